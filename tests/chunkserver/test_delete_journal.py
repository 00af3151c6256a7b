"""The delete journal: DELETEs keep the index snapshot usable across a crash.

Every start here that goes through the snapshot and its journal is checked against a
forced full scan of the same files (the .speedy dir removed): the same fids must be
served with the same bytes, and every acknowledged delete stays deleted in both.
"""
from __future__ import annotations

import logging
import os
import shutil
import threading
import zlib

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from speedy.chunkserver.store import journal
from speedy.chunkserver import faults
from speedy.format.chunkfile import RECORD_HEADER, RECORD_HEADER_SIZE, REF_OFFSET, chunk_name
from speedy.wire.protocol import Err
from speedy.chunkserver.reader import NotFound, ReadFailed
from speedy.chunkserver.shm.counters import StatsView
from speedy.chunkserver.store.chunkstore import WriteFailed
from tests.support.store import (Harness, MiB, patch, payload, read_superblock, record,
                                 write_chunk, writes_recorded)
from tests.support.server import make_server

FIDS = range(0, 80)


@pytest.fixture(autouse=True)
def no_faults():
    faults.configure(None)
    yield
    faults.configure(None)


@pytest.fixture
def h(tmp_path):
    harness = Harness(tmp_path / "data", chunks=2)
    os.makedirs(harness.data_dir)
    yield harness
    harness.shut()


def meta(h: Harness, name: str) -> str:
    return os.path.join(h.data_dir, ".speedy", name)


def chunk_path(h: Harness, cid: int) -> str:
    return os.path.join(h.data_dir, chunk_name(h.group_id, cid))


def served(h: Harness, fids=FIDS) -> dict[int, bytes]:
    """{fid: bytes} of every fid the reader serves."""
    out = {}
    for fid in fids:
        try:
            out[fid] = h.reader.read(fid)
        except (NotFound, ReadFailed):
            pass
    return out


def assert_full_scan_agrees(h: Harness, caplog=None, fids=FIDS) -> dict[int, bytes]:
    """What is served now equals what a full scan (no .speedy at all) serves after it."""
    before = served(h, fids)
    count = h.store.file_count()
    h.crash()
    shutil.rmtree(os.path.join(h.data_dir, ".speedy"))
    if caplog is not None:
        caplog.clear()
    h.open()
    assert h.store.open_mode == "scan"
    assert served(h, fids) == before
    assert h.store.file_count() == count
    if caplog is not None:  # the superblocks were right: the scan fixed nothing
        assert "superblock counts fixed" not in caplog.text
    return before


def filled(h: Harness, n: int = 40, size: int = 100, **changes) -> None:
    """n files, then a clean close (the snapshot is saved) and an open from it."""
    h.open(**changes)
    for fid in range(n):
        h.put(fid, payload(fid, size))
    h.reopen(**changes)
    assert h.store.open_mode == "snapshot"


def ref_on_disk(h: Harness, cid: int, off: int) -> int:
    with open(chunk_path(h, cid), "rb") as f:
        f.seek(off)
        return RECORD_HEADER.unpack(f.read(RECORD_HEADER_SIZE))[1]


def test_deletes_keep_the_snapshot_and_a_crash_replays_them(h, caplog):
    filled(h)
    snap = open(meta(h, "index.snap"), "rb").read()
    locs = {fid: h.index.get(fid) for fid in (3, 17, 39)}
    # 3 is far from the end of the records; 17 and 39 inside the 4 KiB the stamp checks
    assert all(h.store.delete(fid) for fid in locs)
    assert open(meta(h, "index.snap"), "rb").read() == snap
    assert os.path.getsize(meta(h, "deletes.log")) == 8 + 3 * journal.ENTRY_SIZE
    h.crash()
    with caplog.at_level(logging.INFO, "speedy.chunkserver.store.chunkstore"):
        h.open()
    assert h.store.open_mode == "snapshot" and "3 entries replayed" in caplog.text
    assert h.store.file_count() == 37 and not any(h.store.has(f) for f in locs)
    assert read_superblock(chunk_path(h, 1)).files_count == 37
    assert all(ref_on_disk(h, *loc) == 0 for loc in locs.values())
    assert h.reader.read(4) == payload(4, 100)
    h.store.delete(4)  # the journal goes on after a start from it
    h.crash()
    h.open()
    assert h.store.open_mode == "snapshot" and not h.store.has(4)
    with caplog.at_level(logging.WARNING, "speedy.chunkserver.store.chunkstore"):
        got = assert_full_scan_agrees(h, caplog)
    assert sorted(got) == sorted(set(range(40)) - {3, 4, 17, 39})


