"""Fuzz of the chunk scanner and start-up recovery (hypothesis) on real chunk files.

A store writes, deletes and rewrites files into two 1 MiB chunks; each example copies that
data dir, damages it (byte flips, zeroed ranges, truncation, garbage or a stale valid record
after current_offset, record headers with huge sizes, superblocks with a valid checksum and
wild fields, bytes past the end) and opens the store again. It may refuse with StartError,
nothing else; without the snapshot (a full scan) it indexes only records that verify and
end before current_offset, and every record before current_offset that the damage did not
touch stays indexed (the scan resynchronizes after damage, CHUNKFILE.md); every fid it
serves is bytes once written under that fid (or a READ error, when a snapshot vouched for
a record damaged since; never an empty or shortened body); it stays writable and a new
write never lands over a record that was live.

The default run is short; a measured run:
    SPEEDY_FUZZ_EXAMPLES=50000 python -m pytest -m slow -s -p no:logging tests/test_fuzz_scanner.py
"""
from __future__ import annotations

import os
import random
import shutil
import tempfile
import struct
import time
import zlib
from dataclasses import dataclass, field
from typing import Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from speedy.format.chunkfile import (MAGIC, RECORD_HEADER, RECORD_HEADER_SIZE, SUPERBLOCK_BODY,
                                     SUPERBLOCK_SIZE, checksum, encode_record_header,
                                     length_ambiguous)
from speedy.chunkserver.reader import NotFound, ReadFailed
from speedy.format.scan import ScanEnd, scan_records
from speedy.chunkserver.store.chunkstore import StartError
from tests.support.store import (MiB, Harness, patch, payload, read_superblock, record, remove_snapshot,
                       write_chunk)

CI_EXAMPLES = 500
LONG_EXAMPLES = int(os.environ.get("SPEEDY_FUZZ_EXAMPLES", "3000"))
CHUNKS = ("chunk_1_1.chunk", "chunk_1_2.chunk")
STALE_FID = 0xDEAD_BEEF_0000_0001
AFTER_FID, AFTER = 0x5EED_0000_0000_AF7E, b"after the damage"  # far from any damaged fid
SNAPSHOT = os.path.join(".speedy", "index.snap")
TMPFS = "/dev/shm"


@dataclass
class Pristine:
    """The undamaged data dir and what was written into it."""

    data_dir: str
    versions: dict[int, set[bytes]] = field(default_factory=dict)  # every write, by fid
    files: dict[str, bytes] = field(default_factory=dict)  # chunk files and the snapshot
    boundaries: dict[str, list[int]] = field(default_factory=dict)  # record offsets per chunk
    current: dict[str, int] = field(default_factory=dict)  # current_offset per chunk
    records: dict[str, list[tuple]] = field(default_factory=dict)  # (off, fid, ref, size, ts)

    def every_version(self) -> set[bytes]:
        return set().union(*self.versions.values())


@pytest.fixture(scope="module")
def pristine(tmp_path_factory) -> Iterator[Pristine]:
    """On tmpfs when there is one: the store fsyncs a lot, and thousands of opens follow."""
    if os.path.isdir(TMPFS):
        d = tempfile.mkdtemp(prefix="fuzzscan", dir=TMPFS)
        try:
            yield make_pristine(d)
        finally:
            shutil.rmtree(d, ignore_errors=True)
    else:
        yield make_pristine(str(tmp_path_factory.mktemp("pristine")))


def make_pristine(d: str) -> Pristine:
    """Write, delete and rewrite files through a real store into data dir d."""
    rng = random.Random(5)
    out = Pristine(str(d))
    h = Harness(d, chunks=2, chunk_size=MiB)
    try:
        h.open()
        fids = [rng.getrandbits(64) for _ in range(60)]
        for i, fid in enumerate(fids):
            big = 240_000 if i % 10 == 5 else 0  # six of these: the rest goes to chunk 2
            data = payload(fid, big or rng.choice([0, 1, 7, 100, 1000, 3000, 20_000]))
            h.put(fid, data)
            out.versions.setdefault(fid, set()).add(data)
            if i % 7 == 3:  # delete, and sometimes write again (a dead record stays behind)
                assert h.store.delete(fid)
                if i % 2:
                    again = payload(fid + 1, 500)
                    h.put(fid, again)
                    out.versions[fid].add(again)
        for _ in range(50):  # chunk 1 is nearly full now: many of these land in chunk 2
            fid = rng.getrandbits(64)
            data = payload(fid, rng.choice([0, 5000, 8000]))
            h.put(fid, data)
            out.versions[fid] = {data}
    finally:
        h.shut()
    for name in CHUNKS + (SNAPSHOT,):
        with open(os.path.join(d, name), "rb") as f:
            out.files[name] = f.read()
    out.versions[AFTER_FID] = {AFTER}
    for name in CHUNKS:
        path = os.path.join(d, name)
        out.current[name] = read_superblock(path).current_offset
        out.records[name] = walk(path, out.current[name])
        out.boundaries[name] = [off for off, *_ in out.records[name]]
    assert sum(len(b) for b in out.boundaries.values()) > 60
    assert all(len(out.boundaries[name]) > 5 for name in CHUNKS)
    return out


