"""Test helpers: a real spy_server.py process under tmp_path, and a tiny blocking client."""
from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
from dataclasses import dataclass, field

import pytest

from tests.support import PYTHON, ROOT, free_port
from tests.support.daemon import children_of, exited, spawn, stop_session, wait_ready

from speedy.chunkserver.shm.pool import BlockPool
from speedy.chunkserver.shm.segments import server_prefix, unlink_prefix
from speedy.wire.protocol import REQUEST_HEADER, RESPONSE_HEADER, Err, Op, encode_file_key

SPY_SERVER = os.path.join(ROOT, "spy_server.py")
DEFAULTS = {"chunk_size": 4 << 20, "chunks": 2, "mem_blocks": 8, "workers": 1,
            "group_id": 1, "master_ip": "127.0.0.1", "master_port": 1,
            "report_interval": 60}


class Client:
    """A blocking protocol client: one connection, one request at a time (or pipelined)."""

    def __init__(self, port: int, host: str = "127.0.0.1", timeout: float = 30.0) -> None:
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def send(self, op: int, body: bytes = b"") -> None:
        """Send one request frame."""
        self.sock.sendall(REQUEST_HEADER.pack(op, len(body)) + body)

    def recv_exact(self, n: int) -> bytes:
        """n bytes; EOFError if the server closes first."""
        parts, got = [], 0
        while got < n:
            data = self.sock.recv(min(n - got, 1 << 20))
            if not data:
                raise EOFError(f"connection closed after {got} of {n} bytes")
            parts.append(data)
            got += len(data)
        return b"".join(parts)

    def response(self) -> tuple[int, int, bytes]:
        """(opcode, error, body) of the next response."""
        op, err, n = RESPONSE_HEADER.unpack(self.recv_exact(6))
        return op, err, self.recv_exact(n)

    def call(self, op: int, body: bytes = b"") -> tuple[int, bytes]:
        """Send one request, return (error, body) of its response."""
        self.send(op, body)
        rop, err, rbody = self.response()
        assert rop == op, f"response opcode {rop} for request {op}"
        return err, rbody

    def write(self, fid: int, data: bytes, group: int = 1) -> int:
        return self.call(Op.WRITE, encode_file_key(group, fid) + data)[0]

    def read(self, fid: int, group: int = 1) -> tuple[int, bytes]:
        return self.call(Op.READ, encode_file_key(group, fid))

    def delete(self, fid: int, group: int = 1) -> int:
        return self.call(Op.DELETE, encode_file_key(group, fid))[0]

    def ping(self) -> int:
        return self.call(Op.PING)[0]

    def closed(self, timeout: float = 5.0) -> bool:
        """True if the server closed the connection (EOF or reset) within timeout."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False


@dataclass
class ServerProc:
    """One spy_server.py process; start() waits until it answers PING."""

    data_dir: str
    log_path: str
    flags: dict = field(default_factory=dict)
    env: dict = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen | None = None

    def argv(self) -> list[str]:
        flags = {**DEFAULTS, **self.flags, "data_dir": self.data_dir, "port": self.port,
                 "error_log": self.log_path}
        return [PYTHON, SPY_SERVER] + [f"--{k}={v}" for k, v in flags.items()]

    @property
    def out_path(self) -> str:
        """Where the process's stdout and stderr go."""
        return self.log_path + ".out"

    def start(self, timeout: float = 30.0) -> "ServerProc":
        """Spawn it (its own session) and wait until it answers PING."""
        if not self.port:
            self.port = free_port()
        os.makedirs(self.data_dir, exist_ok=True)
        self.proc = spawn(self.argv(), self.out_path, env=self.env)
        self.wait_serving(timeout)
        return self

    def serving(self) -> bool:
        """It answers PING now."""
        with Client(self.port, timeout=2) as c:
            return c.ping() == Err.SUCCESS

    def wait_serving(self, timeout: float = 30.0) -> None:
        """Wait until it answers PING; DaemonExited (with its output and log) if it exits."""
        wait_ready(self.serving, timeout, f"spy_server on port {self.port}",
                   exited(self.proc, "spy_server", self.out_path, self.log_path))

    @property
    def pid(self) -> int:
        return self.proc.pid

    def client(self, timeout: float = 30.0) -> Client:
        return Client(self.port, timeout=timeout)

    def log(self) -> str:
        try:
            with open(self.log_path, encoding="utf-8", errors="replace") as f:
                return f.read()
        except FileNotFoundError:
            return ""

    def children(self) -> dict[int, str]:
        """{pid: comm} of the supervisor's child processes."""
        return children_of(self.pid)

    def signal(self, sig: int) -> None:
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 60.0) -> int:
        return self.proc.wait(timeout)

    def stop(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait; kill the whole group if it does not stop."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else 0
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill9()
            raise

    def kill9(self) -> None:
        """kill -9 of every process of the server (its session)."""
        stop_session(self.proc)

    def discard(self) -> None:
        """kill -9, then remove the shared memory a killed server leaves (end of a test)."""
        self.kill9()
        if self.proc is not None:
            discard_shm(self.pid)

    def shm_segments(self) -> list[str]:
        """This server's shared memory segments still in /dev/shm."""
        prefix = f"speedy{self.pid}_"
        return [n for n in os.listdir("/dev/shm") if n.startswith(prefix)]


def discard_shm(pid: int) -> None:
    """Remove the shared memory segments of the server whose supervisor was pid (killed)."""
    unlink_prefix(server_prefix(pid))


def make_server(base_dir, name: str = "srv", **flags) -> ServerProc:
    """A server (not started) with data in base_dir/name/data; env vars via env={...}."""
    env = flags.pop("env", {})
    base = os.path.join(str(base_dir), name)
    os.makedirs(base, exist_ok=True)
    return ServerProc(os.path.join(base, "data"), os.path.join(base, "server.log"), flags, env)



def worker_pids(srv: ServerProc) -> set[int]:
    """The pids of the server's worker processes."""
    return {pid for pid, comm in srv.children().items() if comm.startswith("spy_worker")}


def pool_in_use(srv: ServerProc) -> int:
    """Pool blocks in use now."""
    pool = BlockPool.attach(f"speedy{srv.pid}_pool")
    try:
        return pool.in_use()
    finally:
        pool.close()


@contextlib.contextmanager
def running_server(base_dir, name: str = "srv", **flags):
    """A started server, killed for sure (kill -9 of its session) on the way out."""
    srv = make_server(base_dir, name, **flags)
    try:
        yield srv.start()
    finally:
        srv.discard()


@pytest.fixture
def servers(tmp_path):
    """Factory fixture: servers(name, **flags) -> started ServerProc; all killed at the end."""
    made: list[ServerProc] = []

    def start(name: str = "srv", **flags) -> ServerProc:
        srv = make_server(tmp_path, name, **flags)
        made.append(srv)
        return srv.start()

    yield start
    for srv in made:
        srv.discard()


def payload(fid: int, size: int) -> bytes:
    """Deterministic test data (the vectors' pattern)."""
    pattern = bytes((fid * 31 + i) % 251 for i in range(251))
    return (pattern * (size // 251 + 1))[:size]
