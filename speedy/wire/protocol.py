"""Chunkserver wire protocol: opcodes, error codes and pure frame encode/decode.

    request:   opcode u8 | body_len u32 | body[body_len]
    response:  opcode u8 | error u8 | body_len u32 | body[body_len]

All integers are unsigned big-endian (see shared/spec/PROTOCOL.md).

    WRITE/READ/DELETE body:  group_id u16 | fid u64 [| data]
    QUERY_IO_STATUS body:    pending_writes u32 | writing_count u32 | reading_count u32
    QUERY_DETAIL_INFOS body: conn u32 | reading u32 | writing u32 | pending u32 |
                             read_count u64 | write_count u64 | read_error u64 |
                             write_error u64 | read_bytes u64 | write_bytes u64 |
                             n_chunks u32 | n_chunks x (chunk_id u64, avail u64) |
                             total_file_count u64
    QUERY_GARBAGE body (new): compacting u64 | n_chunks u32 | n_chunks x (chunk_id u64,
                             garbage_bytes u64, used_bytes u64, avail_space u64)
    COMPACT request (new):   threshold_ppm u32 (0xFFFFFFFF: the server's) | wait u8
    COMPACT response (new):  n_chunks u32 | freed_bytes u64
"""
from __future__ import annotations

import enum
import struct
from dataclasses import dataclass, field

REQUEST_HEADER = struct.Struct(">BI")
RESPONSE_HEADER = struct.Struct(">BBI")
FILE_KEY = struct.Struct(">HQ")
IO_STATUS = struct.Struct(">III")
DETAIL_HEAD = struct.Struct(">IIIIQQQQQQI")
DETAIL_CHUNK = struct.Struct(">QQ")
U64 = struct.Struct(">Q")
GARBAGE_HEAD = struct.Struct(">QI")
GARBAGE_CHUNK = struct.Struct(">QQQQ")
COMPACT_REQUEST = struct.Struct(">IB")
COMPACT_RESULT = struct.Struct(">IQ")
SERVER_THRESHOLD = 0xFFFFFFFF

REQUEST_HEADER_SIZE = REQUEST_HEADER.size  # 5
RESPONSE_HEADER_SIZE = RESPONSE_HEADER.size  # 6
FILE_KEY_SIZE = FILE_KEY.size  # 10
MAX_CHUNK_NAME = 32


class Op(enum.IntEnum):
    """Request opcodes."""

    WRITE = 0
    READ = 1
    DELETE = 2
    PING = 10
    CHECK_DISK = 11
    SET_STATUS = 20
    GET_STATUS = 21
    KILL_PD_WR = 30
    QUERY_IO_STATUS = 31
    QUERY_DETAIL_INFOS = 32
    DUMP_CHUNK = 40
    QUERY_GARBAGE = 41  # new
    COMPACT = 42  # new


class Err(enum.IntEnum):
    """Response error codes."""

    SUCCESS = 0
    SERVER_ID_MISMATCH = 1
    CHUNK_UNAVAILABLE = 2
    FILE_NOT_FOUND = 3
    FILE_EXISTS = 4
    WRITE_ERROR = 5
    READ_ERROR = 6
    INTERNAL_ERROR = 7
    IO_JOB_UNAVAILABLE = 8
    REACH_MEMORY_LIMIT = 9
    SERVER_READ_ONLY = 10
    KILLED = 11
    CHUNK_CHECK_ERROR = 12


class WriteOutcome(enum.Enum):
    """What a WRITE's answer says about the fid on that server."""

    STORED = "stored"            # SUCCESS: the file is there
    NOT_STORED = "not stored"    # refused before any I/O: nothing of this request was stored
    UNKNOWN = "unknown"          # may or may not be readable (now or after a restart)


# A WRITE answered with one of these was refused before its record was written: the fid
# holds nothing of this request (FILE_EXISTS: the fid holds another write, not this one).
WRITE_NOT_STORED = frozenset({Err.SERVER_ID_MISMATCH, Err.CHUNK_UNAVAILABLE, Err.FILE_EXISTS,
                              Err.IO_JOB_UNAVAILABLE, Err.REACH_MEMORY_LIMIT,
                              Err.SERVER_READ_ONLY, Err.KILLED})


