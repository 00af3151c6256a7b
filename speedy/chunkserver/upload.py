"""A worker's upload memory: pool blocks claimed as a body arrives, bounded per source.

A WRITE body goes into 1 MiB pool blocks, but a block is claimed only once the first
CLAIM_AT bytes of its part (or the whole part, if shorter) have arrived in the
connection's buffer: a client holds blocks only for bytes it has sent, so a slow or
stalled upload holds at most its connection buffer (16 KiB) before its first block, and
never more than one block beyond what it sent. A source address may hold at most
``--mem_blocks_per_ip`` blocks in one worker (counting uploads being received and writes
the writer has not answered yet); past that, or when the pool is empty, the write is
answered REACH_MEMORY_LIMIT and the rest of its body skipped.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass, field

from speedy.chunkserver.conn import RECV_BUF, Conn
from speedy.chunkserver.shm.pool import BLOCK_SIZE, BlockPool, HomeSlice

CLAIM_AT = RECV_BUF


class PoolFull(Exception):
    """No block for the next part: the pool is empty or the source holds its share."""


@dataclass
class Upload:
    """One body being received: its blocks (in order), size and running adler32."""

    peer: str
    size: int
    blocks: list[int] = field(default_factory=list)
    csum: int = 0
    got: int = 0  # body bytes received so far
    handed: bool = False  # its blocks went to the writer


class UploadMemory:
    """The blocks this worker's uploads hold: claimed, being filled, and per source."""

    def __init__(self, pool: BlockPool, owner: int, per_source: int, slot: int = -1) -> None:
        self.pool = pool
        self.owner = owner
        self.home = HomeSlice(pool, slot, owner)  # slot -1: no home slice
        self.per_source = per_source
        self.filling: set[int] = set()  # claimed, not handed to the writer yet
        self.by_source: dict[str, int] = {}  # blocks held per source address

    def receive(self, conn: Conn, up: Upload) -> None:
        """Read up.size body bytes into blocks claimed as they arrive; PoolFull when a
        block cannot be had (the blocks claimed so far stay in up.blocks)."""
        left = up.size
        while left:
            n = min(BLOCK_SIZE, left)
            conn.wait_buffered(min(n, CLAIM_AT))
            up.blocks.append(self.claim(up.peer))
            part = self.pool.view(up.blocks[-1])[:n]
            conn.read_into(part)
            up.csum = zlib.adler32(part, up.csum)
            up.got += n
            left -= n

    def claim(self, peer: str) -> int:
        """One block for peer; PoolFull if the pool or the source's share is used up."""
        held = self.by_source.get(peer, 0)
        if held >= self.per_source:
            raise PoolFull(f"{peer} holds {held} blocks")
        got = self.home.allocate_one()
        if got is None:
            raise PoolFull("the pool is empty")
        self.filling.add(got)
        self.by_source[peer] = held + 1
        return got

    def handed_over(self, up: Upload) -> None:
        """The writer got up's blocks (it frees them, or the link's end returns them);
        they count for the source until done()."""
        self.filling.difference_update(up.blocks)
        up.handed = True

    def done(self, up: Upload) -> None:
        """up is over (answered, refused, or its connection gone): blocks it still holds
        go back to the pool, unless the writer has them; none count for the source now."""
        if up.blocks:
            if not up.handed:
                self.filling.difference_update(up.blocks)
                self.pool.free(up.blocks)
            self.forget(up.peer, len(up.blocks))
            up.blocks = []

    def forget(self, peer: str, n: int) -> None:
        """n blocks of peer are no longer held."""
        held = self.by_source.get(peer, 0) - n
        if held > 0:
            self.by_source[peer] = held
        else:
            self.by_source.pop(peer, None)

    def release_unclaimed(self, blocks: list[int]) -> int:
        """Return blocks of writes a dead writer never claimed: those still this worker's
        and not re-used meanwhile by one of its uploads. How many were freed."""
        mine = [b for b in blocks if b not in self.filling]
        return self.pool.free_if_owned(mine, self.owner) if mine else 0


def per_source_default(mem_blocks: int) -> int:
    """Blocks one source may hold in one worker when --mem_blocks_per_ip is 0: three
    quarters of the pool (a quarter stays for the other sources)."""
    return max(1, mem_blocks - mem_blocks // 4)
