"""Full chunks: pending writes, the queue limit, KILL_PD_WR; DUMP_CHUNK of a real chunk."""
from __future__ import annotations

import os
import time

import pytest

from tests.support import wait_for
from tests.support.server import running_server
from speedy.format.chunkfile import max_data_size
from speedy.chunkserver.shm.pool import BlockPool
from speedy.wire.protocol import (Err, Op, decode_detail_info, decode_io_status, encode_file_key,
                             encode_request)

MiB = 1 << 20
BIGGEST = max_data_size(MiB)  # fills a 1 MiB chunk up to avail_space 1


@pytest.fixture(scope="module")
def srv(tmp_path_factory):
    with running_server(tmp_path_factory.mktemp("limits"), chunk_size=MiB, chunks=2,
                        mem_blocks=32, workers=2) as s:
        yield s


def pending(srv) -> int:
    with srv.client() as c:
        err, body = c.call(Op.QUERY_IO_STATUS)
        assert err == Err.SUCCESS
        return decode_io_status(body)[0]


def test_dump_chunk_is_the_file(srv):
    with srv.client() as c:
        for fid in range(1, 6):
            assert c.write(fid, os.urandom(1000 * fid)) == Err.SUCCESS
        err, body = c.call(Op.DUMP_CHUNK, b"chunk_1_1.chunk")
    assert err == Err.SUCCESS
    with open(os.path.join(srv.data_dir, "chunk_1_1.chunk"), "rb") as f:
        on_disk = f.read()
    assert len(body) == MiB and body == on_disk
    assert body.startswith(b"CHUNK_SB_MAGIC!")


def chunk_avail(c) -> dict[int, int]:
    err, body = c.call(Op.QUERY_DETAIL_INFOS)
    assert err == Err.SUCCESS
    return dict(decode_detail_info(body).chunks)


def test_fill_chunks_then_writes_wait_and_fail(srv):
    with srv.client() as c:
        assert c.write(100, b"\x01" * BIGGEST) == Err.SUCCESS  # fits only the empty chunk 2
        avail = chunk_avail(c)
        assert avail[2] == 1 and avail[1] > 31
        assert c.write(101, b"\x02" * (avail[1] - 31)) == Err.SUCCESS  # the rest of chunk 1
        assert chunk_avail(c) == {1: 1, 2: 1}
        t0 = time.monotonic()
        assert c.write(103, b"\x04" * (BIGGEST + 1)) == Err.CHUNK_UNAVAILABLE  # never fits
        assert time.monotonic() - t0 < 2
        t0 = time.monotonic()
        assert c.write(104, b"small") == Err.CHUNK_UNAVAILABLE  # waited in the queue
        waited = time.monotonic() - t0
        assert 4.5 <= waited <= 10, waited
        assert c.read(104)[0] == Err.FILE_NOT_FOUND
        assert c.read(100) == (Err.SUCCESS, b"\x01" * BIGGEST)
        assert c.write(100, b"") == Err.FILE_EXISTS  # exists beats no room


def test_queue_full_and_kill_pending(srv):
    with srv.client() as c:
        if chunk_avail(c) != {1: 1, 2: 1}:
            pytest.skip("chunks not full (run with the whole module)")
    waiting = [srv.client() for _ in range(20)]
    pool = BlockPool.attach(f"speedy{srv.pid}_pool")
    try:
        for i, cl in enumerate(waiting):
            cl.send(Op.WRITE, encode_file_key(1, 300 + i) + b"queued")
        wait_for(lambda: pending(srv) == 20, timeout=4)
        assert pool.in_use() == 20
        with srv.client() as c:
            t0 = time.monotonic()
            assert c.write(400, b"one too many") == Err.CHUNK_UNAVAILABLE
            assert time.monotonic() - t0 < 2
            assert c.write(300, b"same fid as a queued one") == Err.FILE_EXISTS
            assert c.call(Op.KILL_PD_WR) == (Err.SUCCESS, b"")
        for cl in waiting:
            assert cl.response() == (Op.WRITE, Err.KILLED, b"")
            assert cl.ping() == Err.SUCCESS
        assert pending(srv) == 0
        wait_for(lambda: pool.in_use() == 0, timeout=5)
        with srv.client() as c:
            assert c.call(Op.KILL_PD_WR) == (Err.SUCCESS, b"")  # nothing queued: fine
            c.sock.sendall(encode_request(Op.PING))
            assert c.response() == (Op.PING, Err.SUCCESS, b"")
    finally:
        for cl in waiting:
            cl.close()
        pool.close()
