"""Damage at many offsets of a chunk, with and without the index snapshot (issue 11).

A real store writes records of several sizes (an empty one and an all-zero one among
them) into one chunk; each case copies that data dir, damages it (every byte of a header,
data bytes, the first/middle/last record, several records, a range across a record
boundary) and opens the store again. Then: every record the damage did not touch reads
back byte for byte (CHUNKFILE.md: the scan resynchronizes after damage, it no longer cuts
the rest of the chunk); a damaged one answers ReadFailed or NotFound, never other bytes;
a new write lands past every live record, and all of it survives a full scan again.
"""
from __future__ import annotations

import os
import shutil

import pytest

from speedy.chunkserver.reader import NotFound, ReadFailed
from speedy.format.chunkfile import RECORD_HEADER, RECORD_HEADER_SIZE, length_ambiguous
from tests.support.store import (MiB, Harness, patch, payload, read_superblock,
                                 remove_snapshot)

SIZES = [300, 0, 5000, 1, 700, 2048, 100, 4000, 64, 900, 6000]
ZERO_FID = 7  # its body is all zeros: its checksum does not vouch for its size either
FIDS = list(range(1, len(SIZES) + 1))
CHUNK = "chunk_1_1.chunk"
NEW_FID = 1000


def body_of(fid: int) -> bytes:
    size = SIZES[fid - 1]
    return bytes(size) if fid == ZERO_FID else payload(fid, size)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    """A data dir holding FIDS in one chunk, stopped cleanly (its snapshot saved); and
    each fid's (offset, size)."""
    d = tmp_path_factory.mktemp("pristine")
    h = Harness(d, chunks=1, chunk_size=MiB)
    try:
        h.open()
        for fid in FIDS:
            h.put(fid, body_of(fid))
        where = {fid: h.ireader.get(fid)[1] for fid in FIDS}
    finally:
        h.shut()
    return str(d), {fid: (where[fid], SIZES[fid - 1]) for fid in FIDS}


def span(where, fid: int) -> tuple[int, int]:
    off, size = where[fid]
    return off, off + RECORD_HEADER_SIZE + size


def flip(path: str, at: int) -> None:
    """Invert the byte at offset at."""
    with open(path, "rb") as f:
        f.seek(at)
        patch(path, at, bytes([f.read(1)[0] ^ 0xFF]))


def zero(path: str, start: int, end: int) -> None:
    patch(path, start, bytes(end - start))


def run_case(tmp_path, pristine, hurt: list[tuple[int, int]], how: str, snapshot: bool) -> dict:
    """Copy, damage the ranges (flip every byte, or zero them), open, check; counts."""
    src, where = pristine
    d = tmp_path / "case"
    if d.exists():
        shutil.rmtree(d)
    shutil.copytree(src, d)
    path = str(d / CHUNK)
    for start, end in hurt:
        if how == "zero":
            zero(path, start, end)
        else:
            for at in range(start, end):
                flip(path, at)
    if not snapshot:
        remove_snapshot(d)
    counts = {"intact": 0, "damaged": 0, "refused": 0}
    h = Harness(d, chunks=1, chunk_size=MiB)
    try:
        h.open()
        check_reads(h, where, hurt, counts)
        ends = max((span(where, f)[1] for f in FIDS if readable(h, f)), default=0)
        h.put(NEW_FID, b"written after the damage")
        assert h.ireader.get(NEW_FID)[1] >= ends, "a new write landed over a live record"
        h.reopen(snapshot=False)  # and all of it holds after a full scan too
        check_reads(h, where, hurt, {"intact": 0, "damaged": 0, "refused": 0})
        assert h.reader.read(NEW_FID) == b"written after the damage"
    finally:
        h.shut()
    return counts


def readable(h: Harness, fid: int) -> bool:
    try:
        h.reader.read(fid)
        return True
    except (NotFound, ReadFailed):
        return False


def touched(where, fid: int, hurt) -> bool:
    a, b = span(where, fid)
    return any(s < b and a < e for s, e in hurt)


