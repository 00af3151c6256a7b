"""Record scanner for recovery: walks a chunk's records in bounded reads, checking each one,
and resynchronizes after damage at the next offset where a whole valid record starts."""
from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass, field
from typing import Iterator

from speedy.format.chunkfile import (MAX_CHECKSUM, MAX_TIMESTAMP, RECORD_HEADER,
                                     RECORD_HEADER_SIZE, header_problem)

WINDOW = 1 << 20  # bytes read at once; record data larger than that is checked piece by piece
OVERLAP = 64  # bytes two search windows share, so that no header is split between them
TS_AT = 22  # offset of the timestamp field inside a record header
CHECK_BUDGET = 64 << 20  # a search checksums this much (+4x what it read) for places that
CHAIN_HOPS = 16  # turn out to be no record; then a place needs this many sound headers
# after it (or all up to the end) before its data is checksummed
ZERO_RUN = re.compile(rb"\x00{4,}")


@dataclass
class Skip:
    """A damaged range the scan skipped: garbage with valid records after it."""

    start: int
    end: int
    reason: str


@dataclass
class ScanEnd:
    """Where a scan's records end, why they end before the end it was given, and the
    damaged ranges it skipped on the way."""

    offset: int = 0
    reason: str = ""
    skipped: list[Skip] = field(default_factory=list)

    @property
    def skipped_bytes(self) -> int:
        """Bytes of all skipped ranges."""
        return sum(s.end - s.start for s in self.skipped)


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


def scan_records(fd: int, start: int, end: int, out: ScanEnd, zeros_end: bool = False,
                 records: int | None = None) -> Iterator[tuple[int, int, int, int, int]]:
    """Yield (offset, fid, ref, size, timestamp) of each valid record in [start, end).

    A record is valid when header_problem() finds nothing wrong with its header, it ends
    by end and its data matches its checksum. At an invalid one the scan looks for the
    next offset where a whole valid record starts (find_record) and goes on from there,
    noting the damaged range in out.skipped; when there is none (a torn tail) the records
    end there: out.offset is where, out.reason says why ('' when they reach end).
    zeros_end: an all-zero header ends the records without a search (a chunk whose
    superblock is rebuilt is scanned to its capacity: the zeros are its preallocated tail).

    A record whose checksum does not vouch for its size (length_ambiguous: an empty or
    all-zero body) is yielded only once what follows proves where it ends: a valid
    record, end, or (zeros_end) zeros. Right before damage it is taken as part of it,
    but for a torn tail of zeros: kept, unless the superblock counts no more records than
    the scan found before the zeros (records: its files_alloc), so that the zeros are the
    rest of that record's data and its size field was damaged.
    """
    count = 0  # records yielded
    max_ts, unpack_from, adler32 = MAX_TIMESTAMP, RECORD_HEADER.unpack_from, zlib.adler32
    held = None  # a length-ambiguous record, yielded once what follows it proves sound
    pos = start
    win = b""
    view = memoryview(win)
    win_off = start
    reason = ""
    while pos < end:
        left = end - pos
        if left >= RECORD_HEADER_SIZE:
            rel = pos - win_off
            if rel < 0 or rel + RECORD_HEADER_SIZE > len(win):  # (a resync may go back)
                win = read_padded(fd, pos, min(WINDOW, left))
                view = memoryview(win)
                win_off, rel = pos, 0
            fid, ref, size, csum, ts = unpack_from(win, rel)
            # header_problem() inline, so that the clean scan pays for no call per record
            # (a checksum field past 32 bits fails the checksum comparison below)
            if ref <= 1 and size <= left - RECORD_HEADER_SIZE and ts and ts < max_ts:
                total = RECORD_HEADER_SIZE + size
                if rel + total > len(win) and total <= WINDOW:
                    win = read_padded(fd, pos, min(WINDOW, left))
                    view = memoryview(win)
                    win_off, rel = pos, 0
                if rel + total <= len(win):
                    got = adler32(view[rel + RECORD_HEADER_SIZE:rel + total], 0)
                else:
                    got = checksum_range(fd, pos + RECORD_HEADER_SIZE, size)
                if got == csum:
                    if held is not None:
                        yield held
                        count += 1
                        held = None
                    if csum & 0xFFFF:  # not length_ambiguous(csum), inline
                        yield pos, fid, ref, size, ts
                        count += 1
                    else:
                        held = (pos, fid, ref, size, ts)
                    pos += total
                    continue
                problem = f"checksum mismatch in the record of fid {fid} (size {size})"
            else:
                problem = header_problem(fid, ref, size, csum, ts, left - RECORD_HEADER_SIZE)
                if zeros_end and not (fid or ref or size or csum or ts):
                    reason = problem
                    if held is not None:
                        yield held
                        held = None
                    break
        else:
            problem = f"{left} stray bytes, too short for a record header"
        bad, kept = (pos, None) if held is None else (held[0], held)
        held = None
        after = resync_point(fd, pos, end, problem, bad + 1)
        if after is None:
            if kept is not None and (records is None or count + 1 < records) \
                    and zeros_from(fd, pos, end):
                yield kept  # a torn tail of zeros after it; the superblock counts more
                count += 1
                bad = pos
            elif kept is not None:
                problem += (f"; the record of fid {kept[1]} before it goes with it (its "
                            "checksum does not vouch for its size)")
            if out.skipped and out.skipped[-1].end == bad:  # nothing kept after it:
                bad = out.skipped.pop().start  # the skipped range is torn tail too
            reason, pos = problem, bad
            break
        if kept is not None:
            problem += (f"; the record of fid {kept[1]} before it goes with it (its "
                        "checksum does not vouch for its size)")
        if out.skipped and out.skipped[-1].end == bad:  # what the last search found
            out.skipped[-1].end = after  # was no record after all: one range
        else:
            out.skipped.append(Skip(bad, after, problem))
        pos = after
    if held is not None:  # it ends exactly at end
        yield held
    out.offset = pos
    out.reason = reason


