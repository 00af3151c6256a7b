"""The chunk store: the writer process's chunk files, recovery, appends, deletes, group commit.

Only the writer process uses it. Layout of a data dir::

    <data_dir>/chunk_<group>_<id>.chunk   the chunk files (CHUNKFILE.md), ids from 1
    <data_dir>/.speedy/lock               flock'ed while a server uses the dir
    <data_dir>/.speedy/index.snap         fid index snapshot (speedy/snapshot.py)
    <data_dir>/.speedy/deletes.log        the DELETEs since that snapshot (speedy/journal.py)
    <data_dir>/.speedy/tmp.*              a chunk file being preallocated, a snapshot being written

Writes are staged (the record's buffers queued past the committed end) and made durable
and visible by one ChunkCommit per chunk: begin_commit, write_commit in any thread (one
pwritev for the chunk's staged records, its superblock, one fsync when sync),
end_commit (the fids go into the shared index). The writer commits chunks in parallel;
commit() runs them one after another for tests.
Chunk choice (_pick): small records share the lowest chunk holding no large one, large
records take chunks of their own.
A delete appends its records' places to the delete journal (fsynced with sync) before it
sets their ref bytes to 0, so the snapshot stays usable; a snapshot save empties it.
"""
from __future__ import annotations

import logging
import os
import struct
import time
from dataclasses import dataclass

from speedy.chunkserver.store import datadir, journal, recovery, snapshot
from speedy.chunkserver import diskio
from speedy.format.chunkfile import (RECORD_HEADER, RECORD_HEADER_SIZE, REF, REF_DELETED, REF_OFFSET,
                        Superblock, chunk_name, encode_record_header, fits, max_data_size)
from speedy.chunkserver.store.datadir import Chunk
from speedy.common.daemonize import StartError
from speedy.chunkserver.shm.index import FidIndex
from speedy.wire.protocol import Err

log = logging.getLogger("speedy.chunkserver.store.chunkstore")

META_DIR = ".speedy"
SNAPSHOT_FILE = "index.snap"
JOURNAL_FILE = "deletes.log"
SNAPSHOT_INTERVAL = 300.0  # seconds between automatic snapshot saves while files change
JOURNAL_LIMIT = 65536  # journaled deletes that make the next change save the snapshot
LARGE_BYTES = 64 << 10  # a record this large takes a chunk of its own (ChunkStore._pick)


class StoreError(Exception):
    """A store operation that failed; code is the protocol error to answer."""

    code: int = Err.INTERNAL_ERROR


class FileExists(StoreError):
    """The fid is already stored (or staged)."""

    code = Err.FILE_EXISTS


class NoRoom(StoreError):
    """No chunk has room for the write now."""

    code = Err.CHUNK_UNAVAILABLE


class WriteFailed(StoreError):
    """An I/O error while writing; the store turned read_only."""

    code = Err.WRITE_ERROR


@dataclass
class ChunkCommit:
    """One chunk's staged records on their way to disk, committed apart from the other
    chunks': begin_commit (writer thread), write_commit (any thread: the records, then
    the superblock that covers them, then the fsync with sync), end_commit (writer)."""

    chunk: Chunk
    bufs: list
    at: int
    sb: Superblock  # the superblock that covers the records
    fids: list[tuple[int, int]]  # (fid, offset)
    sync: bool
    large: int = 0  # large records among them
    error: OSError | None = None
    sb_raw: bytes = b""  # sb encoded once (written by write_commit, kept by end_commit)

    def __post_init__(self) -> None:
        self.sb_raw = self.sb.encode()


