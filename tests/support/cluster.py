"""A real speedy cluster for tests: a master and N groups of M chunkservers on loopback.

    with Cluster(tmp_path, groups=2, per_group=3) as c:
        client = c.client()
        ...

or, in a test module, a module-scoped fixture named `cluster`:

    cluster = cluster_fixture(groups=1, per_group=3, heartbeat_timeout=4.0)

or the `clusters` fixture (tests/conftest.py): clusters(groups=1, per_group=2) -> a
started Cluster under tmp_path, stopped at the end of the test.

Every daemon runs in its own session under tmp_path (tests/support/daemon.py); stop()
(also at exit of the with block, at interpreter exit, and when start() fails) kills
every process of every session for sure: SIGTERM, then SIGKILL.
"""
from __future__ import annotations

import atexit
import hashlib
import os
import signal
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from tests.support import PYTHON, ROOT, Started, free_port
from tests.support.daemon import listening, spawn, stop_session, tail, wait_ready
from tests.support.server import discard_shm
from speedy.cli import local
from speedy.client.chunkconn import ConnPool, Reply
from speedy.client import RW, Client, Master

LIVE: set["Cluster"] = set()


@dataclass
class Daemon:
    """One started process."""

    name: str
    port: int
    cmd: list[str]
    log: str
    group: int = 0
    proc: subprocess.Popen | None = field(default=None, repr=False)
    expected: bool = False  # False once a test killed it on purpose

    @property
    def addr(self) -> tuple[str, int]:
        return "127.0.0.1", self.port

    @property
    def name_addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None


class Cluster(Started):
    """A master plus groups of chunkservers, started and killed for real."""

    def __init__(self, root, groups: int = 2, per_group: int = 3,
                 heartbeat_timeout: float = 30.0, monitor_interval: float = 0.5,
                 report_interval: float = 0.5, chunks: int = 2, chunk_size: int = 4 << 20,
                 mem_blocks: int = 16, workers: int = 1, token: str = ""):
        self.root = str(root)
        self.token = token
        mdir = os.path.join(self.root, "master")
        os.makedirs(mdir, exist_ok=True)
        port = free_port()
        cmd = local.master_cmd(port, os.path.join(mdir, "master.db"),
                               os.path.join(mdir, "master.log"), heartbeat_timeout,
                               monitor_interval, python=PYTHON)
        if token:
            cmd.append(f"--token={token}")
        self.master = Daemon("master", port, cmd, os.path.join(mdir, "stdout.log"))
        self.servers: list[Daemon] = []
        used = {port}
        for g in range(1, groups + 1):
            for i in range(per_group):
                sport = free_port()
                while sport in used:
                    sport = free_port()
                used.add(sport)
                name = f"g{g}s{i + 1}"
                sdir = os.path.join(self.root, name)
                os.makedirs(os.path.join(sdir, "data"), exist_ok=True)
                scmd = local.server_cmd(sport, g, os.path.join(sdir, "data"),
                                        os.path.join(sdir, "server.log"), port,
                                        chunks=chunks, chunk_size=chunk_size,
                                        mem_blocks=mem_blocks, workers=workers,
                                        report_interval=report_interval, python=PYTHON)
                if token:
                    scmd.append(f"--token={token}")
                self.servers.append(Daemon(name, sport, scmd,
                                           os.path.join(sdir, "stdout.log"), g))
        self.pool = ConnPool(timeout=10.0)

    # -- life cycle ---------------------------------------------------------------------

    @property
    def master_addr(self) -> str:
        return f"127.0.0.1:{self.master.port}"

    def master_api(self) -> Master:
        return Master(self.master_addr, token=self.token, timeout=5.0)

    def spawn(self, d: Daemon) -> None:
        LIVE.add(self)
        d.proc = spawn(d.cmd, d.log, cwd=self.root)
        d.expected = True

    def start(self, timeout: float = 60.0) -> None:
        """Start the master, register every server, start them, wait until all are RW."""
        self.spawn(self.master)
        self.wait(lambda: listening(self.master.port), timeout, self.master)
        api = self.master_api()
        for d in self.servers:
            api.init_server(d.group, "127.0.0.1", d.port)
        for d in self.servers:
            self.spawn(d)
        self.wait_all_rw(timeout)

    def wait(self, check, timeout: float, d: Daemon | None = None, what: str = "") -> None:
        """Poll check(); fail early with its log when d (or, without d, any daemon) died."""
        def dead() -> str | None:
            for x in ([d] if d else [self.master] + self.servers):
                if x.expected and x.proc is not None and x.proc.poll() is not None:
                    return f"{x.name} exited {x.proc.returncode}: {self.log_tail(x)}"
            return None
        wait_ready(check, timeout, what or (d.name if d else "the cluster"), dead)

    def log_tail(self, d: Daemon, size: int = 1000) -> str:
        return tail(d.log, size) + " || " + tail(
            os.path.join(os.path.dirname(d.log), "server.log"), size)

    def statuses(self) -> dict[tuple[str, int], int]:
        return local.route_statuses(self.master_api())

    def wait_status(self, d: Daemon, status: int | None, timeout: float = 30.0) -> None:
        """Wait until the master's route says status for d (None: not in the route)."""
        self.wait(lambda: self.statuses().get(d.addr) == status, timeout,
                  what=f"{d.name} to be status {status}")

    def wait_all_rw(self, timeout: float = 60.0) -> None:
        """Wait until every running server is RW in the route."""
        want = [d.addr for d in self.servers if d.running()]
        self.wait(lambda: local.all_rw(self.master_api(), want), timeout,
                  what="every chunkserver RW")

    def kill(self, d: Daemon, sig: int = signal.SIGKILL) -> None:
        """Send sig to a daemon's whole session (SIGKILL after 10 s) and reap it."""
        if d.proc is None:
            return
        d.expected = False
        stop_session(d.proc, sig)
        if d is not self.master:
            discard_shm(d.proc.pid)

    def restart(self, d: Daemon, timeout: float = 60.0) -> None:
        """Start a stopped daemon again with the same flags and data; wait until RW."""
        self.kill(d)
        self.spawn(d)
        self.wait(lambda: listening(d.port) and self.pool.ping(d.addr).ok, timeout, d,
                  f"{d.name} to answer PING")
        self.wait(lambda: self.statuses().get(d.addr) == RW, timeout, d,
                  f"{d.name} to come back RW")

    def stop(self) -> None:
        """Stop every daemon's session: SIGTERM, SIGKILL after 10 s."""
        for d in self.servers + [self.master]:
            stop_session(d.proc, signal.SIGTERM)
            if d is not self.master and d.proc is not None:
                discard_shm(d.proc.pid)  # left by a server that had to be killed
        self.pool.close()
        LIVE.discard(self)

    # -- helpers for tests --------------------------------------------------------------

    def client(self, **kw) -> Client:
        kw.setdefault("token", self.token)
        return Client(self.master_addr, **kw)

    def group(self, g: int) -> list[Daemon]:
        return [d for d in self.servers if d.group == g]

    def read_direct(self, d: Daemon, group: int, fid: int) -> Reply:
        """READ a fid from one chunkserver over the raw protocol."""
        return self.pool.read(d.addr, group, fid)

    def cli(self, *args: str, input: bytes | None = None, env: dict | None = None,
            timeout: float = 60.0) -> subprocess.CompletedProcess:
        """Run `python -m speedy --master <this master> args...`."""
        extra = ["--token", self.token] if self.token else []
        return run_cli("--master", self.master_addr, *extra, *args, input=input, env=env,
                       timeout=timeout)