def resync_point(fd: int, pos: int, end: int, problem: str, search: int) -> int | None:
    """Where the records go on after an invalid one at pos: right after it when its header
    is sound and a valid record follows (its data was damaged), else the first offset from
    search on where a whole valid record starts; None when there is none (a torn tail).

    search is pos + 1, or the offset after the start of a length-ambiguous record taken
    with the damage: such a record found by a search in zeros may be a few zero bytes
    and the start of a real header (a timestamp of 1 is plausible), so the real record
    may start inside it."""
    if problem.startswith("checksum mismatch"):
        fid, ref, size, csum, ts = RECORD_HEADER.unpack(read_padded(fd, pos, RECORD_HEADER_SIZE))
        after = pos + RECORD_HEADER_SIZE + size
        if after == end:
            return None  # the last record: nothing after it to keep
        if record_at(fd, after, end):
            return after
    return find_record(fd, search, end)


def record_at(fd: int, pos: int, end: int, hops: int = 0) -> bool:
    """Whether a whole valid record starts at pos and ends by end; with hops, the search's
    cheap test first: that many records after it (or all up to end) have sound headers."""
    if end - pos < RECORD_HEADER_SIZE:
        return False
    fid, ref, size, csum, ts = RECORD_HEADER.unpack(read_padded(fd, pos, RECORD_HEADER_SIZE))
    if header_problem(fid, ref, size, csum, ts, end - pos - RECORD_HEADER_SIZE):
        return False
    after = pos + RECORD_HEADER_SIZE + size
    while hops and after < end:
        nxt = RECORD_HEADER.unpack(read_padded(fd, after, RECORD_HEADER_SIZE))
        if end - after < RECORD_HEADER_SIZE or header_problem(
                *nxt, end - after - RECORD_HEADER_SIZE):
            return False
        after += RECORD_HEADER_SIZE + nxt[2]
        hops -= 1
    return checksum_range(fd, pos + RECORD_HEADER_SIZE, size) == csum


def find_record(fd: int, start: int, end: int) -> int | None:
    """The first offset in [start, end) where a whole valid record starts, or None.

    A valid header's timestamp field has 4 zero bytes (its high half) before a non-zero
    low half: it ends a run of at least 4 zero bytes 4 to 7 bytes before a non-zero byte.
    The regex engine finds the runs of zeros, so random data and long zero stretches both
    go at C speed; the places that fit have their ref, checksum and size looked at in the
    window, and only those that pass are checked as records (record_at()). A record of
    more than WINDOW bytes is checksummed only when a sound header follows it, and once
    CHECK_BUDGET is spent on places that were no record (data full of header-like places,
    such as arrays of small integers) only a place with CHAIN_HOPS sound headers after it
    is, so the search stays about linear: a record that is followed by damage that soon
    can then be missed (and is skipped with it).
    """
    w0 = start
    last = start - 1  # the highest offset checked already
    spent = 0  # bytes checksummed for places that were no record
    while w0 + RECORD_HEADER_SIZE <= end:
        n = min(WINDOW, end - w0)
        buf = read_padded(fd, w0, n)
        final = w0 + n >= end
        for m in ZERO_RUN.finditer(buf):
            s, e = m.span()
            if e == n and not final:
                break  # the run may go on: the next window sees where it ends
            for t in range(max(s, e - 7), e - 3):
                at = w0 + t - TS_AT
                if at <= last or at < start:
                    continue
                last = at
                if t >= TS_AT and t + 8 <= n:  # the header is in the window: a first look
                    _fid, ref, size, csum, _ts = RECORD_HEADER.unpack_from(buf, t - TS_AT)
                    if ref > 1 or csum > MAX_CHECKSUM or size > end - at - RECORD_HEADER_SIZE:
                        continue
                size = RECORD_HEADER.unpack(read_padded(fd, at, RECORD_HEADER_SIZE))[2]
                if spent > CHECK_BUDGET + 4 * (w0 - start):
                    hops = CHAIN_HOPS  # data full of header-like places: a long chain first
                else:
                    hops = 1 if size > WINDOW else 0
                if record_at(fd, at, end, hops):
                    return at
                spent += size
        if final:
            return None
        w0 += n - OVERLAP
    return None


def zeros_from(fd: int, offset: int, end: int) -> bool:
    """Whether the bytes from offset up to end (at most WINDOW of them) are all zeros."""
    n = min(WINDOW, end - offset)
    return n <= 0 or not read_padded(fd, offset, n).strip(b"\0")
