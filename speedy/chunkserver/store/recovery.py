"""Start-up recovery of a ChunkStore: fill the fid index from the snapshot or by a scan.

Rules (CHUNKFILE.md): every live record up to current_offset is indexed, a deleted one
(ref 0) is not; at a record whose header or checksum is wrong, or that runs past
current_offset, the scan resynchronizes at the next whole valid record (scan.py): the
damaged range is logged, counted in the chunk's garbage_bytes and left alone; only a
torn tail (no valid record after it) is cut (current_offset goes back there, the
superblock is rewritten, the log says what was cut). A damaged superblock is rebuilt by
scanning from offset 55 up to the first all-zero header. Of two live records with one fid
the later one (timestamp, then position) wins; the other stays on disk, remembered as a
"shadow" so that deleting the fid marks both.

The snapshot (snapshot.py) is used instead of the scan when it still describes every
chunk once the delete journal (journal.py) is replayed: same file, not truncated, the
superblock's current_offset and files_alloc not shrunk, the 4 KiB of records before the
snapshot's offset unchanged but for the ref bytes of journaled deletes, every journal
entry's record still carrying its fid (ref set to 0 again where a crash came first, so
a later scan agrees), records appended since valid up to current_offset and as many as
files_alloc says, and files_count what the snapshot, the journal and the appended records
make it (higher only by the records of the last journal append, a delete the crash cut
short: fixed then). Anything else (damage among the appended records too) means the
full scan. garbage_bytes comes from the snapshot's stamps plus the journaled deletes and
the deleted records appended since.
"""
from __future__ import annotations

import logging
import os
import struct
from typing import TYPE_CHECKING

from speedy.chunkserver import diskio
from speedy.chunkserver.store import datadir, journal, snapshot
from speedy.format.chunkfile import (RECORD_HEADER, RECORD_HEADER_SIZE, REF, REF_DELETED, REF_LIVE,
                        REF_OFFSET, SUPERBLOCK_SIZE, FormatError, Superblock)
from speedy.format.scan import ScanEnd, scan_records

if TYPE_CHECKING:  # pragma: no cover
    from speedy.chunkserver.store.chunkstore import Chunk, ChunkStore

log = logging.getLogger("speedy.chunkserver.store.chunkstore")


class RecoveryError(Exception):
    """A superblock that cannot be rewritten at start (the store turns it into StartError)."""


def scan_all(store: "ChunkStore") -> None:
    """Index every chunk from its first record (the slow path); one new table at the end."""
    store.shadows.clear()
    found: dict[int, int] = {}  # fid -> chunk_id << 32 | offset
    for ch in store.ordered_chunks():
        scan_chunk(store, ch, found)
    store.index.load(found)


def scan_chunk(store: "ChunkStore", ch: "Chunk", found: dict[int, int]) -> None:
    """Collect one chunk's live records in found, skip damage with valid records after it,
    cut a torn tail, fix its superblock, count its garbage."""
    end = ch.sb.current_offset if ch.sb_valid else ch.capacity
    out = ScanEnd()
    records = live = dead = 0
    setdefault, base = found.setdefault, ch.chunk_id << 32
    for off, fid, ref, size, ts in scan_records(
            ch.fd, SUPERBLOCK_SIZE, end, out, zeros_end=not ch.sb_valid,
            records=ch.sb.files_alloc if ch.sb_valid else None):
        records += 1
        if ref:
            live += 1
            loc = base | off
            old = setdefault(fid, loc)
            if old != loc and settle_duplicate(store, ch, fid, off, ts,
                                               (old >> 32, old & 0xFFFFFFFF)):
                found[fid] = loc
        elif size:  # an empty deleted record is a tombstone (Chunk.add_dead_record)
            dead += RECORD_HEADER_SIZE + size
    ch.garbage_bytes = dead + out.skipped_bytes
    for skip in out.skipped:
        log.warning("%s: damaged bytes %d-%d skipped (%d bytes: %s); the records after them "
                    "are kept, the range stays unused", ch.name, skip.start, skip.end,
                    skip.end - skip.start, skip.reason)
    new = Superblock(ch.chunk_id, records, live, out.offset, ch.capacity - out.offset)
    if not ch.sb_valid:
        log.warning("%s: superblock rebuilt from the records: current_offset %d, %d records, "
                    "%d live (scan stopped: %s)", ch.name, out.offset, records, live,
                    out.reason or "end of chunk")
    elif out.reason:
        log.warning("%s: cut at offset %d: %s; %d bytes up to current_offset %d dropped",
                    ch.name, out.offset, out.reason, end - out.offset, end)
    elif new != ch.sb:
        log.warning("%s: superblock counts fixed: files_alloc %d -> %d, files_count %d -> %d",
                    ch.name, ch.sb.files_alloc, records, ch.sb.files_count, live)
    if new != ch.sb or not ch.sb_valid:
        raw = new.encode()
        try:
            datadir.pwrite_all(ch.fd, raw, 0)
            diskio.fsync(ch.fd)
        except OSError as e:
            raise RecoveryError(f"cannot rewrite the superblock of {ch.path}: "
                                f"{e.strerror}") from None
        ch.sb_raw = raw
    ch.sb, ch.tail, ch.sb_valid = new, new.current_offset, True


