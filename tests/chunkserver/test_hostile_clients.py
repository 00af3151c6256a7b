"""Hostile clients against a real spy_server.py: lying length fields, pipelined garbage,
clients that vanish mid-request, slow-loris trickles and 1,000 slow connections.

After every scenario the server must still be up with the same workers, every pool block
free again and a normal WRITE + READ served. The pace rule under test (worker.py): from
the first byte of a request, no wait for more bytes may pass SPEEDY_STALL_TIMEOUT and,
after that many seconds, the request must average SPEEDY_MIN_RATE bytes/s.

    python -m pytest -m slow -s tests/test_hostile_clients.py   # 1,000 x 3 s trickles, 30 s idle
"""
from __future__ import annotations

import itertools
import os
import resource
import selectors
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

import pytest

from tests.support import wait_for
from tests.support.server import (pool_in_use, worker_pids, Client, ServerProc, payload, running_server)
from speedy.wire.protocol import (OPCODES, Err, Op, decode_detail_info,
                             encode_file_key, encode_request)

MiB = 1 << 20
IDLE = 2.0
MIN_RATE = 2000
FIDS = itertools.count(50_000)
HEADER = struct.Struct(">BI")
U32_MAX = 0xFFFFFFFF




def conn_count(srv: ServerProc) -> int:
    with srv.client() as c:
        return decode_detail_info(c.call(Op.QUERY_DETAIL_INFOS)[1]).conn_count


def check_healthy(srv: ServerProc, workers: set[int]) -> None:
    """Up, same workers, all pool blocks free, no stray connections, write + read served."""
    assert srv.proc.poll() is None, srv.log()[-2000:]
    wait_for(lambda: pool_in_use(srv) == 0, timeout=15)
    wait_for(lambda: conn_count(srv) == 1, timeout=15)  # only the asking connection
    assert worker_pids(srv) == workers
    fid = next(FIDS)
    with srv.client(timeout=10) as c:
        assert c.write(fid, payload(fid, 3000)) == Err.SUCCESS
        assert c.read(fid) == (Err.SUCCESS, payload(fid, 3000))
    assert "Traceback" not in srv.log()


def stop_cleanly(srv: ServerProc) -> None:
    """After all that, SIGTERM still stops the server with exit code 0 and no segments left."""
    assert srv.stop() == 0, srv.log()[-2000:]
    assert srv.shm_segments() == []


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    env = {"SPEEDY_STALL_TIMEOUT": str(IDLE), "SPEEDY_MIN_RATE": str(MIN_RATE)}
    with running_server(tmp_path_factory.mktemp("hostile"), workers=2, chunk_size=16 * MiB,
                        chunks=2, mem_blocks=16, env=env) as s:
        s.workers = worker_pids(s)
        yield s
        stop_cleanly(s)


@pytest.fixture(autouse=True)
def healthy_after(request):
    """Every test that uses srv leaves it healthy."""
    yield
    if "srv" in request.fixturenames:
        srv = request.getfixturevalue("srv")
        check_healthy(srv, srv.workers)


def raw(srv: ServerProc, timeout: float = 10.0) -> Client:
    return srv.client(timeout=timeout)


def responses_until_close(c: Client, timeout: float) -> list[tuple[int, int, bytes]]:
    """Every response the server sends until it closes; AssertionError if it never does."""
    got = []
    c.sock.settimeout(timeout)
    try:
        while True:
            got.append(c.response())
    except (EOFError, ConnectionResetError):
        return got
    except socket.timeout:
        raise AssertionError(f"no close after {timeout}s; responses so far {got}") from None


# ---------------------------------------------------------------- hostile length fields
@pytest.mark.parametrize("op", [Op.WRITE, Op.READ, Op.DELETE, Op.SET_STATUS])
def test_zero_body_len_where_a_body_is_needed(srv, op):
    with raw(srv) as c:
        assert c.call(op) == (Err.INTERNAL_ERROR, b"")
        assert c.ping() == Err.SUCCESS


@pytest.mark.parametrize("op", sorted(OPCODES) + [7, 200])
def test_body_len_u32_max_gets_error_then_close(srv, op):
    """2^32-1: an error answer (never a 4 GiB allocation) and, with no body coming, a close."""
    with raw(srv) as c:
        frame = HEADER.pack(op, U32_MAX)
        if op == Op.WRITE:
            frame += encode_file_key(1, next(FIDS)) + b"x" * 100
        c.sock.sendall(frame)
        got = responses_until_close(c, timeout=4 * IDLE + 5)
    if op in OPCODES:
        expect = Err.CHUNK_UNAVAILABLE if op == Op.WRITE else Err.INTERNAL_ERROR
        assert got == [(op, expect, b"")]
    else:
        assert got == []


