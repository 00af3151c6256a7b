"""The delete journal: a redo log of DELETEs since the index snapshot was saved.

``<data_dir>/.speedy/deletes.log`` (integers big-endian)::

    head    magic "SPYDELJ1"
    entry   fid u64 | chunk_id u32 | offset u32 | more u8 | pad[3] | crc32 u32 (of the
            20 bytes before it); 24 bytes each, appended

A DELETE appends one entry per record it marks (the fid's record and its shadows); the
DELETEs the writer handles together (one group) are appended in one write, the last
entry with more = 0, BEFORE any of their ref bytes change (fsynced first with --sync=1).
The snapshot save truncates the journal back to its head once the new snapshot is
durable; a crash in between leaves entries the new snapshot already covers, which a
replay finds harmless (their records were deleted before the snapshot). Reading stops at
the first entry with a bad checksum or a short tail, and drops a trailing group whose
last entry says more = 1 (a torn append); a bad head makes the journal unusable. The
rules of the replay are in recovery.py.
"""
from __future__ import annotations

import logging
import os
import struct
import zlib
from dataclasses import dataclass

from speedy.chunkserver.store import datadir

MAGIC = b"SPYDELJ1"
BODY = struct.Struct(">QIIB3x")
ENTRY = struct.Struct(">QIIB3xI")
ENTRY_SIZE = ENTRY.size  # 24
MAX_BYTES = 1 << 30  # a journal larger than this is not read (a scan is cheaper)

log = logging.getLogger("speedy.chunkserver.store.chunkstore")


class JournalError(Exception):
    """A journal that cannot be used at all."""


@dataclass(frozen=True)
class DeleteEntry:
    """One record a DELETE marked: where it is and whose it is."""

    fid: int
    chunk_id: int
    offset: int
    more: bool = False

    def encode(self) -> bytes:
        """The 24 bytes of the entry, its crc included."""
        body = BODY.pack(self.fid, self.chunk_id, self.offset, int(self.more))
        return body + struct.pack(">I", zlib.crc32(body))


def encode_group(groups: list[tuple[int, list[tuple[int, int]]]]) -> bytes:
    """The entries of one append: per (fid, [(chunk_id, offset)...]) one entry per place,
    all but the very last with more."""
    flat = [(fid, cid, off) for fid, locs in groups for cid, off in locs]
    return b"".join(DeleteEntry(fid, cid, off, i < len(flat) - 1).encode()
                    for i, (fid, cid, off) in enumerate(flat))


def parse(data: bytes) -> tuple[list[DeleteEntry], int]:
    """(the whole groups of valid entries, the length they span); JournalError on a bad head."""
    if len(data) < len(MAGIC) or data[:len(MAGIC)] != MAGIC:
        raise JournalError("bad journal head")
    entries: list[DeleteEntry] = []
    pos = good = len(MAGIC)
    kept = 0
    while pos + ENTRY_SIZE <= len(data):
        fid, cid, off, more, crc = ENTRY.unpack_from(data, pos)
        if crc != zlib.crc32(data[pos:pos + BODY.size]) or more > 1:
            break
        entries.append(DeleteEntry(fid, cid, off, bool(more)))
        pos += ENTRY_SIZE
        if not more:
            good, kept = pos, len(entries)
    return entries[:kept], good


def read(path: str) -> tuple[list[DeleteEntry], int, int]:
    """(entries, valid length, file length); a missing file reads as an empty journal."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            if size > MAX_BYTES:
                raise JournalError(f"{size} bytes, more than {MAX_BYTES}")
            data = f.read()
    except FileNotFoundError:
        return [], 0, 0
    except OSError as e:
        raise JournalError(e.strerror) from None
    entries, good = parse(data)
    return entries, good, len(data)


def last_group(entries: list[DeleteEntry]) -> list[DeleteEntry]:
    """The entries of the last append (the DELETEs a crash may have cut short)."""
    i = len(entries) - 1
    while i > 0 and entries[i - 1].more:
        i -= 1
    return entries[i:] if entries else []


def open_journal(path: str, length: int) -> "DeleteJournal | None":
    """The journal opened to append after its first length bytes (a new one if 0); None
    (logged) when it cannot be opened: a DELETE then drops the snapshot instead."""
    try:
        return DeleteJournal(path, length)
    except OSError as e:
        log.warning("cannot open the delete journal %s: %s; a DELETE will drop the index "
                    "snapshot instead", path, e)
        return None


class DeleteJournal:
    """The open journal file of a store: appends groups, resets after a snapshot save."""

    def __init__(self, path: str, length: int) -> None:
        self.path = path
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        self.length = length
        try:
            if length < len(MAGIC):
                self.reset(sync=False)
            elif os.fstat(self.fd).st_size != length:
                os.ftruncate(self.fd, length)  # a torn tail: later appends follow good entries
        except OSError:
            os.close(self.fd)
            raise

    def append(self, groups: list[tuple[int, list[tuple[int, int]]]], sync: bool) -> None:
        """Write the entries of some DELETEs at the end, in one write (fsynced when sync);
        OSError on failure."""
        data = encode_group(groups)
        datadir.pwrite_all(self.fd, data, self.length)
        self.length += len(data)
        if sync:
            os.fsync(self.fd)

    def entries(self) -> int:
        """How many entries the journal holds."""
        return max(0, self.length - len(MAGIC)) // ENTRY_SIZE

    def try_append(self, groups: list[tuple[int, list[tuple[int, int]]]], sync: bool) -> bool:
        """append(); False (logged) if it failed: the caller must drop the snapshot."""
        try:
            self.append(groups, sync)
            return True
        except OSError as e:
            log.warning("cannot append to the delete journal %s: %s; dropping the index "
                        "snapshot", self.path, e)
            return False

    def try_reset(self) -> None:
        """reset() after a snapshot save; a failure is logged (a replay skips what the
        snapshot covers)."""
        try:
            self.reset()
        except OSError as e:
            log.warning("cannot empty the delete journal %s: %s", self.path, e)

    def reset(self, sync: bool = True) -> None:
        """Back to the head alone (the saved snapshot covers every entry)."""
        datadir.pwrite_all(self.fd, MAGIC, 0)
        os.ftruncate(self.fd, len(MAGIC))
        self.length = len(MAGIC)
        if sync:
            os.fsync(self.fd)

    def close(self) -> None:
        """Close the file."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