def walk(path: str, end: int) -> list[tuple[int, int, int, int, int]]:
    """Every record scan_records finds in [55, end) of a file."""
    fd = os.open(path, os.O_RDONLY)
    try:
        return list(scan_records(fd, SUPERBLOCK_SIZE, end, ScanEnd()))
    finally:
        os.close(fd)


# ---------------------------------------------------------------- damage
@dataclass
class Damage:
    """What was done to one chunk file, for the oracle."""

    steps: list[str] = field(default_factory=list)
    superblock_touched: bool = False
    sb_hurt: set[str] = field(default_factory=set)  # chunks whose superblock was touched
    hurt: dict[str, list[tuple[int, int]]] = field(default_factory=dict)  # damaged ranges
    stale: bool = False
    stale_data: set[bytes] = field(default_factory=set)  # bodies of the stale records put in


@st.composite
def damage_plans(draw) -> list[tuple]:
    """A list of (kind, chunk name, numbers...) to apply to the copy."""
    kinds = st.sampled_from(["flip", "flip", "flip", "zero", "truncate", "garbage_after",
                             "huge_header", "stale_record", "superblock", "append"])
    plan = []
    for _ in range(draw(st.integers(1, 4))):
        plan.append((draw(kinds), draw(st.sampled_from(CHUNKS)), draw(st.integers(0, 2**32)),
                     draw(st.integers(0, 2**32 - 1)), draw(st.binary(min_size=1, max_size=64))))
    return plan


def apply_damage(p: Pristine, data_dir: str, plan: list[tuple]) -> Damage:
    dmg = Damage()
    for kind, name, a, b, blob in plan:
        path = os.path.join(data_dir, name)
        size = os.path.getsize(path)
        cur = p.current[name]
        bounds = p.boundaries[name] + [cur]
        used = cur + 64
        hurt = dmg.hurt.setdefault(name, [])
        if kind == "flip":
            at = a % used if a % 4 else a % max(size, 1)
            if at < size:
                hurt.append((at, at + 1))
                with open(path, "r+b") as f:
                    f.seek(at)
                    old = f.read(1)[0]
                    f.seek(at)
                    f.write(bytes([old ^ (b % 255 + 1)]))
                dmg.superblock_touched |= at < SUPERBLOCK_SIZE
        elif kind == "zero":
            at, n = a % used, b % 300 + 1
            patch(path, at, bytes(n))
            hurt.append((at, at + n))
            dmg.superblock_touched |= at < SUPERBLOCK_SIZE
        elif kind == "truncate":
            cut = a % (used + 1) if a % 3 else a % (size + 1)
            os.truncate(path, min(cut, os.path.getsize(path)))
            hurt.append((min(cut, size), 1 << 40))
            dmg.superblock_touched |= cut < SUPERBLOCK_SIZE
        elif kind == "garbage_after":
            patch(path, cur, blob * (b % 8 + 1))
        elif kind == "huge_header":
            at = bounds[a % len(bounds)]
            huge = [0xFFFFFFFF, MiB, MiB - at - RECORD_HEADER_SIZE + 1, b][a % 4]
            patch(path, at, encode_record_header(b * 7919, huge, b, 1700000000 + a, 1))
            hurt.append((at, at + RECORD_HEADER_SIZE))
        elif kind == "stale_record":
            patch(path, cur, record(STALE_FID, blob, ts=2_000_000_000))
            dmg.stale = True
            dmg.stale_data.add(blob)
        elif kind == "superblock":
            cid = int(name.split("_")[2].split(".")[0])
            fields = [a, b, a ^ b, a * 7, 2**64 - 1 - b, cur, cur + 30]
            body = SUPERBLOCK_BODY.pack(MAGIC, cid if a % 5 else b, b & 0xFFFFFFFF,
                                        a & 0xFFFFFFFF, fields[a % 7] % 2**64,
                                        fields[b % 7] % 2**64)
            patch(path, 0, body + struct.pack(">Q", checksum(body)))
            dmg.superblock_touched = True
            hurt.append((0, SUPERBLOCK_SIZE))
        elif kind == "append":
            with open(path, "ab") as f:
                f.write(blob * (a % 100 + 1))
        dmg.steps.append(kind)
        if any(start < SUPERBLOCK_SIZE for start, _ in hurt):
            dmg.sb_hurt.add(name)
    return dmg