def test_body_len_shorter_than_what_follows(srv):
    """The extra bytes are the next request: here garbage with an unknown opcode."""
    fid = next(FIDS)
    with raw(srv) as c:
        body = encode_file_key(1, fid) + b"hello"
        c.sock.sendall(HEADER.pack(Op.WRITE, len(body) - 3) + body + b"\xee" * 20)
        got = responses_until_close(c, timeout=5)
    assert got == [(Op.WRITE, Err.SUCCESS, b"")]
    with raw(srv) as c:
        assert c.read(fid) == (Err.SUCCESS, b"he")  # what body_len covered, nothing more


def test_read_body_len_shorter_runs_into_next_request(srv):
    with raw(srv) as c:
        key = encode_file_key(1, next(FIDS))
        c.sock.sendall(HEADER.pack(Op.READ, 10) + key + b"\x0a\x00\x00\x00\x00" + b"\xfe")
        got = responses_until_close(c, timeout=5)
    assert got == [(Op.READ, Err.FILE_NOT_FOUND, b""), (Op.PING, Err.SUCCESS, b"")]


@pytest.mark.parametrize("then", ["wait", "half_close"])
def test_body_len_longer_than_what_follows(srv, then):
    """A WRITE that announces more than it sends: dropped, nothing stored, blocks freed."""
    fid = next(FIDS)
    with raw(srv) as c:
        c.sock.sendall(HEADER.pack(Op.WRITE, 10 + 2 * MiB) + encode_file_key(1, fid)
                       + b"\x05" * (MiB + 20000))  # blocks for what was sent
        wait_for(lambda: pool_in_use(srv) == 2, timeout=10)
        if then == "half_close":
            c.sock.shutdown(socket.SHUT_WR)
        t0 = time.monotonic()
        assert responses_until_close(c, timeout=4 * IDLE + 5) == []
        print(f"\n{then}: closed after {time.monotonic() - t0:.2f}s")
    with raw(srv) as c:
        assert c.read(fid)[0] == Err.FILE_NOT_FOUND


# ---------------------------------------------------------------- pipelined garbage
def test_pipelined_garbage_after_valid_requests(srv):
    fid = next(FIDS)
    frames = (encode_request(Op.WRITE, encode_file_key(1, fid) + b"valid")
              + encode_request(Op.READ, encode_file_key(1, fid)) + encode_request(Op.PING))
    garbage = b"\xc3" + os.urandom(300)
    with raw(srv) as c:
        c.sock.sendall(frames + garbage)
        got = responses_until_close(c, timeout=5)
    assert got == [(Op.WRITE, Err.SUCCESS, b""), (Op.READ, Err.SUCCESS, b"valid"),
                   (Op.PING, Err.SUCCESS, b"")]


def test_pipelined_bad_bodies_answered_in_order(srv):
    """Malformed but framed requests each get an error; the stream stays in step."""
    fid = next(FIDS)
    frames = [encode_request(Op.READ, b"\x00"), encode_request(Op.WRITE, b"short"),
              encode_request(Op.SET_STATUS, b"\x09"), encode_request(Op.DELETE, b"x" * 30),
              encode_request(Op.WRITE, encode_file_key(1, fid) + b"ok"),
              encode_request(Op.READ, encode_file_key(1, fid)), b"\xff\x00\x00\x00\x00"]
    with raw(srv) as c:
        c.sock.sendall(b"".join(frames))
        got = responses_until_close(c, timeout=5)
    assert got == [(Op.READ, Err.INTERNAL_ERROR, b""), (Op.WRITE, Err.INTERNAL_ERROR, b""),
                   (Op.SET_STATUS, Err.INTERNAL_ERROR, b""), (Op.DELETE, Err.INTERNAL_ERROR, b""),
                   (Op.WRITE, Err.SUCCESS, b""), (Op.READ, Err.SUCCESS, b"ok")]


# ---------------------------------------------------------------- clients that vanish
def test_many_clients_vanish_mid_header_and_mid_body(srv):
    """300 clients cut a WRITE frame anywhere (header, key, body) and close or reset."""
    fids = []
    cuts = [1, 3, 4, 5, 7, 14, 15, 1000, 100_000, MiB + 15, 2 * MiB]
    for i in range(300):
        fid = next(FIDS)
        fids.append(fid)
        frame_head = HEADER.pack(Op.WRITE, 10 + 3 * MiB) + encode_file_key(1, fid)
        cut = cuts[i % len(cuts)]
        s = socket.create_connection(("127.0.0.1", srv.port), timeout=10)
        try:
            if i % 2:  # RST instead of FIN
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            data = frame_head[:cut]
            if cut > len(frame_head):
                data = frame_head + b"\x07" * (cut - len(frame_head))
            s.sendall(data)
        except OSError:
            pass  # the server may already have answered REACH_MEMORY_LIMIT and moved on
        finally:
            s.close()
    with raw(srv) as c:
        for fid in fids[::10]:
            assert c.read(fid)[0] == Err.FILE_NOT_FOUND


