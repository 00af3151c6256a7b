"""The writer's chunk commits under way: small ones written in its loop, large ones by
I/O threads, one chunk each, in parallel (pwritev and fsync release the GIL)."""
from __future__ import annotations

import collections
import concurrent.futures
import os
import time
from typing import Any

from speedy.chunkserver.store.chunkstore import ChunkCommit, ChunkStore

IO_THREADS = 8  # at most this many chunks written at once


class Commits:
    """Starts one commit per chunk with staged writes; hands the written ones back in order
    of completion, each with the writes (jobs) it covers."""

    def __init__(self, store: ChunkStore) -> None:
        self.store = store
        self.io = concurrent.futures.ThreadPoolExecutor(
            max_workers=max(1, min(IO_THREADS, len(store.chunk_ids()))),
            thread_name_prefix="speedy-io")
        self.inflight: dict[int, tuple[concurrent.futures.Future | None, list[Any]]] = {}
        self.written: collections.deque[ChunkCommit] = collections.deque()  # by the threads
        self.wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)

    def start(self, waiting: dict[int, list[Any]]) -> None:
        """Start a commit for every chunk with staged writes and none under way (its jobs
        taken from waiting). A commit holding a large record is written by an I/O thread
        (records, superblock, fsync), so the loop goes on; a commit of small records only
        is written here at once (a hand-off to a thread would cost more than its pwritev,
        and its fsync is the group commit)."""
        store = self.store
        for ch in store.staged_chunks():
            c = store.begin_commit(ch)
            jobs = waiting.pop(ch.chunk_id, [])
            if not c.large:
                self.inflight[ch.chunk_id] = (None, jobs)
                self.written.append(store.write_commit(c))
                continue
            future = self.io.submit(store.write_commit, c)
            self.inflight[ch.chunk_id] = (future, jobs)
            future.add_done_callback(self._written)

    def _written(self, future: concurrent.futures.Future) -> None:
        """(An I/O thread) a commit is written: queue it, wake the loop."""
        self.written.append(future.result())
        try:
            os.write(self._wake_w, b"w")
        except BlockingIOError:  # the loop has wake-ups to read already
            pass

    def take(self) -> tuple[ChunkCommit, list[Any]] | None:
        """The next written commit and its jobs, or None."""
        if not self.written:
            return None
        c = self.written.popleft()
        _future, jobs = self.inflight.pop(c.chunk.chunk_id)
        return c, jobs

    def wait_written(self) -> None:
        """Block until every commit under way is written."""
        concurrent.futures.wait([f for f, _ in self.inflight.values() if f is not None])
        while len(self.written) < len(self.inflight):  # the callbacks run just after
            time.sleep(0.0001)

    def shutdown(self) -> None:
        """Stop the I/O threads (after the commits were drained)."""
        self.io.shutdown(wait=True)
        for fd in (self.wake_r, self._wake_w):
            os.close(fd)
