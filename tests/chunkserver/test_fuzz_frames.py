"""Fuzz of the wire protocol (hypothesis): the pure codec, then a real spy_server.py.

Codec: every decode_* either returns a value that encodes back to the same bytes or raises
ProtocolError, nothing else. Server: random bytes and mutated valid frames, each on a fresh
connection closed for writing at the end; the server answers the frames the length fields
delimit, in order, with well-formed responses, then closes (never hangs); afterwards it
still serves, with the same workers and every pool block free.

The default run is short; a measured run:
    SPEEDY_FUZZ_EXAMPLES=50000 python -m pytest -m slow -s -W ignore tests/test_fuzz_frames.py
"""
from __future__ import annotations

import itertools
import os
import socket
import struct
import time
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.support import wait_for
from tests.support.server import pool_in_use, worker_pids, ServerProc, payload, running_server
from speedy.wire import protocol as p
from speedy.wire.protocol import OPCODES, Err, Op, ProtocolError, encode_file_key, encode_request

MiB = 1 << 20
CI_EXAMPLES = 600
LONG_EXAMPLES = int(os.environ.get("SPEEDY_FUZZ_EXAMPLES", "20000"))
SMALL_BODY_MAX = 65536  # worker.py: a longer non-WRITE body is answered, then the conn closed
ERRS = frozenset(int(e) for e in Err)
FIDS = itertools.count(7_000_000)


# ---------------------------------------------------------------- the pure codec
def decodes_or_protocol_error(decode, encode, buf: bytes) -> None:
    """decode(buf) is a ProtocolError or a value that encode() turns back into buf."""
    try:
        value = decode(buf)
    except ProtocolError:
        return
    assert encode(value) == buf


@settings(max_examples=1000, deadline=None)
@given(st.binary(max_size=12))
def test_request_and_response_headers(buf):
    decodes_or_protocol_error(p.decode_request_header, lambda v: p.encode_request_header(*v), buf)
    decodes_or_protocol_error(p.decode_response_header,
                              lambda v: p.encode_response_header(*v), buf)


@settings(max_examples=500, deadline=None)
@given(st.binary(max_size=40))
def test_file_key(buf):
    try:
        group, fid = p.decode_file_key(buf)
    except ProtocolError:
        assert len(buf) < p.FILE_KEY_SIZE
        return
    assert p.encode_file_key(group, fid) == buf[:p.FILE_KEY_SIZE]


detail_infos = st.builds(
    p.DetailInfo, *[st.integers(0, 2**32 - 1)] * 4, *[st.integers(0, 2**64 - 1)] * 6,
    chunks=st.lists(st.tuples(st.integers(0, 2**64 - 1), st.integers(0, 2**64 - 1)),
                    max_size=5),
    total_file_count=st.integers(0, 2**64 - 1))


@st.composite
def damaged(draw, valid: st.SearchStrategy[bytes]) -> bytes:
    """A valid encoding with a few bytes changed, cut, or added."""
    buf = bytearray(draw(valid))
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["flip", "cut", "add", "u32"]))
        at = draw(st.integers(0, len(buf)))
        if kind == "flip" and at < len(buf):
            buf[at] ^= draw(st.integers(1, 255))
        elif kind == "cut":
            del buf[at:]
        elif kind == "add":
            buf[at:at] = draw(st.binary(min_size=1, max_size=20))
        elif kind == "u32" and at + 4 <= len(buf):
            buf[at:at + 4] = struct.pack(">I", draw(st.integers(0, 2**32 - 1)))
    return bytes(buf)


@settings(max_examples=1000, deadline=None)
@given(st.one_of(st.binary(max_size=200), damaged(detail_infos.map(p.encode_detail_info))))
def test_detail_info_and_io_status(buf):
    decodes_or_protocol_error(p.decode_detail_info, p.encode_detail_info, buf)
    decodes_or_protocol_error(p.decode_io_status, lambda v: p.encode_io_status(*v), buf)


