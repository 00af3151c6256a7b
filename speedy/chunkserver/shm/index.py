"""The fid index: one open-addressing hash table per chunkserver, in shared memory.

Two kinds of segment, both ``multiprocessing.shared_memory``::

    control  <name>           u64 seq | u64 generation | u64 name_len | name[64]
    table    <prefix>_t<gen>  capacity x 16-byte slot:  u64 fid | u64 location

``location = chunk_id << 32 | offset`` of the record header (chunk ids >= 1, so a
real location is >= 2**32); ``location == 0`` marks an empty slot and
``location == 1`` a tombstone, which leaves every u64 free for fids (fid 0 too).
Linear probing from a Fibonacci hash; the capacity is a power of two and the table
grows x2 when live + tombstones would pass 81 % (so 16 / 0.405 = 39.5 bytes per file
at worst right after a growth, about 20-40 otherwise).

Only the writer changes the table. Every change happens inside a seqlock on
``seq`` (odd while a change is under way); a reader retries a lookup that saw
``seq`` move, so it never returns a torn slot. Growth builds the new table in a new
segment, then publishes its name under the seqlock with ``generation + 1`` and
unlinks the old segment; readers re-attach when they see the new generation.
"""
from __future__ import annotations

import logging
import time
from multiprocessing import shared_memory
from typing import Callable, Iterator

from speedy.chunkserver.shm.generations import SEGMENT_SIZE as GENS_SIZE
from speedy.chunkserver.shm.generations import ChunkState, Generations
from speedy.chunkserver.shm.segments import attach_segment, create_segment, unlink_segment

log = logging.getLogger("speedy.chunkserver.shm.index")

M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
EMPTY = 0
TOMBSTONE = 1
SLOT_BYTES = 16
MAX_LOAD = 0.81
MIN_CAPACITY = 1 << 10
CTL_SIZE = 128
CTL_NAME_OFFSET = 24
CTL_NAME_MAX = CTL_SIZE - CTL_NAME_OFFSET
SPIN_LIMIT = 2.0  # seconds a reader waits for a writer stuck inside the seqlock


def _capacity_for(n: int, minimum: int = MIN_CAPACITY) -> int:
    """The smallest power of two >= minimum that holds n entries below the maximum load."""
    cap = max(minimum, MIN_CAPACITY)
    cap = 1 << (cap - 1).bit_length()
    while n > cap * MAX_LOAD:
        cap <<= 1
    return cap


class _Table:
    """One mapped table segment: a u64 view and its geometry."""

    def __init__(self, shm: shared_memory.SharedMemory, capacity: int) -> None:
        self.shm = shm
        self.capacity = capacity
        self.mask = capacity - 1
        self.shift = 64 - (capacity.bit_length() - 1)
        self.slots = shm.buf.cast("B").cast("Q")[: 2 * capacity]

    def home(self, fid: int) -> int:
        """The first slot probed for fid."""
        return ((fid * GOLDEN) & M64) >> self.shift

    def lookup(self, fid: int) -> int:
        """The location stored for fid, or 0."""
        slots = self.slots
        mask = self.mask
        i = ((fid * GOLDEN) & M64) >> self.shift
        for _ in range(self.capacity):
            loc = slots[2 * i + 1]
            if loc == EMPTY:
                return 0
            if loc != TOMBSTONE and slots[2 * i] == fid:
                return loc
            i = (i + 1) & mask
        return 0

    def close(self) -> None:
        """Release the view and unmap."""
        self.slots.release()
        try:
            self.shm.close()
        except BufferError:  # pragma: no cover - a view still exported
            pass


