"""Compaction: a chunk's live records rewritten, in order, into a new file swapped in.

The writer runs one Compaction at a time, a slice per loop round (step()), so requests
for other chunks go on between slices; the chunk takes no appends meanwhile (its writes
go to other chunks, or wait in the pending queue). Phases:

    collect  the chunk's indexed records, read from the index slots in slices, by offset
    copy     each record still indexed there (header and data as they are: same fid,
             timestamp, checksum) appended to ``.speedy/tmp.compact.<name>``, a file
             preallocated like the old one; a DELETE of a record already copied marks
             its copy too. A deleted record becomes a tombstone (its fid, ref 0, no data,
             the compaction's time) kept for keep_deleted seconds, so that `speedy admin
             repair` still sees the delete and never copies the file back from a replica
             the DELETE missed; the headers between two live records are walked for them
             (a damaged stretch is skipped)
    seal     the new file fsynced by a helper thread while the writer goes on
    swap     the new superblock, fsync; the old file gets a second name
             ``.speedy/tmp.old.<name>`` (readers that must still read it open that);
             readers are told the chunk's entries start moving (shm/generations.py);
             rename over ``<name>``, fsync the directory; the store's chunk now is the
             new file (a location not moved yet is translated for the writer)
    move     the index entries point at their new offsets, in offset order, in slices
    done     the new file is the chunk's only generation, the old name is removed, the
             index snapshot saved (its stamp has the new inode)

Crash safety: before the rename the chunk is the old file (the snapshot and the delete
journal describe it; the temporary files are removed at the next start, see
datadir.lock_dir); after it the chunk is the new file, whose inode no snapshot stamp
has, so the next start scans it. Either file alone is a whole chunk: a mix never exists.

``SPEEDY_CRASH_AT=<point>[:after=N]`` (tests only) makes the writer _exit(CRASH_EXIT)
at a named point (POINTS), after N earlier passes.
"""
from __future__ import annotations

import bisect
import logging
import os
import threading
import time
from array import array
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from speedy.chunkserver import diskio
from speedy.chunkserver.shm.generations import MAX_ENTRIES
from speedy.chunkserver.store import datadir, snapshot
from speedy.format.chunkfile import (RECORD_HEADER, RECORD_HEADER_SIZE, REF, REF_DELETED,
                                     REF_LIVE, REF_OFFSET, SUPERBLOCK_SIZE, Superblock,
                                     encode_record_header)
from speedy.format.scan import read_padded

if TYPE_CHECKING:  # pragma: no cover
    from speedy.chunkserver.store.chunkstore import ChunkStore
    from speedy.chunkserver.store.datadir import Chunk

log = logging.getLogger("speedy.chunkserver.store.compact")

CRASH_ENV = "SPEEDY_CRASH_AT"
CRASH_EXIT = 86
POINTS = ("start", "copy", "copied", "linked", "renamed", "move", "moved", "done")
COPY_TMP = "tmp.compact."
OLD_TMP = "tmp.old."
COLLECT_SLOTS = 1 << 14  # index slots looked at per collect slice (a few ms)
MOVE_SLICE = 1024  # index entries moved per slice (readers wait for one)
PIECE = 1 << 20  # bytes of a record read at once
SYNC_EVERY = 8 << 20  # copied bytes between two fdatasyncs of the new file (a short last one)
KEEP_DELETED = 7 * 86400  # seconds a tombstone of a deleted file is kept (default)


def crash_point(name: str) -> None:
    """Exit at once if SPEEDY_CRASH_AT names this point (counting its passes)."""
    spec = os.environ.get(CRASH_ENV)
    if not spec:
        return
    point, _, opt = spec.partition(":")
    if point != name:
        return
    after = int(opt.partition("=")[2] or 0) if opt.startswith("after=") else 0
    seen = _PASSES[name] = _PASSES.get(name, 0) + 1
    if seen > after:
        log.error("%s=%s: exiting at %s", CRASH_ENV, spec, name)
        os._exit(CRASH_EXIT)


_PASSES: dict[str, int] = {}


def used_bytes(ch: "Chunk") -> int:
    """Bytes of records in a chunk (live or not)."""
    return max(0, ch.sb.current_offset - SUPERBLOCK_SIZE)


@dataclass
class Result:
    """What one compaction did."""

    chunk_id: int
    files: int = 0
    moved_bytes: int = 0
    freed_bytes: int = 0
    seconds: float = 0.0
    max_slice: float = 0.0  # the longest slice: how long a request waited at most
    max_slice_phase: str = ""


