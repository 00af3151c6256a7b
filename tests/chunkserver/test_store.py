"""ChunkStore on real files: creation, appends, group commit, deletes, recovery, snapshot."""
from __future__ import annotations

import logging
import os
import random
import subprocess
import tracemalloc
import zlib

import pytest

from speedy.chunkserver import diskio, faults
from speedy.format.chunkfile import SUPERBLOCK_SIZE, Superblock, chunk_name
from speedy.wire.protocol import Err
from speedy.chunkserver.reader import NotFound
from speedy.chunkserver.store.chunkstore import FileExists, NoRoom, StartError, WriteFailed
from tests.support.store import (MiB, Harness, patch, payload, read_superblock, record,
                       write_chunk)

from tests.support import PYTHON, ROOT


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path)
    yield harness
    harness.shut()


@pytest.fixture(autouse=True)
def no_faults():
    faults.configure(None)
    yield
    faults.configure(None)


def chunk_path(h, cid: int) -> str:
    return os.path.join(h.data_dir, chunk_name(h.group_id, cid))


def test_first_start_creates_preallocated_chunks(h):
    h.open(chunks=3)
    names = sorted(os.listdir(h.data_dir))
    assert names == [".speedy", "chunk_1_1.chunk", "chunk_1_2.chunk", "chunk_1_3.chunk"]
    for cid in (1, 2, 3):
        st = os.stat(chunk_path(h, cid))
        assert st.st_size == MiB
        assert st.st_blocks * 512 >= MiB  # really allocated, not sparse
        assert read_superblock(chunk_path(h, cid)) == Superblock.empty(cid, MiB)
    assert os.path.isdir(os.path.join(h.data_dir, ".speedy"))
    assert h.store.chunk_stats() == [(1, MiB - 55), (2, MiB - 55), (3, MiB - 55)]
    assert h.store.file_count() == 0 and h.store.chunk_ids() == [1, 2, 3]


def test_write_commit_read_and_reopen(h):
    h.open()
    data = {fid: payload(fid, size) for fid, size in [(0, 0), (1, 5), (2, 4096), (77, 100000)]}
    for fid, body in data.items():
        h.put(fid, body)
    for fid, body in data.items():
        assert h.reader.read(fid) == body
    sb = read_superblock(chunk_path(h, 1))
    assert sb.files_alloc == sb.files_count == 4
    assert sb.current_offset == 55 + sum(30 + len(b) for b in data.values())
    assert sb.avail_space == MiB - sb.current_offset
    for snap in (True, False):
        h.reopen(snapshot=snap)
        assert h.store.open_mode == ("snapshot" if snap else "scan")
        assert h.store.file_count() == 4
        for fid, body in data.items():
            assert h.reader.read(fid) == body


def test_group_commit_one_fsync_per_chunk(h):
    h.open(sync=True)
    big = payload(1, MiB - 55 - 30 - 100)
    for fid in range(10, 15):
        h.store.stage(fid, [memoryview(b"x" * fid)], fid, zlib.adler32(b"x" * fid, 0))
    assert h.store.has(12) and h.store.file_count() == 0
    with pytest.raises(NotFound):
        h.reader.read(12)  # staged is not visible
    with pytest.raises(FileExists):
        h.store.stage(12, [], 0, 0)
    # this one does not fit chunk 1 any more: goes to chunk 2 in the same batch
    h.store.stage(99, [memoryview(big)], len(big), zlib.adler32(big, 0))
    before = h.store.fsync_count
    assert sorted(h.store.commit()) == [10, 11, 12, 13, 14, 99]
    assert h.store.fsync_count - before == 2  # chunks 1 and 2, once each
    assert h.store.commit() == []
    assert h.reader.read(14) == b"x" * 14 and h.reader.read(99) == big
    assert h.ireader.get(99)[0] == 2
    assert read_superblock(chunk_path(h, 1)).files_count == 5
    with pytest.raises(FileExists):
        h.store.stage(12, [], 0, 0)