def index_record(store: "ChunkStore", ch: "Chunk", fid: int, off: int, ts: int) -> None:
    """Index a live record; of two live records with one fid the later one wins."""
    old = store.index.setdefault(fid, ch.chunk_id, off)
    if old is not None and settle_duplicate(store, ch, fid, off, ts, old):
        store.index.insert(fid, ch.chunk_id, off)


def settle_duplicate(store: "ChunkStore", ch: "Chunk", fid: int, off: int, ts: int,
                     old: tuple[int, int]) -> bool:
    """A second live record of fid: the later one (timestamp, then position) wins, the other
    is remembered as a shadow; True when the new one wins (the caller indexes it)."""
    new = (ch.chunk_id, off)
    won = ts >= timestamp_at(store, *old)
    if won:
        win, lose = new, old
    else:
        win, lose = old, new
    store.shadows.setdefault(fid, []).append(lose)
    log.warning("fid %d: two live records, %s offset %d and %s offset %d; the later one "
                "(%s offset %d) wins, the other stays on disk", fid, store.chunk_file(lose[0]),
                lose[1], store.chunk_file(win[0]), win[1], store.chunk_file(win[0]), win[1])
    return won


def timestamp_at(store: "ChunkStore", cid: int, off: int) -> int:
    """The timestamp of the record header at (cid, off), 0 if unreadable."""
    try:
        raw = os.pread(store.chunks[cid].fd, RECORD_HEADER_SIZE, off)
        return RECORD_HEADER.unpack(raw)[4]
    except (OSError, KeyError, struct.error):
        return 0


def load_snapshot(store: "ChunkStore") -> str | None:
    """Fill the index from the snapshot, replaying the delete journal, if they match the
    chunks: "snapshot" when no record was appended since, "incremental" when some were
    (they are indexed too); None means scan instead."""
    store.journal_length = 0
    try:
        f = open(store.snapshot_path, "rb")
    except FileNotFoundError:
        return None
    except OSError as e:
        log.warning("index snapshot ignored: %s", e.strerror)
        return None
    with f:
        try:
            meta = snapshot.read_meta(f)
            knowns = snapshot_plan(store, meta)
            try:
                entries, length, size = journal.read(store.journal_path)
            except journal.JournalError as e:
                raise snapshot.SnapshotError(f"delete journal {store.journal_path}: {e}") from None
            snapshot.load_table(f, meta, store.index)
            store.shadows.clear()
            for fid, cid, off in meta.shadows:
                store.shadows.setdefault(fid, []).append((cid, off))
            mode = follow(store, meta, knowns, entries)
        except (snapshot.SnapshotError, OSError) as e:
            log.warning("index snapshot %s ignored: %s; scanning the chunks",
                        store.snapshot_path, e)
            store.index.clear()
            store.shadows.clear()
            return None
    if size > length:
        log.warning("delete journal %s: torn tail, %d bytes after the last whole entry cut",
                    store.journal_path, size - length)
    store.journal_length = length
    return mode