@dataclass
class Compaction:
    """One chunk's compaction, advanced a slice at a time by step()."""

    store: "ChunkStore"
    ch: "Chunk"
    keep_deleted: float = KEEP_DELETED
    phase: str = "collect"
    records: list[tuple[int, int]] = field(default_factory=list)  # (old offset, fid)
    old_offs: array = field(default_factory=lambda: array("Q"))
    new_offs: array = field(default_factory=lambda: array("Q"))
    fids: array = field(default_factory=lambda: array("Q"))
    pos: int = 0
    table_gen: int = 0
    out: int = SUPERBLOCK_SIZE
    fd: int = -1
    deleted: int = 0  # copied records deleted before the swap
    garbage: int = 0  # their bytes
    unsynced: int = 0
    watermark: int = 0
    old_tail: int = 0
    started: float = 0.0
    renamed: bool = False
    kernel_copy: bool = hasattr(os, "copy_file_range")
    syncer: threading.Thread | None = None
    sealed: bool = False
    prev_end: int = SUPERBLOCK_SIZE  # the old file's offset up to which records were seen
    tombstones: int = 0
    tombstoned: set = field(default_factory=set)
    result: Result | None = None

    def __post_init__(self) -> None:
        self.started = time.monotonic()
        self.old_tail = self.ch.sb.current_offset
        self.result = Result(self.ch.chunk_id)
        self.ch.compacting = True
        self.copy_path = os.path.join(self.store.meta_dir, COPY_TMP + self.ch.name)
        self.old_path = os.path.join(self.store.meta_dir, OLD_TMP + self.ch.name)
        crash_point("start")

    # ------------------------------------------------------------------ driving
    def step(self, budget: int) -> int:
        """One slice (up to budget bytes copied); the bytes copied. Raises OSError."""
        t0 = time.monotonic()
        phase = self.phase
        copied = 0
        if self.phase == "collect":
            self._collect()
        elif self.phase == "copy":
            copied = self._copy(budget)
        elif self.phase == "seal":
            self._seal()
        elif self.phase == "swap":
            self._swap()
        elif self.phase == "move":
            self._move()
        if self.phase == "done":
            self._finish()
        took = time.monotonic() - t0
        if took > self.result.max_slice:
            self.result.max_slice, self.result.max_slice_phase = took, phase
        return copied

    @property
    def finished(self) -> bool:
        """The new file is the chunk's file and every entry points into it."""
        return self.phase == "finished"

    def stop(self) -> None:
        """The store closes: drop a copy not swapped in yet, or finish a swap under way."""
        if not self.renamed:
            self.abort("the store is closing")
            return
        while self.phase == "move":
            self._move()
        if self.phase == "done":
            self._finish(save=False)

    def _join_syncer(self) -> None:
        if self.syncer is not None:
            self.syncer.join()
            self.syncer = None

    def abort(self, why: str) -> None:
        """Give up before the swap: the old file stays the chunk, the copy is removed."""
        log.warning("%s: compaction given up: %s", self.ch.name, why)
        self._join_syncer()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        for path in (self.copy_path, self.old_path):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                log.warning("cannot remove %s: %s", path, e.strerror)
        self.ch.compacting = False
        self.store.compaction = None
        self.phase = "finished"

    # ------------------------------------------------------------------ phases
    def _collect(self) -> None:
        """One slice of index slots: the chunk's entries."""
        index = self.store.index
        found, gen = index.chunk_entries(self.ch.chunk_id, self.pos, COLLECT_SLOTS)
        if self.pos and gen != self.table_gen:  # the table was rebuilt: start over
            self.records.clear()
            self.pos = 0
            found, gen = index.chunk_entries(self.ch.chunk_id, 0, COLLECT_SLOTS)
        self.table_gen = gen
        self.records.extend(found)
        self.pos += COLLECT_SLOTS
        if self.pos >= index.capacity:
            self.records.sort()
            self.pos = 0
            self._create_copy()
            self.phase = "copy"

    def _create_copy(self) -> None:
        """The new file, preallocated to the old one's size."""
        self.fd = os.open(self.copy_path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC,
                          0o644)
        size = max(os.fstat(self.ch.fd).st_size, SUPERBLOCK_SIZE)
        try:
            diskio.posix_fallocate(self.fd, 0, size)
        except OSError as e:
            if e.errno not in (95, 22):  # EOPNOTSUPP, EINVAL: a file system without it
                raise
            os.ftruncate(self.fd, size)

    def _copy(self, budget: int) -> int:
        """Copy records until budget bytes are copied; the bytes copied."""
        ch, index, cid = self.ch, self.store.index, self.ch.chunk_id
        copied = 0
        while self.pos < len(self.records) and copied < budget:
            off, fid = self.records[self.pos]
            self.pos += 1
            if index.get(fid) != (cid, off):  # deleted since it was collected
                continue
            self._walk_gap(self.prev_end, off)
            hfid, ref, size = RECORD_HEADER.unpack(read_padded(ch.fd, off, RECORD_HEADER_SIZE))[:3]
            if hfid != fid or ref != REF_LIVE:
                log.error("%s: compaction: the index pointed at offset %d for fid %d, which "
                          "is not its live record; dropped", ch.name, off, fid)
                index.remove(fid)
                continue
            n = RECORD_HEADER_SIZE + size
            self._copy_bytes(off, n)
            self.old_offs.append(off)
            self.new_offs.append(self.out)
            self.fids.append(fid)
            self.out += n
            self.prev_end = off + n
            copied += n
        self.unsynced += copied
        if self.unsynced >= SYNC_EVERY and (self.syncer is None or not self.syncer.is_alive()):
            self.syncer = threading.Thread(target=diskio.fdatasync, args=(self.fd,),
                                           name="compact-sync", daemon=True)
            self.syncer.start()  # written back meanwhile: the fsync at the swap is short
            self.unsynced = 0
        self.result.moved_bytes += copied
        crash_point("copy")
        if self.pos >= len(self.records):
            self._walk_gap(self.prev_end, self.old_tail)
            self.records = []
            self.tombstoned = set()
            self.phase = "seal"
        return copied

    def _copy_bytes(self, off: int, n: int) -> None:
        """n bytes of the old file at off to the new one at out (in the kernel when it can;
        past the end of a short old file they are zeros)."""
        at = 0
        while at < n and self.kernel_copy:
            try:
                got = os.copy_file_range(self.ch.fd, self.fd, n - at, off + at, self.out + at)
            except OSError:
                self.kernel_copy = False
                break
            if not got:
                break
            at += got
        while at < n:
            piece = diskio.pread(self.ch.fd, min(PIECE, n - at), off + at)
            if len(piece) < min(PIECE, n - at):
                piece += bytes(min(PIECE, n - at) - len(piece))
            datadir.pwrite_all(self.fd, piece, self.out + at)
            at += len(piece)

    def _walk_gap(self, start: int, end: int) -> None:
        """The records between two live ones: a tombstone for each deleted fid that is not
        live (fresh deletes, and tombstones younger than keep_deleted)."""
        ch, index = self.ch, self.store.index
        pos = start
        now = int(time.time())
        while self.keep_deleted > 0 and pos + RECORD_HEADER_SIZE <= end:
            fid, ref, size, _csum, ts = RECORD_HEADER.unpack(
                read_padded(ch.fd, pos, RECORD_HEADER_SIZE))
            nxt = pos + RECORD_HEADER_SIZE + size
            if nxt > end or ref not in (REF_DELETED, REF_LIVE) or not ts:
                return  # damage or zeros: the rest of this stretch is not records
            if (ref == REF_DELETED and fid not in self.tombstoned and index.get(fid) is None
                    and (size or ts + self.keep_deleted > now)):
                self.tombstoned.add(fid)
                datadir.pwrite_all(self.fd, encode_record_header(
                    fid, 0, 0, ts if not size else now, REF_DELETED), self.out)
                self.out += RECORD_HEADER_SIZE
                self.tombstones += 1
            pos = nxt

    def _seal(self) -> None:
        """The new file's records to the disk, by a helper thread (no step waits for it)."""
        if self.syncer is not None and self.syncer.is_alive():
            return
        if not self.sealed:
            self._join_syncer()
            self.syncer = threading.Thread(target=diskio.fsync, args=(self.fd,),
                                           name="compact-sync", daemon=True)
            self.syncer.start()
            self.sealed = True
            return
        self._join_syncer()
        self.phase = "swap"

    def _swap(self) -> None:
        """Superblock, fsync, second name for the old file, rename the new one in."""
        ch, store = self.ch, self.store
        files = len(self.fids)
        sb = Superblock(ch.chunk_id, files + self.tombstones, files - self.deleted, self.out,
                        ch.capacity - self.out)
        raw = sb.encode()
        datadir.pwrite_all(self.fd, raw, 0)
        diskio.fsync(self.fd)  # the records were synced by _seal: short
        crash_point("copied")
        try:
            os.unlink(self.old_path)
        except FileNotFoundError:
            pass
        os.link(ch.path, self.old_path)
        crash_point("linked")
        store.index.begin_move(ch.chunk_id)
        try:
            os.rename(self.copy_path, ch.path)
        except OSError:
            store.index.end_move(ch.chunk_id, cancel=True)
            raise
        self.renamed = True  # from here on the new file is the chunk: the swap must finish
        try:
            snapshot.sync_dir(store.data_dir)
        except OSError as e:
            log.warning("%s: fsync of the data dir after the swap failed: %s", ch.name,
                        e.strerror)
        crash_point("renamed")
        old_fd, ch.fd, self.fd = ch.fd, self.fd, -1
        os.close(old_fd)
        self.result.freed_bytes = self.old_tail - self.out
        ch.sb, ch.sb_raw, ch.tail = sb, raw, self.out
        ch.garbage_bytes = self.garbage
        for fid in list(store.shadows):  # the shadows of this chunk were left out
            locs = [loc for loc in store.shadows[fid] if loc[0] != ch.chunk_id]
            if locs:
                store.shadows[fid] = locs
            else:
                del store.shadows[fid]
        self.result.files = files - self.deleted
        self.pos = 0
        self.phase = "move"

    def _move(self) -> None:
        """One slice of index entries to their new offsets."""
        index, cid = self.store.index, self.ch.chunk_id
        end = min(self.pos + MOVE_SLICE, len(self.fids))
        moves = []
        for i in range(self.pos, end):
            fid = self.fids[i]
            if index.get(fid) == (cid, self.old_offs[i]):
                moves.append((fid, self.new_offs[i]))
        index.move(cid, moves)
        if moves:
            self.watermark = moves[-1][1]
        self.pos = end
        crash_point("move")
        if self.pos >= len(self.fids):
            crash_point("moved")
            self.phase = "done"

    def _finish(self, save: bool = True) -> None:
        """The new file is the chunk's only generation now."""
        ch, store = self.ch, self.store
        store.index.end_move(ch.chunk_id)
        ch.compacting = False
        store.compaction = None
        self.phase = "finished"
        try:
            os.unlink(self.old_path)
        except OSError as e:
            log.warning("cannot remove %s: %s", self.old_path, e.strerror)
        self.result.seconds = time.monotonic() - self.started
        r = self.result
        log.info("%s compacted: %d files, %d bytes moved in %.2fs, %d bytes freed "
                 "(longest slice %.1f ms, %s)", ch.name, r.files, r.moved_bytes, r.seconds,
                 r.freed_bytes, r.max_slice * 1e3, r.max_slice_phase)
        crash_point("done")
        if save:
            store.save_snapshot()

    # ------------------------------------------------------------------ the store's hooks
    def translate(self, loc: tuple[int, int]) -> tuple[int, int]:
        """A location the index holds, in the store's current file of its chunk: an entry
        not moved yet (above the watermark) still names its old offset."""
        cid, off = loc
        if cid != self.ch.chunk_id or self.phase != "move" or off <= self.watermark:
            return loc
        i = bisect.bisect_left(self.old_offs, off)
        if i < len(self.old_offs) and self.old_offs[i] == off:
            return cid, self.new_offs[i]
        return loc

    def note_delete(self, cid: int, off: int, size: int) -> None:
        """A record of the chunk was deleted before the swap: mark its copy too."""
        if cid != self.ch.chunk_id or self.phase not in ("copy", "seal", "swap"):
            return
        i = bisect.bisect_left(self.old_offs, off)
        if i < len(self.old_offs) and self.old_offs[i] == off:
            datadir.pwrite_all(self.fd, REF.pack(REF_DELETED), self.new_offs[i] + REF_OFFSET)
            if self.store.sync:
                diskio.fsync(self.fd)
            self.deleted += 1
            self.garbage += RECORD_HEADER_SIZE + size


def start(store: "ChunkStore", chunk_id: int,
          keep_deleted: float = KEEP_DELETED) -> Compaction | None:
    """Begin compacting a chunk (None if one is under way, writes are staged, or the store
    cannot write)."""
    if store.compaction is not None or store.staged or store.read_only:
        return None
    ch = store.chunks.get(chunk_id)
    if ch is None or ch.pending:
        return None
    if not store.index.gens.has_room(chunk_id):
        log.error("%s: not compacted: more than %d chunks to track", ch.name, MAX_ENTRIES)
        return None
    store.compaction = Compaction(store, ch, keep_deleted)
    return store.compaction
