"""The shared memory-block pool and the shared stats segment, across real processes."""
from __future__ import annotations

import os
import signal
import time

import pytest

from speedy.chunkserver.shm.pool import (BLOCK_SIZE, WRITER_OWNER, BlockPool, HomeSlice,
                                         blocks_for)
from speedy.chunkserver.shm.segments import (remove_stale_segments, segments_with_prefix,
                                             unlink_prefix)
from speedy.wire.protocol import Err, Op
from speedy.chunkserver.shm.counters import StatsView


@pytest.fixture
def prefix():
    p = f"speedy{os.getpid()}t{time.monotonic_ns() % 10**6}"
    yield p
    unlink_prefix(p)


def test_allocate_free_and_limits(prefix):
    pool = BlockPool.create(f"{prefix}_pool", 4)
    try:
        assert pool.allocate(0, 1) == []
        assert pool.allocate(5, 1) is None  # more than the pool
        a = pool.allocate(3, 1)
        assert len(set(a)) == 3 and pool.in_use() == 3
        assert pool.allocate(2, 2) is None  # only one left
        b = pool.allocate(1, 2)
        assert set(a).isdisjoint(b) and pool.in_use() == 4
        pool.free(a)
        assert pool.in_use() == 1
        c = pool.allocate(3, 3)
        assert c is not None and set(c).isdisjoint(b)
        assert pool.free_owner(3) == 3 and pool.free_owner(3) == 0
        assert pool.in_use() == 1
        with pytest.raises(ValueError):
            pool.allocate(1, 0)
    finally:
        pool.close()


def test_claim_moves_ownership_only_from_the_owner(prefix):
    pool = BlockPool.create(f"{prefix}_pool", 4)
    try:
        blocks = pool.allocate(2, 7)
        other = pool.allocate(1, 9)
        assert pool.claim_many([(blocks, 8), (other, 9)]) == [False, True]  # not owner 8's
        assert pool.claim_many([(blocks, 7)]) == [True]
        assert pool.owned_by(WRITER_OWNER) == 3 and pool.free_owner(7) == 0
        assert pool.claim_many([(blocks, 7)]) == [False]  # already the writer's
        pool.free(other)
        pool.free(blocks)
        assert pool.in_use() == 0
    finally:
        pool.close()


def test_home_slices_first_then_the_common_part(prefix):
    pool = BlockPool.create(f"{prefix}_pool", 64, slots=2)  # homes of 4 blocks, 56 common
    try:
        assert (pool.home_size, pool.home(0), pool.home(1)) == (4, range(0, 4), range(4, 8))
        assert pool.home(2) == range(0)
        mine = HomeSlice(pool, 1, owner=5)
        got = [mine.allocate_one() for _ in range(6)]
        assert got[:4] == [4, 5, 6, 7] and all(b >= 8 for b in got[4:])  # then common
        other = BlockPool.attach(pool.name)
        assert (other.common_from, other.home(1)) == (8, range(4, 8))
        other.close()
        common = pool.allocate(56 - 2, 9)  # the common part never hands out home blocks
        assert common is not None and min(common) >= 8
        assert mine.allocate_one() is None and pool.allocate(1, 9) is None
        assert HomeSlice(pool, 0, owner=6).allocate_one() == 0  # slot 0's home is free
        pool.free([5])
        assert mine.allocate_one() == 5 and pool.in_use() == 61
        assert pool.free_owner(5) == 6 and mine.allocate_one() == 6  # a dead worker's
    finally:
        pool.close()


def test_home_slices_never_hand_one_block_to_two_processes(prefix):
    """Two processes allocate from their homes (no lock) and the common part (locked) and
    free at once; each stamps its blocks and checks them: no block is shared."""
    pool = BlockPool.create(f"{prefix}_pool", 32, slots=2)  # homes of 2, 28 common
    pids = []
    for slot in range(2):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                home, held = HomeSlice(pool, slot, owner=slot + 1), []
                for i in range(3000):
                    b = home.allocate_one()
                    if b is not None:
                        pool.view(b)[:8] = bytes([slot + 1]) * 8
                        held.append(b)
                    if len(held) > 12 or (b is None and held):
                        for h in held:
                            assert bytes(pool.view(h)[:8]) == bytes([slot + 1]) * 8
                            assert pool._owners[h] == slot + 1
                        pool.free(held[:7])
                        held = held[7:]
                code = 0
            finally:
                os._exit(code)
        pids.append(pid)
    try:
        assert all(os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) == 0 for p in pids)
    finally:
        pool.close()


