"""Compaction on the store harness: live records rewritten in order, deleted space back,
reads right in every phase, the snapshot and journal consistent, the original's format."""
from __future__ import annotations

import os
import time
import zlib

import pytest

from speedy.chunkserver.store import compact
from speedy.format.chunkfile import RECORD_HEADER, RECORD_HEADER_SIZE, SUPERBLOCK_SIZE, Superblock
from tests.support.store import MiB, Harness, payload


def run(store, chunk_id: int, budget: int = 64 << 10, each=None,
        keep_deleted: float = compact.KEEP_DELETED) -> compact.Result:
    """Compact one chunk to the end, a slice at a time; each(c) runs between slices."""
    c = compact.start(store, chunk_id, keep_deleted)
    assert c is not None
    while not c.finished:
        c.step(budget)
        if each is not None and not c.finished:
            each(c)
    return c.result


def original_view(path: str) -> dict[int, bytes]:
    """Parse a chunk file the way the original C server does: trust the superblock (magic,
    adler32 from 0), records back to back from 55 up to current_offset, all live."""
    with open(path, "rb") as f:
        raw = f.read()
    sb = Superblock.decode(raw[:SUPERBLOCK_SIZE])  # magic and checksum, or FormatError
    size = os.path.getsize(path)
    assert sb.avail_space + sb.current_offset <= max(size, sb.avail_space + sb.current_offset)
    out = {}
    pos = SUPERBLOCK_SIZE
    n = 0
    while pos < sb.current_offset:
        fid, ref, dsize, csum, _ts = RECORD_HEADER.unpack_from(raw, pos)
        data = raw[pos + RECORD_HEADER_SIZE:pos + RECORD_HEADER_SIZE + dsize]
        assert ref == 1 and zlib.adler32(data, 0) == csum
        out[fid] = data
        pos += RECORD_HEADER_SIZE + dsize
        n += 1
    assert pos == sb.current_offset and n == sb.files_alloc == sb.files_count
    return out


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path, chunks=2, chunk_size=MiB)
    harness.open()
    yield harness
    harness.shut()


def fill(h, n: int = 60, size: int = 9000) -> dict[int, bytes]:
    files = {}
    for fid in range(1, n + 1):
        files[fid] = payload(fid, size + fid)
        h.put(fid, files[fid])
    return files


def test_deleted_space_comes_back_and_the_file_is_the_originals_format(h):
    files = fill(h)
    ch = h.store.chunks[1]
    doomed = [fid for fid in files if fid % 10 < 7 and h.store.index.get(fid)[0] == 1]
    deleted_bytes = sum(RECORD_HEADER_SIZE + len(files[f]) for f in doomed)
    h.store.delete_many(doomed)
    assert ch.garbage_bytes == deleted_bytes
    avail_before = dict(h.store.chunk_stats())[1]
    ino = os.stat(ch.path).st_ino
    result = run(h.store, 1, keep_deleted=0)  # no tombstones: every byte comes back
    assert result.freed_bytes == deleted_bytes
    assert dict(h.store.chunk_stats())[1] == avail_before + deleted_bytes
    assert ch.garbage_bytes == 0 and os.stat(ch.path).st_ino != ino
    live = {f: d for f, d in files.items() if f not in doomed}
    for fid, data in live.items():
        assert h.reader.read(fid) == data
    on_disk = original_view(ch.path)
    assert on_disk == {f: d for f, d in live.items() if h.store.index.get(f)[0] == 1}
    assert sorted(on_disk) == sorted(on_disk, key=lambda f: h.store.index.get(f)[1])  # in order
    assert not [n for n in os.listdir(os.path.join(h.data_dir, ".speedy")) if n.startswith("tmp.")]
    # the snapshot saved after the swap is trusted, and garbage survives in it
    h.store.delete_many([max(on_disk)])
    g = ch.garbage_bytes
    h.reopen()
    assert h.store.open_mode == "snapshot"
    assert h.store.chunks[1].garbage_bytes == g
    assert all(h.reader.read(f) == d for f, d in live.items() if f != max(on_disk))
    h.reopen(snapshot=False)
    assert h.store.chunks[1].garbage_bytes == g


