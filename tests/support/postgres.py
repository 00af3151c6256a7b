"""A private PostgreSQL instance for tests: initdb + pg_ctl in a temporary directory.

    with PostgresInstance() as pg:          # SkipReason when the binaries are missing
        url = pg.new_database()             # postgresql://postgres@127.0.0.1:PORT/test_1

Run as root, the server runs as the `postgres` user (it refuses root); the data
directory is private to the instance and removed at stop.
"""
from __future__ import annotations

import atexit
import glob
import itertools
import os
import pwd
import shutil
import subprocess
import tempfile

from tests.support import Started, free_port, wait_port


class PostgresUnavailable(Exception):
    """No PostgreSQL server binaries on this machine (the reason says what is missing)."""


def find_bindir() -> str:
    """The newest /usr/lib/postgresql/*/bin with initdb and pg_ctl (or on PATH)."""
    dirs = sorted(glob.glob("/usr/lib/postgresql/*/bin"),
                  key=lambda d: int(d.split("/")[-2]) if d.split("/")[-2].isdigit() else 0)
    for d in reversed(dirs):
        if os.access(os.path.join(d, "initdb"), os.X_OK) and \
                os.access(os.path.join(d, "pg_ctl"), os.X_OK):
            return d
    initdb = shutil.which("initdb")
    if initdb and shutil.which("pg_ctl"):
        return os.path.dirname(initdb)
    raise PostgresUnavailable("PostgreSQL server binaries (initdb, pg_ctl) not found in "
                              "/usr/lib/postgresql/*/bin or PATH: apt-get install postgresql")


class PostgresInstance(Started):
    """One postgres server on 127.0.0.1:<free port>, trust authentication, user postgres."""

    def __init__(self) -> None:
        self.bindir = find_bindir()
        self.port = free_port()
        # as root, in /tmp: the postgres user must reach it (a root-only TMPDIR would not do)
        self.root = tempfile.mkdtemp(prefix="speedy-pg-",
                                     dir="/tmp" if os.geteuid() == 0 else None)
        self.data = os.path.join(self.root, "data")
        self.log = os.path.join(self.root, "server.log")
        self.user: str | None = None
        if os.geteuid() == 0:
            try:
                pw = pwd.getpwnam("postgres")
            except KeyError:
                raise PostgresUnavailable("running as root and no `postgres` user to run "
                                          "the server as") from None
            self.user = "postgres"
            os.chown(self.root, pw.pw_uid, pw.pw_gid)
        os.chmod(self.root, 0o700)
        self._names = itertools.count(1)
        self.started = False

    def _run(self, *args: str, timeout: float = 60.0) -> subprocess.CompletedProcess:
        cmd = list(args)
        if self.user:
            cmd = ["runuser", "-u", self.user, "--"] + cmd
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                           cwd=self.root)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(args[:2])} failed ({r.returncode}): "
                               f"{(r.stderr or r.stdout).strip()[-500:]}")
        return r

    def start(self) -> "PostgresInstance":
        """initdb and start the server; wait until it accepts connections."""
        self._run(os.path.join(self.bindir, "initdb"), "-D", self.data, "-U", "postgres",
                  "--auth=trust", "-E", "UTF8", "--locale=C.UTF-8", "--no-sync")
        opts = (f"-c listen_addresses=127.0.0.1 -c port={self.port} "
                f"-c unix_socket_directories={self.root} -c fsync=off "
                "-c synchronous_commit=off -c full_page_writes=off -c max_connections=50")
        self.started = True
        atexit.register(self.stop)      # even when the test session dies
        self._run(os.path.join(self.bindir, "pg_ctl"), "-D", self.data, "-l", self.log,
                  "-o", opts, "-w", "-t", "60", "start")
        wait_port(self.port, 30.0)
        return self

    def url(self, dbname: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def new_database(self) -> str:
        """A fresh, empty database; its URL."""
        import psycopg
        name = f"test_{next(self._names)}"
        with psycopg.connect(self.url(), autocommit=True, connect_timeout=10) as c:
            c.execute(f"CREATE DATABASE {name}")
        return self.url(name)

    def stop(self) -> None:
        """Stop the server (fast, then immediate) and remove its directory."""
        if self.started:
            ctl = os.path.join(self.bindir, "pg_ctl")
            try:
                self._run(ctl, "-D", self.data, "-m", "fast", "-w", "-t", "20", "stop")
            except (RuntimeError, subprocess.TimeoutExpired):
                try:
                    self._run(ctl, "-D", self.data, "-m", "immediate", "-w", "stop")
                except (RuntimeError, subprocess.TimeoutExpired):
                    pass
            self.started = False
        shutil.rmtree(self.root, ignore_errors=True)