# ---------------------------------------------------------------- slow-loris
def trickle_until_closed(sock: socket.socket, data: bytes, interval: float,
                         limit: float) -> float | None:
    """Send data one byte per interval; seconds until the server closed, None if it never did."""
    sel = selectors.DefaultSelector()
    sel.register(sock, selectors.EVENT_READ)
    t0 = time.monotonic()
    try:
        for i in range(len(data)):
            if time.monotonic() - t0 > limit:
                return None
            try:
                sock.sendall(data[i:i + 1])
            except OSError:
                return time.monotonic() - t0
            for _key, _ev in sel.select(timeout=interval):
                try:
                    if sock.recv(1 << 16) == b"":
                        return time.monotonic() - t0
                except OSError:
                    return time.monotonic() - t0
        return None
    finally:
        sel.close()


@pytest.mark.parametrize("what", ["write_body", "header_and_key"])
def test_slow_loris_is_dropped_by_the_pace_rule(srv, what):
    """One byte every 0.7 s never trips the 2 s no-progress rule, but is far under the pace."""
    fid = next(FIDS)
    with raw(srv) as c:
        if what == "write_body":
            c.sock.sendall(HEADER.pack(Op.WRITE, 10 + 3 * MiB) + encode_file_key(1, fid))
            assert pool_in_use(srv) == 0  # nothing of the body sent: no block claimed
            data = b"\x01" * 100
        else:
            data = HEADER.pack(Op.READ, 10) + encode_file_key(1, fid)
        took = trickle_until_closed(c.sock, data, interval=0.7, limit=6 * IDLE + 10)
    print(f"\nslow-loris {what}: dropped after {took}s")
    assert took is not None, "a trickling client was never dropped"
    with raw(srv) as c:
        assert c.read(fid)[0] == Err.FILE_NOT_FOUND


def test_slow_but_steady_upload_is_served(srv):
    """Above the minimum rate a WRITE may take longer than the idle timeout and succeed."""
    fid = next(FIDS)
    data = payload(fid, 24_000)
    with raw(srv) as c:
        c.sock.sendall(HEADER.pack(Op.WRITE, 10 + len(data)) + encode_file_key(1, fid))
        t0 = time.monotonic()
        for at in range(0, len(data), 800):  # about 8 KB/s, 4x the minimum rate
            c.sock.sendall(data[at:at + 800])
            time.sleep(0.1)
        assert c.response() == (Op.WRITE, Err.SUCCESS, b"")
        took = time.monotonic() - t0
        assert took > IDLE  # longer than the no-progress limit, as meant
        assert c.read(fid) == (Err.SUCCESS, data)


# ---------------------------------------------------------------- many slow connections
@dataclass
class SlowCrowd:
    """Many sockets, each with the rest of a request to trickle, one byte at a time."""

    socks: list[socket.socket] = field(default_factory=list)
    rest: list[bytes] = field(default_factory=list)
    closed_at: dict[int, float] = field(default_factory=dict)

    def open(self, port: int, n: int, writes: int) -> None:
        """n connections: `writes` partial WRITE bodies (16 KiB sent: a block each), the rest
        partial READ headers and partial DUMP_CHUNK names (too long to finish in the grace)."""
        for i in range(n):
            s = socket.create_connection(("127.0.0.1", port), timeout=10)
            s.setblocking(False)
            key = encode_file_key(1, 900_000 + i)
            if i < writes:
                frame = HEADER.pack(Op.WRITE, 10 + MiB) + key + b"\x03" * 16384
                first, rest = frame, b"\x03" * 1000
            elif i % 2:
                frame = HEADER.pack(Op.READ, 10) + key
                first, rest = frame[:2], frame[2:]
            else:
                frame = HEADER.pack(Op.DUMP_CHUNK, 31) + b"chunk_1_1.chunk".ljust(31, b"x")
                first, rest = frame[:7], frame[7:]
            s.send(first)
            self.socks.append(s)
            self.rest.append(rest)

    def step(self, t: float) -> None:
        """One byte on every open socket; note the ones the server closed."""
        for i, s in enumerate(self.socks):
            if i in self.closed_at:
                continue
            try:
                got = s.recv(4096)
            except BlockingIOError:
                got = None
            except OSError:
                got = b""
            if got == b"":
                self.closed_at[i] = t
                continue
            if self.rest[i]:
                try:
                    s.send(self.rest[i][:1])
                    self.rest[i] = self.rest[i][1:]
                except OSError:
                    self.closed_at[i] = t

    def close(self) -> None:
        for s in self.socks:
            s.close()


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def open_files_limit(pid: int) -> int:
    """The soft RLIMIT_NOFILE of a process, from /proc."""
    with open(f"/proc/{pid}/limits") as f:
        for line in f:
            if line.startswith("Max open files"):
                soft = line.split()[3]
                return 1 << 62 if soft == "unlimited" else int(soft)
    raise AssertionError("no open files limit in /proc")


