"""The fid index snapshot: the raw shared table image plus what it covers, for a fast start.

``<data_dir>/.speedy/index.snap`` (integers big-endian except the table image)::

    head    magic "SPYSNAP1" | version u32 | little_endian u8 | group_id u16 |
            n_chunks u32 | capacity u64 | count u64 | tombstones u64 |
            n_shadows u32 | table_crc32 u32
    stamps  n_chunks x (chunk_id u64 | capacity u64 | superblock[55] |
                        st_dev u64 | st_ino u64 | st_size u64 | st_mtime_ns u64 |
                        tail_crc32 u32 of the 4 KiB before current_offset |
                        garbage u64: bytes of deleted records and skipped damage)
    shadows n_shadows x (fid u64 | chunk_id u32 | offset u32)   older live duplicates
    meta_crc32 u32 (of head, stamps and shadows)
    table   capacity x 16 bytes, the FidIndex slots in native byte order

Written to a temporary name, fsynced and renamed, so a crash leaves the old one or
the new one. Any mismatch (magic, version, byte order, crc) makes it unusable. The
stamps are checked against the chunks at start by recovery.py; DELETEs made since are
in the delete journal (journal.py), which the store empties after each save.
"""
from __future__ import annotations

import os
import struct
import sys
import zlib
from dataclasses import dataclass, field
from typing import Iterable

from speedy.format.chunkfile import REF, REF_LIVE, REF_OFFSET, SUPERBLOCK_SIZE
from speedy.chunkserver.shm.index import SLOT_BYTES, FidIndex

MAGIC = b"SPYSNAP1"
VERSION = 2  # 2: the garbage count per chunk
HEAD = struct.Struct(">8sIBHIQQQII")
STAMP = struct.Struct(f">QQ{SUPERBLOCK_SIZE}sQQQQIQ")
TAIL = 4096
SHADOW = struct.Struct(">QII")
CRC = struct.Struct(">I")
NATIVE_LE = int(sys.byteorder == "little")
READ_PIECE = 8 << 20


class SnapshotError(Exception):
    """A snapshot file that cannot be used."""


@dataclass
class ChunkStamp:
    """What a snapshot knew about one chunk file."""

    chunk_id: int
    capacity: int
    superblock: bytes
    dev: int
    ino: int
    size: int
    mtime_ns: int
    tail_crc: int
    garbage: int = 0

    @classmethod
    def of(cls, chunk_id: int, capacity: int, superblock: bytes, fd: int,
           current_offset: int, garbage: int = 0) -> "ChunkStamp":
        """The stamp of an open chunk file: its superblock bytes, fstat, tail checksum,
        garbage count."""
        st = os.fstat(fd)
        return cls(chunk_id, capacity, superblock, st.st_dev, st.st_ino, st.st_size,
                   st.st_mtime_ns, tail_crc(fd, current_offset), garbage)


def tail_crc(fd: int, current_offset: int, live_refs: Iterable[int] = ()) -> int:
    """crc32 of the (up to) 4 KiB of records just before current_offset, with the ref
    field of the records at the live_refs offsets (deleted since, per the journal) read
    as 1, as it was when the stamp was taken."""
    start = max(SUPERBLOCK_SIZE, current_offset - TAIL)
    buf = bytearray(os.pread(fd, current_offset - start, start))
    live = REF.pack(REF_LIVE)
    for off in live_refs:
        for i, byte in enumerate(live):
            at = off + REF_OFFSET + i - start
            if 0 <= at < len(buf):
                buf[at] = byte
    return zlib.crc32(buf)


@dataclass
class SnapshotMeta:
    """The header of a snapshot: table geometry, chunk stamps, shadowed duplicates."""

    group_id: int
    capacity: int
    count: int
    tombstones: int
    table_crc: int
    stamps: dict[int, ChunkStamp] = field(default_factory=dict)
    shadows: list[tuple[int, int, int]] = field(default_factory=list)
    table_offset: int = 0


