"""A real gateway process in front of a tests.support.cluster Cluster, and HTTP helpers.

    with Cluster(tmp_path, groups=1, per_group=2) as c, Gateway(c, tmp_path) as gw:
        status, headers, body = gw.request("GET", "/3,10452")

or a module-scoped fixture `gateway_fixture(cluster_name="cluster", **kw)`. The gateway
runs in its own process group; stop() kills it for sure (SIGTERM, then SIGKILL).
"""
from __future__ import annotations

import http.client
import os
import re
import signal
import socket
import subprocess

import pytest

from tests.support import PYTHON, Started, free_port
from tests.support.cluster import Cluster
from tests.support.daemon import exited, session_pids, spawn, stop_session, tail, wait_ready

GATEWAY_MODULE = ["-m", "speedy", "gateway"]
ACCESS_LINE = re.compile(   # one line of --access_log: Combined Log Format and seconds
    r'(?P<addr>\S+) - - \[(?P<time>\d\d/[A-Z][a-z]{2}/\d{4}:\d\d:\d\d:\d\d \+0000)\] '
    r'"(?P<request>[^"]*)" (?P<status>\d{3}) (?P<sent>\d+) "(?P<referer>[^"]*)" '
    r'"(?P<agent>[^"]*)" (?P<seconds>\d+\.\d{6})')


def access_lines(path: str) -> list[dict]:
    """The parsed lines of an access log (AssertionError on a malformed one)."""
    if not os.path.exists(path):
        return []
    out = []
    with open(path, "rb") as f:
        for raw in f.read().decode("ascii").splitlines():
            m = ACCESS_LINE.fullmatch(raw)
            assert m, f"malformed access log line {raw!r}"
            out.append(m.groupdict())
    return out


class Gateway(Started):
    """`python -m speedy gateway` on a free port, talking to cluster's master."""

    def __init__(self, cluster: Cluster | None, root, workers: int = 1,
                 master: str | None = None, extra: list[str] | None = None,
                 metadb: str | None = None):
        self.root = os.path.join(str(root), f"gateway-{free_port()}")
        os.makedirs(self.root, exist_ok=True)
        self.port = free_port()
        self.log = os.path.join(self.root, "gateway.log")
        self.stdout = os.path.join(self.root, "stdout.log")
        master = master or cluster.master_addr
        self.metadb = metadb or "sqlite:///" + os.path.join(self.root, "gateway.db")
        self.cmd = [PYTHON, *GATEWAY_MODULE, "--ip=127.0.0.1", f"--port={self.port}",
                    f"--master={master}", f"--metadb={self.metadb}",
                    f"--workers={workers}", f"--error_log={self.log}", "--timeout=5"]
        if cluster is not None and cluster.token:
            self.cmd.append(f"--token={cluster.token}")
        self.cmd += extra or []
        self.proc: subprocess.Popen | None = None

    @property
    def addr(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, timeout: float = 30.0) -> None:
        """Start the gateway and wait until it accepts connections."""
        self.proc = spawn(self.cmd, self.stdout, cwd=self.root)  # every option is a flag
        wait_ready(self.answers, timeout, "the gateway",
                   exited(self.proc, "the gateway", self.log, self.stdout))

    def answers(self) -> bool:
        """True when a worker answers HTTP (the supervisor binds before they serve)."""
        try:
            return self.request("GET", "/metrics")[0] == 200
        except (OSError, http.client.HTTPException):
            return False

    def tail(self) -> str:
        """The ends of the gateway's log and output."""
        return tail(self.log, 1000) + " || " + tail(self.stdout, 1000)

    def stop(self) -> None:
        """Stop the gateway (SIGTERM, then SIGKILL) and every process of its session."""
        stop_session(self.proc, signal.SIGTERM, grace=25.0)

    def worker_pids(self) -> list[int]:
        """The worker processes (the supervisor's session but the supervisor)."""
        return [p for p in session_pids(self.proc.pid) if p != self.proc.pid] \
            if self.proc else []

    def conn(self, timeout: float = 30.0) -> http.client.HTTPConnection:
        """A keep-alive HTTP connection to the gateway."""
        return http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)

    def exchange(self, data: bytes, half_close: bool = True, timeout: float = 20.0) -> bytes:
        """Send raw bytes on a new connection (then close it for writing, when half_close);
        everything the gateway answers until it closes (AssertionError if it does not)."""
        with socket.create_connection(("127.0.0.1", self.port), timeout=timeout) as s:
            try:
                s.sendall(data)
                if half_close:
                    s.shutdown(socket.SHUT_WR)
            except OSError:
                pass   # the gateway may answer and close before it took everything
            out = b""
            while True:
                try:
                    got = s.recv(65536)
                except ConnectionResetError:
                    return out
                except socket.timeout:
                    raise AssertionError(f"no end of the answer within {timeout:g} s to "
                                         f"{data[:300]!r}") from None
                if not got:
                    return out
                out += got

    def request(self, method: str, path: str, body: bytes | None = None,
                headers: dict | None = None) -> tuple[int, dict[str, str], bytes]:
        """One request on a new connection: (status, lower-case headers, body)."""
        c = self.conn()
        try:
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            data = r.read()
            return r.status, {k.lower(): v for k, v in r.getheaders()}, data
        finally:
            c.close()


def gateway_fixture(cluster_name: str = "cluster", scope: str = "module", **kw):
    """A pytest fixture yielding a started Gateway in front of fixture `cluster_name`."""
    @pytest.fixture(scope=scope)
    def gateway(request, tmp_path_factory):
        cluster = request.getfixturevalue(cluster_name)
        with Gateway(cluster, tmp_path_factory.mktemp("gateway"), **kw) as gw:
            yield gw
    return gateway