def test_deleted_appended_and_rewritten_files(h, caplog):
    filled(h)
    for fid in range(40, 50):
        h.put(fid, payload(fid, 300))  # appended after the snapshot
    assert h.store.delete(45) and h.store.delete(2) and h.store.delete(39)
    h.put(2, b"two again")  # a deleted fid written again
    h.put(39, payload(39, 5000))
    h.crash()
    h.open()
    assert h.store.open_mode == "incremental"
    got = served(h)
    assert got[2] == b"two again" and got[39] == payload(39, 5000) and 45 not in got
    assert h.store.file_count() == 49
    assert os.path.getsize(meta(h, "deletes.log")) == 8  # the new snapshot covers them
    with caplog.at_level(logging.WARNING, "speedy.chunkserver.store.chunkstore"):
        assert assert_full_scan_agrees(h, caplog) == got


@pytest.mark.parametrize("op", ["ref", "superblock", "fsync"])
def test_a_delete_cut_short_is_finished_at_start(h, op, caplog):
    """The journal entry is written, then the delete fails (as a crash there would leave
    it): the start replays it, the record is marked on disk and the counts are fixed."""
    filled(h, sync=True)
    loc = h.index.get(11)
    faults.configure(f"{op}:*")
    with pytest.raises(WriteFailed):
        h.store.delete(11)
    faults.configure(None)
    h.crash()
    with caplog.at_level(logging.WARNING, "speedy.chunkserver.store.chunkstore"):
        h.open()
    assert h.store.open_mode == "snapshot" and not h.store.has(11)
    assert ref_on_disk(h, *loc) == 0
    assert read_superblock(chunk_path(h, 1)).files_count == 39
    if op == "ref":
        assert "marked deleted now" in caplog.text
    with caplog.at_level(logging.WARNING, "speedy.chunkserver.store.chunkstore"):
        assert 11 not in assert_full_scan_agrees(h, caplog)


def test_deletes_as_one_group(h, caplog):
    """delete_many (the writer's DELETEs of one round): one journal append, one fsync per
    touched chunk; a crash after its ref bytes and before its superblock is finished."""
    filled(h, sync=True)
    fsyncs = h.store.fsync_count
    assert h.store.delete_many([4, 9, 4, 1234, 13]) == [True, True, False, False, True]
    assert h.store.fsync_count == fsyncs + 1
    entries, _ = journal.parse(open(meta(h, "deletes.log"), "rb").read())
    assert [(e.fid, e.more) for e in entries] == [(4, True), (9, True), (13, False)]
    faults.configure("superblock:*")
    with pytest.raises(WriteFailed):
        h.store.delete_many([20, 21])  # both refs are 0 on disk, the superblock says 37
    faults.configure(None)
    h.crash()
    with caplog.at_level(logging.WARNING, "speedy.chunkserver.store.chunkstore"):
        h.open()
    assert h.store.open_mode == "snapshot" and "files_count 37 -> 35" in caplog.text
    assert not any(h.store.has(f) for f in (4, 9, 13, 20, 21)) and h.store.file_count() == 35
    assert_full_scan_agrees(h)


def test_a_long_journal_makes_the_next_change_save_the_snapshot(h):
    filled(h)
    h.store.journal_limit = 3
    snap = open(meta(h, "index.snap"), "rb").read()
    assert h.store.delete(1) and h.store.delete(2)
    assert open(meta(h, "index.snap"), "rb").read() == snap
    assert h.store.delete(3)  # the third entry: saved, and the journal emptied
    assert open(meta(h, "index.snap"), "rb").read() != snap
    assert os.path.getsize(meta(h, "deletes.log")) == 8
    h.crash()
    h.open()
    assert h.store.open_mode == "snapshot" and h.store.file_count() == 37