# ---------------------------------------------------------------- the oracle
def check_open_store(p: Pristine, h: Harness, dmg: Damage, scanned: bool) -> None:
    """Indexed records verify (after a scan); served bytes were written under that fid."""
    every = p.every_version() | dmg.stale_data
    sbs = {}
    for name in CHUNKS:
        path = os.path.join(h.data_dir, name)
        sbs[int(name.split("_")[2].split(".")[0])] = (path, read_superblock(path))
    # the index is sized by what the files hold, not by what a superblock claims
    assert h.index.nbytes() < 16 * MiB, (h.index.capacity, dmg.steps)
    entries = list(h.index.items())
    for fid, cid, off in entries:
        if scanned:
            path, sb = sbs[cid]
            with open(path, "rb") as f:
                f.seek(off)
                head = f.read(RECORD_HEADER_SIZE)
                hfid, ref, size, csum, ts = RECORD_HEADER.unpack(head)
                data = f.read(size)
            assert (hfid, ref) == (fid, 1), (fid, hfid, ref, dmg.steps)
            assert off + RECORD_HEADER_SIZE + size <= sb.current_offset, dmg.steps
            assert len(data) == size and zlib.adler32(data, 0) == csum, dmg.steps
        try:
            got = h.reader.read(fid)
        except ReadFailed:
            assert not scanned, f"fid {fid} indexed by a scan but unreadable: {dmg.steps}"
            continue
        except NotFound:
            assert not scanned, dmg.steps
            continue
        if fid in p.versions:
            assert got in p.versions[fid], (fid, dmg.steps)
        elif fid == STALE_FID:
            assert dmg.stale and dmg.superblock_touched, dmg.steps
        else:  # a damaged fid field: undetectable (no header checksum), the bytes are real
            assert got in every, (fid, dmg.steps)
    if scanned:
        check_intact_kept(p, h, dmg)


def check_intact_kept(p: Pristine, h: Harness, dmg: Damage) -> None:
    """After a full scan, every live record the damage did not touch is still indexed
    where it was (in a chunk whose superblock was left alone): damage is skipped, not cut.
    A record whose checksum does not vouch for its size (an empty one) may go with damage
    to the record right after it."""
    indexed = {(cid, off) for _fid, cid, off in h.index.items()}

    def touched(name: str, rec: tuple) -> bool:
        off, _fid, _ref, size, _ts = rec
        end = off + RECORD_HEADER_SIZE + size
        return any(a < end and off < b for a, b in dmg.hurt.get(name, []))

    for name in CHUNKS:
        if name in dmg.sb_hurt:
            continue
        cid = int(name.split("_")[2].split(".")[0])
        recs = p.records[name]
        for i, rec in enumerate(recs):
            off, fid, ref, _size, _ts = rec
            if not ref or touched(name, rec):
                continue
            csum = RECORD_HEADER.unpack_from(p.files[name], off)[3]
            if length_ambiguous(csum) and i + 1 < len(recs) and touched(name, recs[i + 1]):
                continue
            assert (cid, off) in indexed, (f"intact fid {fid} at {name} {off} lost", dmg.steps)


def live_ends(h: Harness) -> dict[int, int]:
    """{chunk_id: where its last indexed record ends}."""
    ends: dict[int, int] = {}
    for fid, cid, _off in h.index.items():
        try:
            rec = h.reader.fetch(fid, 0)
        except (ReadFailed, NotFound):  # damaged since the snapshot: never served
            continue
        ends[cid] = max(ends.get(cid, 0), rec.offset + RECORD_HEADER_SIZE + rec.size)
    return ends


def check_after_write(h: Harness, before: dict[int, int]) -> None:
    """The write after the damage lands past every record the scan kept in its chunk."""
    cid, off = h.index.get(AFTER_FID)
    assert off >= before.get(cid, SUPERBLOCK_SIZE), (cid, off, before)


def restore(p: Pristine, keep_snapshot: bool) -> None:
    """Put the undamaged bytes back in place (same inodes: the snapshot still matches them)."""
    for name, content in p.files.items():
        path = os.path.join(p.data_dir, name)
        if name == SNAPSHOT:
            if keep_snapshot:
                with open(path, "wb") as f:
                    f.write(content)
            else:
                remove_snapshot(p.data_dir)
            continue
        fd = os.open(path, os.O_WRONLY)
        try:
            os.pwrite(fd, content, 0)
            os.ftruncate(fd, len(content))
        finally:
            os.close(fd)