def crowd_scenario(srv: ServerProc, n: int, writes: int, interval: float,
                   limit: float) -> None:
    """n slow connections trickling while a normal client writes and reads; all dropped."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < n + 256:
        if hard != resource.RLIM_INFINITY and hard < n + 256:
            pytest.skip(f"RLIMIT_NOFILE hard limit {hard} is too low for {n} connections")
        resource.setrlimit(resource.RLIMIT_NOFILE, (n + 1024, hard))
    for pid in worker_pids(srv):  # the supervisor raises its soft limit to the hard one
        assert open_files_limit(pid) >= n + 64, "workers cannot hold the connections"
    crowd = SlowCrowd()
    latencies: list[float] = []
    errors: list[str] = []
    stop = threading.Event()

    def normal_client() -> None:
        try:
            with srv.client(timeout=30) as c:
                while not stop.is_set():
                    fid = next(FIDS)
                    data = payload(fid, 1024)
                    t0 = time.monotonic()
                    err = c.write(fid, data)
                    got = c.read(fid)
                    latencies.append(time.monotonic() - t0)
                    if err != Err.SUCCESS or got != (Err.SUCCESS, data):
                        errors.append(f"fid {fid}: write {err}, read {got[0]}")
                    time.sleep(0.02)
        except Exception as e:  # noqa: BLE001 - reported by the test
            errors.append(repr(e))

    t_start = time.monotonic()
    try:
        crowd.open(srv.port, n, writes)
        opened = time.monotonic() - t_start
        wait_for(lambda: conn_count(srv) >= n, timeout=30)
        wait_for(lambda: pool_in_use(srv) == writes, timeout=10)
        worker = threading.Thread(target=normal_client)
        worker.start()
        try:
            while len(crowd.closed_at) < n and time.monotonic() - t_start < limit:
                crowd.step(time.monotonic() - t_start)
                time.sleep(interval)
        finally:
            stop.set()
            worker.join(60)
    finally:
        crowd.close()
    closed = sorted(crowd.closed_at.values())
    print(f"\n{n} slow connections (opened in {opened:.2f}s, {writes} pinning a block): "
          f"dropped {len(closed)}, first at {closed[0] if closed else 0:.1f}s, last at "
          f"{closed[-1] if closed else 0:.1f}s; normal client {len(latencies)} write+read: "
          f"p50 {percentile(latencies, .5) * 1e3:.1f} ms, p99 "
          f"{percentile(latencies, .99) * 1e3:.1f} ms, max {max(latencies) * 1e3:.1f} ms")
    assert not errors, errors[:5]
    assert len(closed) == n, f"only {len(closed)} of {n} slow connections dropped"
    assert len(latencies) > 10
    assert max(latencies) < 5.0, "the normal client starved"


def test_thousand_slow_connections_normal_client_still_served(tmp_path):
    env = {"SPEEDY_STALL_TIMEOUT": "3", "SPEEDY_MIN_RATE": "1000"}
    with running_server(tmp_path, workers=2, chunk_size=16 * MiB, chunks=2, mem_blocks=64,
                        max_conns_per_ip=5000, mem_blocks_per_ip=64, env=env) as srv:
        workers = worker_pids(srv)
        crowd_scenario(srv, n=1000, writes=48, interval=1.0, limit=30)
        check_healthy(srv, workers)
        stop_cleanly(srv)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_thousand_slow_connections_default_timeouts(tmp_path):
    """The issue's scenario with the shipped limits: a byte every 3 s, 30 s, 16 KiB/s."""
    n = int(os.environ.get("SPEEDY_SLOW_CONNS", "1000"))
    with running_server(tmp_path, workers=2, chunk_size=16 * MiB, chunks=2,
                        mem_blocks=64, max_conns_per_ip=n + 1000, mem_blocks_per_ip=64) as srv:
        workers = worker_pids(srv)
        crowd_scenario(srv, n=n, writes=48, interval=3.0, limit=120)
        check_healthy(srv, workers)
        stop_cleanly(srv)
