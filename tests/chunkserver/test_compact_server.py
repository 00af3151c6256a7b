"""Compaction in a real server: the admin opcodes, automatic runs, reads during it, the
space coming back, garbage in the metrics; crash points with SPEEDY_CRASH_AT."""
from __future__ import annotations

import os
import threading
import urllib.request

import pytest

from speedy.chunkserver.store import compact
from speedy.format.chunkfile import RECORD_HEADER_SIZE
from speedy.wire.protocol import (COMPACT_RESULT, Err, Op, decode_detail_info, decode_garbage,
                                  encode_compact_request)
from tests.support import free_port
from tests.support import wait_for
from tests.support.server import make_server, payload

SIZE = 40_000


def garbage(srv) -> dict[int, int]:
    with srv.client() as c:
        err, body = c.call(Op.QUERY_GARBAGE)
    assert err == Err.SUCCESS
    return {g.chunk_id: g.garbage_bytes for g in decode_garbage(body)[1]}


def avail(srv) -> int:
    with srv.client() as c:
        err, body = c.call(Op.QUERY_DETAIL_INFOS)
    return sum(a for _, a in decode_detail_info(body).chunks)


def compact_now(srv, threshold=None, wait=True) -> tuple[int, int]:
    with srv.client(timeout=120) as c:
        err, body = c.call(Op.COMPACT, encode_compact_request(threshold, wait))
    assert err == Err.SUCCESS, err
    return COMPACT_RESULT.unpack(body)


def store(srv, fids) -> dict[int, bytes]:
    files = {}
    with srv.client() as c:
        for fid in fids:
            files[fid] = payload(fid, SIZE + fid)
            assert c.write(fid, files[fid]) == Err.SUCCESS
    return files


def delete(srv, fids) -> int:
    with srv.client() as c:
        for fid in fids:
            assert c.delete(fid) == Err.SUCCESS
    return len(fids)


def check(srv, files, gone) -> None:
    with srv.client() as c:
        for fid, data in files.items():
            err, body = c.read(fid)
            if fid in gone:
                assert err == Err.FILE_NOT_FOUND, fid
            else:
                assert (err, body) == (Err.SUCCESS, data), fid


@pytest.fixture
def srv(tmp_path):
    made = []

    def start(**flags):
        flags = {"chunks": 2, "chunk_size": 4 << 20, "compact_threshold": 0, **flags}
        s = make_server(tmp_path, f"s{len(made)}", **flags)
        made.append(s)
        return s.start()

    yield start
    for s in made:
        s.discard()


def test_admin_compact_frees_the_deleted_bytes_while_reads_go_on(srv):
    s = srv(compact_rate=1 << 20, workers=2, chunks=3)
    files = store(s, range(1, 121))
    with s.client() as c:  # a big file too: its READ is streamed in pieces
        files[7777] = payload(7777, 3 << 20)
        assert c.write(7777, files[7777]) == Err.SUCCESS
    gone = {f for f in files if f % 10 < 7}
    delete(s, sorted(gone))
    deleted = sum(RECORD_HEADER_SIZE + len(files[f]) for f in gone)
    assert sum(garbage(s).values()) == deleted
    before = avail(s)
    errors: list = []
    stop = threading.Event()

    def reads():
        try:
            while not stop.is_set():
                check(s, files, gone)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    readers = [threading.Thread(target=reads) for _ in range(2)]
    for t in readers:
        t.start()
    try:
        n, freed = compact_now(s, threshold=0.0)
    finally:
        stop.set()
        for t in readers:
            t.join()
    assert not errors, errors[0]
    freed_want = deleted - RECORD_HEADER_SIZE * len(gone)  # tombstones stay (7 days)
    assert n >= 2 and freed == freed_want
    assert avail(s) == before + freed_want
    assert sum(garbage(s).values()) == 0
    check(s, files, gone)
    # new writes reuse the space; a restart (scan: the inodes changed) agrees
    more = store(s, range(500, 520))
    s.stop()
    s.start()
    check(s, {**files, **more}, gone)
    assert "compacted" in s.log()