def test_torn_journal_tail_is_cut(h, caplog):
    filled(h)
    assert h.store.delete(5) and h.store.delete(6)
    torn = journal.encode_group([(7, [h.index.get(7), (2, 55)])])[:journal.ENTRY_SIZE]
    h.crash()
    good = os.path.getsize(meta(h, "deletes.log"))
    with open(meta(h, "deletes.log"), "ab") as f:
        f.write(torn + b"\x01\x02\x03")  # half a group (more=1), then garbage
    with caplog.at_level(logging.WARNING, "speedy.chunkserver.store.chunkstore"):
        h.open()
    assert h.store.open_mode == "snapshot" and "torn tail" in caplog.text
    assert not h.store.has(5) and not h.store.has(6) and h.store.has(7)
    assert os.path.getsize(meta(h, "deletes.log")) == good  # appends follow good entries
    assert h.store.delete(8)
    h.crash()
    h.open()
    assert h.store.open_mode == "snapshot"
    assert [h.store.has(f) for f in (5, 6, 7, 8)] == [False, False, True, False]
    assert_full_scan_agrees(h)


def test_bad_entry_in_the_middle_never_resurrects_a_delete(h, caplog):
    filled(h)
    assert h.store.delete(5) and h.store.delete(6) and h.store.delete(7)
    h.crash()
    patch(meta(h, "deletes.log"), 8 + journal.ENTRY_SIZE + 3, b"\xff")  # entry of fid 6
    with caplog.at_level(logging.WARNING, "speedy.chunkserver.store.chunkstore"):
        h.open()
    # the journal is cut before fid 6: the chunk's files_count says more was deleted
    assert h.store.open_mode == "scan" and "files_count" in caplog.text
    assert not any(h.store.has(f) for f in (5, 6, 7))
    assert_full_scan_agrees(h)


@pytest.mark.parametrize("damage", ["head", "other fid", "no such chunk", "past the end"])
def test_journal_that_cannot_be_trusted_means_a_full_scan(h, damage, caplog):
    filled(h)
    assert h.store.delete(5)
    off7 = h.index.get(7)[1]
    h.crash()
    path = meta(h, "deletes.log")
    if damage == "head":
        patch(path, 0, b"NOTAJRNL")
    else:
        entry = {"other fid": (1, off7), "no such chunk": (9, off7),
                 "past the end": (1, (1 << 20) - 100)}[damage]
        with open(path, "ab") as f:
            f.write(journal.encode_group([(9999, [entry])]))
    with caplog.at_level(logging.WARNING, "speedy.chunkserver.store.chunkstore"):
        h.open()
    assert h.store.open_mode == "scan" and "ignored" in caplog.text
    assert not h.store.has(5) and h.store.has(7) and h.store.file_count() == 39
    assert ref_on_disk(h, 1, off7) == 1


@pytest.mark.parametrize("change", ["ref in the tail", "foreign delete", "offset shrank",
                                    "tail data", "counts only"])
def test_changes_the_journal_does_not_explain_mean_a_full_scan(h, change, caplog):
    filled(h)
    assert h.store.delete(20)  # a journaled delete too: its tolerance must not hide others
    loc38, loc2 = h.index.get(38), h.index.get(2)
    h.crash()
    path = chunk_path(h, 1)
    sb = read_superblock(path)
    if change == "ref in the tail":
        patch(path, loc38[1] + REF_OFFSET, b"\x00\x00")
    elif change == "foreign delete":  # as another server would do it: ref and count
        patch(path, loc2[1] + REF_OFFSET, b"\x00\x00")
        sb.files_count -= 1
    elif change == "offset shrank":
        sb.current_offset = loc38[1]
        sb.avail_space = MiB - sb.current_offset
        sb.files_alloc -= 2
        sb.files_count -= 2
    elif change == "tail data":
        patch(path, loc38[1] + RECORD_HEADER_SIZE + 5, b"\xee")
    else:  # more than the last delete could have left behind
        sb.files_count += 2
    patch(path, 0, sb.encode())
    with caplog.at_level(logging.WARNING, "speedy.chunkserver.store.chunkstore"):
        h.open()
    assert h.store.open_mode == "scan" and "ignored" in caplog.text
    assert not h.store.has(20)