class _Control:
    """The small control segment: seqlock counter, generation, current table name."""

    def __init__(self, shm: shared_memory.SharedMemory) -> None:
        self.shm = shm
        self.words = shm.buf.cast("B").cast("Q")[:3]

    def publish(self, gen: int, table_name: str) -> None:
        """Point readers at a new table (caller holds the seqlock)."""
        raw = table_name.encode()
        if len(raw) > CTL_NAME_MAX:
            raise ValueError(f"segment name too long: {table_name!r}")
        self.shm.buf[CTL_NAME_OFFSET:CTL_NAME_OFFSET + len(raw)] = raw
        self.words[2] = len(raw)
        self.words[1] = gen

    def table_name(self) -> str:
        """The current table's segment name (may be torn: check the seqlock around it)."""
        n = min(self.words[2], CTL_NAME_MAX)
        return bytes(self.shm.buf[CTL_NAME_OFFSET:CTL_NAME_OFFSET + n]).decode("ascii", "replace")

    def close(self) -> None:
        """Release the view and unmap."""
        self.words.release()
        try:
            self.shm.close()
        except BufferError:  # pragma: no cover
            pass


def _split(loc: int) -> tuple[int, int]:
    return loc >> 32, loc & 0xFFFFFFFF


class FidIndex:
    """Writer side: open-addressing hash table fid -> (chunk_id, offset of the record header)."""

    def __init__(self, prefix: str, ctl: _Control, table: _Table, gen: int) -> None:
        self.prefix = prefix
        self.name = ctl.shm.name
        self._ctl = ctl
        self._table = table
        self._gen = gen
        self._count = 0
        self._tombstones = 0
        self._closed = False
        self._gens_shm = create_segment(gens_name(self.name), GENS_SIZE)
        self.gens = Generations(self._gens_shm.buf)
        self.gens.init()

    @classmethod
    def create(cls, prefix: str, capacity: int = 1 << 16) -> "FidIndex":
        """New control + table segments named after prefix (e.g. ``spy1234``)."""
        capacity = _capacity_for(0, capacity)
        ctl = _Control(create_segment(f"{prefix}_ic", CTL_SIZE))
        gen = 1
        table = _Table(create_segment(f"{prefix}_t{gen}", capacity * SLOT_BYTES), capacity)
        ctl.publish(gen, table.shm.name)
        return cls(prefix, ctl, table, gen)

    # -- reading (writer process: no seqlock needed, it is the only one changing it)
    def get(self, fid: int) -> tuple[int, int] | None:
        """(chunk_id, offset) of fid, or None."""
        loc = self._table.lookup(fid)
        return _split(loc) if loc else None

    def __contains__(self, fid: int) -> bool:
        return self._table.lookup(fid) != 0

    def __len__(self) -> int:
        return self._count

    @property
    def capacity(self) -> int:
        """Slots in the current table."""
        return self._table.capacity

    @property
    def tombstones(self) -> int:
        """Removed slots not reused yet."""
        return self._tombstones

    def nbytes(self) -> int:
        """Shared memory used by the index (control + current table)."""
        return self._ctl.shm.size + self._table.shm.size

    def items(self) -> Iterator[tuple[int, int, int]]:
        """Every (fid, chunk_id, offset), in slot order."""
        slots = self._table.slots
        for i in range(self._table.capacity):
            loc = slots[2 * i + 1]
            if loc > TOMBSTONE:
                yield slots[2 * i], loc >> 32, loc & 0xFFFFFFFF

    # -- changing
    def _lock(self) -> None:
        self._ctl.words[0] += 1

    _unlock = _lock

    def insert(self, fid: int, chunk_id: int, offset: int) -> None:
        """Map fid to (chunk_id, offset); overwrites an existing fid."""
        self._put(fid, chunk_id, offset, True)

    def setdefault(self, fid: int, chunk_id: int, offset: int) -> tuple[int, int] | None:
        """Insert fid unless it is there; return the location it already had, else None."""
        old = self._put(fid, chunk_id, offset, False)
        return _split(old) if old else None

    def _put(self, fid: int, chunk_id: int, offset: int, overwrite: bool) -> int:
        """Store fid's location (one probe walk); the location it had before, or 0."""
        if not 0 <= fid <= M64:
            raise ValueError(f"fid out of range: {fid}")
        if not (1 <= chunk_id <= 0xFFFFFFFF and 0 <= offset <= 0xFFFFFFFF):
            raise ValueError(f"location out of range: chunk {chunk_id} offset {offset}")
        loc = chunk_id << 32 | offset
        t = self._table
        slots, mask = t.slots, t.mask
        i = ((fid * GOLDEN) & M64) >> t.shift
        free = -1
        for _ in range(t.capacity):
            cur = slots[2 * i + 1]
            if cur == EMPTY:
                break
            if cur == TOMBSTONE:
                if free < 0:
                    free = i
            elif slots[2 * i] == fid:
                if overwrite:
                    self._lock()
                    slots[2 * i + 1] = loc
                    self._unlock()
                return cur
            i = (i + 1) & mask
        else:
            i = -1
        if free < 0:
            if i < 0 or self._count + self._tombstones + 1 > t.capacity * MAX_LOAD:
                self._rebuild(self._count + 1)
                return self._put(fid, chunk_id, offset, overwrite)
            self._lock()
            slots[2 * i] = fid
            slots[2 * i + 1] = loc
            self._unlock()
        else:
            self._lock()
            slots[2 * free] = fid
            slots[2 * free + 1] = loc
            self._unlock()
            self._tombstones -= 1
        self._count += 1
        return 0

    def remove(self, fid: int) -> bool:
        """Forget fid; False if it was not there."""
        t = self._table
        slots, mask = t.slots, t.mask
        i = t.home(fid)
        for _ in range(t.capacity):
            cur = slots[2 * i + 1]
            if cur == EMPTY:
                return False
            if cur != TOMBSTONE and slots[2 * i] == fid:
                self._lock()
                slots[2 * i + 1] = TOMBSTONE
                self._unlock()
                self._count -= 1
                self._tombstones += 1
                return True
            i = (i + 1) & mask
        return False

    # -- compaction: a chunk's entries move to a new file (shm/generations.py)
    def chunk_state(self, cid: int) -> ChunkState:
        """Which file generation chunk cid's locations belong to."""
        return self.gens.state(cid)

    def begin_move(self, cid: int) -> int:
        """Readers: cid's locations up to the watermark (none yet) are in a new file."""
        self._lock()
        try:
            return self.gens.begin(cid)
        finally:
            self._unlock()

    def move(self, cid: int, moves: list[tuple[int, int]]) -> None:
        """Point each (fid, new offset) at cid's new file, in offset order, with the watermark,
        as one change for readers; fids no longer indexed are skipped."""
        if not moves:
            return
        t = self._table
        slots, mask = t.slots, t.mask
        self._lock()
        try:
            for fid, off in moves:
                i = ((fid * GOLDEN) & M64) >> t.shift
                for _ in range(t.capacity):
                    cur = slots[2 * i + 1]
                    if cur == EMPTY:
                        break
                    if cur != TOMBSTONE and slots[2 * i] == fid:
                        slots[2 * i + 1] = cid << 32 | off
                        break
                    i = (i + 1) & mask
            self.gens.advance(cid, moves[-1][1])
        finally:
            self._unlock()

    def chunk_entries(self, cid: int, start: int, n: int) -> tuple[list[tuple[int, int]], int]:
        """(offset, fid) of chunk cid's entries in slots start..start+n, and the table
        generation they were read from (another one means the slots moved: start over)."""
        slots = self._table.slots
        out = []
        for i in range(start, min(start + n, self._table.capacity)):
            loc = slots[2 * i + 1]
            if loc > TOMBSTONE and loc >> 32 == cid:
                out.append((loc & 0xFFFFFFFF, slots[2 * i]))
        return out, self._gen

    def end_move(self, cid: int, cancel: bool = False) -> None:
        """Every location of cid is in its new file now (cancel: none is, nor will be)."""
        self._lock()
        try:
            (self.gens.cancel if cancel else self.gens.end)(cid)
        finally:
            self._unlock()

    def load(self, entries: dict[int, int]) -> None:
        """Replace every entry with entries ({fid: chunk_id << 32 | offset}): one new table,
        filled without per-entry locking, then published (the start-up scan)."""
        cap = _capacity_for(len(entries))

        def fill(slots: memoryview) -> None:
            shift = 64 - (cap.bit_length() - 1)
            mask = cap - 1
            for fid, loc in entries.items():
                if not (0 <= fid <= M64 and loc >> 32 and loc <= M64):
                    raise ValueError(f"bad index entry: fid {fid} location {loc:#x}")
                i = ((fid * GOLDEN) & M64) >> shift
                while slots[2 * i + 1] != EMPTY:
                    i = (i + 1) & mask
                slots[2 * i] = fid
                slots[2 * i + 1] = loc

        self._publish(cap, fill, len(entries), 0)

    def clear(self) -> None:
        """Drop every entry (a fresh, minimum-size table)."""
        self._publish(_capacity_for(0), lambda slots: None, 0, 0)

    def reserve(self, n: int) -> None:
        """Make room now so that the index can hold n live fids without a rebuild on the way."""
        if n + self._tombstones > self._table.capacity * MAX_LOAD:
            self._rebuild(n)

    def _rebuild(self, need: int) -> None:
        """Make room for need entries: x2 (or more), or the same size without tombstones."""
        cap = self._table.capacity
        if need > cap * MAX_LOAD / 2:
            cap = _capacity_for(need, 2 * cap)
        self._rehash(cap)

    def _rehash(self, cap: int) -> None:
        """Move the live entries into a new table of cap slots."""
        old = self._table.slots
        old_cap = self._table.capacity
        t0 = time.monotonic()

        def fill(slots: memoryview) -> None:
            shift = 64 - (cap.bit_length() - 1)
            mask = cap - 1
            for j in range(old_cap):
                loc = old[2 * j + 1]
                if loc > TOMBSTONE:
                    fid = old[2 * j]
                    i = ((fid * GOLDEN) & M64) >> shift
                    while slots[2 * i + 1] != EMPTY:
                        i = (i + 1) & mask
                    slots[2 * i] = fid
                    slots[2 * i + 1] = loc

        count = self._count
        self._publish(cap, fill, count, 0)
        log.debug("index rebuilt: %d -> %d slots for %d fids in %.3fs",
                  old_cap, cap, count, time.monotonic() - t0)

    def _publish(self, capacity: int, fill: Callable[[memoryview], None], count: int,
                 tombstones: int) -> None:
        """Build a new table segment with fill(), then switch readers to it."""
        gen = self._gen + 1
        name = f"{self.prefix}_t{gen}"
        shm = create_segment(name, capacity * SLOT_BYTES)
        table = _Table(shm, capacity)
        try:
            fill(table.slots)
        except BaseException:
            table.close()
            unlink_segment(name)
            raise
        old = self._table
        self._lock()
        self._ctl.publish(gen, shm.name)
        self._unlock()
        self._table, self._gen = table, gen
        self._count, self._tombstones = count, tombstones
        old_name = old.shm.name
        old.close()
        unlink_segment(old_name)

    # -- snapshot support: the raw table image
    def raw_table(self) -> memoryview:
        """The current table's bytes (valid until the next change)."""
        return self._table.shm.buf[: self._table.capacity * SLOT_BYTES]

    def load_raw(self, capacity: int, count: int, tombstones: int,
                 fill: Callable[[memoryview], None]) -> None:
        """Replace the table with an image that fill() writes into the given byte view."""
        if capacity < 1 or capacity & (capacity - 1):
            raise ValueError(f"capacity must be a power of two: {capacity}")

        def fill_bytes(slots: memoryview) -> None:
            view = slots.cast("B")
            try:
                fill(view)
            finally:
                view.release()

        self._publish(capacity, fill_bytes, count, tombstones)

    # -- lifetime
    def close(self) -> None:
        """Detach from the segments (they stay for other processes)."""
        if self._closed:
            return
        self._closed = True
        self._table.close()
        self._ctl.close()
        self.gens.release()
        try:
            self._gens_shm.close()
        except BufferError:  # pragma: no cover
            pass

    def unlink(self) -> None:
        """Remove every segment: the current table (even if another process grew it) and control."""
        names = {f"{self.prefix}_t{self._gen}", f"{self.prefix}_ic", gens_name(self.name)}
        try:
            ctl = _Control(attach_segment(f"{self.prefix}_ic"))
            names.add(ctl.table_name())
            ctl.close()
        except (FileNotFoundError, ValueError):
            pass
        for name in names:
            unlink_segment(name)