def open_damaged(p: Pristine, plan: list[tuple], keep_snapshot: bool) -> str:
    """Restore, damage, open, check, write, reopen; how it opened (for the tally)."""
    restore(p, keep_snapshot)
    dmg = apply_damage(p, p.data_dir, plan)
    h = Harness(p.data_dir, chunks=2, chunk_size=MiB)
    try:
        try:
            h.open()
        except StartError:
            return "refused"
        scanned = h.store.open_mode == "scan"
        check_open_store(p, h, dmg, scanned)
        before = sorted(fid for fid, _, _ in h.index.items() if fid != AFTER_FID)
        ends = live_ends(h)
        h.put(AFTER_FID, AFTER)
        assert h.reader.read(AFTER_FID) == AFTER
        check_after_write(h, ends)
        if scanned:
            h.reopen(snapshot=False)
            after = sorted(fid for fid, _, _ in h.index.items())
            assert after == sorted(before + [AFTER_FID]), dmg.steps
            check_open_store(p, h, dmg, True)
        return h.store.open_mode
    finally:
        h.shut()


def fuzz_store(p: Pristine, examples: int) -> None:
    tally: dict[str, int] = {}
    t0 = time.monotonic()

    @settings(max_examples=examples, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow])
    @given(damage_plans(), st.booleans())
    def one(plan, keep_snapshot):
        mode = open_damaged(p, plan, keep_snapshot)
        tally[mode] = tally.get(mode, 0) + 1

    one()
    took = time.monotonic() - t0
    print(f"\nscanner fuzz: {sum(tally.values())} executions {tally}, 0 crashes, "
          f"{took:.1f}s ({sum(tally.values()) / took:.0f}/s)")
    assert tally.get("scan", 0) > 0


def test_damaged_chunks_recover_safely(pristine):
    fuzz_store(pristine, CI_EXAMPLES)


@pytest.mark.slow
@pytest.mark.timeout(1200)
def test_damaged_chunks_recover_safely_long(pristine):
    fuzz_store(pristine, LONG_EXAMPLES)


# ---------------------------------------------------------------- scan_records alone
def scan_bytes(content: bytes, start: int, end: int, planted: list[int] = ()) -> None:
    """scan_records over arbitrary bytes: every record it yields verifies, never raises;
    the gaps between the records are exactly the skipped ranges; a record whose checksum
    does not vouch for its size is followed by a record, end, or a torn tail of zeros;
    every planted valid record is found unless a found record overlaps it (or it is such
    a record with damage right after it)."""
    fd = os.memfd_create("fuzzscan")
    try:
        os.write(fd, content)
        out = ScanEnd()
        found = []
        for off, fid, ref, size, ts in scan_records(fd, start, end, out):
            assert ref in (0, 1) and 0 < ts < 2**32
            head = content[off:off + RECORD_HEADER_SIZE].ljust(RECORD_HEADER_SIZE, b"\0")
            data = content[off + RECORD_HEADER_SIZE:off + RECORD_HEADER_SIZE + size]
            data = data.ljust(size, b"\0")  # past the file end the scanner reads zeros
            assert RECORD_HEADER.unpack(head) == (fid, ref, size, zlib.adler32(data, 0), ts)
            found.append((off, off + RECORD_HEADER_SIZE + size,
                          length_ambiguous(RECORD_HEADER.unpack(head)[3])))
        pos = start
        skips = list(out.skipped)
        for off, stop, _amb in found:
            if off != pos:
                skip = skips.pop(0)
                assert (skip.start, skip.end) == (pos, off), (skip, pos, off)
            pos = stop
            assert pos <= end
        assert not skips, skips
        assert out.offset == pos and start <= out.offset <= max(start, end)
        assert (out.reason == "") == (pos >= end)
        starts = {off for off, _, _ in found}
        for off, stop, amb in found:  # followed by a record (found, or one that verified
            if amb:  # but went with damage after it: a skip or the cut), or end
                assert stop in starts or stop in (end, out.offset) \
                    or stop in {s.start for s in out.skipped}, (off, stop)
        for at in planted:
            if at < start or at + RECORD_HEADER_SIZE > end or at in starts:
                continue
            size = RECORD_HEADER.unpack_from(content, at)[2]
            stop = at + RECORD_HEADER_SIZE + size
            if stop > end or any(o < stop and at < s for o, s, _ in found):
                continue
            if length_ambiguous(RECORD_HEADER.unpack_from(content, at)[3]) and stop not in planted:
                continue
            raise AssertionError(f"planted record at {at} lost: {found} {out}")
    finally:
        os.close(fd)