def check_reads(h: Harness, where, hurt, counts: dict) -> None:
    """Intact records read back exactly; damaged ones are refused or read exactly."""
    for i, fid in enumerate(FIDS):
        exempt = touched(where, fid, hurt)
        if not exempt and i + 1 < len(FIDS) and touched(where, FIDS[i + 1], hurt):
            # a record whose checksum does not vouch for its size goes with damage right
            # after it (an empty file cannot be told from a zeroed size field otherwise)
            with open(os.path.join(h.data_dir, CHUNK), "rb") as f:
                f.seek(where[fid][0])
                exempt = length_ambiguous(RECORD_HEADER.unpack(f.read(RECORD_HEADER_SIZE))[3])
        try:
            got = h.reader.read(fid)
        except (NotFound, ReadFailed):
            assert exempt, f"intact fid {fid} lost (damage {hurt})"
            counts["refused"] += 1
            continue
        assert got == body_of(fid), f"fid {fid}: WRONG BYTES (damage {hurt})"
        counts["damaged" if exempt else "intact"] += 1


def header_cases(where, fid: int) -> list[list[tuple[int, int]]]:
    off = where[fid][0]
    return [[(off + i, off + i + 1)] for i in range(RECORD_HEADER_SIZE)]


@pytest.mark.parametrize("snapshot", [True, False], ids=["snapshot", "scan"])
@pytest.mark.parametrize("fid", [1, 6, 2, ZERO_FID, FIDS[-1]],
                         ids=["first", "middle", "empty", "all-zero", "last"])
def test_every_header_byte(tmp_path, pristine, fid, snapshot):
    """Each of the 30 header bytes flipped in turn, then zeroed (ts, size+checksum...)."""
    _src, where = pristine
    totals = {"intact": 0, "damaged": 0, "refused": 0}
    cases = header_cases(where, fid)
    off = where[fid][0]
    zeros = [[(off + a, off + b)] for a, b in ((10, 30), (10, 22), (22, 30), (0, 30), (8, 10))]
    for hurt in cases:
        for k, v in run_case(tmp_path, pristine, hurt, "flip", snapshot).items():
            totals[k] += v
    for hurt in zeros:
        for k, v in run_case(tmp_path, pristine, hurt, "zero", snapshot).items():
            totals[k] += v
    print(f"fid {fid} header damage, {len(cases) + len(zeros)} cases: {totals}")
    assert totals["intact"] >= (len(cases) + len(zeros)) * (len(FIDS) - 2)