def test_crash_between_snapshot_save_and_journal_reset(h):
    filled(h)
    for fid in (1, 37, 38):  # 37 and 38 inside the stamp's 4 KiB
        assert h.store.delete(fid)
    old = open(meta(h, "deletes.log"), "rb").read()
    assert h.store.save_snapshot()
    assert os.path.getsize(meta(h, "deletes.log")) == 8
    with open(meta(h, "deletes.log"), "wb") as f:
        f.write(old)  # as if the crash came before the reset
    h.crash()
    h.open()
    assert h.store.open_mode == "snapshot" and h.store.file_count() == 37
    assert h.store.delete(36)  # appends after the stale entries
    h.crash()
    h.open()
    assert h.store.open_mode == "snapshot"
    assert not any(h.store.has(f) for f in (1, 36, 37, 38)) and h.store.file_count() == 36
    assert_full_scan_agrees(h)


def test_delete_of_a_shadowed_duplicate(tmp_path, caplog):
    data = tmp_path / "data"
    data.mkdir()
    write_chunk(data / "chunk_1_1.chunk", 1, [record(9, b"newer", ts=2000), record(8, b"8")])
    write_chunk(data / "chunk_1_2.chunk", 2, [record(9, b"older", ts=1000)])
    h = Harness(data)
    try:
        h.open()
        h.reopen()
        assert h.store.open_mode == "snapshot" and h.store.shadows
        assert h.store.delete(9)
        assert os.path.getsize(meta(h, "deletes.log")) == 8 + 2 * journal.ENTRY_SIZE
        saved = open(meta(h, "deletes.log"), "rb").read()
        h.crash()
        h.open()
        assert h.store.open_mode == "snapshot" and not h.store.has(9) and not h.store.shadows
        assert_full_scan_agrees(h, fids=[8, 9])
    finally:
        h.shut()
    # the first entry of the group alone (a torn append) is no delete at all
    assert journal.parse(saved[:8 + journal.ENTRY_SIZE]) == ([], 8)
    assert len(journal.parse(saved)[0]) == 2


def test_journal_that_cannot_be_written_drops_the_snapshot(h):
    filled(h)
    os.close(h.store.journal.fd)  # every append now fails (EBADF)
    h.store.journal.fd = os.open(os.devnull, os.O_RDONLY)
    assert h.store.delete(3)
    assert not os.path.exists(meta(h, "index.snap"))  # the old rule
    h.crash()
    h.open()
    assert h.store.open_mode == "scan" and not h.store.has(3)


# -- every prefix of the writes after a snapshot ----------------------------------------

FIXED_OPS = [("del", 2, 0),  # far from the end of the snapshot's records
             ("del", 39, 0),  # inside its last 4 KiB
             ("put", 40, 500), ("put", 41, 70), ("commit", 0, 0),
             ("del", 40, 0),  # a record appended after the snapshot
             ("put", 2, 321), ("commit", 0, 0),  # a deleted fid written again
             ("del", 17, 0), ("del", 2, 0), ("put", 42, 9000), ("commit", 0, 0)]


def record_workload(h: Harness, ops: list) -> tuple[list, list]:
    """Run ops after a snapshot ("put" is staged until the next "commit"; "del" runs a
    delete), logging every chunk and journal write and the acknowledgements."""
    log: list[tuple[str, int, bytes]] = []
    acks: list = []  # (log start, log end, "put"/"del", fid, size)
    store = h.store
    staged: dict[int, int] = {}
    start = 0
    with writes_recorded(log, lambda path: os.path.relpath(path, h.data_dir)):
        for kind, fid, size in ops + [("commit", 0, 0)]:
            if kind == "put" and not store.has(fid):
                body = payload(fid + 1000, size)
                if not staged:
                    start = len(log)
                store.stage(fid, [memoryview(body)], size, zlib.adler32(body, 0))
                staged[fid] = size
            elif kind == "commit" or (kind == "del" and staged):
                for done in store.commit():
                    acks.append((start, len(log), "put", done, staged[done]))
                staged.clear()
            if kind == "del":
                at = len(log)
                if store.delete(fid):
                    acks.append((at, len(log), "del", fid, None))
    return log, acks