def write_outcome(err: int | None) -> WriteOutcome:
    """The outcome of a WRITE from its error code (None: no answer at all).

    Unknown: WRITE_ERROR (the disk failed during or after the record's write),
    INTERNAL_ERROR (also what a worker answers when the writer died with the write in
    its queue: the record may be on disk and found by recovery after a restart), any
    other or unlisted code, and no answer (a lost connection, a timeout). A client that
    reports such a put as failed deletes the fid on that server first.
    """
    if err == Err.SUCCESS:
        return WriteOutcome.STORED
    if err in WRITE_NOT_STORED:
        return WriteOutcome.NOT_STORED
    return WriteOutcome.UNKNOWN


class ServerStatus(enum.IntEnum):
    """The chunkserver's own status (SET_STATUS / GET_STATUS / reports)."""

    RW = 0
    RO = 1


OPCODES = frozenset(int(o) for o in Op)
ADMIN_OPCODES = frozenset({Op.SET_STATUS, Op.KILL_PD_WR, Op.DUMP_CHUNK, Op.QUERY_GARBAGE,
                           Op.COMPACT})


class ProtocolError(Exception):
    """A frame or body that cannot be decoded."""


@dataclass
class DetailInfo:
    """The QUERY_DETAIL_INFOS answer."""

    conn_count: int = 0
    reading_count: int = 0
    writing_count: int = 0
    pending_writes: int = 0
    read_count: int = 0
    write_count: int = 0
    read_error: int = 0
    write_error: int = 0
    read_bytes: int = 0
    write_bytes: int = 0
    chunks: list[tuple[int, int]] = field(default_factory=list)
    total_file_count: int = 0


def encode_request(op: int, body: bytes = b"") -> bytes:
    """A whole request frame."""
    return REQUEST_HEADER.pack(op, len(body)) + body


def encode_request_header(op: int, body_len: int) -> bytes:
    """The 5-byte request header (the body follows separately)."""
    return REQUEST_HEADER.pack(op, body_len)


def decode_request_header(buf: bytes) -> tuple[int, int]:
    """(opcode, body_len) of a 5-byte request header."""
    if len(buf) != REQUEST_HEADER_SIZE:
        raise ProtocolError("request header must be 5 bytes")
    return REQUEST_HEADER.unpack(buf)


def encode_response(op: int, err: int, body: bytes = b"") -> bytes:
    """A whole response frame."""
    return RESPONSE_HEADER.pack(op, err, len(body)) + body


def encode_response_header(op: int, err: int, body_len: int) -> bytes:
    """The 6-byte response header (the body follows separately)."""
    return RESPONSE_HEADER.pack(op, err, body_len)


def decode_response_header(buf: bytes) -> tuple[int, int, int]:
    """(opcode, error, body_len) of a 6-byte response header."""
    if len(buf) != RESPONSE_HEADER_SIZE:
        raise ProtocolError("response header must be 6 bytes")
    return RESPONSE_HEADER.unpack(buf)


def encode_file_key(group_id: int, fid: int) -> bytes:
    """group_id u16 | fid u64: the start of a WRITE body, the whole READ/DELETE body."""
    return FILE_KEY.pack(group_id, fid)


def decode_file_key(body: bytes) -> tuple[int, int]:
    """(group_id, fid) from the first 10 bytes of a body."""
    if len(body) < FILE_KEY_SIZE:
        raise ProtocolError("body shorter than 10 bytes (group_id u16, fid u64)")
    return FILE_KEY.unpack_from(body)


def encode_io_status(pending: int, writing: int, reading: int) -> bytes:
    """QUERY_IO_STATUS body."""
    return IO_STATUS.pack(pending, writing, reading)


