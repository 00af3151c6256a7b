"""The shared-memory fid index: writer table, reader in another process, growth, fid 0."""
from __future__ import annotations

import itertools
import multiprocessing
import os
import random
import time

import pytest

from speedy.chunkserver.shm.index import MAX_LOAD, FidIndex, IndexReader

_seq = itertools.count()


def shm_names(prefix: str) -> list[str]:
    return [n for n in os.listdir("/dev/shm") if n.startswith(prefix)] \
        if os.path.isdir("/dev/shm") else []


@pytest.fixture
def index():
    prefix = f"spyti{os.getpid()}x{next(_seq)}"
    idx = FidIndex.create(prefix, capacity=1024)
    yield idx
    idx.close()
    idx.unlink()
    assert shm_names(prefix) == []


def loc_of(fid: int) -> tuple[int, int]:
    return fid % 97 + 1, (fid * 7919) % (1 << 32 - 1) + 55


def test_insert_get_remove(index):
    assert index.get(5) is None and len(index) == 0
    index.insert(5, 1, 55)
    assert index.get(5) == (1, 55)
    index.insert(5, 2, 1000)  # overwrite
    assert index.get(5) == (2, 1000) and len(index) == 1
    assert index.remove(5) and not index.remove(5)
    assert index.get(5) is None and len(index) == 0
    index.insert(5, 3, 77)  # reuses the tombstone
    assert index.get(5) == (3, 77) and index.tombstones == 0


def test_fid_zero_and_max(index):
    reader = IndexReader(index.name)
    try:
        assert reader.get(0) is None
        index.insert(0, 1, 55)
        index.insert(2**64 - 1, 4294967295, 4294967295)
        assert index.get(0) == (1, 55)
        assert reader.get(0) == (1, 55)
        assert reader.get(2**64 - 1) == (4294967295, 4294967295)
        assert index.remove(0)
        assert reader.get(0) is None and reader.get(2**64 - 1) is not None
    finally:
        reader.close()
    with pytest.raises(ValueError):
        index.insert(1, 0, 55)  # chunk ids start at 1
    with pytest.raises(ValueError):
        index.insert(-1, 1, 55)


def test_growth_keeps_entries_and_memory_budget(index):
    reader = IndexReader(index.name)
    try:
        start_cap = index.capacity
        fids = random.Random(1).sample(range(1 << 62), 20000)
        for fid in fids:
            index.insert(fid, *loc_of(fid))
        assert index.capacity > start_cap
        assert len(index) == 20000
        assert len(index) <= index.capacity * MAX_LOAD
        assert index.nbytes() / len(index) <= 40
        for fid in fids:
            assert index.get(fid) == loc_of(fid)
            assert reader.get(fid) == loc_of(fid)
        assert sorted(f for f, _, _ in index.items()) == sorted(fids)
    finally:
        reader.close()


def test_many_removes_do_not_fill_the_table(index):
    for round_ in range(20):
        for fid in range(round_ * 500, round_ * 500 + 500):
            index.insert(fid, 1, 55)
        for fid in range(round_ * 500, round_ * 500 + 500):
            assert index.remove(fid)
    assert len(index) == 0
    assert index.capacity == 1024  # tombstones were rehashed away, not grown around
    assert index.get(123) is None


def test_random_against_dict(index):
    rng = random.Random(7)
    ref: dict[int, tuple[int, int]] = {}
    keys = [rng.getrandbits(64) for _ in range(60000)] + list(range(100))
    for _ in range(100000):
        fid = rng.choice(keys)
        op = rng.random()
        if op < 0.7:
            loc = (rng.randrange(1, 1 << 32), rng.randrange(55, 1 << 32))
            index.insert(fid, *loc)
            ref[fid] = loc
        else:
            assert index.remove(fid) == (ref.pop(fid, None) is not None)
    assert len(index) == len(ref)
    reader = IndexReader(index.name)
    try:
        for fid in keys:
            assert index.get(fid) == ref.get(fid)
            assert reader.get(fid) == ref.get(fid)
    finally:
        reader.close()


def _child_reader(name: str, acked, stop, result) -> None:
    """In a forked process: every acknowledged fid must be there with the right location."""
    reader = IndexReader(name)
    rng = random.Random(os.getpid())
    checks = errors = 0
    try:
        while not stop.is_set():
            n = acked.value
            if n == 0:
                continue
            fid = n - 1 if rng.random() < 0.5 else rng.randrange(n)
            got = reader.get(fid * 1000003)
            checks += 1
            if got != loc_of(fid * 1000003):
                errors += 1
        # after the writer stopped: everything is there
        for fid in range(acked.value):
            if reader.get(fid * 1000003) != loc_of(fid * 1000003):
                errors += 1
    finally:
        reader.close()
    result.put((checks, errors))


