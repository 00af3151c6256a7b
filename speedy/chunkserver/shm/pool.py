"""The upload memory-block pool: mem_blocks x 1 MiB in one shared memory segment.

One ``multiprocessing.shared_memory`` segment, created by the supervisor before it forks::

    offset 0              block 0 | block 1 | ... | block n-1      (n x 1 MiB)
    offset n MiB          owner table: n x u16   (0 free, else the owner id)
    offset n MiB + 2n     home size u32, slots u32

An owner id is given to each worker process when it is spawned (1..65534, never reused
while it could still be in the table) and WRITER_OWNER (65535) marks blocks the writer
took over. Each worker slot has a home slice of the table (``home size`` blocks, at most
HOME_MAX, slot i's from i x home size; none in small pools), and the blocks after the
home slices are common. Only one process ever marks a free block taken without the lock:
a worker, in its own home slice (an aligned u16 store; no one else takes blocks there
while it lives, and a dead worker's slot is empty until its blocks were returned). Every
other change that takes a block or moves blocks between owners (allocations from the
common part, claim_many, free_if_owned, free_owner) happens under a POSIX record lock
(``fcntl.lockf``) on the segment: the kernel drops it when its holder dies, so a killed
worker never leaves the pool locked. Freeing blocks one holds needs no lock (the writer's
commits): no one else writes a taken block's entry while its holder lives. A dead
worker's blocks are returned with free_owner().

Also here: segment helpers shared by the chunkserver's processes (create, unlink by
prefix, clean up the segments of servers that died without unlinking theirs).
"""
from __future__ import annotations

import fcntl
import logging
import os
import struct
from multiprocessing import shared_memory

from speedy.chunkserver.shm.segments import attach_segment, create_segment, unlink_segment

log = logging.getLogger("speedy.chunkserver.shm.pool")

BLOCK_SIZE = 1 << 20
WRITER_OWNER = 0xFFFF
MAX_OWNER = 0xFFFE
HOME = struct.Struct("=II")  # home size, slots
HOME_MAX = 64  # blocks of one worker's home slice (enough for its uploads in flight)
HOME_SHARE = 8  # the home slices take at most 1/HOME_SHARE of the pool


