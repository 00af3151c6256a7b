"""Chunk file generations: which file of a chunk an index location belongs to.

Compaction (store/compact.py) replaces a chunk file by a new file of the same name, and
moves the chunk's fid index entries to their new offsets. A worker must read an offset
with the descriptor of the file that offset belongs to. One small shared segment next to
the index (``<prefix>_ig``), changed only by the writer, inside the index's seqlock::

    word 0                  base: this index's generation of every chunk never compacted
    words 1 + 5 x i ...     MAX_ENTRIES x (chunk_id | gen | moving | watermark | next)

A chunk without an entry is at generation ``base`` (random per writer lifetime, so a
descriptor a worker opened under an earlier writer is never taken for a later file). While
its entries move, ``moving`` is 1: a location at or below ``watermark`` (the new offset of
the last entry moved; entries move in offset order, each with the watermark, so every
offset the old file still holds lies above it) is in file ``next``, any other in file
``gen``. When every entry has moved, ``gen = next`` and ``moving = 0``.
"""
from __future__ import annotations

import os
import struct
from dataclasses import dataclass

MAX_ENTRIES = 256
ENTRY_WORDS = 5
SEGMENT_SIZE = 8 * (1 + ENTRY_WORDS * MAX_ENTRIES)
BASE_LIMIT = 1 << 62


@dataclass(frozen=True)
class ChunkState:
    """One chunk's file generation as a reader sees it."""

    gen: int
    moving: bool = False
    watermark: int = 0
    next: int = 0

    def file_of(self, offset: int) -> int:
        """The generation of the file that holds a record at offset."""
        if self.moving and offset <= self.watermark:
            return self.next
        return self.gen


class Generations:
    """The generation words over a mapped segment (writer: changes under the seqlock)."""

    def __init__(self, buf: memoryview) -> None:
        self.words = buf.cast("B").cast("Q")[: 1 + ENTRY_WORDS * MAX_ENTRIES]
        self._slots: dict[int, int] = {}
        self._misses: dict[int, int] = {}  # cid -> the first empty entry when it was absent
        self._states: dict[tuple, ChunkState] = {}  # one object per distinct state

    def init(self) -> None:
        """A fresh random base, no entries (the writer, at create)."""
        self.words[0] = struct.unpack("=Q", os.urandom(8))[0] % BASE_LIMIT + 1
        for i in range(1, len(self.words)):
            self.words[i] = 0

    def base(self) -> int:
        """The generation of a chunk never compacted."""
        return self.words[0]

    def _find(self, cid: int) -> int:
        """The word index of cid's entry, or -1."""
        at = self._slots.get(cid)
        w = self.words
        if at is not None and w[at] == cid:
            return at
        first = self._misses.get(cid, 0)  # entries are only added: no need to look again
        if first and (first >= MAX_ENTRIES or w[1 + ENTRY_WORDS * first] == 0):
            return -1
        for i in range(first, MAX_ENTRIES):
            at = 1 + ENTRY_WORDS * i
            if w[at] == cid:
                self._slots[cid] = at
                return at
            if w[at] == 0:
                if i:
                    self._misses[cid] = i
                return -1
        self._misses[cid] = MAX_ENTRIES
        return -1

    def state(self, cid: int) -> ChunkState:
        """cid's generation (torn if read outside the seqlock: the caller checks it)."""
        at = self._find(cid)
        w = self.words
        key = (w[0],) if at < 0 else (w[at + 1], w[at + 2], w[at + 3], w[at + 4])
        state = self._states.get(key)
        if state is None:
            if len(self._states) > 1024:
                self._states.clear()
            state = self._states[key] = ChunkState(key[0]) if at < 0 else ChunkState(
                key[0], bool(key[1]), key[2], key[3])
        return state

    def _entry(self, cid: int) -> int:
        """cid's entry, created at the base generation if it has none."""
        at = self._find(cid)
        if at >= 0:
            return at
        w = self.words
        for i in range(MAX_ENTRIES):
            at = 1 + ENTRY_WORDS * i
            if w[at] == 0:
                w[at + 1] = w[0]
                w[at] = cid
                return at
        raise OverflowError("no room for another compacted chunk's generation")

    def has_room(self, cid: int) -> bool:
        """Whether cid has an entry or one can be made."""
        return self._find(cid) >= 0 or any(self.words[1 + ENTRY_WORDS * i] == 0
                                           for i in range(MAX_ENTRIES))

    def begin(self, cid: int) -> int:
        """Start moving cid's entries to a new file; its generation (caller holds the lock)."""
        at = self._entry(cid)
        w = self.words
        nxt = (max(w[0], max(w[1 + ENTRY_WORDS * i + 1] for i in range(MAX_ENTRIES))) + 1)
        w[at + 4] = nxt
        w[at + 3] = 0
        w[at + 2] = 1
        return nxt

    def advance(self, cid: int, watermark: int) -> None:
        """Entries up to watermark are in the new file (caller holds the lock)."""
        self.words[self._entry(cid) + 3] = watermark

    def end(self, cid: int) -> None:
        """Every entry moved: the new file is the chunk's file (caller holds the lock)."""
        at = self._entry(cid)
        w = self.words
        w[at + 1] = w[at + 4]
        w[at + 2] = 0
        w[at + 3] = 0

    def cancel(self, cid: int) -> None:
        """The new file did not come: the chunk stays at its generation (lock held)."""
        at = self._entry(cid)
        self.words[at + 2] = 0
        self.words[at + 3] = 0

    def release(self) -> None:
        """Release the view."""
        self.words.release()