def decode_io_status(body: bytes) -> tuple[int, int, int]:
    """(pending_writes, writing_count, reading_count)."""
    if len(body) != IO_STATUS.size:
        raise ProtocolError("QUERY_IO_STATUS body must be 12 bytes")
    return IO_STATUS.unpack(body)


def encode_detail_info(info: DetailInfo) -> bytes:
    """QUERY_DETAIL_INFOS body: 76 + 16 x n_chunks bytes."""
    parts = [DETAIL_HEAD.pack(info.conn_count, info.reading_count, info.writing_count,
                              info.pending_writes, info.read_count, info.write_count,
                              info.read_error, info.write_error, info.read_bytes,
                              info.write_bytes, len(info.chunks))]
    parts += [DETAIL_CHUNK.pack(cid, avail) for cid, avail in info.chunks]
    parts.append(U64.pack(info.total_file_count))
    return b"".join(parts)


def decode_detail_info(body: bytes) -> DetailInfo:
    """Parse a QUERY_DETAIL_INFOS body."""
    if len(body) < DETAIL_HEAD.size + U64.size:
        raise ProtocolError("QUERY_DETAIL_INFOS body too short")
    head = DETAIL_HEAD.unpack_from(body)
    n = head[10]
    if len(body) != DETAIL_HEAD.size + DETAIL_CHUNK.size * n + U64.size:
        raise ProtocolError("QUERY_DETAIL_INFOS body length disagrees with n_chunks")
    chunks = [DETAIL_CHUNK.unpack_from(body, DETAIL_HEAD.size + DETAIL_CHUNK.size * i)
              for i in range(n)]
    (total,) = U64.unpack_from(body, len(body) - U64.size)
    return DetailInfo(*head[:10], chunks=chunks, total_file_count=total)


@dataclass
class ChunkGarbage:
    """One chunk's line of the QUERY_GARBAGE answer."""

    chunk_id: int
    garbage_bytes: int
    used_bytes: int
    avail_space: int


def encode_garbage(compacting: int, chunks: list[ChunkGarbage]) -> bytes:
    """QUERY_GARBAGE body (new)."""
    return GARBAGE_HEAD.pack(compacting, len(chunks)) + b"".join(
        GARBAGE_CHUNK.pack(c.chunk_id, c.garbage_bytes, c.used_bytes, c.avail_space)
        for c in chunks)


def decode_garbage(body: bytes) -> tuple[int, list[ChunkGarbage]]:
    """(compacting chunk id or 0, chunks) from a QUERY_GARBAGE body."""
    if len(body) < GARBAGE_HEAD.size:
        raise ProtocolError("QUERY_GARBAGE body too short")
    compacting, n = GARBAGE_HEAD.unpack_from(body)
    if len(body) != GARBAGE_HEAD.size + n * GARBAGE_CHUNK.size:
        raise ProtocolError(f"QUERY_GARBAGE body of {len(body)} bytes for {n} chunks")
    return compacting, [ChunkGarbage(*GARBAGE_CHUNK.unpack_from(body, GARBAGE_HEAD.size +
                                                              i * GARBAGE_CHUNK.size))
                        for i in range(n)]


def encode_compact_request(threshold: float | None, wait: bool) -> bytes:
    """COMPACT request body (new): threshold as a fraction (None: the server's)."""
    if threshold is not None and not 0 <= threshold <= 1:
        raise ValueError(f"threshold {threshold} is not in 0..1")
    ppm = SERVER_THRESHOLD if threshold is None else round(threshold * 1e6)
    return COMPACT_REQUEST.pack(ppm, int(wait))


def decode_compact_request(body: bytes) -> tuple[int, bool]:
    """(threshold ppm or SERVER_THRESHOLD, wait) of a COMPACT body."""
    if len(body) != COMPACT_REQUEST.size:
        raise ProtocolError("COMPACT body must be 5 bytes")
    ppm, wait = COMPACT_REQUEST.unpack(body)
    if (ppm > 1_000_000 and ppm != SERVER_THRESHOLD) or wait > 1:
        raise ProtocolError("COMPACT: threshold above 1 or wait not 0/1")
    return ppm, bool(wait)