class BlockPool:
    """Fixed blocks of 1 MiB shared by every process of one chunkserver."""

    def __init__(self, shm: shared_memory.SharedMemory, nblocks: int) -> None:
        self.shm = shm
        self.name = shm.name
        self.nblocks = nblocks
        self._fd = shm._fd  # type: ignore[attr-defined]
        table_at = nblocks * BLOCK_SIZE
        self._buf = shm.buf
        self._owners = shm.buf[table_at:table_at + 2 * nblocks].cast("H")
        self._home_at = table_at + 2 * nblocks
        self.home_size, self.slots = HOME.unpack_from(self._buf, self._home_at)
        self.common_from = self.home_size * self.slots  # the first block of no home slice
        self._hint = self.common_from

    @staticmethod
    def segment_size(nblocks: int) -> int:
        """Bytes of the segment for nblocks blocks."""
        return nblocks * BLOCK_SIZE + 2 * nblocks + HOME.size

    @classmethod
    def create(cls, name: str, nblocks: int, slots: int = 0) -> "BlockPool":
        """A new pool segment (the supervisor, before forking) with a home slice for each
        of slots workers."""
        if nblocks < 1:
            raise ValueError("a pool needs at least one block")
        shm = create_segment(name, cls.segment_size(nblocks))
        HOME.pack_into(shm.buf, nblocks * (BLOCK_SIZE + 2), home_size(nblocks, slots), slots)
        return cls(shm, nblocks)

    @classmethod
    def attach(cls, name: str) -> "BlockPool":
        """Attach an existing pool by name (tools and tests; children inherit it by fork)."""
        shm = attach_segment(name)
        n = (shm.size - HOME.size) // (BLOCK_SIZE + 2)
        return cls(shm, n)

    # -- the lock
    def _lock(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_EX, 1, 0, os.SEEK_SET)

    def _unlock(self) -> None:
        fcntl.lockf(self._fd, fcntl.LOCK_UN, 1, 0, os.SEEK_SET)

    # -- the API
    def in_use(self) -> int:
        """Blocks currently allocated (any owner)."""
        return self.nblocks - self._owners.tolist().count(0)

    def home(self, slot: int) -> range:
        """Worker slot's home slice (empty for a slot past the pool's slots)."""
        if not 0 <= slot < self.slots:
            return range(0)
        return range(slot * self.home_size, (slot + 1) * self.home_size)

    def allocate(self, n: int, owner: int) -> list[int] | None:
        """n free blocks of the common part now owned by owner, or None when it cannot
        hold them."""
        if n == 0:
            return []
        if not 1 <= owner <= WRITER_OWNER:
            raise ValueError(f"bad owner id {owner}")
        owners, start, total = self._owners, self.common_from, self.nblocks
        if n > total - start:
            return None
        self._lock()
        try:
            found: list[int] = []
            i = self._hint if start <= self._hint < total else start
            for _ in range(total - start):
                if owners[i] == 0:
                    found.append(i)
                    if len(found) == n:
                        break
                i += 1
                if i == total:
                    i = start
            if len(found) < n:
                return None
            for b in found:
                owners[b] = owner
            self._hint = found[-1] + 1
            return found
        finally:
            self._unlock()

    def free(self, blocks: list[int]) -> None:
        """Return blocks the caller holds to the pool (no lock: see the module's note)."""
        owners = self._owners
        for b in blocks:
            owners[b] = 0

    def free_if_owned(self, blocks, owner: int) -> int:
        """Return those of blocks that owner still holds; how many."""
        owners, n = self._owners, self.nblocks
        self._lock()
        try:
            freed = 0
            for b in blocks:
                if b < n and owners[b] == owner:
                    owners[b] = 0
                    freed += 1
            return freed
        finally:
            self._unlock()

    def claim_many(self, requests: list[tuple[list[int], int]],
                   new_owner: int = WRITER_OWNER) -> list[bool]:
        """Move each (blocks, owner) to new_owner under one lock; False (nothing changed)
        for one whose blocks are not all owner's."""
        owners, n = self._owners, self.nblocks
        out = []
        self._lock()
        try:
            for blocks, owner in requests:
                ok = all(b < n and owners[b] == owner for b in blocks)
                if ok:
                    for b in blocks:
                        owners[b] = new_owner
                out.append(ok)
        finally:
            self._unlock()
        return out

    def free_owner(self, owner: int) -> int:
        """Return every block owner holds (a dead worker); returns how many."""
        return self.free_if_owned(range(self.nblocks), owner)

    def owned_by(self, owner: int) -> int:
        """How many blocks owner holds."""
        return sum(1 for b in range(self.nblocks) if self._owners[b] == owner)

    def view(self, block: int) -> memoryview:
        """The 1 MiB of one block."""
        start = block * BLOCK_SIZE
        return self._buf[start:start + BLOCK_SIZE]

    def parts(self, blocks: list[int], size: int) -> list[memoryview]:
        """Views of the first size bytes spread over blocks, in order."""
        out = []
        for b in blocks:
            n = min(size, BLOCK_SIZE)
            start = b * BLOCK_SIZE
            out.append(self._buf[start:start + n])
            size -= n
        return out

    def close(self) -> None:
        """Unmap (views handed out must be released first)."""
        self._owners.release()
        try:
            self.shm.close()
        except BufferError:  # a view still exported: the mapping goes with the process
            pass

    def unlink(self) -> None:
        """Remove the segment name."""
        unlink_segment(self.name)


class HomeSlice:
    """A worker's allocator: its home slice without the lock, else the common part."""

    def __init__(self, pool: BlockPool, slot: int, owner: int) -> None:
        if not 1 <= owner <= MAX_OWNER:
            raise ValueError(f"bad owner id {owner}")
        self.pool = pool
        self.owner = owner
        self.blocks = pool.home(slot)
        self._next = self.blocks.start

    def allocate_one(self) -> int | None:
        """One block now owner's: a free one of the home slice if any, else one of the
        common part; None when neither has one."""
        owners, home = self.pool._owners, self.blocks
        if home:
            i, end = self._next, home.stop
            for _ in range(len(home)):
                if owners[i] == 0:
                    owners[i] = self.owner
                    self._next = i + 1 if i + 1 < end else home.start
                    return i
                i += 1
                if i == end:
                    i = home.start
        got = self.pool.allocate(1, self.owner)
        return got[0] if got else None


def home_size(nblocks: int, slots: int) -> int:
    """Blocks in each of slots home slices of a pool of nblocks."""
    return min(HOME_MAX, nblocks // (HOME_SHARE * slots)) if slots > 0 else 0


def blocks_for(size: int) -> int:
    """Blocks an upload of size bytes needs."""
    return (size + BLOCK_SIZE - 1) // BLOCK_SIZE