def test_automatic_compaction_past_the_threshold_and_the_metric(srv):
    mport = free_port()
    s = srv(compact_threshold=0.3, metrics_port=mport)
    files = store(s, range(1, 81))
    gone = set(range(1, 41))  # chunk 1 holds most of them
    delete(s, sorted(gone))
    text = urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10).read()
    assert b"speedy_chunk_garbage_bytes{" in text
    wait_for(lambda: b"speedy_compactions_total 1" in urllib.request.urlopen(
        f"http://127.0.0.1:{mport}/metrics", timeout=10).read(), timeout=30)
    wait_for(lambda: sum(garbage(s).values()) < 0.3 * SIZE * 40, timeout=30)
    check(s, files, gone)


def test_compact_without_wait_answers_at_once_and_queues(srv):
    s = srv()
    files = store(s, range(1, 41))
    delete(s, range(1, 21))
    n, freed = compact_now(s, threshold=0.5, wait=False)
    assert freed == 0
    wait_for(lambda: all(g == 0 for cid, g in garbage(s).items()
                         if cid in range(1, n + 1)) or n == 0, timeout=30)
    check(s, files, set(range(1, 21)))


def test_compaction_opcodes_are_admin_only_and_check_their_body(srv):
    s = srv(admin_allow="10.9.9.9")
    with s.client() as c:
        assert c.call(Op.QUERY_GARBAGE)[0] == Err.INTERNAL_ERROR
        assert c.call(Op.COMPACT, encode_compact_request(0.5, False))[0] == Err.INTERNAL_ERROR
        assert c.ping() == Err.SUCCESS
    t = srv()
    with t.client() as c:
        assert c.call(Op.COMPACT, b"\x00\x00")[0] == Err.INTERNAL_ERROR
        assert c.call(Op.COMPACT, b"\x00\x20\x00\x00\x00")[0] == Err.INTERNAL_ERROR  # > 1
        assert c.call(Op.COMPACT, b"\x00\x00\x00\x00\x07")[0] == Err.INTERNAL_ERROR  # wait 7
        assert c.call(Op.QUERY_GARBAGE, b"x")[0] == Err.INTERNAL_ERROR
        assert c.ping() == Err.SUCCESS


@pytest.mark.parametrize("point", compact.POINTS)
def test_a_crash_at_any_point_leaves_the_old_or_the_new_chunk(srv, point):
    s = srv(compact_rate=1 << 20,  # slices of 128 KiB: "copy:after=3" is mid-copy
            env={compact.CRASH_ENV: point + (":after=3" if point == "copy" else "")})
    files = store(s, range(1, 61))
    gone = {f for f in files if f % 3 == 0}
    delete(s, sorted(gone))
    sizes = {n: os.path.getsize(os.path.join(s.data_dir, n)) for n in os.listdir(s.data_dir)
             if n.endswith(".chunk")}
    with s.client(timeout=60) as c:
        c.send(Op.COMPACT, encode_compact_request(0.0, True))
        try:
            c.response()
        except (EOFError, OSError):
            pass
    # the writer exited at the point; a new one recovered in place (supervisor.py)
    wait_for(lambda: "new writer ready" in s.log(), timeout=60)
    assert f"exiting at {point}" in s.log()
    check(s, files, gone)
    assert s.stop() == 0
    s.env = {}
    s.start()
    check(s, files, gone)
    assert not [n for n in os.listdir(os.path.join(s.data_dir, ".speedy"))
                if n.startswith("tmp.")]
    names = sorted(n for n in os.listdir(s.data_dir) if n.endswith(".chunk"))
    assert names == sorted(sizes)
    compact_now(s, threshold=0.0)  # and it compacts fine afterwards
    check(s, files, gone)
    assert sum(garbage(s).values()) == 0


def test_a_compaction_that_cannot_write_its_copy_fails_cleanly(srv):
    s = srv()
    files = store(s, range(1, 41))
    delete(s, range(1, 21))
    g = garbage(s)
    # a directory where the copy of chunk 1 would go: creating the copy fails
    os.makedirs(os.path.join(s.data_dir, ".speedy", "tmp.compact.chunk_1_1.chunk"))
    with s.client(timeout=60) as c:
        err, _ = c.call(Op.COMPACT, encode_compact_request(0.0, True))
    assert err == Err.WRITE_ERROR
    assert garbage(s)[1] == g[1]  # chunk 1 is still the old file
    check(s, files, set(range(1, 21)))
    assert "compaction given up" in s.log()
    with s.client() as c:  # the server still writes, reads and answers
        assert c.write(999, b"after") == Err.SUCCESS
        assert c.read(999) == (Err.SUCCESS, b"after")