def cluster_fixture(scope: str = "module", **kw):
    """A pytest fixture that yields a started Cluster(tmp dir, **kw) and stops it."""
    @pytest.fixture(scope=scope)
    def cluster(tmp_path_factory):
        with Cluster(tmp_path_factory.mktemp("cluster"), **kw) as c:
            yield c
    return cluster


@pytest.fixture
def clusters(tmp_path):
    """Factory fixture: clusters(name="cluster", **kw) -> a started Cluster under tmp_path;
    every one stopped at the end of the test."""
    made: list[Cluster] = []

    def start(name: str = "cluster", **kw) -> Cluster:
        c = Cluster(tmp_path / name, **kw)
        made.append(c)
        c.__enter__()
        return c

    yield start
    for c in made:
        c.stop()


def _stop_all() -> None:
    for c in list(LIVE):
        c.stop()


atexit.register(_stop_all)


def run_cli(*args: str, input: bytes | None = None, env: dict | None = None,
            cwd: str = ROOT, timeout: float = 60.0) -> subprocess.CompletedProcess:
    """`python -m speedy args...` with no config file or SPEEDY_* from the environment."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("SPEEDY_")}
    full_env.update({"HOME": "/nonexistent", "XDG_CONFIG_HOME": "/nonexistent"})
    full_env.update(env or {})
    full_env.setdefault("PYTHONPATH", ROOT)
    return subprocess.run([sys.executable, "-m", "speedy", *args], input=input,
                          capture_output=True, cwd=cwd, env=full_env, timeout=timeout)


def blob(n: int, seed: int = 0) -> bytes:
    """n deterministic pseudo-random bytes."""
    out = bytearray()
    counter = 0
    while len(out) < n:
        out += hashlib.sha256(f"{seed}:{counter}".encode()).digest()
        counter += 1
    return bytes(out[:n])