def save(path: str, group_id: int, stamps: list[ChunkStamp],
         shadows: list[tuple[int, int, int]], index: FidIndex) -> int:
    """Write the snapshot atomically; returns its size in bytes."""
    table = index.raw_table()
    try:
        table_crc = zlib.crc32(table)
        meta = bytearray(HEAD.pack(MAGIC, VERSION, NATIVE_LE, group_id, len(stamps),
                                   index.capacity, len(index), index.tombstones,
                                   len(shadows), table_crc))
        for s in stamps:
            meta += STAMP.pack(s.chunk_id, s.capacity, s.superblock, s.dev, s.ino, s.size,
                               s.mtime_ns, s.tail_crc, s.garbage)
        for fid, chunk_id, offset in shadows:
            meta += SHADOW.pack(fid, chunk_id, offset)
        meta += CRC.pack(zlib.crc32(meta))
        tmp = path + ".tmp"
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        try:
            with os.fdopen(fd, "wb", closefd=True) as f:
                f.write(meta)
                f.write(table)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            try:
                os.unlink(tmp)
            except OSError:
                pass
            raise
        sync_dir(os.path.dirname(path))
        return len(meta) + len(table)
    finally:
        table.release()


def read_meta(f) -> SnapshotMeta:
    """Parse and check everything but the table image; SnapshotError if unusable."""
    head = f.read(HEAD.size)
    if len(head) != HEAD.size:
        raise SnapshotError("truncated header")
    magic, version, le, group_id, n_chunks, cap, count, tombs, n_shadows, tcrc = HEAD.unpack(head)
    if magic != MAGIC or version != VERSION:
        raise SnapshotError("not a snapshot of this version")
    if le != NATIVE_LE:
        raise SnapshotError("written on a machine of the other byte order")
    if n_chunks > 1 << 20 or n_shadows > 1 << 24 or cap < 1 or cap & (cap - 1) or cap > 1 << 40:
        raise SnapshotError("implausible header")
    rest_len = n_chunks * STAMP.size + n_shadows * SHADOW.size + CRC.size
    rest = f.read(rest_len)
    if len(rest) != rest_len:
        raise SnapshotError("truncated header")
    meta = head + rest[:-CRC.size]
    if CRC.unpack_from(rest, rest_len - CRC.size)[0] != zlib.crc32(meta):
        raise SnapshotError("header checksum mismatch")
    m = SnapshotMeta(group_id, cap, count, tombs, tcrc, table_offset=len(head) + rest_len)
    pos = 0
    for _ in range(n_chunks):
        s = ChunkStamp(*STAMP.unpack_from(rest, pos))
        m.stamps[s.chunk_id] = s
        pos += STAMP.size
    for _ in range(n_shadows):
        m.shadows.append(SHADOW.unpack_from(rest, pos))
        pos += SHADOW.size
    if count + tombs > cap:
        raise SnapshotError("implausible table counts")
    return m


def load_table(f, meta: SnapshotMeta, index: FidIndex) -> None:
    """Read the table image straight into a new index segment; SnapshotError if damaged."""
    size = os.fstat(f.fileno()).st_size
    if size != meta.table_offset + meta.capacity * SLOT_BYTES:
        raise SnapshotError(f"size {size} does not match its table of {meta.capacity} slots")

    def fill(view: memoryview) -> None:
        f.seek(meta.table_offset)
        pos = 0
        crc = 0
        while pos < len(view):
            piece = view[pos:pos + READ_PIECE]
            n = f.readinto(piece)
            if not n:
                raise SnapshotError("truncated table")
            crc = zlib.crc32(piece[:n], crc)
            piece.release()
            pos += n
        if crc != meta.table_crc:
            raise SnapshotError("table checksum mismatch")

    index.load_raw(meta.capacity, meta.count, meta.tombstones, fill)


def sync_dir(path: str) -> None:
    """fsync a directory so a rename or unlink in it is durable."""
    fd = os.open(path or ".", os.O_RDONLY | os.O_CLOEXEC)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
