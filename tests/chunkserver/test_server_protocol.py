"""Every opcode and error code of PROTOCOL.md against one real spy_server.py (2 workers)."""
from __future__ import annotations

import itertools
import os
import signal
import socket
import struct

import pytest

from tests.support import wait_for
from tests.support.server import Client, payload, running_server
from speedy.chunkserver.shm.pool import BlockPool
from speedy.wire.protocol import (IO_STATUS, Err, Op, decode_detail_info, decode_io_status,
                             encode_file_key, encode_request)

MiB = 1 << 20
FIDS = itertools.count(1000)


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("proto"), workers=2, chunk_size=32 * MiB,
                        chunks=2, mem_blocks=16, env={"SPEEDY_STALL_TIMEOUT": "2"}) as s:
        yield s


@pytest.fixture
def c(srv):
    with srv.client() as client:
        yield client


def pool_of(srv) -> BlockPool:
    return BlockPool.attach(f"speedy{srv.pid}_pool")


def test_ping_and_status(c):
    assert c.call(Op.PING) == (Err.SUCCESS, b"")
    assert c.call(Op.GET_STATUS) == (Err.SUCCESS, b"\x00")


@pytest.mark.parametrize("size", [0, 1, 5, 4096, MiB, 5 * MiB + 7])
def test_write_read_round_trip(c, size):
    fid = next(FIDS)
    data = os.urandom(size)
    assert c.write(fid, data) == Err.SUCCESS
    assert c.read(fid) == (Err.SUCCESS, data)


def test_file_exists_and_not_found(c):
    fid = next(FIDS)
    assert c.read(fid) == (Err.FILE_NOT_FOUND, b"")
    assert c.delete(fid) == Err.FILE_NOT_FOUND
    assert c.write(fid, b"first") == Err.SUCCESS
    assert c.write(fid, b"second") == Err.FILE_EXISTS
    assert c.read(fid) == (Err.SUCCESS, b"first")


def test_delete_then_write_again(c):
    fid = next(FIDS)
    assert c.write(fid, b"old data") == Err.SUCCESS
    assert c.delete(fid) == Err.SUCCESS
    assert c.read(fid) == (Err.FILE_NOT_FOUND, b"")
    assert c.delete(fid) == Err.FILE_NOT_FOUND
    assert c.write(fid, b"new data") == Err.SUCCESS
    assert c.read(fid) == (Err.SUCCESS, b"new data")


def test_group_mismatch(c):
    fid = next(FIDS)
    assert c.write(fid, b"x" * 100, group=2) == Err.SERVER_ID_MISMATCH
    assert c.read(fid, group=2)[0] == Err.SERVER_ID_MISMATCH
    assert c.delete(fid, group=2) == Err.SERVER_ID_MISMATCH
    assert c.read(fid) == (Err.FILE_NOT_FOUND, b"")  # nothing was stored, connection usable


@pytest.mark.parametrize("body", [b"", b"\x00\x01", b"123456789"])
def test_write_shorter_than_10_bytes(c, body):
    assert c.call(Op.WRITE, body) == (Err.INTERNAL_ERROR, b"")
    assert c.ping() == Err.SUCCESS


@pytest.mark.parametrize("op,body", [(Op.READ, b"\x00\x01"), (Op.READ, b"\x00" * 11),
                                     (Op.DELETE, b""), (Op.PING, b"junk"),
                                     (Op.GET_STATUS, b"x"), (Op.QUERY_IO_STATUS, b"x")])
def test_malformed_bodies(c, op, body):
    assert c.call(op, body) == (Err.INTERNAL_ERROR, b"")
    assert c.ping() == Err.SUCCESS


def test_oversized_garbage_body_closes(c):
    c.send(Op.PING, b"\x00" * (1 << 17))
    assert c.response()[1] == Err.INTERNAL_ERROR
    assert c.closed()


@pytest.mark.parametrize("op", [3, 12, 99, 255])
def test_unknown_opcode_closes(srv, op):
    with srv.client() as c:
        c.sock.sendall(bytes([op]) + b"\x00\x00\x00\x00")
        assert c.closed()