@pytest.mark.parametrize("snapshot", [True, False], ids=["snapshot", "scan"])
def test_data_bytes_and_many_records(tmp_path, pristine, snapshot):
    """Data bytes (first, middle, last) of the first/middle/last record, two and three
    damaged records, and ranges across a record boundary, flipped or zeroed."""
    _src, where = pristine

    def data(fid: int, at: str) -> tuple[int, int]:
        a, b = span(where, fid)
        a += RECORD_HEADER_SIZE
        pos = {"first": a, "middle": (a + b) // 2, "last": b - 1}[at]
        return pos, pos + 1

    cases = [[data(fid, at)] for fid in (1, 6, FIDS[-1]) for at in ("first", "middle", "last")]
    cases += [[data(3, "middle"), data(8, "middle")],
              [data(1, "last"), (where[5][0] + 12, where[5][0] + 13), data(11, "first")],
              [(span(where, 3)[1] - 10, span(where, 3)[1] + 10)],  # end of 3, header of 4
              [(span(where, 5)[1] - 3, span(where, 6)[0] + 40)],
              [(where[3][0] + 100, span(where, 9)[0] + 5)]]  # most of the chunk
    totals = {"intact": 0, "damaged": 0, "refused": 0}
    for hurt in cases:
        for how in ("flip", "zero"):
            for k, v in run_case(tmp_path, pristine, hurt, how, snapshot).items():
                totals[k] += v
    print(f"data/many-record damage, {2 * len(cases)} cases: {totals}")
    assert totals["refused"] > 0 and totals["intact"] > 0


def test_skipped_damage_is_garbage_and_logged(tmp_path, pristine, caplog):
    """The scan logs the skipped range, counts it in garbage_bytes, keeps current_offset."""
    src, where = pristine
    shutil.copytree(src, tmp_path / "d")
    path = str(tmp_path / "d" / CHUNK)
    before = read_superblock(path).current_offset
    a, b = span(where, 6)
    flip(path, a + 40)
    remove_snapshot(tmp_path / "d")
    h = Harness(tmp_path / "d", chunks=1, chunk_size=MiB)
    try:
        with caplog.at_level("WARNING"):
            h.open()
        assert f"damaged bytes {a}-{b} skipped" in caplog.text
        assert h.store.chunks[1].garbage_bytes == b - a
        assert read_superblock(path).current_offset == before
        assert all(h.reader.read(f) == body_of(f) for f in FIDS if f != 6)
        assert h.store.delete(8)
        assert h.store.chunks[1].garbage_bytes == b - a + RECORD_HEADER_SIZE + SIZES[7]
        h.reopen()  # the snapshot keeps the count
        assert h.store.open_mode == "snapshot"
        assert h.store.chunks[1].garbage_bytes == b - a + RECORD_HEADER_SIZE + SIZES[7]
    finally:
        h.shut()


@pytest.mark.parametrize("snapshot", [True, False], ids=["snapshot", "scan"])
@pytest.mark.parametrize("where_", ["middle", "last"])
def test_all_zero_file_with_a_smaller_size_is_not_served_short(tmp_path, snapshot, where_):
    """adler32 (from 0) of 4096 zeros is 0, as of 2048 or of none: a size field that lost
    a bit must not serve 2048 or 0 zeros (the bytes after the record show the damage)."""
    h = Harness(tmp_path, chunks=1, chunk_size=MiB)
    try:
        h.open()
        h.put(1, payload(1, 500))
        h.put(2, bytes(4096))
        if where_ == "middle":
            h.put(3, payload(3, 6000))
        off = h.ireader.get(2)[1]
        h.shut()
        path = str(tmp_path / CHUNK)
        for size in (2048, 0):
            with open(path, "r+b") as f:
                f.seek(off + 10)
                f.write(size.to_bytes(4, "big"))
            if not snapshot:
                remove_snapshot(tmp_path)
            h.open()
            with pytest.raises((ReadFailed, NotFound)):
                got = h.reader.read(2)
                print(f"served {len(got)} bytes")  # (what the old reader did)
            assert h.reader.read(1) == payload(1, 500)
            if where_ == "middle":
                assert h.reader.read(3) == payload(3, 6000)
            h.shut()
            with open(path, "r+b") as f:  # back to the written size for the next round
                f.seek(off + 10)
                f.write((4096).to_bytes(4, "big"))
    finally:
        h.shut()


def test_garbage_bytes_agree_on_every_start_path(tmp_path, pristine):
    """garbage_bytes after a snapshot + journal start and an incremental start (records
    appended and deleted since) is what a full scan counts."""
    src, where = pristine
    shutil.copytree(src, tmp_path / "d")
    h = Harness(tmp_path / "d", chunks=1, chunk_size=MiB)
    try:
        h.open()
        assert h.store.chunks[1].garbage_bytes == 0
        assert h.store.delete(3) and h.store.delete(9)
        want = 2 * RECORD_HEADER_SIZE + SIZES[2] + SIZES[8]
        h.crash()  # the deletes are in the journal only
        h.open()
        assert h.store.open_mode == "snapshot"
        assert h.store.chunks[1].garbage_bytes == want
        h.shut()  # a clean stop: a new snapshot
        h.open()
        h.put(NEW_FID, b"x" * 123)
        h.put(NEW_FID + 1, b"y" * 45)
        assert h.store.delete(NEW_FID)
        want += RECORD_HEADER_SIZE + 123
        h.crash()
        h.open()
        assert h.store.open_mode == "incremental"
        assert h.store.chunks[1].garbage_bytes == want
        h.reopen(snapshot=False)
        assert h.store.open_mode == "scan" and h.store.chunks[1].garbage_bytes == want
    finally:
        h.shut()