def test_reader_in_forked_process_sees_inserts_and_growth(index):
    ctx = multiprocessing.get_context("fork")
    acked = ctx.Value("Q", 0, lock=False)
    stop = ctx.Event()
    result = ctx.Queue()
    child = ctx.Process(target=_child_reader, args=(index.name, acked, stop, result))
    child.start()
    try:
        start_cap = index.capacity
        for fid in range(30000):
            index.insert(fid * 1000003, *loc_of(fid * 1000003))
            acked.value = fid + 1  # acknowledged only after insert returned
        assert index.capacity >= 32 * start_cap  # several growths while the child read
        stop.set()
        checks, errors = result.get(timeout=120)
    finally:
        stop.set()
        child.join(timeout=30)
        if child.is_alive():
            child.kill()
    assert child.exitcode == 0
    assert errors == 0
    assert checks > 100


def test_reader_attached_before_growth_follows_and_old_segments_go(index):
    reader = IndexReader(index.name)
    try:
        index.insert(1, 1, 55)
        assert reader.get(1) == (1, 55)
        first_segments = shm_names(index.prefix)
        for fid in range(2, 5000):
            index.insert(fid, 1, 55 + fid)
        assert reader.get(4999) == (1, 55 + 4999)
        now = shm_names(index.prefix)
        assert len(now) == 3  # control, generations and the current table only
        assert set(now) != set(first_segments)
    finally:
        reader.close()


def test_unlink_from_a_stale_handle_removes_the_grown_table():
    prefix = f"spyti{os.getpid()}x{next(_seq)}"
    idx = FidIndex.create(prefix, capacity=1024)
    pid = os.fork()
    if pid == 0:  # the "writer" grows the table in another process
        try:
            for fid in range(5000):
                idx.insert(fid, 1, 55)
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    reader = IndexReader(idx.name)
    assert reader.get(4999) == (1, 55)
    reader.close()
    idx.close()
    idx.unlink()  # this handle still knows only the first table
    assert shm_names(prefix) == []


def test_snapshot_image_round_trip(index):
    for fid in range(3000):
        index.insert(fid, 2, fid + 55)
    index.remove(10)
    image = bytes(index.raw_table())
    cap, count, tombs = index.capacity, len(index), index.tombstones
    index.clear()
    assert len(index) == 0 and index.get(5) is None

    def fill(view):
        view[:] = image

    index.load_raw(cap, count, tombs, fill)
    assert len(index) == 2999 and index.get(5) == (2, 60) and index.get(10) is None
    index.insert(10, 1, 55)
    assert index.get(10) == (1, 55)


def test_reader_speed(index):
    for fid in range(10000):
        index.insert(fid, 1, 55)
    reader = IndexReader(index.name)
    try:
        t0 = time.monotonic()
        for fid in range(10000):
            reader.get(fid)
        assert time.monotonic() - t0 < 5
    finally:
        reader.close()


def test_reader_survives_a_writer_that_died_inside_an_update(index, monkeypatch):
    import speedy.chunkserver.shm.index as mod
    monkeypatch.setattr(mod, "SPIN_LIMIT", 0.2)
    index.insert(3, 1, 55)
    reader = IndexReader(index.name)
    try:
        index._lock()  # as if the writer was killed half-way through an insert
        t0 = time.monotonic()
        assert reader.get(3) == (1, 55)  # after waiting SPIN_LIMIT
        t1 = time.monotonic()
        assert reader.get(3) == (1, 55) and reader.get(4) is None  # no more waiting
        assert t1 - t0 >= 0.2 and time.monotonic() - t1 < 0.1
        index._unlock()
        index.insert(4, 2, 99)
        assert reader.get(4) == (2, 99)
    finally:
        reader.close()


def test_load_replaces_everything_in_one_new_table(index):
    reader = IndexReader(index.name)
    try:
        index.insert(7, 1, 55)  # gone after the load
        entries = {fid: loc_of(fid)[0] << 32 | loc_of(fid)[1] for fid in range(1000, 31000, 3)}
        entries[0] = 1 << 32 | 55  # fid 0 is a fid like any other
        index.load(entries)
        assert len(index) == len(entries) and index.get(7) is None
        assert reader.get(7) is None  # the reader follows the published table
        for fid in (0, 1000, 1003, 30997):
            want = loc_of(fid) if fid else (1, 55)
            assert index.get(fid) == want and reader.get(fid) == want
        assert index.capacity * MAX_LOAD >= len(entries) and len(shm_names(index.prefix)) == 3
        index.insert(2, 3, 99)  # an ordinary insert afterwards
        index.remove(1000)
        assert index.get(2) == (3, 99) and index.get(1000) is None
        assert len(index) == len(entries)
    finally:
        reader.close()


@pytest.mark.parametrize("loc", [0, 1, 55, 1 << 64])
def test_load_refuses_a_location_without_a_chunk(index, loc):
    index.insert(9, 1, 55)
    with pytest.raises(ValueError):
        index.load({5: loc})
    assert index.get(9) == (1, 55) and len(index) == 1  # the old table stays