def test_reach_memory_limit_keeps_connection(c):
    fid = next(FIDS)
    assert c.write(fid, b"\xab" * (17 * MiB)) == Err.REACH_MEMORY_LIMIT
    assert c.ping() == Err.SUCCESS
    assert c.read(fid)[0] == Err.FILE_NOT_FOUND
    assert c.write(fid, b"fits") == Err.SUCCESS


def test_body_bigger_than_any_chunk(c):
    fid = next(FIDS)
    assert c.write(fid, bytes(32 * MiB)) == Err.CHUNK_UNAVAILABLE
    assert c.ping() == Err.SUCCESS


def test_set_status_read_only(c):
    fid = next(FIDS)
    assert c.write(fid, b"before") == Err.SUCCESS
    try:
        assert c.call(Op.SET_STATUS, b"\x01") == (Err.SUCCESS, b"")
        assert c.call(Op.GET_STATUS) == (Err.SUCCESS, b"\x01")
        assert c.write(next(FIDS), b"refused") == Err.SERVER_READ_ONLY
        assert c.delete(fid) == Err.SERVER_READ_ONLY
        assert c.read(fid) == (Err.SUCCESS, b"before")
    finally:
        assert c.call(Op.SET_STATUS, b"\x00") == (Err.SUCCESS, b"")
    assert c.call(Op.GET_STATUS) == (Err.SUCCESS, b"\x00")
    assert c.delete(fid) == Err.SUCCESS
    assert c.call(Op.SET_STATUS, b"\x07") == (Err.INTERNAL_ERROR, b"")
    assert c.call(Op.SET_STATUS, b"") == (Err.INTERNAL_ERROR, b"")
    assert c.call(Op.GET_STATUS) == (Err.SUCCESS, b"\x00")


def test_admin_opcodes_refused_to_other_peers(srv):
    sock = socket.socket()
    sock.bind(("127.0.0.2", 0))  # not in the default --admin_allow
    sock.settimeout(10)
    sock.connect(("127.0.0.1", srv.port))
    c = Client.__new__(Client)
    c.sock = sock
    with c:
        assert c.call(Op.SET_STATUS, b"\x01") == (Err.INTERNAL_ERROR, b"")
        assert c.call(Op.KILL_PD_WR) == (Err.INTERNAL_ERROR, b"")
        assert c.call(Op.DUMP_CHUNK, b"chunk_1_1.chunk") == (Err.INTERNAL_ERROR, b"")
        assert c.call(Op.GET_STATUS) == (Err.SUCCESS, b"\x00")  # not admin: allowed
        assert c.ping() == Err.SUCCESS


def test_io_status_and_detail_infos(c):
    err, body = c.call(Op.QUERY_IO_STATUS)
    assert err == Err.SUCCESS and len(body) == IO_STATUS.size
    pending, writing, reading = decode_io_status(body)
    assert pending == 0 and writing == 0 and reading == 0
    err, body = c.call(Op.QUERY_DETAIL_INFOS)
    assert err == Err.SUCCESS and len(body) == 76 + 16 * 2
    before = decode_detail_info(body)
    assert [cid for cid, _ in before.chunks] == [1, 2]
    assert before.conn_count >= 1
    fid = next(FIDS)
    assert c.write(fid, b"z" * 1000) == Err.SUCCESS
    assert c.read(fid) == (Err.SUCCESS, b"z" * 1000)
    assert c.read(next(FIDS))[0] == Err.FILE_NOT_FOUND
    after = decode_detail_info(c.call(Op.QUERY_DETAIL_INFOS)[1])
    assert after.write_count == before.write_count + 1
    assert after.write_bytes == before.write_bytes + 1000
    assert after.read_count == before.read_count + 1
    assert after.read_bytes == before.read_bytes + 1000
    assert after.total_file_count == before.total_file_count + 1
    assert sum(a for _, a in after.chunks) == sum(a for _, a in before.chunks) - 1030


def test_check_disk(c):
    assert c.call(Op.CHECK_DISK) == (Err.SUCCESS, b"")


def test_dump_chunk_names(c):
    for name in (b"chunk_2_1.chunk", b"chunk_1_3.chunk", b"chunk_1_01.chunk", b"../chunk_1_1.chunk",
                 b"chunk_1_1.chunk\x00", b".speedy/lock", b"server.log", b"\xff\xfe", b""):
        assert c.call(Op.DUMP_CHUNK, name) == (Err.FILE_NOT_FOUND, b""), name
    assert c.call(Op.DUMP_CHUNK, b"c" * 32) == (Err.INTERNAL_ERROR, b"")
    assert c.ping() == Err.SUCCESS