def test_new_writes_use_the_freed_space(h):
    files = fill(h, n=200, size=9000)
    fid = 1000
    while h.store.can_fit(20_000):  # both chunks full
        files[fid] = payload(fid, 20_000)
        h.put(fid, files[fid])
        fid += 1
    assert not h.store.can_fit(200_000)
    h.store.delete_many([f for f in files if h.store.index.get(f)[0] == 1])
    run(h.store, 1, keep_deleted=0)
    h.put(5000, payload(5000, 200_000))
    assert h.store.index.get(5000)[0] == 1
    assert h.reader.read(5000) == payload(5000, 200_000)


def test_reads_right_in_every_phase_and_deletes_during_it_stay_deleted(h, monkeypatch):
    files = fill(h)
    in_one = [f for f in files if h.store.index.get(f)[0] == 1]
    h.store.delete_many(in_one[::3])
    gone = set(in_one[::3])
    later = [f for f in in_one if f not in gone][::4]
    phases = set()

    def each(c):
        phases.add(c.phase)
        for fid, data in files.items():
            if fid in gone:
                with pytest.raises(Exception):
                    h.reader.read(fid)
            else:
                assert h.reader.read(fid) == data, (c.phase, fid)
        if later and c.phase in ("copy", "move"):
            fid = later.pop()
            assert h.store.delete_many([fid]) == [True]
            gone.add(fid)
        # a write during compaction goes to the other chunk
        new = 10_000 + len(phases) * 100 + c.pos % 97
        if not h.store.has(new):
            h.put(new, payload(new, 100))
            files[new] = payload(new, 100)
            assert h.store.index.get(new)[0] != 1

    monkeypatch.setattr(compact, "MOVE_SLICE", 5)
    monkeypatch.setattr(compact, "COLLECT_SLOTS", 100)
    run(h.store, 1, budget=20_000, each=each)
    assert {"collect", "copy", "swap", "move"} <= phases
    for fid in gone:
        assert h.store.index.get(fid) is None
    h.reopen(snapshot=False)
    for fid, data in files.items():
        if fid in gone:
            assert h.store.index.get(fid) is None, fid
        else:
            assert h.reader.read(fid) == data


def test_a_reader_holding_the_old_file_reads_it_until_the_entry_moves(h):
    files = fill(h, n=40)
    in_one = [f for f in files if h.store.index.get(f)[0] == 1]
    h.store.delete_many(in_one[:10])
    keep = in_one[-1]
    assert h.reader.read(keep) == files[keep]  # the reader has the old file open
    old_loc = h.store.index.get(keep)
    c = compact.start(h.store, 1)
    while c.phase != "move":
        c.step(1 << 20)
    # renamed: the path names the new file, the index still has the old offset
    assert h.store.index.get(keep) == old_loc
    assert h.reader.read(keep) == files[keep]
    from speedy.chunkserver.reader import ChunkReader
    r2 = ChunkReader(h.data_dir, 1, h.ireader)  # never opened the chunk: opens the old name
    try:
        assert r2.read(keep) == files[keep]
    finally:
        r2.close()
    while not c.finished:
        c.step(1 << 20)
    assert h.store.index.get(keep) != old_loc
    assert h.reader.read(keep) == files[keep]


def test_deleted_files_leave_tombstones_until_they_expire(h, monkeypatch):
    files = fill(h, n=30)
    in_one = [f for f in files if h.store.index.get(f)[0] == 1]
    gone = in_one[:10]
    h.store.delete_many(gone)
    deleted = sum(RECORD_HEADER_SIZE + len(files[f]) for f in gone)
    result = run(h.store, 1)
    assert result.freed_bytes == deleted - RECORD_HEADER_SIZE * len(gone)
    ch = h.store.chunks[1]
    assert ch.garbage_bytes == 0
    raw = open(ch.path, "rb").read()
    sb = Superblock.decode(raw[:SUPERBLOCK_SIZE])
    assert sb.files_alloc == sb.files_count + len(gone)
    heads, pos = [], SUPERBLOCK_SIZE
    while pos < sb.current_offset:
        head = RECORD_HEADER.unpack_from(raw, pos)
        heads.append(head)
        pos += RECORD_HEADER_SIZE + head[2]
    assert pos == sb.current_offset
    assert sorted(hd[0] for hd in heads if hd[1] == 0) == sorted(gone)
    assert all(hd[2] == 0 for hd in heads if hd[1] == 0)
    # a restart does not count tombstones as garbage; a later compaction keeps them ...
    h.reopen(snapshot=False)
    assert h.store.chunks[1].garbage_bytes == 0
    assert run(h.store, 1).freed_bytes == 0
    # ... until they are older than keep_deleted
    monkeypatch.setattr(compact.time, "time", lambda: 2e9)
    assert run(h.store, 1, keep_deleted=3600).freed_bytes == RECORD_HEADER_SIZE * len(gone)
    for fid, data in files.items():
        if fid not in gone:
            assert h.reader.read(fid) == data