class ChunkStore:
    """The chunk files of one group in one data dir, and the fid index that covers them."""

    def __init__(self, data_dir: str, group_id: int, chunks: int, chunk_size: int,
                 sync: bool, index: FidIndex) -> None:
        self.data_dir = os.path.abspath(data_dir)
        self.meta_dir = os.path.join(self.data_dir, META_DIR)
        self.snapshot_path = os.path.join(self.meta_dir, SNAPSHOT_FILE)
        self.journal_path = os.path.join(self.meta_dir, JOURNAL_FILE)
        self.journal: journal.DeleteJournal | None = None
        self.journal_length = 0  # of the valid entries found at start (set by recovery)
        self.group_id = group_id
        self.chunks_wanted = chunks
        self.chunk_size = chunk_size
        self.sync = bool(sync)
        self.index = index
        self.read_only = False
        self.chunks: dict[int, Chunk] = {}
        self.staged: dict[int, tuple[int, int]] = {}
        self.busy: set[int] = set()  # chunk ids with a ChunkCommit under way
        self.large_staged: dict[int, int] = {}  # chunk id -> large records staged there
        self.large_writing: dict[int, int] = {}  # ... and in its ChunkCommit under way
        self.writing: set[int] = set()  # the fids of the ChunkCommits under way
        self.shadows: dict[int, list[tuple[int, int]]] = {}
        self.fsync_count = 0
        self._ordered: list[Chunk] | None = None  # chunks by id (cached: _pick runs per write)
        self.open_mode = ""  # "snapshot", "incremental" or "scan" after open()
        self.open_seconds = 0.0
        self._lock_fd = -1
        self._snapshot_on_disk = False
        self._snapshot_time = 0.0
        self._changed = False
        self.snapshot_interval = SNAPSHOT_INTERVAL  # 0 turns the automatic saves off
        self.journal_limit = JOURNAL_LIMIT
        self.compaction = None  # the compact.Compaction under way, if any

    # ------------------------------------------------------------------ start-up
    def open(self) -> None:
        """Create + preallocate (first start) or recover the chunk files; fill the index."""
        t0 = time.monotonic()
        self._lock_fd = datadir.lock_dir(self.data_dir, self.meta_dir)
        try:
            found = datadir.find_chunks(self.data_dir, self.group_id)
            found.update(datadir.create_missing(self.data_dir, self.meta_dir, self.group_id,
                                                self.chunks_wanted, self.chunk_size, found))
            for cid in sorted(found):
                self.chunks[cid] = datadir.open_chunk(cid, found[cid], self.chunk_size)
            self._ordered = None
            mode = recovery.load_snapshot(self)
            if mode is None:
                mode = "scan"
                recovery.scan_all(self)
            self.open_mode = mode
            self.journal = journal.open_journal(self.journal_path,
                                                0 if mode == "scan" else self.journal_length)
            if mode != "snapshot":
                self.save_snapshot()
            else:  # the loaded snapshot is on disk: deletes go to its journal (see delete())
                self._snapshot_on_disk = True
                self._snapshot_time = time.monotonic()
        except recovery.RecoveryError as e:
            self._close_files()
            raise StartError(str(e)) from None
        except BaseException:
            self._close_files()
            raise
        self.open_seconds = time.monotonic() - t0
        log.info("opened %d chunks in %s: %d files, %.3fs (%s)", len(self.chunks),
                 self.data_dir, len(self.index), self.open_seconds, self.open_mode)

    def save_snapshot(self) -> bool:
        """Persist the index with the chunk stamps it covers; False if not possible now."""
        if (self.staged or self.busy or not self.chunks or self._lock_fd < 0
                or self.compaction is not None):
            return False
        try:
            stamps = [snapshot.ChunkStamp.of(ch.chunk_id, ch.capacity, ch.sb_raw, ch.fd,
                                             ch.sb.current_offset, ch.garbage_bytes)
                      for ch in self.ordered_chunks()]
            shadows = [(fid, cid, off) for fid, locs in self.shadows.items() for cid, off in locs]
            t0 = time.monotonic()
            size = snapshot.save(self.snapshot_path, self.group_id, stamps, shadows, self.index)
        except OSError as e:
            log.warning("cannot save the index snapshot %s: %s", self.snapshot_path, e)
            return False
        self._snapshot_on_disk = True
        self._snapshot_time = time.monotonic()
        self._changed = False
        if self.journal is not None:  # the snapshot covers its entries now
            self.journal.try_reset()
        log.info("index snapshot saved: %d fids, %d bytes, %.3fs", len(self.index), size,
                 time.monotonic() - t0)
        return True

    def maybe_save_snapshot(self) -> bool:
        """Save the snapshot if files changed and snapshot_interval has passed since the last
        save, or the delete journal holds journal_limit entries (a long replay slows a start)."""
        if (not self._changed or self.snapshot_interval <= 0
                or (time.monotonic() - self._snapshot_time < self.snapshot_interval
                    and (self.journal is None or self.journal.entries() < self.journal_limit))):
            return False
        return self.save_snapshot()

    def _drop_snapshot(self) -> None:
        """Remove the snapshot before a delete it could not follow (no journal)."""
        try:
            os.unlink(self.snapshot_path)
        except FileNotFoundError:
            pass
        if self.sync:
            snapshot.sync_dir(self.meta_dir)
        self._snapshot_on_disk = False

    # ------------------------------------------------------------------ queries
    def has(self, fid: int) -> bool:
        """True for a live fid, committed or staged."""
        return fid in self.staged or fid in self.writing or self.index.get(fid) is not None

    def lookup(self, fid: int) -> tuple[int, int] | None:
        """fid's (chunk_id, offset) in the open chunk files (a compaction's entries not
        moved yet point into the old file: translated)."""
        loc = self.index.get(fid)
        if loc is not None and self.compaction is not None:
            return self.compaction.translate(loc)
        return loc

    def can_fit(self, size: int) -> bool:
        """Some chunk has room for a body of size bytes now."""
        return self._pick(size) is not None

    def max_size(self) -> int:
        """The largest body an empty chunk could hold."""
        caps = [ch.capacity for ch in self.chunks.values()] or [self.chunk_size]
        return max_data_size(max(caps))

    def chunk_stats(self) -> list[tuple[int, int]]:
        """(chunk_id, avail_space) per chunk."""
        return [(ch.chunk_id, ch.capacity - ch.tail) for ch in self.ordered_chunks()]

    def file_count(self) -> int:
        """Live committed files."""
        return len(self.index)

    def chunk_ids(self) -> list[int]:
        """Ids of the open chunks, ascending."""
        return sorted(self.chunks)

    def ordered_chunks(self) -> list[Chunk]:
        """The open chunks by id."""
        if self._ordered is None:
            self._ordered = [self.chunks[cid] for cid in sorted(self.chunks)]
        return self._ordered

    def is_large(self, size: int) -> bool:
        """Whether a record of size is large: its own chunk, written in parallel."""
        return size >= LARGE_BYTES

    def holds_large(self, cid: int) -> bool:
        """Whether chunk cid has a large record staged or being committed."""
        return bool(self.large_staged.get(cid) or self.large_writing.get(cid))

    def _pick(self, size: int) -> Chunk | None:
        """The chunk a record goes to, among those with room. A small record: the lowest id
        that holds no large record (one commit and fsync for the small records of a round,
        queued behind that chunk's commit under way: group commit). A large record: the
        lowest id with no commit under way and nothing staged, unless it is the last chunk
        the small records could use; else it queues behind the large record chunk with the
        fewest bytes not committed yet. So large records are written in parallel and the
        small ones do not wait behind them."""
        large = self.is_large(size)
        free: list[Chunk] = []
        smallable = 0  # chunks that hold no large record
        best, best_load = None, 0
        for ch in self.ordered_chunks():
            if not fits(ch.capacity - ch.tail, size) or ch.compacting:
                continue
            cid = ch.chunk_id
            if not self.holds_large(cid):
                if not large:
                    return ch
                smallable += 1
                if cid not in self.busy and not ch.staged:
                    free.append(ch)
                continue
            load = ch.tail - ch.sb.current_offset
            if best is None or load < best_load:
                best, best_load = ch, load
        if free and (smallable > 1 or best is None):
            return free[0]
        return best

    def chunk_file(self, cid: int) -> str:
        """The file name of chunk cid."""
        return chunk_name(self.group_id, cid)

    def _live_header(self, fid: int, cid: int, off: int) -> bool:
        """Whether the record header at (cid, off) is fid's and live (guards a stale index)."""
        return self._live_size(fid, cid, off) >= 0

    def _live_size(self, fid: int, cid: int, off: int) -> int:
        """The data size of fid's live record at (cid, off); -1 when the header there is not
        fid's or not live."""
        try:
            raw = os.pread(self.chunks[cid].fd, RECORD_HEADER_SIZE, off)
            hfid, ref, size = RECORD_HEADER.unpack(raw)[:3]
        except (OSError, KeyError, struct.error):
            return -1
        return size if hfid == fid and ref == 1 else -1

    # ------------------------------------------------------------------ writes
    def stage(self, fid: int, parts: list, size: int, csum: int) -> None:
        """Append a record to a chunk with room; visible only after commit()."""
        if fid in self.staged or fid in self.writing:
            raise FileExists(f"fid {fid} is being written")
        loc = self.lookup(fid)
        if loc is not None:
            if self._live_header(fid, *loc):
                raise FileExists(f"fid {fid} exists")
            log.warning("fid %d: index pointed at %s offset %d, which is not its live record; "
                        "dropped", fid, self.chunk_file(loc[0]), loc[1])
            self.index.remove(fid)
        views = [p if isinstance(p, memoryview) and p.format == "B" and p.ndim == 1
                 else memoryview(p).cast("B") for p in parts]
        if sum(v.nbytes for v in views) != size:
            raise ValueError(f"parts hold {sum(v.nbytes for v in views)} bytes, size says {size}")
        ch = self._pick(size)
        if ch is None:
            raise NoRoom(f"no chunk has room for {size} bytes")
        off = ch.tail
        header = encode_record_header(fid, size, csum, int(time.time()))
        if not ch.pending:
            ch.pending_at = off
        ch.pending.append(header)  # written by the chunk's commit: one pwritev
        ch.pending.extend(views)
        ch.tail = off + RECORD_HEADER_SIZE + size
        ch.staged += 1
        self.staged[fid] = (ch.chunk_id, off)
        if self.is_large(size):
            self.large_staged[ch.chunk_id] = self.large_staged.get(ch.chunk_id, 0) + 1

    def commit(self) -> list[int]:
        """Commit every staged record now, chunk by chunk as the writer does (begin_commit,
        write_commit, end_commit), for tools and tests that stage without a writer: the
        fids made visible. WriteFailed after the loop when a chunk's commit failed (the
        other chunks' records are committed)."""
        fids: list[int] = []
        failed: WriteFailed | None = None
        for ch in self.staged_chunks():
            try:
                fids += self.end_commit(self.write_commit(self.begin_commit(ch)))
            except WriteFailed as e:
                failed = failed or e
        self.maybe_save_snapshot()
        if failed is not None:
            raise failed
        return fids

    def staged_chunks(self) -> list[Chunk]:
        """The chunks with staged records and no commit under way: ready for begin_commit."""
        return [ch for ch in self.ordered_chunks() if ch.staged and ch.chunk_id not in self.busy]

    def begin_commit(self, ch: Chunk) -> ChunkCommit:
        """Take a chunk's staged records for a commit of their own (see ChunkCommit)."""
        assert ch.chunk_id not in self.busy, "one commit per chunk at a time"
        fids = [(fid, off) for fid, (cid, off) in self.staged.items() if cid == ch.chunk_id]
        for fid, _ in fids:
            del self.staged[fid]
            self.writing.add(fid)
        # room for every commit under way: no index growth after an fsync
        self.index.reserve(len(self.index) + len(self.writing) + len(self.staged))
        c = ChunkCommit(ch, ch.pending, ch.pending_at, ch.staged_superblock(), fids, self.sync,
                        self.large_staged.pop(ch.chunk_id, 0))
        self.large_writing[ch.chunk_id] = c.large
        ch.pending = []
        ch.staged = 0
        self.busy.add(ch.chunk_id)
        return c

    @staticmethod
    def write_commit(c: ChunkCommit) -> ChunkCommit:
        """The commit's disk writes (thread-safe: its own chunk file, its own buffers); an
        OSError is kept in c.error for end_commit."""
        ch = c.chunk
        try:
            if c.bufs:
                datadir.pwritev_all(ch.fd, c.bufs, c.at)
            datadir.pwrite_all(ch.fd, c.sb_raw, 0)
            if c.sync:
                diskio.fsync(ch.fd)
        except OSError as e:
            c.error = e
        return c

    def end_commit(self, c: ChunkCommit) -> list[int]:
        """Make a written commit visible (superblock, index); its fids. After a failed one
        (WriteFailed) the store is read-only and the chunk's records staged since are
        dropped too (the writer fails their writes with it)."""
        ch = c.chunk
        self.busy.discard(ch.chunk_id)
        self.large_writing.pop(ch.chunk_id, None)
        self.writing.difference_update(fid for fid, _ in c.fids)
        c.bufs = []
        if c.error is not None:
            self.read_only = True
            dropped = self._drop_staged(ch)
            self._restore_superblock(ch)  # in case the new one reached the file
            log.error("%s: commit of %d writes failed: %s; read-only now (%d staged dropped)",
                      ch.name, len(c.fids), c.error, len(dropped))
            raise WriteFailed(f"commit failed: {c.error.strerror}")
        if c.sync:
            self.fsync_count += 1
        ch.sb = c.sb
        ch.sb_raw = c.sb_raw
        insert = self.index.insert
        cid = ch.chunk_id
        for fid, off in c.fids:
            insert(fid, cid, off)
        self._changed = True
        return [fid for fid, _ in c.fids]

    def _drop_staged(self, ch: Chunk) -> list[int]:
        """Forget a chunk's staged records (not written yet), its tail back at the
        committed end; their fids."""
        fids = [fid for fid, (cid, _) in self.staged.items() if cid == ch.chunk_id]
        for fid in fids:
            del self.staged[fid]
        ch.pending = []
        ch.staged = 0
        ch.tail = ch.sb.current_offset
        self.large_staged.pop(ch.chunk_id, None)
        return fids

    def _restore_superblock(self, ch: Chunk) -> None:
        """Write the committed superblock back (fsynced with sync) after a failed commit."""
        try:
            datadir.pwrite_all(ch.fd, ch.sb_raw, 0)
            if self.sync:
                diskio.fsync(ch.fd)
        except OSError as e:
            log.error("%s: cannot restore the superblock after a failed commit: %s",
                      ch.name, e.strerror)

    def _fsync(self, ch: Chunk) -> None:
        diskio.fsync(ch.fd)
        self.fsync_count += 1

    def delete(self, fid: int) -> bool:
        """Mark fid's record deleted on disk and drop it from the index; False if absent."""
        return self.delete_many([fid])[0]

    def delete_many(self, fids: list[int]) -> list[bool]:
        """Delete fids in order, as a group: one journal append, then the ref bytes, the
        superblocks and (sync) one fsync per touched file; per fid whether it was there."""
        found: list[bool] = []
        groups: list[tuple[int, list[tuple[int, int]]]] = []
        doomed: set[int] = set()
        sizes: dict[tuple[int, int], int] = {}  # data size of each record to mark deleted
        for fid in fids:
            loc = None if fid in doomed else self.lookup(fid)
            size = -1 if loc is None else self._live_size(fid, *loc)
            if loc is not None and size < 0:
                log.warning("fid %d: index pointed at %s offset %d, which is not its live "
                            "record; dropped", fid, self.chunk_file(loc[0]), loc[1])
                self.index.remove(fid)
                loc = None
            found.append(loc is not None)
            if loc is not None:
                doomed.add(fid)
                locs = [loc]
                sizes[loc] = size
                for shadow in self.shadows.pop(fid, []):
                    size = self._live_size(fid, *shadow)
                    if size >= 0:
                        locs.append(shadow)
                        sizes[shadow] = size
                groups.append((fid, locs))
        if not groups:
            return found
        touched: dict[int, Chunk] = {}
        try:
            if self._snapshot_on_disk and not (self.journal is not None and
                                               self.journal.try_append(groups, self.sync)):
                self._drop_snapshot()  # no journal: the snapshot could not follow
            for fid, locs in groups:
                for i, (cid, off) in enumerate(locs):
                    ch = self.chunks[cid]
                    datadir.pwrite_all(ch.fd, REF.pack(REF_DELETED), off + REF_OFFSET)
                    if i == 0:
                        self.index.remove(fid)
                    if self.compaction is not None:
                        self.compaction.note_delete(cid, off, sizes[(cid, off)])
                    ch.sb.files_count -= 1
                    ch.add_dead_record(sizes[(cid, off)])
                    touched[cid] = ch
            for ch in touched.values():
                ch.sb_raw = ch.sb.encode()
                datadir.pwrite_all(ch.fd, ch.sb_raw, 0)
            if self.sync:
                for ch in touched.values():
                    self._fsync(ch)
        except OSError as e:
            self.read_only = True
            log.error("deleting fid %s failed: %s; read-only now",
                      ", ".join(str(fid) for fid, _ in groups), e)
            raise WriteFailed(f"delete failed: {e.strerror}") from None
        self._changed = True
        self.maybe_save_snapshot()
        return found

    # ------------------------------------------------------------------ shutdown
    def close(self) -> None:
        """Flush superblocks, fsync, save the index snapshot, release the data dir."""
        if self._lock_fd < 0:
            return
        if self.compaction is not None:
            self.compaction.stop()
        if self.staged:
            log.warning("closing with %d uncommitted writes; dropped", len(self.staged))
            for ch in self.ordered_chunks():
                if ch.staged:
                    self._drop_staged(ch)
        clean = True
        for ch in self.ordered_chunks():  # superblocks were written by the commits and delete()
            try:
                diskio.fsync(ch.fd)
            except OSError as e:
                clean = False
                log.error("%s: flushing at close failed: %s", ch.name, e.strerror)
        if clean and not self.read_only:
            self.save_snapshot()
        self._close_files()

    def _close_files(self) -> None:
        if self.journal is not None:
            self.journal.close()
        for ch in self.chunks.values():
            try:
                os.close(ch.fd)
            except OSError:
                pass
        self.chunks.clear()
        self._ordered = None
        if self._lock_fd >= 0:
            os.close(self._lock_fd)
            self._lock_fd = -1