def make_base(work, files: int = 40) -> dict[str, bytes]:
    """A data dir with files of 100 B and its snapshot; the bytes of every file in it."""
    h = Harness(work, chunks=2, chunk_size=64 * 1024)
    h.open()
    for fid in range(files):
        h.put(fid, payload(fid, 100))
    h.shut()
    names = [n for n in os.listdir(work) if n.endswith(".chunk")]
    names += [".speedy/index.snap", ".speedy/deletes.log"]
    return {n: (work / n).read_bytes() for n in names}


def replay_case(work, pristine: dict[str, bytes], log: list, acks: list, k: int,
                cut: int | None) -> str:
    """Rebuild the dir as a crash after log[:k] (+ log[k] torn at cut) left it, start it,
    check the acknowledgements and that a full scan agrees; the start's open_mode."""
    # the chunk files are rewritten in place: the snapshot's stamps name their inodes
    shutil.rmtree(work / ".speedy", ignore_errors=True)
    os.makedirs(work / ".speedy")
    for name, data in pristine.items():
        with open(work / name, "r+b" if (work / name).exists() else "wb") as f:
            f.write(data)
            f.truncate()
    writes = log[:k] + ([(*log[k][:2], log[k][2][:cut])] if cut else [])
    for name, offset, data in writes:
        with open(work / name, "r+b") as f:
            f.seek(offset)
            f.write(data)
    r = Harness(work, chunks=2, chunk_size=64 * 1024)
    try:
        r.open()
        mode = r.store.open_mode
        check_acks(served(r), acks, k, f"prefix {k} cut {cut} ({mode})")
        assert_full_scan_agrees(r)
        return mode
    finally:
        r.shut()


def check_acks(got: dict[int, bytes], acks: list, position: int, what: str) -> None:
    """Acknowledged puts read back, acknowledged deletes are gone, nothing else changed."""
    want = {fid: payload(fid, 100) for fid in range(40)}
    maybe: dict[int, list] = {}
    for start, end, kind, fid, size in acks:
        if start > position:
            break
        body = payload(fid + 1000, size) if kind == "put" else None
        if end <= position:
            want[fid] = body
            maybe.pop(fid, None)
        else:  # in flight: either outcome
            maybe[fid] = [want.get(fid), body]
    for fid in set(want) | set(got):
        allowed = maybe.get(fid, [want.get(fid)])
        assert got.get(fid) in allowed, f"{what}: fid {fid}"


def recorded(work, ops: list) -> tuple[dict[str, bytes], list, list]:
    """make_base, then ops run from its snapshot with every write logged."""
    pristine = make_base(work)
    h = Harness(work, chunks=2, chunk_size=64 * 1024)
    h.open()
    assert h.store.open_mode == "snapshot"
    h.store.snapshot_interval = 0
    try:
        log, acks = record_workload(h, ops)
    finally:
        h.crash()
    return pristine, log, acks


def test_every_prefix_agrees_with_a_full_scan(tmp_path):
    pristine, log, acks = recorded(tmp_path, FIXED_OPS)
    assert any(name.endswith("deletes.log") for name, _, _ in log) and len(log) > 15
    for k in range(len(log) + 1):
        assert replay_case(tmp_path, pristine, log, acks, k, None) != "scan", k
        if k < len(log):
            for cut in {1, len(log[k][2]) // 2}:
                if 0 < cut < len(log[k][2]):
                    replay_case(tmp_path, pristine, log, acks, k, cut)


OPS = st.lists(st.tuples(st.sampled_from(["put", "del", "del", "commit"]),
                         st.integers(0, 45), st.sampled_from([0, 1, 100, 700, 5000])),
               min_size=1, max_size=14)


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=OPS, data=st.data())
def test_random_workload_and_crash_point_agree_with_a_full_scan(tmp_path_factory, ops, data):
    """Any puts and deletes after a snapshot, a crash after any write (or inside one)."""
    work = tmp_path_factory.mktemp("random")
    pristine, log, acks = recorded(work, ops)
    k = data.draw(st.integers(0, len(log)), label="crash after writes")
    cut = None
    if k < len(log) and data.draw(st.booleans(), label="torn"):
        cut = data.draw(st.integers(1, max(1, len(log[k][2]) - 1)), label="cut")
    mode = replay_case(work, pristine, log, acks, k, cut)
    if cut is None:
        assert mode != "scan"
    shutil.rmtree(work)