def test_a_reader_looks_again_when_the_chunk_changes_under_its_open(h, monkeypatch):
    from speedy.chunkserver.shm.generations import ChunkState
    files = fill(h, n=5)
    real = h.ireader.chunk_state
    calls = []

    def flaky(cid):  # the first check after an open sees another generation
        calls.append(cid)
        return ChunkState(12345) if len(calls) == 1 else real(cid)

    monkeypatch.setattr(h.ireader, "chunk_state", flaky)
    assert h.reader.read(1) == files[1]
    assert len(calls) >= 2
    assert ChunkState(5, True, 100, 6).file_of(100) == 6
    assert ChunkState(5, True, 100, 6).file_of(101) == 5
    assert ChunkState(5).file_of(100) == 5


def test_nothing_to_compact_is_cheap_and_harmless(h):
    files = fill(h, n=10)
    result = run(h.store, 1)
    assert result.freed_bytes == 0
    for fid, data in files.items():
        assert h.reader.read(fid) == data


def test_close_during_copy_drops_the_copy(h, tmp_path):
    files = fill(h)
    h.store.delete_many([1, 2, 3])
    c = compact.start(h.store, 1)
    c.step(10_000)
    c.step(10_000)
    assert c.phase == "copy"
    h.reopen()
    assert h.store.open_mode == "snapshot"
    assert not [n for n in os.listdir(tmp_path / ".speedy") if n.startswith("tmp.")]
    for fid, data in files.items():
        if fid > 3:
            assert h.reader.read(fid) == data


def test_qualifies():
    from speedy.chunkserver.garbage import qualifies
    assert qualifies(300, 1000, MiB, 0.3)
    assert not qualifies(299, 1000, MiB, 0.3)
    assert not qualifies(0, 1000, MiB, 0.0)
    assert not qualifies(300, 1000, 2 * MiB * 64, 0.3, automatic=True)


def test_compacted_original_chunk_files_stay_the_originals_format(tmp_path):
    """The C vectors: compacting a chunk gives exactly the file the original would have
    written without the deleted files (its records byte for byte, a right superblock)."""
    from tests.chunkserver.test_vectors_store import CHUNK_SIZE, unpack
    manifest = unpack(tmp_path)
    path = str(tmp_path / "chunk_3_1.chunk")
    before = open(path, "rb").read()
    h = Harness(tmp_path, group_id=3, chunks=2, chunk_size=CHUNK_SIZE)
    try:
        h.open()
        in_one = sorted(f for f in map(int, manifest["files"])
                        if h.store.index.get(f)[0] == 1)
        gone = set(in_one[::2])
        h.store.delete_many(sorted(gone))
        kept, pos = [], SUPERBLOCK_SIZE
        sb0 = Superblock.decode(before[:SUPERBLOCK_SIZE])
        while pos < sb0.current_offset:
            fid, _ref, size = RECORD_HEADER.unpack_from(before, pos)[:3]
            if fid not in gone:
                kept.append(before[pos:pos + RECORD_HEADER_SIZE + size])
            pos += RECORD_HEADER_SIZE + size
        run(h.store, 1, keep_deleted=0)
        after = open(path, "rb").read()
        body = b"".join(kept)
        sb = Superblock.decode(after[:SUPERBLOCK_SIZE])  # magic, adler32 from 0
        assert sb == Superblock(1, len(kept), len(kept), SUPERBLOCK_SIZE + len(body),
                                CHUNK_SIZE - SUPERBLOCK_SIZE - len(body))
        assert after[SUPERBLOCK_SIZE:sb.current_offset] == body
        assert original_view(path).keys() == {int(f) for f in in_one} - gone
        assert len(after) == len(before)  # the same (short) file size
        h.reopen(snapshot=False)
        for fid_text, want in manifest["files"].items():
            fid = int(fid_text)
            if fid in gone:
                assert h.store.index.get(fid) is None
            else:
                assert h.reader.read(fid) == payload(fid, want["size"])
    finally:
        h.shut()


