"""The writer's compaction policy: which chunk, when, how fast (store/compact.py does it).

At most one chunk at a time. A chunk is compacted when an operator asks (COMPACT, all
chunks whose garbage is at least the asked fraction of their used bytes) or, with
--compact_threshold > 0, when its garbage passes that fraction (and MIN_GARBAGE); the
copy is paced to --compact_rate bytes/s, a slice of at most SLICE bytes per writer loop
round, and to at most a third of the writer's time, so requests between slices wait at most
one slice (its time is published as compact_max_slice_us).
"""
from __future__ import annotations

import logging
import struct
import time
from typing import Callable

from speedy.chunkserver.garbage import qualifies
from speedy.chunkserver.messages import COMPACT_MSG
from speedy.chunkserver.shm.counters import StatsView
from speedy.chunkserver.store import compact
from speedy.chunkserver.store.chunkstore import ChunkStore
from speedy.wire.protocol import SERVER_THRESHOLD, Err

log = logging.getLogger("speedy.chunkserver.compactor")

SLICE = 512 << 10  # bytes copied per slice at most
AUTO_CHECK = 1.0  # seconds between two looks for a chunk past the threshold
RETRY_AFTER = 600.0  # seconds before a chunk whose compaction failed is tried again


class Compactor:
    """Queue, pacing and figures of the writer's compactions."""

    def __init__(self, store: ChunkStore, stats: StatsView, threshold: float, rate: int,
                 reply: Callable[[object, int, int], None],
                 keep_deleted: float = compact.KEEP_DELETED) -> None:
        self.store = store
        self.stats = stats
        self.threshold = threshold
        self.rate = max(1, rate)
        self.slice = max(64 << 10, min(SLICE, self.rate // 8))
        self.reply = reply
        self.keep_deleted = keep_deleted
        self.queue: list[int] = []
        self.waiters: list[tuple[object, int, set[int]]] = []
        self.next_at = 0.0
        self.checked_at = 0.0
        self.failed: dict[int, float] = {}

    def due(self) -> float:
        """Seconds until the compactor wants the loop back (a long time when idle)."""
        if self.store.compaction is not None or self.queue:
            return max(0.0, self.next_at - time.monotonic())
        if self.threshold > 0:
            return max(0.0, self.checked_at + AUTO_CHECK - time.monotonic())
        return 3600.0

    def request(self, link: object, data: bytes) -> None:
        """COMPACT from a worker: queue the chunks at the threshold; answer now, or (wait)
        when they are done."""
        try:
            req_id, _kind, ppm, wait = COMPACT_MSG.unpack(data)
        except struct.error:
            self.reply(link, struct.unpack_from("=I", data)[0], Err.INTERNAL_ERROR)
            return
        if self.store.read_only:
            self.reply(link, req_id, Err.SERVER_READ_ONLY)
            return
        threshold = (self.threshold if ppm == SERVER_THRESHOLD else ppm / 1e6)
        chunks = self.candidates(threshold, automatic=False)
        for cid in chunks:
            if cid not in self.queue and not self._current(cid):
                self.queue.append(cid)
        if chunks:
            log.info("compaction asked for %d chunks (threshold %.3f)", len(chunks), threshold)
        if wait and chunks:
            self.waiters.append((link, req_id, set(chunks)))
        else:
            self.reply(link, req_id, Err.SUCCESS)

    def candidates(self, threshold: float, automatic: bool) -> list[int]:
        """Chunk ids whose garbage reaches threshold, the most garbage first."""
        due = [(ch.garbage_bytes / max(1, compact.used_bytes(ch)), ch.chunk_id)
               for ch in self.store.ordered_chunks()
               if qualifies(ch.garbage_bytes, compact.used_bytes(ch), ch.capacity,
                            threshold, automatic)]
        return [cid for _, cid in sorted(due, reverse=True)]

    def _current(self, cid: int) -> bool:
        c = self.store.compaction
        return c is not None and c.ch.chunk_id == cid

    def tick(self) -> bool:
        """Run one slice if one is due; True if the store changed (publish its figures)."""
        store = self.store
        now = time.monotonic()
        if store.read_only and (self.queue or self.waiters):  # the disk failed: give up
            self.queue = []
            for link, req_id, _ in self.waiters:
                self.reply(link, req_id, Err.WRITE_ERROR)
            self.waiters = []
        if store.read_only or now < self.next_at:
            return False
        c = store.compaction
        if c is None:
            c = self._start_next(now)
            if c is None:
                return False
        cid = c.ch.chunk_id
        t0 = time.monotonic()
        try:
            copied = c.step(self.slice)
        except OSError as e:
            if c.renamed:  # cannot happen past the rename (no I/O that may fail)
                raise
            self.failed[cid] = now
            c.abort(f"{e.strerror or e}")
            self._settle(cid, Err.WRITE_ERROR)
            return True
        took = time.monotonic() - t0  # at most a third of the writer's time goes to it
        self.next_at = max(max(now, self.next_at) + copied / self.rate, now + 3 * took)
        if c.finished:
            r = c.result
            st = self.stats
            st.add("compactions")
            st.add("compact_freed", r.freed_bytes)
            st.add("compact_moved", r.moved_bytes)
            st.set("compact_max_slice_us", max(st.get("compact_max_slice_us"),
                                               int(r.max_slice * 1e6)))
            st.set("compacting", 0)
            self._settle(cid, Err.SUCCESS)
        return True

    def _start_next(self, now: float) -> compact.Compaction | None:
        """The next queued chunk, or one past the automatic threshold."""
        if not self.queue and self.threshold > 0 and now >= self.checked_at + AUTO_CHECK:
            self.checked_at = now
            self.queue = [cid for cid in self.candidates(self.threshold, automatic=True)
                          if now - self.failed.get(cid, -RETRY_AFTER) >= RETRY_AFTER][:1]
        while self.queue:
            cid = self.queue.pop(0)
            c = compact.start(self.store, cid, self.keep_deleted)
            if c is not None:
                self.stats.set("compacting", cid)
                return c
            if self.store.staged or self.store.compaction is not None:
                self.queue.insert(0, cid)
                return None
            self._settle(cid, Err.SUCCESS)  # the chunk is gone or cannot be written
        return None

    def _settle(self, cid: int, err: int) -> None:
        """Answer the COMPACT requests waiting for nothing but this chunk."""
        left = []
        for link, req_id, cids in self.waiters:
            cids.discard(cid)
            if cids and err == Err.SUCCESS:
                left.append((link, req_id, cids))
            else:
                self.reply(link, req_id, err)
        self.waiters = left

    def stop(self) -> None:
        """The writer stops: answer every waiter."""
        for link, req_id, _ in self.waiters:
            self.reply(link, req_id, Err.INTERNAL_ERROR)
        self.waiters = []
