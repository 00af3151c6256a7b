"""Start-up recovery of a ChunkStore: fill the fid index from the snapshot or by a scan.

Rules (CHUNKFILE.md): every live record up to current_offset is indexed, a deleted one
(ref 0) is not; the first record whose header or checksum is wrong, or that runs past
current_offset, ends the scan of its chunk (current_offset is cut back there, the
superblock rewritten, the log says what was cut). A damaged superblock is rebuilt by
scanning from offset 55 while the records are valid. Of two live records with one fid
the later one (timestamp, then position) wins; the other stays on disk, remembered as a
"shadow" so that deleting the fid marks both.
"""
from __future__ import annotations

import logging
import os
import struct
from typing import TYPE_CHECKING

from . import snapshot
from .chunkfile import (RECORD_HEADER, RECORD_HEADER_SIZE, SUPERBLOCK_SIZE, FormatError,
                        Superblock)
from .scan import ScanEnd, scan_records

if TYPE_CHECKING:  # pragma: no cover
    from .store import Chunk, ChunkStore

log = logging.getLogger("speedy.store")


class RecoveryError(Exception):
    """A superblock that cannot be rewritten at start (the store turns it into StartError)."""


def scan_all(store: "ChunkStore") -> None:
    """Index every chunk from its first record (the slow path)."""
    store.index.clear()
    store.shadows.clear()
    store.index.reserve(sum(min(ch.sb.files_count,
                                (ch.sb.current_offset - SUPERBLOCK_SIZE) // RECORD_HEADER_SIZE)
                            for ch in store.chunks.values() if ch.sb_valid))
    for ch in store.ordered_chunks():
        scan_chunk(store, ch)


def scan_chunk(store: "ChunkStore", ch: "Chunk") -> None:
    """Index one chunk's live records, cut it at the first bad one, fix its superblock."""
    end = ch.sb.current_offset if ch.sb_valid else ch.capacity
    out = ScanEnd()
    records = live = 0
    for off, fid, ref, _size, ts in scan_records(ch.fd, SUPERBLOCK_SIZE, end, out):
        records += 1
        if ref:
            live += 1
            index_record(store, ch, fid, off, ts)
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
            os.pwrite(ch.fd, raw, 0)
            os.fsync(ch.fd)
        except OSError as e:
            raise RecoveryError(f"cannot rewrite the superblock of {ch.path}: "
                                f"{e.strerror}") from None
        ch.sb_raw = raw
    ch.sb, ch.tail, ch.sb_valid = new, new.current_offset, True


def index_record(store: "ChunkStore", ch: "Chunk", fid: int, off: int, ts: int) -> None:
    """Index a live record; of two live records with one fid the later one wins."""
    old = store.index.setdefault(fid, ch.chunk_id, off)
    if old is None:
        return
    new = (ch.chunk_id, off)
    if ts >= timestamp_at(store, *old):
        store.index.insert(fid, ch.chunk_id, off)
        win, lose = new, old
    else:
        win, lose = old, new
    store.shadows.setdefault(fid, []).append(lose)
    log.warning("fid %d: two live records, %s offset %d and %s offset %d; the later one "
                "(%s offset %d) wins, the other stays on disk", fid, store.chunk_file(lose[0]),
                lose[1], store.chunk_file(win[0]), win[1], store.chunk_file(win[0]), win[1])


def timestamp_at(store: "ChunkStore", cid: int, off: int) -> int:
    """The timestamp of the record header at (cid, off), 0 if unreadable."""
    try:
        raw = os.pread(store.chunks[cid].fd, RECORD_HEADER_SIZE, off)
        return RECORD_HEADER.unpack(raw)[4]
    except (OSError, KeyError, struct.error):
        return 0


def load_snapshot(store: "ChunkStore") -> str | None:
    """Fill the index from the snapshot if it matches the chunks: "snapshot" when exactly,
    "incremental" when records were only appended since; None means scan instead."""
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
            plan = snapshot_plan(store, meta)
            snapshot.load_table(f, meta, store.index)
        except (snapshot.SnapshotError, OSError) as e:
            log.warning("index snapshot %s ignored: %s; scanning the chunks",
                        store.snapshot_path, e)
            store.index.clear()
            return None
    store.shadows.clear()
    for fid, cid, off in meta.shadows:
        store.shadows.setdefault(fid, []).append((cid, off))
    if not plan:
        return "snapshot"
    for cid, known in plan.items():
        ch = store.chunks[cid]
        out = ScanEnd()
        records = live = 0
        for off, fid, ref, _size, ts in scan_records(ch.fd, known.current_offset,
                                                     ch.sb.current_offset, out):
            records += 1
            if ref:
                live += 1
                index_record(store, ch, fid, off, ts)
        if (out.reason or records != ch.sb.files_alloc - known.files_alloc
                or live != ch.sb.files_count - known.files_count):
            log.warning("index snapshot: %s changed in a way it cannot follow (%s); "
                        "scanning the chunks", ch.name,
                        out.reason or f"{records} new records, {live} live")
            return None
        log.info("index snapshot: %s: %d records appended since, indexed", ch.name, records)
    return "incremental"


def snapshot_plan(store: "ChunkStore", meta: snapshot.SnapshotMeta) -> dict[int, Superblock]:
    """{chunk_id: the superblock the snapshot knew} of chunks to scan from there on.

    SnapshotError when the snapshot does not describe these chunk files: another group,
    a chunk gone, another file (device/inode), truncated, the 4 KiB of records before
    its current_offset changed, or a superblock that did not only grow.
    """
    if meta.group_id != store.group_id:
        raise snapshot.SnapshotError(f"made for group {meta.group_id}")
    missing = set(meta.stamps) - set(store.chunks)
    if missing:
        raise snapshot.SnapshotError(f"chunk {min(missing)} is gone")
    plan: dict[int, Superblock] = {}
    for cid, ch in store.chunks.items():
        stamp = meta.stamps.get(cid)
        if not ch.sb_valid:
            raise snapshot.SnapshotError(f"{ch.name} has a damaged superblock")
        if stamp is None:  # a chunk created since: all its records are new
            plan[cid] = Superblock.empty(cid, ch.capacity)
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
        if snapshot.tail_crc(ch.fd, known.current_offset) != stamp.tail_crc:
            raise snapshot.SnapshotError(f"the records of {ch.name} have changed")
        if stamp.superblock == ch.sb_raw:
            continue
        if (ch.sb.current_offset < known.current_offset or ch.sb.files_alloc < known.files_alloc
                or ch.sb.files_count < known.files_count):
            raise snapshot.SnapshotError(f"{ch.name} has changed, not only grown")
        plan[cid] = known
    return plan
