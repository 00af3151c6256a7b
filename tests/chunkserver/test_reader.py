"""ChunkReader: verified reads through read-only descriptors, DUMP_CHUNK paths, CHECK_DISK."""
from __future__ import annotations

import os
import zlib

import pytest

from speedy.chunkserver import faults
from speedy.format.chunkfile import MAX_CHUNK_SIZE, RECORD_HEADER_SIZE
from speedy.wire.protocol import Err
from speedy.chunkserver.reader import ChunkReader, NotFound, ReadFailed
from tests.support.store import MiB, Harness, patch, payload, record, write_chunk


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path)
    harness.open()
    yield harness
    faults.configure(None)
    harness.shut()


def test_read_verified(h):
    h.put(0, b"")
    h.put(1, payload(1, 5))
    h.put(2**64 - 1, payload(9, 300000))
    assert h.reader.read(0) == b""
    assert h.reader.read(1) == payload(1, 5)
    assert h.reader.read(2**64 - 1) == payload(9, 300000)
    with pytest.raises(NotFound) as e:
        h.reader.read(3)
    assert e.value.code == Err.FILE_NOT_FOUND


def test_fetch_and_read_at_for_streaming(h):
    """A record over the limit: fetch verifies its header only; read_at gives its data."""
    body = payload(4, 200000)
    h.put(4, body)
    rec = h.reader.fetch(4, 65536)
    assert (rec.chunk_id, rec.size, rec.buf) == (1, 200000, None)
    assert rec.csum == zlib.adler32(body, 0)
    off = rec.offset + RECORD_HEADER_SIZE
    got = b"".join(h.reader.read_at(rec.chunk_id, off + i, min(65536, rec.size - i))
                   for i in range(0, rec.size, 65536))
    assert got == body


def test_damaged_record_is_read_failed(h):
    h.put(5, payload(5, 1000))
    cid, off = h.ireader.get(5)
    path = os.path.join(h.data_dir, "chunk_1_1.chunk")
    patch(path, off + 30 + 500, b"\x00\x01")
    with pytest.raises(ReadFailed) as e:
        h.reader.read(5)
    assert e.value.code == Err.READ_ERROR
    patch(path, off, (6).to_bytes(8, "big"))  # the header names another fid
    with pytest.raises(ReadFailed, match="holds fid 6"):
        h.reader.read(5)
    patch(path, off, (5).to_bytes(8, "big") + b"\x00\x07")  # bad ref
    with pytest.raises(ReadFailed):
        h.reader.read(5)
    patch(path, off + 8, b"\x00\x01\xff\xff\xff\xff")  # size 2^32-1
    with pytest.raises(ReadFailed):
        h.reader.read(5)


def test_deleted_is_not_found(h):
    h.put(6, b"six")
    loc = h.ireader.get(6)
    assert h.store.delete(6)
    with pytest.raises(NotFound):
        h.reader.read(6)

    class Stale:  # an index that did not see the delete yet: the header says ref 0
        def get(self, fid):
            return loc

    stale = ChunkReader(h.data_dir, 1, Stale())
    try:
        with pytest.raises(NotFound):
            stale.read(6)
    finally:
        stale.close()


def test_read_error_injected(h):
    h.put(7, b"seven")
    faults.configure("read:chunk_1_1.chunk")
    with pytest.raises(ReadFailed) as e:
        h.reader.read(7)
    assert e.value.code == Err.READ_ERROR


def test_short_file_tail_reads_as_zeros(tmp_path):
    zeros = bytes(5000)
    path = tmp_path / "chunk_1_1.chunk"
    write_chunk(path, 1, [record(1, b"one"), record(2, zeros)])
    os.truncate(path, os.path.getsize(path) - 3000)  # the zero tail was not copied
    h = Harness(tmp_path)
    try:
        h.open()
        assert h.reader.read(2) == zeros and h.reader.read(1) == b"one"
        assert h.reader.read_at(1, MAX_CHUNK_SIZE - 10, 10) == bytes(10)
    finally:
        h.shut()


def test_chunk_path_only_for_own_chunks(h, tmp_path):
    own = h.reader.chunk_path("chunk_1_1.chunk")
    assert own == os.path.join(str(tmp_path), "chunk_1_1.chunk")
    assert h.reader.chunk_path("chunk_1_2.chunk")
    (tmp_path / "secret").write_text("no")
    os.symlink(tmp_path / "secret", tmp_path / "chunk_1_3.chunk")
    (tmp_path / "chunk_1_4.chunk").mkdir()
    for bad in ("../x", "../chunk_1_1.chunk", "chunk_2_1.chunk", "chunk_1_9.chunk",
                "chunk_1_01.chunk", "chunk_1_0.chunk", "chunk_1_3.chunk", "chunk_1_4.chunk",
                "/etc/passwd", "chunk_1_1.chunk/", "", "chunk_1_1.chunk\0", ".speedy",
                ".speedy/lock", "secret"):
        assert h.reader.chunk_path(bad) is None, bad


def test_check_disk(h, tmp_path):
    h.reader.check_disk()
    faults.configure("read:*")
    with pytest.raises(ReadFailed) as e:
        h.reader.check_disk()
    assert e.value.code == Err.CHUNK_CHECK_ERROR
    faults.configure(None)
    empty = tmp_path / "empty"
    empty.mkdir()
    r = ChunkReader(str(empty), 1, h.ireader)
    with pytest.raises(ReadFailed) as e:
        r.check_disk()
    assert e.value.code == Err.CHUNK_CHECK_ERROR
    r.close()


def test_reader_opens_read_only(h):
    h.put(8, b"eight")
    h.reader.read(8)
    fd = next(iter(h.reader._files[1].values()))
    with pytest.raises(OSError):
        os.pwrite(fd, b"x", 100)
    assert MiB  # the store keeps writing through its own descriptor
    h.put(9, b"nine")
    assert h.reader.read(9) == b"nine"


def _read_acked(data_dir, index_name, acked, stop, result):
    """Forked worker: every acknowledged fid reads back byte for byte, never NotFound."""
    from speedy.chunkserver.shm.index import IndexReader
    ireader = IndexReader(index_name)
    reader = ChunkReader(data_dir, 1, ireader)
    import random
    rng = random.Random(1)
    bad = reads = 0
    try:
        while not stop.is_set() or reads == 0:
            n = acked.value
            if not n:
                continue
            fid = n - 1 if rng.random() < 0.5 else rng.randrange(n)
            try:
                ok = reader.read(fid) == payload(fid, fid % 300)
            except (NotFound, ReadFailed):
                ok = False
            reads += 1
            bad += not ok
    finally:
        reader.close()
        ireader.close()
    result.put((reads, bad))


def test_forked_reader_sees_every_acknowledged_write(h):
    import multiprocessing
    ctx = multiprocessing.get_context("fork")
    acked = ctx.Value("Q", 0, lock=False)
    stop = ctx.Event()
    result = ctx.Queue()
    child = ctx.Process(target=_read_acked,
                        args=(h.data_dir, h.index.name, acked, stop, result))
    child.start()
    try:
        fid = 0
        while fid < 3000:  # batches of 1..8 staged writes, one commit each
            for _ in range(1 + fid % 8):
                body = payload(fid, fid % 300)
                h.store.stage(fid, [memoryview(body)], len(body), zlib.adler32(body, 0))
                fid += 1
            h.store.commit()
            acked.value = fid
        stop.set()
        reads, bad = result.get(timeout=120)
    finally:
        stop.set()
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    assert bad == 0 and reads > 0
    assert h.index.capacity > 1024  # the table grew while the child read