class IndexReader:
    """Worker side, read-only: attaches by name, follows the table when the writer grows it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self._ctl = _Control(attach_segment(name))
        self._table: _Table | None = None
        self._gen = -1
        self._stuck = -1  # an odd seq a dead writer left behind
        self._gens_shm = attach_segment(gens_name(name))
        self._gens = Generations(self._gens_shm.buf)
        self._attach()

    def _attach(self) -> None:
        """Map the table the control segment names now."""
        deadline = time.monotonic() + SPIN_LIMIT
        words = self._ctl.words
        while True:
            s1 = words[0]
            gen = words[1]
            name = self._ctl.table_name()
            if s1 & 1 or words[0] != s1:
                self._wait(deadline)
                continue
            try:
                shm = attach_segment(name)
            except FileNotFoundError:  # grown again meanwhile and unlinked: read again
                if words[1] == gen:
                    raise
                continue
            if self._table is not None:
                self._table.close()
            self._table = _Table(shm, _pow2_floor(shm.size // SLOT_BYTES))
            self._gen = gen
            return

    @staticmethod
    def _wait(deadline: float) -> None:
        if time.monotonic() > deadline:
            raise TimeoutError("fid index writer stuck inside an update")
        time.sleep(0)

    def get(self, fid: int) -> tuple[int, int] | None:
        """(chunk_id, offset) of fid as the writer last published it, or None."""
        loc = self._consistent(lambda: self._table.lookup(fid))  # type: ignore[union-attr]
        return _split(loc) if loc else None

    def locate(self, fid: int) -> tuple[int, int, ChunkState] | None:
        """(chunk_id, offset, the chunk's ChunkState) of fid, read together, or None."""
        words = self._ctl.words
        s1 = words[0]
        if not s1 & 1 and words[1] == self._gen:  # the usual case, without a retry loop
            loc = self._table.lookup(fid)  # type: ignore[union-attr]
            if not loc:
                if words[0] == s1:
                    return None
            else:
                state = self._gens.state(loc >> 32)
                if words[0] == s1:
                    return loc >> 32, loc & 0xFFFFFFFF, state

        def read() -> tuple[int, int, ChunkState] | None:
            loc = self._table.lookup(fid)  # type: ignore[union-attr]
            if not loc:
                return None
            cid, off = _split(loc)
            return cid, off, self._gens.state(cid)
        return self._consistent(read)

    def chunk_state(self, cid: int) -> ChunkState:
        """Chunk cid's file generation, read consistently."""
        return self._consistent(lambda: self._gens.state(cid))

    def _consistent(self, read: Callable):
        """read() inside the seqlock: retried until no change of the writer overlapped it."""
        words = self._ctl.words
        deadline = 0.0
        while True:
            s1 = words[0]
            if not s1 & 1 or s1 == self._stuck:
                if words[1] != self._gen and not s1 & 1:
                    try:
                        self._attach()
                    except TimeoutError:
                        self._stuck = words[0]
                    continue
                loc = read()
                if words[0] == s1:
                    break
            if not deadline:
                deadline = time.monotonic() + SPIN_LIMIT
            elif time.monotonic() > deadline:
                # the writer died inside an update: answer from the table as it is
                log.warning("fid index: the writer is stuck inside an update; reading anyway")
                self._stuck = words[0]
                deadline = 0.0
                continue
            time.sleep(0)
        return loc

    def close(self) -> None:
        """Detach."""
        if self._gens is not None:
            self._gens.release()
            try:
                self._gens_shm.close()
            except BufferError:  # pragma: no cover
                pass
            self._gens = None  # type: ignore[assignment]
        if self._table is not None:
            self._table.close()
            self._table = None
        if self._ctl is not None:
            self._ctl.close()
            self._ctl = None  # type: ignore[assignment]


def gens_name(control_name: str) -> str:
    """The generations segment's name next to an index control segment (``_ic``)."""
    return (control_name[:-3] if control_name.endswith("_ic") else control_name) + "_ig"


def _pow2_floor(n: int) -> int:
    """The largest power of two <= n (segment sizes may be rounded up to a page)."""
    return 1 << (n.bit_length() - 1) if n else 0