@settings(max_examples=300, deadline=None)
@given(detail_infos)
def test_detail_info_round_trip(info):
    assert p.decode_detail_info(p.encode_detail_info(info)) == info


# ---------------------------------------------------------------- what the server must answer
@dataclass
class Expected:
    """The answers a stream of request bytes calls for, as its length fields frame it."""

    complete: list[int] = field(default_factory=list)  # ops of frames that must be answered
    trailing: int | None = None  # op of a cut-off last frame (it may be answered early)


def frame_stream(data: bytes) -> Expected:
    """Split data into frames the way the worker does, up to where it would close."""
    out = Expected()
    pos = 0
    while len(data) - pos >= p.REQUEST_HEADER_SIZE:
        op, blen = p.REQUEST_HEADER.unpack_from(data, pos)
        pos += p.REQUEST_HEADER_SIZE
        if op not in OPCODES:
            return out  # closed without an answer
        if op != Op.WRITE and blen > SMALL_BODY_MAX:
            out.complete.append(op)  # answered at once, then closed
            return out
        if pos + blen > len(data):
            out.trailing = op
            return out
        out.complete.append(op)
        pos += blen
    return out


def exchange(port: int, data: bytes, timeout: float = 20.0) -> tuple[list[int], bool]:
    """Send data, close for writing, collect responses: (their ops, closed cleanly)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    ops: list[int] = []
    buf = bytearray()
    try:
        try:
            sock.sendall(data)
            sock.shutdown(socket.SHUT_WR)
        except OSError:  # EPIPE, ECONNRESET, ENOTCONN: the server closed first (allowed)
            pass
        while True:
            try:
                got = sock.recv(1 << 20)
            except ConnectionResetError:
                return ops, False
            except socket.timeout:
                raise AssertionError(f"server hung on {data[:200]!r} ({len(data)} bytes); "
                                     f"answers so far {ops}") from None
            if not got:
                assert not buf, f"response cut short: {bytes(buf[:50])!r}"
                return ops, True
            buf += got
            while len(buf) >= p.RESPONSE_HEADER_SIZE:
                op, err, blen = p.RESPONSE_HEADER.unpack_from(buf)
                assert op in OPCODES and err in ERRS, (op, err)
                if len(buf) < p.RESPONSE_HEADER_SIZE + blen:
                    break
                del buf[:p.RESPONSE_HEADER_SIZE + blen]
                ops.append(op)
    finally:
        sock.close()


def check_answers(data: bytes, ops: list[int], clean: bool) -> None:
    """The responses are the in-order answers the framing calls for."""
    exp = frame_stream(data)
    allowed = exp.complete + ([exp.trailing] if exp.trailing is not None else [])
    assert ops == allowed[:len(ops)], (ops, allowed, data[:100])
    if clean:
        assert len(ops) >= len(exp.complete), (ops, exp, data[:100])


# ---------------------------------------------------------------- frames for the server
def key_of(fid: int, group: int = 1) -> bytes:
    return encode_file_key(group, fid)


fids = st.one_of(st.integers(1, 50), st.integers(0, 2**64 - 1))  # big WRITEs: 100..120 only
groups = st.sampled_from([1, 1, 1, 2, 0, 65535])
valid_frames = st.one_of(
    st.sampled_from([encode_request(op) for op in (Op.PING, Op.GET_STATUS, Op.CHECK_DISK,
                                                   Op.QUERY_IO_STATUS, Op.QUERY_DETAIL_INFOS,
                                                   Op.KILL_PD_WR)]),
    st.builds(lambda f, g, d: encode_request(Op.WRITE, key_of(f, g) + d), fids, groups,
              st.binary(max_size=300)),
    st.builds(lambda f, g: encode_request(Op.READ, key_of(f, g)), fids, groups),
    st.builds(lambda f, g: encode_request(Op.DELETE, key_of(f, g)), fids, groups),
    st.builds(lambda f, g, n: encode_request(Op.WRITE, key_of(f, g) + b"\x5a" * n),
              st.integers(100, 120), groups, st.integers(16_000, 100_000)),  # recv_into path
    st.builds(lambda op, n: encode_request(op, bytes(n)),
              st.sampled_from([Op.PING, Op.READ, Op.DUMP_CHUNK]),
              st.integers(SMALL_BODY_MAX - 10, SMALL_BODY_MAX + 10)),  # the oversized limit
    st.just(encode_request(Op.SET_STATUS, b"\x00")),
    st.sampled_from([encode_request(Op.DUMP_CHUNK, n)
                     for n in (b"chunk_1_9.chunk", b"../x", b"", b"chunk_1_1.chunk\x00")]))
streams = st.one_of(
    st.binary(max_size=300),
    st.lists(damaged(valid_frames), min_size=1, max_size=6).map(b"".join),
    st.tuples(st.lists(valid_frames, max_size=4).map(b"".join),
              st.binary(min_size=1, max_size=100)).map(b"".join))




@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("fuzzframes"), workers=2, chunk_size=32 * MiB,
                        chunks=3, mem_blocks=8, env={"SPEEDY_STALL_TIMEOUT": "2"}) as s:
        yield s
        assert s.stop() == 0, s.log()[-2000:]
        assert s.shm_segments() == []


def fuzz_server(srv: ServerProc, examples: int) -> None:
    """Run `examples` streams against srv; then check it is whole and still serving."""
    workers = worker_pids(srv)
    count = {"n": 0, "closed_early": 0, "answers": 0}
    t0 = time.monotonic()

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(streams)
    def one(data: bytes) -> None:
        ops, clean = exchange(srv.port, data)
        check_answers(data, ops, clean)
        count["n"] += 1
        count["answers"] += len(ops)
        count["closed_early"] += not clean
        if Op.SET_STATUS in ops:
            with srv.client() as c:
                assert c.call(Op.SET_STATUS, b"\x00")[0] == Err.SUCCESS

    one()
    took = time.monotonic() - t0
    assert srv.proc.poll() is None, srv.log()[-2000:]
    wait_for(lambda: pool_in_use(srv) == 0, timeout=15)
    assert worker_pids(srv) == workers, "a worker died"
    with srv.client(timeout=10) as c:
        fid = next(FIDS)
        assert c.write(fid, payload(fid, 5000)) == Err.SUCCESS
        assert c.read(fid) == (Err.SUCCESS, payload(fid, 5000))
        assert c.call(Op.GET_STATUS) == (Err.SUCCESS, b"\x00")
    assert "Traceback" not in srv.log()
    print(f"\nframe fuzz: {count['n']} executions, {count['answers']} responses checked, "
          f"{count['closed_early']} resets, 0 crashes, {took:.1f}s "
          f"({count['n'] / took:.0f}/s)")


def test_server_survives_fuzzed_frames(srv):
    fuzz_server(srv, CI_EXAMPLES)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_server_survives_fuzzed_frames_long(srv):
    fuzz_server(srv, LONG_EXAMPLES)


@pytest.mark.slow
@pytest.mark.timeout(1200)
@settings(max_examples=LONG_EXAMPLES, deadline=None, database=None)
@given(st.one_of(st.binary(max_size=400), damaged(detail_infos.map(p.encode_detail_info)),
                 damaged(valid_frames)))
def test_codec_long(buf):
    decodes_or_protocol_error(p.decode_detail_info, p.encode_detail_info, buf)
    decodes_or_protocol_error(p.decode_io_status, lambda v: p.encode_io_status(*v), buf)
    decodes_or_protocol_error(p.decode_request_header, lambda v: p.encode_request_header(*v),
                              buf[:5])
    decodes_or_protocol_error(p.decode_response_header,
                              lambda v: p.encode_response_header(*v), buf[:6])