def test_scattered_parts_and_zero_length(h):
    h.open()
    parts = [memoryview(bytearray(b"ab")), memoryview(b"cde"), memoryview(bytearray(MiB // 4))]
    total = sum(len(p) for p in parts)
    body = b"".join(bytes(p) for p in parts)
    h.store.stage(5, parts, total, zlib.adler32(body, 0))
    h.store.stage(6, [], 0, 0)
    with pytest.raises(ValueError):
        h.store.stage(7, [memoryview(b"abc")], 4, 0)
    h.store.commit()
    assert h.reader.read(5) == body and h.reader.read(6) == b""


def test_room_first_fit_and_no_room(h):
    h.open()
    size = MiB - 55 - 30 - 1  # the largest that fits an empty chunk
    assert h.store.max_size() == size
    assert h.store.can_fit(size) and not h.store.can_fit(size + 1)
    h.put(1, payload(1, 600000))
    h.put(2, payload(2, 600000))  # no room left in chunk 1
    assert [h.ireader.get(f)[0] for f in (1, 2)] == [1, 2]
    h.put(3, payload(3, 1000))  # first fit: back to chunk 1
    assert h.ireader.get(3)[0] == 1
    avail = dict(h.store.chunk_stats())
    assert not h.store.can_fit(max(avail.values()) - 30)  # strictly greater than size + 30
    assert h.store.can_fit(max(avail.values()) - 31)
    with pytest.raises(NoRoom) as e:
        h.store.stage(4, [memoryview(payload(4, 600000))], 600000, 0)
    assert e.value.code == Err.CHUNK_UNAVAILABLE
    assert not h.store.read_only


def test_delete_persists_and_fid_can_be_written_again(h):
    h.open(sync=True)
    for fid in range(1, 6):
        h.put(fid, payload(fid, 1000))
    assert h.store.delete(3) and not h.store.delete(3) and not h.store.delete(1234)
    assert not h.store.has(3)
    with pytest.raises(NotFound):
        h.reader.read(3)
    sb = read_superblock(chunk_path(h, 1))
    assert (sb.files_alloc, sb.files_count) == (5, 4)
    for snap in (True, False):
        h.reopen(snapshot=snap)
        assert not h.store.has(3) and h.store.file_count() == 4
        with pytest.raises(NotFound):
            h.reader.read(3)
    h.put(3, b"second life")
    assert h.reader.read(3) == b"second life"
    for snap in (True, False):
        h.reopen(snapshot=snap)
        assert h.reader.read(3) == b"second life"
        assert h.store.file_count() == 5


def test_torn_last_record_is_cut(h, caplog):
    h.open()
    for fid in (1, 2, 3):
        h.put(fid, payload(fid, 5000))
    last = h.ireader.get(3)[1]
    h.shut()
    patch(chunk_path(h, 1), last + 30 + 2500, bytes(2500))  # second half never reached the disk
    with caplog.at_level(logging.WARNING, "speedy.chunkserver.store.chunkstore"):
        h.reopen(snapshot=False)
    assert h.reader.read(2) == payload(2, 5000)
    assert not h.store.has(3)
    sb = read_superblock(chunk_path(h, 1))
    assert sb.current_offset == last and sb.files_count == 2
    assert f"cut at offset {last}" in caplog.text and "checksum" in caplog.text
    h.put(3, b"again")  # the space is reused
    assert h.ireader.get(3) == (1, last)


def test_bad_checksum_in_the_middle_is_skipped(h, caplog):
    """CHUNKFILE.md: damage with valid records after it is skipped, not cut; the damaged
    range counts as garbage and is never written over."""
    h.open()
    for fid in (1, 2, 3):
        h.put(fid, payload(fid, 300))
    second = h.ireader.get(2)[1]
    h.shut()
    patch(chunk_path(h, 1), second + 30 + 10, b"\xff")
    with caplog.at_level(logging.WARNING, "speedy.chunkserver.store.chunkstore"):
        h.reopen(snapshot=False)
    assert h.reader.read(1) == payload(1, 300)
    assert not h.store.has(2)
    assert h.reader.read(3) == payload(3, 300)
    end = second + 2 * 330
    assert read_superblock(chunk_path(h, 1)).current_offset == end
    assert f"damaged bytes {second}-{second + 330} skipped" in caplog.text
    assert "fid 2" in caplog.text
    assert h.store.chunks[1].garbage_bytes == 330
    h.put(4, b"after")
    assert h.ireader.get(4) == (1, end)


@pytest.mark.parametrize("garbage", ["random", "zeros", "stale", "huge"])
def test_garbage_after_current_offset_is_ignored(tmp_path, garbage):
    rng = random.Random(3)
    extra = {
        "random": bytes(rng.getrandbits(8) for _ in range(5000)),
        "zeros": bytes(5000),
        "stale": record(42, b"stale but valid-looking"),
        "huge": b"\0" * 8 + b"\0\x01" + b"\xff\xff\xff\xff" + bytes(16),
    }[garbage]
    recs = [record(1, b"one"), record(2, b"two")]
    write_chunk(tmp_path / "chunk_1_1.chunk", 1, recs, extra=extra)
    h = Harness(tmp_path)
    try:
        h.open()
        assert sorted(f for f, _, _ in h.index.items()) == [1, 2]
        assert h.reader.read(2) == b"two" and not h.store.has(42)
        h.put(42, b"new 42")  # overwrites the garbage
        h.reopen(snapshot=False)
        assert h.reader.read(42) == b"new 42" and h.reader.read(1) == b"one"
    finally:
        h.shut()


def test_header_with_huge_size_inside_current_offset_is_cut_without_big_reads(tmp_path, caplog):
    recs = [record(1, b"one")]
    huge = b"\0" * 7 + b"\x07" + b"\0\x01" + b"\xff\xff\xff\xff" + b"\0" * 8 + b"\0" * 8
    body_len = sum(map(len, recs)) + len(huge) + 5000
    offset = SUPERBLOCK_SIZE + body_len
    path = tmp_path / "chunk_1_1.chunk"
    write_chunk(path, 1, recs, extra=huge + bytes(5000))
    patch(path, 0, Superblock(1, 2, 2, offset, MiB - offset).encode())
    h = Harness(tmp_path)
    tracemalloc.start()
    try:
        with caplog.at_level(logging.WARNING, "speedy.chunkserver.store.chunkstore"):
            h.open()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    try:
        assert peak < 32 * MiB
        assert h.reader.read(1) == b"one" and not h.store.has(7)
        assert read_superblock(path).current_offset == SUPERBLOCK_SIZE + len(recs[0])
        assert "4294967295" in caplog.text
    finally:
        h.shut()


@pytest.mark.parametrize("damage", ["checksum", "magic", "zeros"])
def test_corrupt_superblock_is_rebuilt(tmp_path, damage, caplog):
    recs = [record(1, b"one"), record(2, b"two", ref=0), record(3, payload(3, 70000))]
    path = tmp_path / "chunk_1_1.chunk"
    write_chunk(path, 1, recs, extra=bytes(1000) + record(9, b"after zeros"))
    if damage == "checksum":
        patch(path, 20, b"\x99")
    elif damage == "magic":
        patch(path, 0, b"X")
    else:
        patch(path, 0, bytes(55))
    h = Harness(tmp_path)
    try:
        with caplog.at_level(logging.WARNING, "speedy.chunkserver.store.chunkstore"):
            h.open()
        assert "rebuilt" in caplog.text
        sb = read_superblock(path)
        assert (sb.files_alloc, sb.files_count) == (3, 2)
        assert sb.current_offset == SUPERBLOCK_SIZE + sum(map(len, recs))
        assert sb.avail_space == MiB - sb.current_offset
        assert h.reader.read(3) == payload(3, 70000)
        assert not h.store.has(2) and not h.store.has(9)
    finally:
        h.shut()


def test_truncated_and_short_chunk_files(h, caplog):
    h.open()
    for fid in (1, 2, 3):
        h.put(fid, payload(fid, 2000))
    third = h.ireader.get(3)[1]
    end = read_superblock(chunk_path(h, 1)).current_offset
    h.shut()
    os.truncate(chunk_path(h, 2), end - 1000)  # shorter than the chunk: zeros missing
    os.truncate(chunk_path(h, 1), third + 100)  # cut in the middle of record 3
    with caplog.at_level(logging.WARNING, "speedy.chunkserver.store.chunkstore"):
        h.reopen(snapshot=False)
    assert h.reader.read(2) == payload(2, 2000) and not h.store.has(3)
    assert os.path.getsize(chunk_path(h, 1)) == third + 100  # not extended by recovery
    h.put(3, payload(3, 500000))  # appending past the end of a short file is fine
    h.reopen(snapshot=False)
    assert h.reader.read(3) == payload(3, 500000)
    assert dict(h.store.chunk_stats())[2] == MiB - 55


def test_short_file_superblock_only_and_empty_file(tmp_path):
    (tmp_path / "chunk_1_1.chunk").write_bytes(Superblock.empty(1, MiB).encode())
    (tmp_path / "chunk_1_2.chunk").write_bytes(b"")
    h = Harness(tmp_path)
    try:
        h.open()
        assert os.path.getsize(tmp_path / "chunk_1_1.chunk") == 55
        assert h.store.chunk_stats() == [(1, MiB - 55), (2, MiB - 55)]
        h.put(1, b"x")
        assert h.reader.read(1) == b"x"
    finally:
        h.shut()


def test_more_and_fewer_chunk_files(tmp_path):
    write_chunk(tmp_path / "chunk_1_2.chunk", 2, [record(5, b"five")])
    write_chunk(tmp_path / "chunk_1_4.chunk", 4, [record(6, b"six")])
    (tmp_path / "speedy.log").write_text("a log file in the data dir is fine\n")
    (tmp_path / "notes").mkdir()
    h = Harness(tmp_path)
    try:
        h.open(chunks=3)
        assert h.store.chunk_ids() == [1, 2, 3, 4]
        assert os.path.getsize(tmp_path / "chunk_1_2.chunk") < MiB  # existing: not extended
        assert os.path.getsize(tmp_path / "chunk_1_3.chunk") == MiB
        assert h.reader.read(5) == b"five" and h.reader.read(6) == b"six"
    finally:
        h.shut()


def test_foreign_group_chunk_file_refuses_start(tmp_path):
    write_chunk(tmp_path / "chunk_2_1.chunk", 1, [])
    h = Harness(tmp_path)
    with pytest.raises(StartError, match="chunk_2_1.chunk.*group 2.*--group_id=1"):
        h.open()
    assert not os.path.exists(tmp_path / "chunk_1_1.chunk")
    os.unlink(tmp_path / "chunk_2_1.chunk")
    h.open()
    h.shut()


def test_second_server_on_the_same_dir_refused(h, tmp_path):
    h.open()
    other = Harness(tmp_path)
    with pytest.raises(StartError, match="in use"):
        other.open()
    h.shut()
    other.open()
    other.shut()


def test_fallocate_failure_leaves_nothing_behind(tmp_path):
    faults.configure("fallocate:chunk_1_2.chunk")
    h = Harness(tmp_path)
    with pytest.raises(StartError, match="cannot preallocate .*chunk_1_2.chunk.*No space left"):
        h.open(chunks=3)
    assert sorted(os.listdir(tmp_path)) == [".speedy"]
    assert os.listdir(tmp_path / ".speedy") == ["lock"]
    faults.configure(None)
    h.open(chunks=3)
    assert h.store.chunk_ids() == [1, 2, 3]
    h.shut()


def test_real_out_of_space_is_a_clear_start_error(tmp_path):
    """A file size limit makes posix_fallocate fail for real (EFBIG) without using the disk."""
    code = (
        "import resource, signal, sys\n"
        "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
        "resource.setrlimit(resource.RLIMIT_FSIZE, (3 << 20, 3 << 20))\n"
        "from speedy.chunkserver.shm.index import FidIndex\n"
        "from speedy.chunkserver.store.chunkstore import ChunkStore, StartError\n"
        "idx = FidIndex.create('spystfs%d' % __import__('os').getpid())\n"
        "try:\n"
        f"    ChunkStore({str(tmp_path)!r}, 1, 2, 8 << 20, False, idx).open()\n"
        "except StartError as e:\n"
        "    print('START ERROR:', e); sys.exit(2)\n"
        "finally:\n"
        "    idx.close(); idx.unlink()\n"
    )
    res = subprocess.run([PYTHON, "-c", code], cwd=ROOT, capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 2, res.stderr
    assert "START ERROR: cannot preallocate" in res.stdout and "chunk_1_1.chunk" in res.stdout
    assert "Traceback" not in res.stderr
    assert sorted(os.listdir(tmp_path)) == [".speedy"]
    h = Harness(tmp_path)
    h.open()
    h.shut()


@pytest.mark.parametrize("rule", ["write:*", "superblock:*", "fsync:*"])
def test_injected_write_faults(h, rule):
    h.open(sync=True)
    h.put(1, b"before")
    faults.configure(rule)
    with pytest.raises(WriteFailed) as e:
        for fid in (2, 3):
            h.store.stage(fid, [memoryview(b"lost")], 4, zlib.adler32(b"lost", 0))
        h.store.commit()
    assert e.value.code == Err.WRITE_ERROR
    assert h.store.read_only
    assert not h.store.has(2) and not h.store.has(3) and h.store.file_count() == 1
    assert h.ireader.get(2) is None
    faults.configure(None)
    sb = read_superblock(chunk_path(h, 1))
    assert sb.files_count == 1  # the old superblock is back on disk
    h.store.read_only = False
    h.put(4, b"after")
    h.crash()
    h.open()
    assert h.reader.read(1) == b"before" and h.reader.read(4) == b"after"
    assert not h.store.has(2) and not h.store.has(3)


def test_fault_after_n_and_only_one_file(h):
    h.open(sync=True)
    faults.configure("write:chunk_1_2.chunk:after=1,fsync:chunk_1_1.chunk:after=2:times=1")
    h.put(1, b"a")  # fsync #1 of chunk 1
    h.put(2, b"b")  # fsync #2
    with pytest.raises(WriteFailed):
        h.put(3, b"c")  # fsync #3 fails once
    h.put(4, b"d")
    h.put(5, payload(5, 700000))
    h.put(6, payload(6, 400000))  # chunk 1 is full: the first write into chunk 2 passes
    with pytest.raises(WriteFailed):
        h.put(7, payload(7, 400000))
    assert [h.store.has(f) for f in range(1, 8)] == [True, True, False, True, True, True, False]


def test_faults_syntax():
    rules = faults.parse("write:chunk_1_2.chunk:after=3,fsync:*:after=0:errno=ENOSPC,"
                         "superblock:*:times=2")
    assert [(r.op, r.pattern, r.after, r.times) for r in rules] == [
        ("write", "chunk_1_2.chunk", 3, -1), ("fsync", "*", 0, -1), ("superblock", "*", 0, 2)]
    assert rules[1].errno == 28
    for bad in ("bogus:*", "write", "write:*:later=1", "write:*:errno=ENOPE"):
        with pytest.raises(ValueError):
            faults.parse(bad)


def test_the_seam_is_the_os_calls_unless_faults_are_set():
    """Unset, the I/O seam's functions are the os ones (no cost); SPEEDY_FAULTS swaps them
    at start, in every process that imports the store or the reader."""
    faults.configure("write:*")
    assert diskio.pwritev is not os.pwritev
    faults.configure(None)
    assert all(getattr(diskio, name) is getattr(os, name) for name in diskio.CALLS)
    code = ("import os, sys, speedy.chunkserver.writer as w\n"
            "from speedy.chunkserver import diskio\n"
            "print('faults' if 'speedy.chunkserver.faults' in sys.modules else 'none',"
            " diskio.pwritev is os.pwritev)")
    for env, want in (({}, "none True"), ({"SPEEDY_FAULTS": "fsync:*"}, "faults False")):
        res = subprocess.run([PYTHON, "-c", code], cwd=ROOT, capture_output=True, text=True,
                             timeout=60, env={**{k: v for k, v in os.environ.items()
                                                 if k != "SPEEDY_FAULTS"}, **env})
        assert res.stdout.split() == want.split(), res.stderr


def test_delete_faults(h):
    h.open(sync=True)
    h.put(1, b"one")
    faults.configure("ref:*")
    with pytest.raises(WriteFailed):
        h.store.delete(1)
    assert h.store.read_only and h.store.has(1)
    faults.configure("fsync:*")
    with pytest.raises(WriteFailed):
        h.store.delete(1)  # marked on disk, so it is gone from the index
    faults.configure(None)
    assert not h.store.has(1)
    h.reopen(snapshot=False)
    assert not h.store.has(1)


def test_duplicate_fid_later_wins(tmp_path, caplog):
    write_chunk(tmp_path / "chunk_1_1.chunk", 1,
                [record(9, b"newer", ts=2000), record(8, b"eight")])
    write_chunk(tmp_path / "chunk_1_2.chunk", 2, [record(9, b"older", ts=1000),
                                                  record(10, b"x", ts=5), record(10, b"y", ts=5)])
    h = Harness(tmp_path)
    try:
        with caplog.at_level(logging.WARNING, "speedy.chunkserver.store.chunkstore"):
            h.open()
        assert h.reader.read(9) == b"newer"
        assert h.reader.read(10) == b"y"  # same time: the one further on wins
        assert "fid 9: two live records" in caplog.text
        assert h.store.file_count() == 3
        assert read_superblock(tmp_path / "chunk_1_2.chunk").files_count == 3  # both stay
        h.reopen()  # the snapshot remembers the shadowed one
        assert h.store.open_mode == "snapshot"
        assert h.store.delete(9)
        h.reopen(snapshot=False)
        assert not h.store.has(9)  # the older copy did not come back
    finally:
        h.shut()


def test_snapshot_fresh_stale_corrupt(h, caplog):
    h.open()
    for fid in range(50):
        h.put(fid, payload(fid, 100))
    h.reopen()
    assert h.store.open_mode == "snapshot" and h.store.file_count() == 50
    snap = os.path.join(h.data_dir, ".speedy", "index.snap")
    saved = open(snap, "rb").read()
    # appends after the snapshot: followed incrementally
    for fid in range(50, 60):
        h.put(fid, payload(fid, 100))
    h.crash()
    open(snap, "wb").write(saved)
    h.open()
    assert h.store.open_mode == "incremental"
    assert h.reader.read(59) == payload(59, 100) and h.store.file_count() == 60
    # deletes after the snapshot: journaled, the snapshot stays (tests/test_delete_journal.py)
    saved = open(snap, "rb").read()
    assert h.store.delete(5)
    assert open(snap, "rb").read() == saved
    h.crash()
    h.open()
    assert h.store.open_mode == "snapshot" and not h.store.has(5)
    # a delete the journal does not know (the journal was lost): the snapshot cannot
    # follow, a full scan
    assert h.store.delete(6)
    h.crash()
    os.unlink(os.path.join(h.data_dir, ".speedy", "deletes.log"))
    with caplog.at_level(logging.WARNING, "speedy.chunkserver.store.chunkstore"):
        h.open()
    assert h.store.open_mode == "scan" and not h.store.has(5) and not h.store.has(6)
    assert "snapshot" in caplog.text and "files_count" in caplog.text
    # a corrupt snapshot: ignored
    h.shut()
    data = bytearray(open(snap, "rb").read())
    data[-100] ^= 0xFF
    open(snap, "wb").write(bytes(data))
    h.open()
    assert h.store.open_mode == "scan" and h.store.file_count() == 58
    h.shut()
    open(snap, "wb").write(b"SPYSNAP1 short")
    h.open()
    assert h.store.open_mode == "scan" and h.reader.read(7) == payload(7, 100)


def test_snapshot_of_another_chunk_file_is_not_used(h):
    h.open()
    h.put(1, b"one")
    h.shut()
    path = chunk_path(h, 1)
    data = open(path, "rb").read()
    os.unlink(path)
    write_chunk(path, 1, [record(2, b"two")])  # same name, another file
    h.open()
    assert h.store.open_mode == "scan"
    assert not h.store.has(1) and h.reader.read(2) == b"two"
    del data


def test_start_time_with_many_files(tmp_path):
    """100,000 small files: open() from the snapshot is fast, and faster than the scan."""
    n = 100_000
    recs = [record(fid * 7, payload(fid, 10)) for fid in range(n)]
    write_chunk(tmp_path / "chunk_1_1.chunk", 1, recs, capacity=8 * MiB)
    h = Harness(tmp_path, chunk_size=8 * MiB)
    try:
        h.open()
        scan = h.store.open_seconds
        assert h.store.open_mode == "scan" and h.store.file_count() == n
        h.reopen()
        fast = h.store.open_seconds
        assert h.store.open_mode == "snapshot" and h.store.file_count() == n
        assert h.reader.read(7 * 12345) == payload(12345, 10)
        print(f"open() with {n} files: scan {scan:.3f}s, snapshot {fast:.3f}s")
        assert fast < 1.0
        assert fast < scan
    finally:
        h.shut()


def test_automatic_snapshot_after_interval(h):
    h.open()
    snap = os.path.join(h.data_dir, ".speedy", "index.snap")
    h.store.snapshot_interval = 1e9
    h.put(1, b"one")
    saved = open(snap, "rb").read()
    assert h.store.delete(1)
    assert open(snap, "rb").read() == saved  # a delete keeps it (journaled)
    h.store.snapshot_interval = 0.05
    import time
    time.sleep(0.1)
    h.put(2, b"two")  # the next change after the interval saves it again
    assert open(snap, "rb").read() != saved
    assert os.path.getsize(os.path.join(h.data_dir, ".speedy", "deletes.log")) == 8  # emptied
    h.crash()  # no close(): the automatic snapshot is what the next start finds
    h.open()
    assert h.store.open_mode == "snapshot"
    assert h.reader.read(2) == b"two" and not h.store.has(1)


def test_random_damage_never_crashes_or_serves_wrong_bytes(tmp_path):
    """Flip random bytes anywhere in a chunk: open() copes, every readable fid is right."""
    rng = random.Random(11)
    bodies = {fid: payload(fid, rng.randrange(0, 3000)) for fid in range(40)}
    cut = 0
    for trial in range(25):
        d = tmp_path / f"t{trial}"
        d.mkdir()
        path = d / "chunk_1_1.chunk"
        write_chunk(path, 1, [record(fid, body) for fid, body in bodies.items()],
                    extra=bytes(rng.randrange(0, 200)))
        size = os.path.getsize(path)
        for _ in range(rng.randrange(1, 4)):
            patch(path, rng.randrange(size), bytes([rng.randrange(256)]))
        if rng.random() < 0.3:
            os.truncate(path, rng.randrange(size))
        h = Harness(d)
        try:
            h.open()
            fids = sorted(f for f, _, _ in h.index.items())
            for fid in fids:
                # (a damaged fid field is not detectable: the header has no checksum)
                if fid in bodies:
                    assert h.reader.read(fid) == bodies[fid]
            cut += len(fids) < len(bodies)
            h.put(1000, b"still writable")
            h.reopen(snapshot=False)
            assert h.reader.read(1000) == b"still writable"
            assert sorted(f for f, _, _ in h.index.items()) == sorted(fids + [1000])
        finally:
            h.shut()
    assert cut > 5
