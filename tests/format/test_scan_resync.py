"""The scan's resynchronization search (speedy/format/scan.py): the first whole valid record
after damage, across read windows, in random data, zeros and header-like data."""
from __future__ import annotations

import os
import random
import struct
import time
import zlib

import pytest

from speedy.format.chunkfile import encode_record_header
from speedy.format.scan import WINDOW, ScanEnd, find_record, record_at, scan_records


def rec(fid: int, data: bytes, ts: int = 1_700_000_000) -> bytes:
    return encode_record_header(fid, len(data), zlib.adler32(data, 0), ts) + data


def memfd(content: bytes) -> int:
    fd = os.memfd_create("resync")
    os.write(fd, content)
    return fd


def junk_of(kind: str, n: int, rng: random.Random) -> bytes:
    if kind == "random":
        return rng.randbytes(n)
    if kind == "zeros":
        return bytes(n)
    if kind == "u64":  # small big-endian integers: a header-like place every 8 bytes
        return b"".join(struct.pack(">Q", rng.randrange(1 << 20)) for _ in range(n // 8 + 1))[:n]
    return bytes(rng.choice((0, 0, 0, rng.randrange(256))) for _ in range(n))  # sparse


@pytest.mark.parametrize("kind", ["random", "zeros", "u64", "sparse"])
def test_finds_the_first_record_across_window_edges(kind):
    rng = random.Random(kind)
    target = rec(77, b"the record after the damage" * 3)
    edges = {"random": range(-70, 40, 7), "zeros": range(-70, 40, 7), "u64": (-23, 7)}.get(
        kind, (-64, -30, -23, -1, 0, 7))
    whole = junk_of(kind, WINDOW + 64, rng)
    for length in [1, 29, 30, 1000] + [WINDOW + d for d in edges]:
        junk = whole[:length]
        tail = rec(78, b"x" * 100)
        fd = memfd(junk + target + tail)
        try:
            end = len(junk) + len(target) + len(tail)
            got = find_record(fd, 0, end)
            assert got is not None and got <= length, (kind, length, got)
            assert record_at(fd, got, end)  # (the junk may hold a record: zeros and a
            out = ScanEnd()  # few bytes of the next header can look like an empty one)
            offsets = [off for off, *_ in scan_records(fd, 0, end, out)]
            assert offsets[-2:] == [length, length + len(target)], (kind, length, offsets)
            assert find_record(fd, length, end) == length
            assert find_record(fd, length + 1, end) == length + len(target)
            assert find_record(fd, length + len(target) + 1, end) is None
        finally:
            os.close(fd)


def test_scan_goes_on_after_a_zeroed_range_before_a_record():
    """Zeros right before a header make fake empty records (timestamps of a few low
    bytes of the real fid) overlapping it; the scan still lands on the real record."""
    recs = [rec(0x5EED_0000_0000_0001 + i, bytes([i + 1]) * (50 + i)) for i in range(6)]
    content = bytearray(b"".join(recs))
    a = len(recs[0])
    b = a + len(recs[1]) + len(recs[2])
    content[a:b] = bytes(b - a)  # records 1 and 2 zeroed
    fd = memfd(bytes(content))
    try:
        out = ScanEnd()
        got = [off for off, *_ in scan_records(fd, 0, len(content), out)]
        assert got == [0] + [sum(map(len, recs[:i])) for i in range(3, 6)]
        assert [(s.start, s.end) for s in out.skipped] == [(a, b)] and out.reason == ""
    finally:
        os.close(fd)


def test_search_speed():
    """Figures, not a target: the search in 32 MiB of random data and zeros, 1 MiB of an
    array of small u64s (a header-like place every 8 bytes: the slow case)."""
    rng = random.Random(1)
    for kind in ("random", "zeros", "u64"):
        junk = junk_of(kind, 1 << (20 if kind == "u64" else 25), rng)
        fd = memfd(junk)
        try:
            t0 = time.perf_counter()
            assert find_record(fd, 0, len(junk)) is None
            took = time.perf_counter() - t0
        finally:
            os.close(fd)
        print(f"resync search, {kind}: {len(junk) / took / 1e6:.0f} MB/s")
