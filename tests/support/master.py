"""Test helper: a real spy_master.py on a free loopback port with a temporary database.

    def test_x(masters, tmp_path):  # the fixture (tests/conftest.py)
        m = masters(tmp_path)         # a started MasterProc

Every process a test starts runs in its own session (tests/support/daemon.py) and is
killed (SIGKILL) in the fixture's finalizer, so a failing test never leaves a master
behind.
"""
from __future__ import annotations

import http.client as httpclient
import json
import os
import signal
import sqlite3
import subprocess
from dataclasses import dataclass
from typing import Any

import pytest

from tests.support import PYTHON, ROOT, free_port
from tests.support.daemon import exited, spawn, stop_session, wait_ready

SPY_MASTER = os.path.join(ROOT, "spy_master.py")
TOKEN_HEADER = "X-Speedy-Token"


@dataclass
class Response:
    """An HTTP answer."""

    status: int
    headers: dict
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def http(port: int, method: str, path: str, body: Any = None, headers: dict | None = None,
         timeout: float = 10.0) -> Response:
    """One request to 127.0.0.1:port; dict/list bodies are sent as JSON."""
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
    elif isinstance(body, str):
        body = body.encode()
    conn = httpclient.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        return Response(r.status, {k.lower(): v for k, v in r.getheaders()}, r.read())
    finally:
        conn.close()


class MasterProc:
    """One spy_master.py process (restartable on the same database and port)."""

    def __init__(self, tmp_path, *extra: str, db: str | None = None, port: int | None = None,
                 heartbeat_timeout: float = 1.0, monitor_interval: float = 0.2,
                 token: str = "") -> None:
        self.tmp_path = tmp_path
        self.db = db or str(tmp_path / "master.db")
        self.port = port or free_port()
        self.log = str(tmp_path / f"master-{self.port}.log")
        self.out = str(tmp_path / f"master-{self.port}.out")
        self.token = token
        self.args = ["--ip=127.0.0.1", f"--port={self.port}", f"--db={self.db}",
                     f"--heartbeat_timeout={heartbeat_timeout}",
                     f"--monitor_interval={monitor_interval}", f"--error_log={self.log}",
                     "--log_level=DEBUG"] + ([f"--token={token}"] if token else []) + list(extra)
        self.proc: subprocess.Popen | None = None
        self.procs: list[subprocess.Popen] = []

    def start(self, wait: bool = True, timeout: float = 20.0) -> "MasterProc":
        """Start the process (its own session) and wait until it answers HTTP."""
        self.proc = spawn([PYTHON, SPY_MASTER] + self.args, self.out, cwd=str(self.tmp_path))
        self.procs.append(self.proc)
        if wait:
            self.wait_ready(timeout)
        return self

    def ready(self) -> bool:
        """GET /v1/chunkserver/checkerror answers now."""
        return http(self.port, "GET", "/v1/chunkserver/checkerror", timeout=2).status == 200

    def wait_ready(self, timeout: float = 20.0) -> None:
        """Wait until it answers HTTP; DaemonExited (with its output and log) if it exits."""
        assert self.proc is not None
        wait_ready(self.ready, timeout, f"spy_master on {self.port}",
                   exited(self.proc, "spy_master", self.out, self.log))

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 20.0) -> int:
        """Send sig and wait for the exit; the return code."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def stop(self) -> int:
        """SIGTERM and wait (graceful stop); the return code."""
        return self.kill(signal.SIGTERM)

    def restart(self, sig: int = signal.SIGKILL) -> "MasterProc":
        """Kill (SIGKILL by default) and start again on the same database and port."""
        self.kill(sig)
        return self.start()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def cleanup(self) -> None:
        """Kill every process this object started (their sessions)."""
        for p in self.procs:
            stop_session(p)

    # -- HTTP -------------------------------------------------------------------------

    def request(self, method: str, path: str, body: Any = None,
                headers: dict | None = None, token: bool = True) -> Response:
        """A request; the token header is added when the master has one (token=True)."""
        headers = dict(headers or {})
        if token and self.token:
            headers.setdefault(TOKEN_HEADER, self.token)
        return http(self.port, method, path, body, headers)

    def get(self, path: str, **kw: Any) -> Response:
        return self.request("GET", path, **kw)

    def post(self, path: str, body: Any = None, **kw: Any) -> Response:
        return self.request("POST", path, body, **kw)

    def register(self, group_id: int, ip: str, port: int) -> None:
        r = self.post("/v1/chunkserver/initserver", {"GroupId": group_id, "Ip": ip, "Port": port})
        assert r.status == 200, r.text

    def report(self, group_id: int, ip: str, port: int, **fields: Any) -> Response:
        body = {"GroupId": group_id, "Ip": ip, "Port": port, "Status": 0,
                "TotalFreeSpace": 1000, "MaxFreeSpace": 500, "PendingWrites": 0,
                "WritingCount": 0, "ReadingCount": 0, "DataDir": "/data", "TotalChunks": 2,
                "ConnectionsCount": 1}
        body.update(fields)
        return self.post("/v1/chunkserver/reportinfo", body)

    def route(self) -> dict:
        r = self.get("/v1/chunkmaster/route")
        assert r.status == 200, r.text
        return r.json()

    def statuses(self) -> dict[tuple[int, str, int], int]:
        """(group, ip, port) -> Status from the route."""
        return {(cs["GroupId"], cs["Ip"], cs["Port"]): cs["Status"]
                for servers in self.route().values() for cs in servers}

    def fid(self) -> tuple[int, int]:
        r = self.get("/v1/chunkmaster/fid")
        assert r.status == 200, r.text
        d = r.json()
        return d["FidBegin"], d["FidEnd"]

    # -- files ------------------------------------------------------------------------

    def ro_db(self) -> sqlite3.Connection:
        """A read-only sqlite3 connection to the database (what an operator would open)."""
        return sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=5)

    def log_text(self) -> str:
        try:
            with open(self.log, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""

    def output(self) -> str:
        try:
            with open(self.out, encoding="utf-8", errors="replace") as f:
                return f.read()
        except OSError:
            return ""


def run_master(args: list[str], cwd: str, timeout: float = 30.0) -> subprocess.CompletedProcess:
    """Run spy_master.py to completion (for start-up failures); stdout+stderr captured."""
    return subprocess.run([PYTHON, SPY_MASTER] + args, cwd=cwd, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture
def masters():
    """A factory of MasterProc objects; every process started is killed at the end."""
    made: list[MasterProc] = []

    def make(tmp_path, *extra: str, start: bool = True, **kw: Any) -> MasterProc:
        m = MasterProc(tmp_path, *extra, **kw)
        made.append(m)
        return m.start() if start else m

    yield make
    for m in made:
        m.cleanup()