def snapshot_plan(store: "ChunkStore", meta: snapshot.SnapshotMeta) -> dict[int, Superblock]:
    """{chunk_id: the superblock the snapshot knew} (empty for a chunk created since).

    SnapshotError when the snapshot does not describe these chunk files: another group,
    a chunk gone, another file (device/inode), truncated, a damaged superblock, or one
    whose current_offset or files_alloc shrank. (files_count and the records before
    current_offset are checked by follow(), which knows the journaled deletes.)
    """
    if meta.group_id != store.group_id:
        raise snapshot.SnapshotError(f"made for group {meta.group_id}")
    missing = set(meta.stamps) - set(store.chunks)
    if missing:
        raise snapshot.SnapshotError(f"chunk {min(missing)} is gone")
    knowns: dict[int, Superblock] = {}
    for cid, ch in store.chunks.items():
        stamp = meta.stamps.get(cid)
        if not ch.sb_valid:
            raise snapshot.SnapshotError(f"{ch.name} has a damaged superblock")
        if stamp is None:  # a chunk created since: all its records are new
            knowns[cid] = Superblock.empty(cid, ch.capacity)
            ch.garbage_bytes = 0
            continue
        st = os.fstat(ch.fd)
        if (st.st_dev, st.st_ino, ch.capacity) != (stamp.dev, stamp.ino, stamp.capacity):
            raise snapshot.SnapshotError(f"{ch.name} is another file now")
        if st.st_size < min(stamp.size, ch.sb.current_offset):
            raise snapshot.SnapshotError(f"{ch.name} was truncated")
        try:
            known = Superblock.decode(stamp.superblock)
        except FormatError:
            raise snapshot.SnapshotError(f"bad superblock stamp for {ch.name}") from None
        if (ch.sb.current_offset < known.current_offset
                or ch.sb.files_alloc < known.files_alloc):
            raise snapshot.SnapshotError(f"{ch.name} has changed, not only grown")
        knowns[cid] = known
        ch.garbage_bytes = stamp.garbage
    return knowns


def follow(store: "ChunkStore", meta: snapshot.SnapshotMeta, knowns: dict[int, Superblock],
           entries: list[journal.DeleteEntry]) -> str:
    """Bring the loaded snapshot up to date: journaled deletes, then appended records.

    The 4 KiB before each chunk's snapshot offset must match with the journaled deletes
    undone; each journal entry's record must still carry its fid (its ref is set to 0
    again where a crash came first); each chunk's files_count must be what the snapshot,
    the journal and the appended records make it (or higher by the records of the last,
    maybe unfinished, delete: then it is fixed). SnapshotError otherwise.
    """
    lives = [was_live(store, e, knowns) for e in entries]
    for cid, ch in store.chunks.items():
        stamp = meta.stamps.get(cid)
        if stamp is None:
            continue
        marks = [e.offset for e, live in zip(entries, lives) if live and e.chunk_id == cid]
        if snapshot.tail_crc(ch.fd, knowns[cid].current_offset, marks) != stamp.tail_crc:
            raise snapshot.SnapshotError(f"the records of {ch.name} have changed")
    deleted = redo_deletes(store, entries, lives)
    forget_deleted(store, entries, lives)
    appended: dict[int, int] = {}
    for ch in store.ordered_chunks():
        known = knowns[ch.chunk_id]
        if (ch.sb.current_offset, ch.sb.files_alloc) != (known.current_offset,
                                                         known.files_alloc):
            appended[ch.chunk_id] = index_appended(store, ch, known)
    check_counts(store, knowns, deleted, appended, journal.last_group(entries))
    return "incremental" if appended else "snapshot"


def was_live(store: "ChunkStore", e: journal.DeleteEntry, knowns: dict[int, Superblock]) -> bool:
    """Whether the snapshot has e's record live (indexed or a shadow): deleted since."""
    known = knowns.get(e.chunk_id)
    if known is None or e.offset >= known.current_offset:
        return False
    loc = (e.chunk_id, e.offset)
    return store.index.get(e.fid) == loc or loc in store.shadows.get(e.fid, ())


def redo_deletes(store: "ChunkStore", entries: list[journal.DeleteEntry],
                 lives: list[bool]) -> dict[int, int]:
    """Set ref 0 again where a journaled delete did not reach the record; {chunk_id:
    records the snapshot had live that the journal deletes}. SnapshotError when an
    entry's record does not carry its fid (the journal does not describe these chunks)."""
    fixes: list[tuple["Chunk", int]] = []
    seen: set[tuple[int, int]] = set()
    deleted: dict[int, int] = {}
    for e, live in zip(entries, lives):
        ch = store.chunks.get(e.chunk_id)
        if ch is None:
            raise snapshot.SnapshotError(f"the delete journal names chunk {e.chunk_id}, "
                                         "which is gone")
        hfid = ref = -1
        size = 0
        if SUPERBLOCK_SIZE <= e.offset <= ch.sb.current_offset - RECORD_HEADER_SIZE:
            try:
                hfid, ref, size = RECORD_HEADER.unpack(
                    os.pread(ch.fd, RECORD_HEADER_SIZE, e.offset))[:3]
            except struct.error:
                pass
        if hfid != e.fid or ref not in (REF_DELETED, REF_LIVE):
            raise snapshot.SnapshotError(f"the delete journal says fid {e.fid} is at {ch.name} "
                                         f"offset {e.offset}, but it is not")
        if ref == REF_LIVE and (ch.chunk_id, e.offset) not in seen:
            fixes.append((ch, e.offset))
        if live and (ch.chunk_id, e.offset) not in seen:
            deleted[ch.chunk_id] = deleted.get(ch.chunk_id, 0) + 1
            ch.add_dead_record(size)
        seen.add((ch.chunk_id, e.offset))
    for ch, off in fixes:
        datadir.pwrite_all(ch.fd, REF.pack(REF_DELETED), off + REF_OFFSET)
    for ch in {id(ch): ch for ch, _ in fixes}.values():
        diskio.fsync(ch.fd)
    if fixes:
        log.warning("delete journal: %d records whose delete a crash interrupted marked "
                    "deleted now", len(fixes))
    if entries:
        log.info("delete journal: %d entries replayed", len(entries))
    return deleted