def plant(pieces: list[tuple[bytes, bool]]) -> tuple[bytes, list[int]]:
    """The pieces one after the other, and the offsets of those that are valid records."""
    content, planted = b"", []
    for piece, valid in pieces:
        if valid:
            planted.append(len(content))
        content += piece
    return content, planted


def record_piece(fid: int, data: bytes, ts: int, ref: int) -> tuple[bytes, bool]:
    """A record, and whether it is a valid one (plausible ref and timestamp)."""
    return record(fid, data, ts=ts, ref=ref), ref <= 1 and 0 < ts < 2**32


records = st.builds(record_piece, st.integers(0, 2**64 - 1), st.binary(max_size=100),
                    st.one_of(st.integers(1, 2**32 - 1), st.integers(1, 2**64 - 1)),
                    st.sampled_from([0, 1, 1, 2]))
junk = st.one_of(st.binary(max_size=40), st.integers(1, 40).map(bytes)).map(lambda b: (b, False))
contents = st.one_of(
    st.binary(max_size=400).map(lambda b: (b, [])),
    st.lists(st.one_of(records, records, junk), max_size=8).map(plant))


@settings(max_examples=500, deadline=None)
@given(contents, st.integers(0, 100), st.integers(0, 1000))
def test_scan_records_on_arbitrary_bytes(content, start, extra):
    content, planted = content
    scan_bytes(content, min(start, len(content)), len(content) + extra % 3 * (extra % 50),
               planted)


@pytest.mark.slow
@pytest.mark.timeout(1200)
@settings(max_examples=LONG_EXAMPLES * 2, deadline=None, database=None)
@given(contents, st.integers(0, 100), st.integers(0, 1000))
def test_scan_records_on_arbitrary_bytes_long(content, start, extra):
    content, planted = content
    scan_bytes(content, min(start, len(content)), len(content) + extra % 3 * (extra % 50),
               planted)


# ---------------------------------------------------------------- what the fuzz found
@pytest.mark.parametrize("snapshot", [False, True])
@pytest.mark.parametrize("fields", [(10, 20), (10, 12)])  # size+checksum+timestamp, size+checksum
def test_record_with_zeroed_size_and_checksum_is_not_served_empty(tmp_path, snapshot, fields):
    """Zeroed size + checksum (+ timestamp) fields make a valid-looking empty record: the
    scan skips it with the damage and keeps the records after it; through the snapshot the
    reader refuses it (issue 11: it answered SUCCESS with 0 bytes)."""
    bodies = {11: payload(11, 500), 12: payload(12, 646), 13: b"", 14: payload(14, 70),
              15: payload(15, 5000)}  # the snapshot checks only the last 4 KiB
    recs = [record(fid, body) for fid, body in bodies.items()]
    path = tmp_path / "chunk_1_1.chunk"
    write_chunk(path, 1, recs)
    h = Harness(tmp_path, chunks=1)
    try:
        if snapshot:
            h.open()
            h.shut()  # the snapshot is saved
        at = SUPERBLOCK_SIZE + len(recs[0])  # fid 12's header
        patch(path, at + fields[0], bytes(fields[1]))
        h.open()
        assert h.store.open_mode == ("snapshot" if snapshot else "scan")
        assert h.reader.read(11) == bodies[11]
        with pytest.raises(ReadFailed if snapshot else NotFound):
            h.reader.read(12)  # not b"": that was never written
        assert h.reader.read(13) == b"" and h.reader.read(14) == bodies[14]
        if not snapshot:
            assert sorted(f for f, _, _ in h.index.items()) == [11, 13, 14, 15]
            assert h.store.chunks[1].garbage_bytes == len(recs[1])
        assert read_superblock(path).current_offset == SUPERBLOCK_SIZE + sum(map(len, recs))
    finally:
        h.shut()


@pytest.mark.parametrize("superblock", [True, False])
def test_real_empty_records_are_kept(tmp_path, superblock):
    """Empty files in the middle and at the end survive, with or without a superblock."""
    bodies = {21: b"", 22: payload(22, 300), 23: b"", 24: b""}
    write_chunk(tmp_path / "chunk_1_1.chunk", 1,
                [record(fid, body) for fid, body in bodies.items()], superblock=superblock)
    h = Harness(tmp_path, chunks=1)
    try:
        h.open()
        for fid, body in bodies.items():
            assert h.reader.read(fid) == body
    finally:
        h.shut()