# -- a real server ----------------------------------------------------------------------

def opened_modes(srv) -> list[str]:
    return [line.rsplit("(", 1)[-1].rstrip(")") for line in srv.log().splitlines()
            if " chunks in " in line and "files," in line]


@pytest.mark.parametrize("sync", [0, 1])
def test_server_kill_9_after_deletes_starts_from_the_snapshot(tmp_path, sync):
    srv = make_server(tmp_path, "dj", sync=sync, chunk_size=4 * MiB)
    try:
        srv.start()
        with srv.client() as c:
            for fid in range(1, 61):
                assert c.write(fid, payload(fid, 700)) == Err.SUCCESS
        assert srv.stop() == 0
        srv.port = 0
        srv.start()
        with srv.client() as c:
            for fid in (3, 30, 60):
                assert c.delete(fid) == Err.SUCCESS
            assert c.write(61, payload(61, 50)) == Err.SUCCESS
            assert c.delete(61) == Err.SUCCESS
            assert c.write(3, b"three") == Err.SUCCESS
        srv.discard()
        srv.port = 0
        srv.start()
        assert opened_modes(srv)[-1] in ("snapshot", "incremental"), srv.log()[-2000:]
        with srv.client() as c:
            first = {fid: c.read(fid) for fid in range(1, 62)}
        srv.discard()
        assert first[3] == (Err.SUCCESS, b"three")
        for fid in (30, 60, 61):
            assert first[fid] == (Err.FILE_NOT_FOUND, b"")
        assert all(first[f] == (Err.SUCCESS, payload(f, 700)) for f in range(1, 60)
                   if f not in (3, 30))
        shutil.rmtree(os.path.join(srv.data_dir, ".speedy"))
        srv.port = 0
        srv.start()
        assert opened_modes(srv)[-1] == "scan"
        with srv.client() as c:
            assert {fid: c.read(fid) for fid in range(1, 62)} == first
    finally:
        if srv.proc is not None:
            srv.discard()


def test_server_concurrent_deletes_survive_kill_9(tmp_path):
    """DELETEs from 8 connections at once (--sync=1: the writer groups them), mixed with
    WRITEs, then kill -9: every acknowledged delete stays deleted, the start does not scan."""
    srv = make_server(tmp_path, "many", sync=1, workers=2, mem_blocks=32, chunk_size=4 * MiB)
    try:
        srv.start()
        with srv.client() as c:
            for fid in range(1, 201):
                assert c.write(fid, payload(fid, 300)) == Err.SUCCESS
        assert srv.stop() == 0
        srv.port = 0
        srv.start()
        stats = StatsView.attach(f"speedy{srv.pid}_stats")
        results: dict[int, int] = {}

        def client(n: int) -> None:
            with srv.client() as c:
                for fid in range(n, 201, 8):
                    results[fid] = c.delete(fid)
                    if fid % 5 == 0:
                        results[1000 + fid] = c.write(1000 + fid, payload(fid, 50))

        threads = [threading.Thread(target=client, args=(n,)) for n in range(1, 9)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        fsyncs = stats.totals()["fsyncs"]
        stats.close()
        srv.discard()
        assert set(results.values()) == {Err.SUCCESS} and len(results) == 240
        print(f"200 DELETEs + 40 WRITEs from 8 connections, --sync=1: {fsyncs} chunk fsyncs")
        srv.port = 0
        srv.start()
        assert opened_modes(srv)[-1] in ("snapshot", "incremental"), srv.log()[-2000:]
        with srv.client() as c:
            assert all(c.read(fid) == (Err.FILE_NOT_FOUND, b"") for fid in range(1, 201))
            assert all(c.read(1000 + f) == (Err.SUCCESS, payload(f, 50))
                       for f in range(5, 201, 5))
    finally:
        if srv.proc is not None:
            srv.discard()