def forget_deleted(store: "ChunkStore", entries: list[journal.DeleteEntry],
                   lives: list[bool]) -> None:
    """Drop the journaled deletes' records from the loaded index and shadows."""
    fids = set()
    for e, live in zip(entries, lives):
        if not live:
            continue
        loc = (e.chunk_id, e.offset)
        fids.add(e.fid)
        if store.index.get(e.fid) == loc:
            store.index.remove(e.fid)
        locs = store.shadows.get(e.fid)
        if locs and loc in locs:
            locs.remove(loc)
            if not locs:
                del store.shadows[e.fid]
    for fid in fids:
        if store.shadows.get(fid) and store.index.get(fid) is None:
            raise snapshot.SnapshotError(f"fid {fid} was deleted but keeps a live duplicate")


def index_appended(store: "ChunkStore", ch: "Chunk", known: Superblock) -> int:
    """Index the records appended past the snapshot's current_offset; how many are live.
    Damage among them (a skipped range) means the full scan, which decides about it."""
    out = ScanEnd()
    records = live = 0
    for off, fid, ref, size, ts in scan_records(ch.fd, known.current_offset,
                                                ch.sb.current_offset, out):
        records += 1
        if ref:
            live += 1
            index_record(store, ch, fid, off, ts)
        else:
            ch.add_dead_record(size)
    trouble = out.reason or (out.skipped and f"damaged bytes at offset {out.skipped[0].start}: "
                             f"{out.skipped[0].reason}")
    if trouble or records != ch.sb.files_alloc - known.files_alloc:
        raise snapshot.SnapshotError(
            f"{ch.name} changed in a way it cannot follow ("
            f"{trouble or f'{records} new records, the superblock says {ch.sb.files_alloc - known.files_alloc}'})")
    log.info("index snapshot: %s: %d records appended since, indexed", ch.name, records)
    return live


def check_counts(store: "ChunkStore", knowns: dict[int, Superblock], deleted: dict[int, int],
                 appended: dict[int, int], last: list[journal.DeleteEntry]) -> None:
    """Each files_count is what the snapshot, journal and appended records make it, or
    higher by the records of the last delete (cut short by a crash: fixed here)."""
    unfinished: dict[int, int] = {}
    for e in set(last):
        unfinished[e.chunk_id] = unfinished.get(e.chunk_id, 0) + 1
    fixes: list[tuple["Chunk", int]] = []
    for ch in store.ordered_chunks():
        cid = ch.chunk_id
        want = knowns[cid].files_count - deleted.get(cid, 0) + appended.get(cid, 0)
        extra = ch.sb.files_count - want
        if not 0 <= extra <= unfinished.get(cid, 0):
            raise snapshot.SnapshotError(
                f"{ch.name}: files_count {ch.sb.files_count}, but the snapshot, the delete "
                f"journal and the appended records make it {want}")
        if extra:
            fixes.append((ch, want))
    for ch, want in fixes:  # only once every chunk passed
        new = Superblock(ch.chunk_id, ch.sb.files_alloc, want, ch.sb.current_offset,
                         ch.sb.avail_space)
        raw = new.encode()
        datadir.pwrite_all(ch.fd, raw, 0)
        diskio.fsync(ch.fd)
        log.warning("%s: files_count %d -> %d (finishing a delete a crash interrupted)",
                    ch.name, ch.sb.files_count, want)
        ch.sb, ch.sb_raw = new, raw