def test_generations_of_many_chunks(tmp_path):
    from speedy.chunkserver.shm.generations import MAX_ENTRIES, SEGMENT_SIZE, Generations
    buf = bytearray(SEGMENT_SIZE)
    w, r = Generations(memoryview(buf)), Generations(memoryview(buf))  # writer, reader
    w.init()
    base = w.base()
    assert r.state(7).gen == base and r.state(9).gen == base
    gens = {}
    for cid in range(1, MAX_ENTRIES + 1):
        nxt = w.begin(cid)
        assert r.state(cid).moving and r.state(cid).next == nxt
        w.advance(cid, 1000)
        assert r.state(cid).file_of(1000) == nxt and r.state(cid).file_of(1001) != nxt
        w.end(cid)
        gens[cid] = nxt
    assert len(set(gens.values())) == MAX_ENTRIES  # every file generation is new
    for cid, g in gens.items():
        assert r.state(cid).gen == w.state(cid).gen == g and not r.state(cid).moving
    assert not w.has_room(MAX_ENTRIES + 1) and w.has_room(3)
    assert r.state(MAX_ENTRIES + 1).gen == base
    w.release()
    r.release()


def test_damage_between_live_records_is_left_behind(h):
    from tests.support.store import patch
    files = fill(h, n=20)
    in_one = [f for f in files if h.store.index.get(f)[0] == 1]
    victim, after = in_one[3], in_one[4:]
    _, off = h.store.index.get(victim)
    h.store.delete_many([victim, in_one[6]])
    patch(h.store.chunks[1].path, off, b"\xff" * RECORD_HEADER_SIZE)  # its header: garbage
    result = run(h.store, 1)
    for fid in files:
        if fid not in (victim, in_one[6]):
            assert h.reader.read(fid) == files[fid]
    assert result.freed_bytes > 0 and h.store.chunks[1].garbage_bytes == 0
    h.reopen(snapshot=False)
    assert all(h.reader.read(f) == files[f] for f in after if f != in_one[6])
    assert h.store.index.get(victim) is None and h.store.index.get(in_one[6]) is None


def _read_all(data_dir, index_name, fids, stop, result):
    """Forked worker: every live fid reads back byte for byte while chunks are compacted."""
    from speedy.chunkserver.reader import ChunkReader
    from speedy.chunkserver.shm.index import IndexReader
    ireader = IndexReader(index_name)
    reader = ChunkReader(data_dir, 1, ireader)
    bad, reads, moving = [], 0, 0
    try:
        while not stop.is_set() or reads == 0:
            for fid, size in fids:
                try:
                    ok = reader.read(fid) == payload(fid, size)
                except Exception as e:  # noqa: BLE001 - reported
                    ok = False
                    bad.append(f"{fid}: {e}")
                if not ok and not bad:
                    bad.append(f"{fid}: wrong bytes")
                reads += 1
            moving += ireader.chunk_state(1).moving
    finally:
        reader.close()
        ireader.close()
    result.put((reads, bad[:5], moving))


def test_a_forked_reader_reads_every_file_through_two_compactions(h, monkeypatch):
    import multiprocessing
    files = fill(h, n=60, size=5000)
    in_one = [f for f in files if h.store.index.get(f)[0] == 1]
    h.store.delete_many(in_one[::2])
    live = [(f, len(d)) for f, d in files.items() if f not in in_one[::2]]
    monkeypatch.setattr(compact, "MOVE_SLICE", 3)
    ctx = multiprocessing.get_context("fork")
    stop, result = ctx.Event(), ctx.Queue()
    child = ctx.Process(target=_read_all, args=(h.data_dir, h.index.name, live, stop, result))
    child.start()
    try:
        def slow(c):
            time.sleep(0.002)
        run(h.store, 1, budget=8000, each=slow)
        run(h.store, 1, budget=8000, each=slow)  # the same chunk again: a third file
        stop.set()
        reads, bad, moving = result.get(timeout=120)
    finally:
        stop.set()
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    assert reads > 0 and moving > 0 and not bad, bad