def test_pipelined_requests_answered_in_order(c):
    a, b = next(FIDS), next(FIDS)
    frames = [encode_request(Op.WRITE, encode_file_key(1, a) + b"alpha"),
              encode_request(Op.READ, encode_file_key(1, a)),
              encode_request(Op.PING),
              encode_request(Op.READ, encode_file_key(1, b)),
              encode_request(Op.WRITE, encode_file_key(1, a) + b"again"),
              encode_request(Op.DELETE, encode_file_key(1, a)),
              encode_request(Op.READ, encode_file_key(1, a)),
              encode_request(Op.GET_STATUS)]
    c.sock.sendall(b"".join(frames))
    got = [c.response() for _ in frames]
    assert got == [(Op.WRITE, Err.SUCCESS, b""), (Op.READ, Err.SUCCESS, b"alpha"),
                   (Op.PING, Err.SUCCESS, b""), (Op.READ, Err.FILE_NOT_FOUND, b""),
                   (Op.WRITE, Err.FILE_EXISTS, b""), (Op.DELETE, Err.SUCCESS, b""),
                   (Op.READ, Err.FILE_NOT_FOUND, b""), (Op.GET_STATUS, Err.SUCCESS, b"\x00")]


def test_read_after_ack_across_connections(srv):
    writers = [srv.client() for _ in range(3)]
    readers = [srv.client() for _ in range(3)]
    try:
        for i in range(150):
            fid = next(FIDS)
            data = payload(fid, 100 + i)
            assert writers[i % 3].write(fid, data) == Err.SUCCESS
            assert readers[(i + 1) % 3].read(fid) == (Err.SUCCESS, data)
    finally:
        for cl in writers + readers:
            cl.close()


def test_stalled_upload_is_dropped_and_blocks_return(srv):
    pool = pool_of(srv)
    try:
        with srv.client() as c:
            c.sock.sendall(struct.pack(">BI", Op.WRITE, 10 + 3 * MiB) + encode_file_key(1, 7)
                           + b"\x01" * (MiB + 100))
            wait_for(lambda: pool.in_use() == 1, timeout=10)  # blocks only for bytes sent
            with srv.client() as q:
                err, body = q.call(Op.QUERY_IO_STATUS)
                assert err == Err.SUCCESS and decode_io_status(body) == (0, 1, 0)  # writing
                assert decode_detail_info(q.call(Op.QUERY_DETAIL_INFOS)[1]).writing_count == 1
            assert c.closed(timeout=15)  # SPEEDY_STALL_TIMEOUT=2
        wait_for(lambda: pool.in_use() == 0, timeout=10)
    finally:
        pool.close()
    with srv.client() as c:
        assert c.read(7)[0] == Err.FILE_NOT_FOUND


def test_killed_workers_are_replaced_and_blocks_return(srv):
    pool = pool_of(srv)
    stalled = srv.client()
    try:
        stalled.sock.sendall(struct.pack(">BI", Op.WRITE, 10 + 4 * MiB) + encode_file_key(1, 8)
                             + b"\x02" * (2 * MiB + 16384))
        wait_for(lambda: pool.in_use() == 3, timeout=10)
        old = {pid for pid, comm in srv.children().items() if comm.startswith("spy_worker")}
        assert len(old) == 2
        for pid in old:
            os.kill(pid, signal.SIGKILL)
        new = wait_for(lambda: {p for p, comm in srv.children().items()
                                if comm.startswith("spy_worker")} - old or None, timeout=20)
        wait_for(lambda: len({p for p, comm in srv.children().items()
                              if comm.startswith("spy_worker")} - old) == 2, timeout=20)
        assert new
        assert pool.in_use() == 0
        srv.wait_serving(20)
        with srv.client() as c:
            fid = next(FIDS)
            assert c.write(fid, b"after the kill") == Err.SUCCESS
            assert c.read(fid) == (Err.SUCCESS, b"after the kill")
        assert "worker 0" in srv.log() and "was killed by SIGKILL" in srv.log()
    finally:
        stalled.close()
        pool.close()
