"""Record scanner for recovery: walks a chunk's records in bounded reads, checking each one."""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass
from typing import Iterator

from speedy.format.chunkfile import RECORD_HEADER, RECORD_HEADER_SIZE

WINDOW = 1 << 20  # bytes read at once; record data larger than that is checked piece by piece


@dataclass
class ScanEnd:
    """Where a scan stopped, and why if it stopped before the end it was given."""

    offset: int = 0
    reason: str = ""


def read_padded(fd: int, offset: int, n: int) -> bytes:
    """n bytes at offset; past the end of the file they are zeros (a short chunk file)."""
    data = os.pread(fd, n, offset)
    if len(data) < n:
        data += bytes(n - len(data))
    return data


def checksum_range(fd: int, offset: int, size: int) -> int:
    """adler32 (from 0) of size bytes at offset, read WINDOW bytes at a time."""
    csum = 0
    while size > 0:
        n = min(size, WINDOW)
        csum = zlib.adler32(read_padded(fd, offset, n), csum)
        offset += n
        size -= n
    return csum


def scan_records(fd: int, start: int, end: int, out: ScanEnd,
                 stop_at_zeros: bool = True) -> Iterator[tuple[int, int, int, int, int]]:
    """Yield (offset, fid, ref, size, timestamp) of each valid record in [start, end).

    Stops at the first record whose header is bad (ref not 0/1, all zeros, timestamp 0:
    a torn header, whose zero checksum would match zero data), whose size
    runs past end, or whose data fails its checksum; out.offset is where the valid records
    end and out.reason says why the scan stopped early ('' when it reached end).

    An empty record (size 0, checksum 0) is also what a record whose size and checksum
    fields were zeroed looks like; so one right before the place where a scan stops on
    damage is dropped with it (kept when only zeros follow it: the end of the records).
    """
    held = None  # an empty record, yielded once what follows it proves sound
    pos = start
    win = b""
    view = memoryview(win)
    win_off = start
    reason = ""
    while pos < end:
        left = end - pos
        if left < RECORD_HEADER_SIZE:
            reason = f"{left} stray bytes, too short for a record header"
            break
        rel = pos - win_off
        if rel + RECORD_HEADER_SIZE > len(win):
            win = read_padded(fd, pos, min(WINDOW, left))
            view = memoryview(win)
            win_off, rel = pos, 0
        fid, ref, size, csum, ts = RECORD_HEADER.unpack_from(win, rel)
        if ref > 1:
            reason = f"bad record header (ref {ref}, fid {fid}, size {size})"
            break
        if stop_at_zeros and not (fid or size or csum or ts):
            reason = "zeros where a record header should be"
            break
        if size > left - RECORD_HEADER_SIZE:
            reason = (f"record of fid {fid} with size {size} runs past offset {end}")
            break
        if ts == 0:  # every write stamps the time: a zero is a header torn before its end
            reason = f"record of fid {fid} without a timestamp (a torn header)"
            break
        total = RECORD_HEADER_SIZE + size
        if rel + total > len(win) and total <= WINDOW:
            win = read_padded(fd, pos, min(WINDOW, left))
            view = memoryview(win)
            win_off, rel = pos, 0
        if rel + total <= len(win):
            got = zlib.adler32(view[rel + RECORD_HEADER_SIZE:rel + total], 0)
        else:
            got = checksum_range(fd, pos + RECORD_HEADER_SIZE, size)
        if got != csum:
            reason = f"checksum mismatch in the record of fid {fid} (size {size})"
            break
        if held is not None:
            yield held
            held = None
        if size:
            yield pos, fid, ref, size, ts
        else:
            held = (pos, fid, ref, size, ts)
        pos += total
    if held is not None:
        if not reason or zeros_from(fd, pos, end):
            yield held
        else:
            reason = (f"{reason}; the empty record of fid {held[1]} before it is dropped too "
                      "(its size and checksum may have been zeroed)")
            pos = held[0]
    out.offset = pos
    out.reason = reason


def zeros_from(fd: int, offset: int, end: int) -> bool:
    """Whether the bytes from offset up to end (at most WINDOW of them) are all zeros."""
    n = min(WINDOW, end - offset)
    return n <= 0 or not read_padded(fd, offset, n).strip(b"\0")
