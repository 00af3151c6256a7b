"""Chunk file format: superblock and record layout, pure encode/decode (CHUNKFILE.md).

A chunk file ``chunk_<group_id>_<chunk_id>.chunk`` (all integers big-endian)::

    offset 0   +------------------------------------------------------------+
               | superblock (55 bytes)                                      |
               |   magic "CHUNK_SB_MAGIC!" (15) | chunk_id u64 |             |
               |   files_alloc u32 | files_count u32 | current_offset u64 |  |
               |   avail_space u64 | checksum u64 = adler32(previous 47, 0) |
    offset 55  +------------------------------------------------------------+
               | record: fid u64 | ref u16 | size u32 | checksum u64 |      |
               |         timestamp u64 | data[size]        (30 + size)      |
               +------------------------------------------------------------+
               | record ...                                                 |
    current_offset ---------------------------------------------------------+
               | preallocated zeros up to the chunk size                    |
               +------------------------------------------------------------+

ref is 1 for a live record, 0 for a deleted one (new). checksum is
``zlib.adler32(data, 0)``. A write of ``size`` bytes fits while
``avail_space > size + 30``.
"""
from __future__ import annotations

import re
import struct
import zlib
from dataclasses import dataclass

MAGIC = b"CHUNK_SB_MAGIC!"
SUPERBLOCK = struct.Struct(">15sQIIQQQ")
SUPERBLOCK_BODY = struct.Struct(">15sQIIQQ")
SUPERBLOCK_SIZE = SUPERBLOCK.size  # 55
RECORD_HEADER = struct.Struct(">QHIQQ")
RECORD_HEADER_SIZE = RECORD_HEADER.size  # 30
REF_OFFSET = 8  # of the ref field inside a record header
REF = struct.Struct(">H")
DEFAULT_CHUNK_SIZE = 2147483648
MAX_CHUNK_SIZE = 4294967295
MIN_CHUNK_SIZE = 1 << 20
REF_LIVE = 1
REF_DELETED = 0
MAX_TIMESTAMP = 1 << 32  # a plausible timestamp is below (until 2106) and above 0
MAX_CHECKSUM = 0xFFFFFFFF  # adler32 fills only the low half of the u64 field
CHUNK_NAME = re.compile(r"^chunk_(\d+)_(\d+)\.chunk$")


class FormatError(ValueError):
    """Bytes that are not a valid superblock or record header."""


@dataclass
class Superblock:
    """The 55-byte superblock at offset 0 of a chunk file."""

    chunk_id: int
    files_alloc: int = 0
    files_count: int = 0
    current_offset: int = SUPERBLOCK_SIZE
    avail_space: int = 0

    def encode(self) -> bytes:
        """The 55 bytes, checksum included."""
        body = SUPERBLOCK_BODY.pack(MAGIC, self.chunk_id, self.files_alloc, self.files_count,
                                    self.current_offset, self.avail_space)
        return body + struct.pack(">Q", checksum(body))

    @classmethod
    def decode(cls, buf: bytes) -> "Superblock":
        """Parse 55 bytes; FormatError on a bad magic or checksum."""
        if len(buf) < SUPERBLOCK_SIZE:
            raise FormatError("superblock shorter than 55 bytes")
        magic, chunk_id, alloc, count, offset, avail, csum = SUPERBLOCK.unpack_from(buf)
        if magic != MAGIC:
            raise FormatError("bad superblock magic")
        if csum != checksum(bytes(buf[:SUPERBLOCK_BODY.size])):
            raise FormatError("bad superblock checksum")
        return cls(chunk_id, alloc, count, offset, avail)

    @classmethod
    def empty(cls, chunk_id: int, chunk_size: int) -> "Superblock":
        """The superblock of a freshly created chunk."""
        return cls(chunk_id, 0, 0, SUPERBLOCK_SIZE, chunk_size - SUPERBLOCK_SIZE)


@dataclass
class RecordHeader:
    """The 30-byte header in front of each record's data."""

    fid: int
    ref: int
    size: int
    checksum: int
    timestamp: int

    def encode(self) -> bytes:
        """The 30 header bytes."""
        return RECORD_HEADER.pack(self.fid, self.ref, self.size, self.checksum, self.timestamp)

    @classmethod
    def decode(cls, buf: bytes, offset: int = 0) -> "RecordHeader":
        """Parse 30 bytes at offset (no validation beyond length)."""
        if len(buf) - offset < RECORD_HEADER_SIZE:
            raise FormatError("record header shorter than 30 bytes")
        return cls(*RECORD_HEADER.unpack_from(buf, offset))

    @property
    def live(self) -> bool:
        """True for a live record (ref 1)."""
        return self.ref == REF_LIVE


def checksum(data) -> int:
    """Adler-32 started from 0, as the original computes it."""
    return zlib.adler32(data, 0)


def length_ambiguous(csum: int) -> bool:
    """Whether zero bytes added to or cut from the end of the data keep this checksum.

    adler32 from 0 keeps its value over a zero byte exactly when its low half (the byte
    sum mod 65521) is 0: every empty or all-zero body. Such a record's size field is not
    vouched for by its checksum: what follows it must show where it really ends.
    """
    return csum & 0xFFFF == 0


def header_problem(fid: int, ref: int, size: int, csum: int, ts: int, room: int) -> str:
    """Why a record header cannot start a valid record with room bytes for its data ('' if
    it can): the checks of the start-up scan, the resynchronization and the reader."""
    if ref > REF_LIVE:
        return f"bad record header (ref {ref}, fid {fid}, size {size})"
    if not (fid or size or csum or ts):
        return "zeros where a record header should be"
    if size > room:
        return f"record of fid {fid} with size {size} runs past its end"
    if ts == 0:  # every write stamps the time: a zero is a header torn before its end
        return f"record of fid {fid} without a timestamp (a torn header)"
    if ts >= MAX_TIMESTAMP:
        return f"record of fid {fid} with an implausible timestamp {ts}"
    if csum > MAX_CHECKSUM:
        return f"record of fid {fid} with a checksum field past 32 bits"
    return ""


def encode_record_header(fid: int, size: int, csum: int, timestamp: int,
                         ref: int = REF_LIVE) -> bytes:
    """The 30 header bytes of a new record."""
    return RECORD_HEADER.pack(fid, ref, size, csum, timestamp)


def record_size(data_size: int) -> int:
    """Bytes a record of data_size takes in a chunk."""
    return RECORD_HEADER_SIZE + data_size


def fits(avail_space: int, data_size: int) -> bool:
    """Whether a write of data_size bytes fits a chunk with avail_space (strictly greater)."""
    return avail_space > data_size + RECORD_HEADER_SIZE


def max_data_size(chunk_size: int) -> int:
    """The largest body that fits an empty chunk of chunk_size."""
    return chunk_size - SUPERBLOCK_SIZE - RECORD_HEADER_SIZE - 1


def chunk_name(group_id: int, chunk_id: int) -> str:
    """``chunk_<group_id>_<chunk_id>.chunk``."""
    return f"chunk_{group_id}_{chunk_id}.chunk"


def parse_chunk_name(name: str) -> tuple[int, int] | None:
    """(group_id, chunk_id) of a chunk file name, or None."""
    m = CHUNK_NAME.match(name)
    if not m:
        return None
    return int(m.group(1)), int(m.group(2))
