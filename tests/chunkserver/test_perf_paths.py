"""The batched write path and the one-pread read path: same bytes, same errors, fewer syscalls."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import zlib

import pytest

from speedy.chunkserver.store import datadir
from tests.support.server import payload as server_payload
from tests.support.server import running_server
from speedy.format.chunkfile import RECORD_HEADER_SIZE, SUPERBLOCK_SIZE
from speedy.wire.protocol import Err, Op, encode_file_key
from speedy.chunkserver.reader import ReadFailed
from speedy.chunkserver.store.chunkstore import LARGE_BYTES
from tests.support.store import Harness, payload

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
MiB = 1 << 20
BIG = 4 * LARGE_BYTES  # a large record: a chunk of its own


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path, chunks=2, chunk_size=4 * MiB)
    harness.open()
    yield harness
    harness.shut()


@pytest.fixture
def pwrites(monkeypatch):
    """Every pwritev_all call (the store's writes): (fd, total bytes, offset)."""
    calls: list[tuple[int, int, int]] = []
    real = datadir.pwritev_all

    def recording(fd, bufs, offset):
        calls.append((fd, sum(len(memoryview(b).cast("B")) for b in bufs), offset))
        real(fd, bufs, offset)

    monkeypatch.setattr(datadir, "pwritev_all", recording)
    return calls


def stage(h, fid: int, body: bytes) -> None:
    h.store.stage(fid, [memoryview(body)], len(body), zlib.adler32(body, 0))


def test_small_records_of_a_batch_go_in_one_write(h, pwrites):
    bodies = {fid: payload(fid, 100 + fid) for fid in range(1, 41)}
    for fid, body in bodies.items():
        stage(h, fid, body)
    assert pwrites == []  # staged, not written yet
    assert sorted(h.store.commit()) == sorted(bodies)
    data = [c for c in pwrites if c[2] != 0]  # offset 0: the superblock
    assert data == [(data[0][0], sum(RECORD_HEADER_SIZE + len(b) for b in bodies.values()),
                     SUPERBLOCK_SIZE)]
    for fid, body in bodies.items():
        assert h.reader.read(fid) == body
    h.reopen(snapshot=False)  # a scan finds every record where the batch put it
    assert h.store.file_count() == 40 and h.reader.read(40) == bodies[40]


def test_big_records_go_to_a_chunk_of_their_own(h, pwrites):
    big = payload(1, BIG)
    stage(h, 1, b"small")
    stage(h, 2, big)  # another chunk (not behind the small one)
    stage(h, 3, b"after")  # small records share chunk 1
    assert pwrites == []  # staged, not written yet
    assert {fid: cid for fid, (cid, _) in h.store.staged.items()} == {1: 1, 2: 2, 3: 1}
    h.store.commit()
    chunk1, chunk2 = h.store.chunks[1].fd, h.store.chunks[2].fd
    assert sorted(c for c in pwrites if c[2] != 0) == sorted([  # one pwritev per chunk
        (chunk1, 2 * RECORD_HEADER_SIZE + len(b"small") + len(b"after"), SUPERBLOCK_SIZE),
        (chunk2, RECORD_HEADER_SIZE + len(big), SUPERBLOCK_SIZE)])
    assert [h.reader.read(f) for f in (1, 2, 3)] == [b"small", big, b"after"]


@pytest.mark.parametrize("sizes", [[4096] * 5, [0, 10, 100000, 3, 5000, 5000, 70000, 1],
                                   [300000, 2, 300000, 2, 2, 300000]])
def test_reads_with_right_and_wrong_size_guesses(h, sizes):
    for i, size in enumerate(sizes):
        stage(h, 100 + i, payload(100 + i, size))
    h.store.commit()
    for _ in range(2):
        for i, size in enumerate(sizes):
            assert h.reader.read(100 + i) == payload(100 + i, size)
            rec = h.reader.fetch(100 + i, 2 * MiB)
            assert rec.size == size and bytes(rec.buf[RECORD_HEADER_SIZE:]) == payload(100 + i, size)
            assert h.reader.fetch(100 + i, size - 1).buf is None if size else True


@pytest.mark.parametrize("where", ["first read", "second read"])
def test_a_flipped_byte_is_never_served(h, where):
    small, big = payload(1, 4000), payload(2, 200000)
    stage(h, 1, small)
    stage(h, 2, big)
    h.store.commit()
    loc = h.ireader.get(2)
    at = loc[1] + RECORD_HEADER_SIZE + (100 if where == "first read" else 150000)
    path = os.path.join(h.data_dir, h.store.chunk_file(loc[0]))  # a chunk of its own
    with open(path, "r+b") as f:
        f.seek(at)
        byte = f.read(1)
        f.seek(at)
        f.write(bytes([byte[0] ^ 0x40]))
    assert h.reader.read(1) == small  # the guess is now 4000 bytes: fid 2 needs two reads
    with pytest.raises(ReadFailed):
        h.reader.read(2)
    with pytest.raises(ReadFailed):
        h.reader.fetch(2, 2 * MiB)


def test_many_connections_pipelining_writes_and_reads(tmp_path):
    """Batched messages to the writer and batched replies: each answer reaches its request."""
    with running_server(tmp_path, workers=2, chunk_size=16 * MiB, chunks=2, mem_blocks=32) as srv:
        errors: list[str] = []

        def client(k: int) -> None:
            fids = [k * 1000 + i for i in range(150)]
            try:
                with srv.client() as c:
                    for fid in fids:  # all sent before any answer is read
                        body = encode_file_key(1, fid) + server_payload(fid, fid % 3000)
                        c.send(Op.WRITE, body)
                    c.send(Op.WRITE, encode_file_key(1, fids[0]) + b"again")
                    answers = [c.response() for _ in range(len(fids) + 1)]
                    if [a[:2] for a in answers] != ([(Op.WRITE, Err.SUCCESS)] * len(fids)
                                                    + [(Op.WRITE, Err.FILE_EXISTS)]):
                        errors.append(f"client {k}: {answers[:3]}")
                    for fid in fids:
                        c.send(Op.READ, encode_file_key(1, fid))
                    for fid in fids:
                        op, err, data = c.response()
                        if (op, err, data) != (Op.READ, Err.SUCCESS, server_payload(fid, fid % 3000)):
                            errors.append(f"client {k}: fid {fid} read back {err}")
            except Exception as e:  # reported below
                errors.append(f"client {k}: {e!r}")

        threads = [threading.Thread(target=client, args=(k,)) for k in range(1, 9)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)
        assert errors == []


def test_scale_bench_smoke(tmp_path):
    """bench/scale.py runs end to end on a small data set (it is a benchmark, not a test)."""
    r = subprocess.run([sys.executable, os.path.join(ROOT, "bench", "scale.py"), "--files", "2000",
                        "--levels", "500", "--ops", "300", "-c", "4", "--chunk-size",
                        str(16 * MiB), "--dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout
    for text in ("(snapshot)", "(incremental)", "READ after: FILE_NOT_FOUND",
                 "readable after: True", "summary (b)", "summary (c)"):
        assert text in out, out
    assert "errors 0" in out and "Traceback" not in r.stderr
    assert not [n for n in os.listdir(tmp_path) if n.startswith("speedy-scale-")]