def test_views_are_shared_across_fork(prefix):
    pool = BlockPool.create(f"{prefix}_pool", 3)
    try:
        blocks = pool.allocate(2, 1)
        pid = os.fork()
        if pid == 0:  # the child fills the blocks the parent allocated
            try:
                for i, part in enumerate(pool.parts(blocks, BLOCK_SIZE + 10)):
                    part[:] = bytes([i + 1]) * len(part)
            finally:
                os._exit(0)
        os.waitpid(pid, 0)
        parts = pool.parts(blocks, BLOCK_SIZE + 10)
        assert [len(p) for p in parts] == [BLOCK_SIZE, 10]
        assert bytes(parts[0]) == b"\x01" * BLOCK_SIZE and bytes(parts[1]) == b"\x02" * 10
        assert blocks_for(0) == 0 and blocks_for(1) == 1 and blocks_for(BLOCK_SIZE + 1) == 2
        for p in parts:
            p.release()
    finally:
        pool.close()


def test_a_process_killed_inside_the_lock_does_not_block_the_pool(prefix):
    pool = BlockPool.create(f"{prefix}_pool", 2)
    try:
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            pool._lock()
            pool.allocate  # noqa: B018
            os.write(w, b"x")
            time.sleep(60)
            os._exit(0)
        assert os.read(r, 1) == b"x"
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        t0 = time.monotonic()
        assert len(pool.allocate(2, 1)) == 2  # the kernel dropped the dead holder's lock
        assert time.monotonic() - t0 < 5
    finally:
        pool.close()


def test_stale_segments_of_dead_servers_are_removed():
    pid = os.fork()
    if pid == 0:
        os._exit(0)
    os.waitpid(pid, 0)  # a pid that is dead now
    dead = f"speedy{pid}"
    pool = BlockPool.create(f"{dead}_pool", 1)
    pool.close()
    assert segments_with_prefix(dead) == [f"{dead}_pool"]
    assert remove_stale_segments() >= 1
    assert segments_with_prefix(dead) == []


def test_stats_slots_sum(prefix):
    st = StatsView.create(f"{prefix}_stats", 3)
    try:
        a, b = st.worker(0), st.worker(2)
        a.add("read_count", 2)
        b.add("read_count", 5)
        a.add("conn_count")
        a.add("conn_count", -1)
        a.add("conn_count", -1)  # a gauge never goes below 0
        a.observe(Op.READ, Err.SUCCESS, 0.0002)
        b.observe(Op.READ, Err.FILE_NOT_FOUND, 3.0)
        b.observe(Op.WRITE, Err.CHUNK_UNAVAILABLE, 20.0)
        st.set("pending_writes", 4)
        st.set_chunks([(1, 100), (2, 200)])
        other = StatsView.attach(f"{prefix}_stats")  # what another process sees
        t = other.totals(group_id=9)
        other.close()
        assert t["read_count"] == 7 and t["conn_count"] == 0
        assert t["requests"][Op.READ] == 2 and t["requests"][Op.WRITE] == 1
        assert t["errors"] == {(Op.READ, Err.FILE_NOT_FOUND): 1,
                               (Op.WRITE, Err.CHUNK_UNAVAILABLE): 1}
        assert t["latency"][Op.READ]["counts"][0] == 1
        assert t["latency"][Op.WRITE]["counts"][-1] == 1  # above the last bound
        assert abs(t["latency"][Op.READ]["sum"] - 3.0002) < 1e-3
        assert t["chunks"] == [(1, 100), (2, 200)]
        assert t["chunk_free_bytes"] == {"chunk_9_1.chunk": 100, "chunk_9_2.chunk": 200}
        assert t["pending_writes"] == 4 and t["status"] == 0
        st.set("store_failed", 1)
        assert st.status() == 1
        b.reset_gauges()
        assert st.worker(2).get("read_count") == 5  # counters survive a worker's death
    finally:
        st.close()
