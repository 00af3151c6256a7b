"""Damaged chunk files under a real spy_server.py (issue 6): the server never serves a wrong byte.

Files are written through a real server, which is stopped; the chunk files are then
damaged by hand (a flipped bit, garbage after current_offset, a truncation, a chunk of
another group) and the server is started again. A record that is damaged answers
READ_ERROR when the index still points at it (the snapshot was trusted: nothing checks
old records at start) and FILE_NOT_FOUND when the start-up scan skipped it (CHUNKFILE.md:
the scan resynchronizes at the next valid record, the records after it stay readable).
Every other record reads back byte for byte.
"""
from __future__ import annotations

import hashlib
import os
import socket
import subprocess
import time
import zlib

import pytest

from tests.support import PYTHON, free_port
from tests.support.server import SPY_SERVER, Client, make_server, payload
from tests.support.store import records
from speedy.format.chunkfile import RECORD_HEADER_SIZE, SUPERBLOCK_SIZE, Superblock, encode_record_header
from speedy.wire.protocol import Err, Op, encode_file_key

MiB = 1 << 20
FILE = 200_000  # 5 files fill a 1 MiB chunk (first fit), the 6th goes to the next chunk
NOT_FOUND = (Err.FILE_NOT_FOUND, b"")
STRANGER = 999_999  # a fid never written


def superblock(path: str) -> Superblock:
    with open(path, "rb") as f:
        return Superblock.decode(f.read(SUPERBLOCK_SIZE))


def patch(path: str, offset: int, data: bytes) -> None:
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


def flip(path: str, offset: int, mask: int = 0x10) -> None:
    """Flip bits of one byte in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([byte ^ mask]))


def read_all(port: int, fids) -> dict[int, tuple[int, bytes]]:
    with Client(port) as c:
        return {fid: c.read(fid) for fid in fids}


def check_never_wrong(got: dict[int, tuple[int, bytes]], sizes: dict[int, int]) -> None:
    """Every answer is the exact data or an error with no body."""
    for fid, (err, body) in got.items():
        if err == Err.SUCCESS:
            assert body == payload(fid, sizes[fid]), f"fid {fid}: WRONG BYTES served"
        else:
            assert body == b"", fid


def filled_server(tmp_path, name: str, nfiles: int, chunks: int, size: int = FILE, **flags):
    """A server (stopped again, SIGTERM: the index snapshot is saved) holding nfiles files."""
    srv = make_server(tmp_path, name, chunks=chunks, chunk_size=MiB, workers=1, **flags)
    try:
        srv.start()
        with srv.client() as c:
            for fid in range(1, nfiles + 1):
                assert c.write(fid, payload(fid, size)) == Err.SUCCESS
        assert srv.stop() == 0
    finally:
        srv.discard()
    srv.port = 0
    return srv


def snapshot_path(srv) -> str:
    return os.path.join(srv.data_dir, ".speedy", "index.snap")


@pytest.mark.parametrize("start", ["snapshot", "scan"])
def test_bit_flip_in_stored_data(tmp_path, start):
    """One flipped bit in an old record: READ_ERROR (snapshot start) or skipped (scan start);
    the records after it in its chunk stay readable either way."""
    srv = filled_server(tmp_path, start, nfiles=10, chunks=2)
    recs = records(srv.data_dir)
    victim = recs[2]  # chunk 1 holds fids 1-5, chunk 2 fids 6-10
    flip(victim.path, victim.data_offset + victim.size // 2)
    try:
        if start == "scan":  # a DELETE, a crash, and no snapshot: a full scan
            srv.start()
            with srv.client() as c:
                assert c.delete(10) == Err.SUCCESS
            srv.kill9()
            assert os.path.exists(snapshot_path(srv))  # kept: the delete is journaled
            os.unlink(snapshot_path(srv))
        srv.start()
        got = read_all(srv.port, range(1, 11))
        check_never_wrong(got, {f: FILE for f in range(1, 11)})
        log = srv.log()
        if start == "scan":
            assert got.pop(10) == NOT_FOUND  # deleted
        if start == "snapshot":
            assert got[2][0] == Err.READ_ERROR
            assert all(got[f][0] == Err.SUCCESS for f in range(1, 11) if f != 2)
            assert "checksum mismatch" in log
        else:
            # The scan skips the bad record and goes on at the next one: only fid 2 is
            # gone; current_offset stays, the damaged range is never written over.
            assert got[2] == NOT_FOUND
            assert all(got[f][0] == Err.SUCCESS for f in range(1, 10) if f != 2)
            end = victim.data_offset + victim.size
            assert f"chunk_1_1.chunk: damaged bytes {victim.offset}-{end} skipped" in log
            assert superblock(victim.path).current_offset == recs[5].data_offset + FILE
    finally:
        srv.discard()


def stale_record() -> bytes:
    """A whole, valid-looking record of a fid that was never acknowledged."""
    data = payload(STRANGER, 1000)
    return encode_record_header(STRANGER, len(data), zlib.adler32(data, 0), 1_700_000_000) + data


@pytest.mark.parametrize("sb", ["superblock kept", "superblock zeroed"])
def test_garbage_after_current_offset(tmp_path, sb):
    """Random bytes, zeros, a stale valid record, a 2^32-1 size header after current_offset
    (one kind per chunk): never indexed, never used to allocate; the files all read back."""
    srv = filled_server(tmp_path, sb.split()[1], nfiles=20, chunks=4)
    recs = records(srv.data_dir)
    assert sorted({r.chunk_id for r in recs.values()}) == [1, 2, 3, 4]
    kinds = {1: os.urandom(4096), 2: bytes(4096), 3: stale_record(),
             4: encode_record_header(STRANGER + 1, 0xFFFFFFFF, 1, 1_700_000_000)
             + os.urandom(4066)}
    for cid, junk in kinds.items():
        path = os.path.join(srv.data_dir, f"chunk_1_{cid}.chunk")
        end = superblock(path).current_offset
        patch(path, end, junk)
        if sb == "superblock zeroed":
            patch(path, 0, bytes(SUPERBLOCK_SIZE))
    os.unlink(snapshot_path(srv))  # a full scan
    sizes = {f: FILE for f in range(1, 21)} | {STRANGER: 1000, STRANGER + 1: 0}
    try:
        srv.start()
        got = read_all(srv.port, list(range(1, 21)) + [STRANGER, STRANGER + 1])
        check_never_wrong(got, sizes)
        assert all(got[f] == (Err.SUCCESS, payload(f, FILE)) for f in range(1, 21))
        assert got[STRANGER + 1] == NOT_FOUND
        log = srv.log()
        if sb == "superblock kept":
            assert got[STRANGER] == NOT_FOUND  # past current_offset: never looked at
            assert "cut at" not in log and "rebuilt" not in log
        else:
            # Rebuilt from the records: the scan runs to the end of the chunk and stops at
            # the first invalid header. A complete record with a valid checksum cannot be
            # told from a real one, so it may be indexed: it is served intact.
            assert got[STRANGER][0] in (Err.SUCCESS, Err.FILE_NOT_FOUND)
            assert log.count("superblock rebuilt from the records") == 4
            assert "zeros where a record header should be" in log
            assert f"record of fid {STRANGER + 1} with size 4294967295 runs past" in log
        for cid in kinds:  # the superblocks end where the real records end
            path = os.path.join(srv.data_dir, f"chunk_1_{cid}.chunk")
            last = max(r.offset + RECORD_HEADER_SIZE + r.size for r in recs.values()
                       if r.chunk_id == cid)
            extra = RECORD_HEADER_SIZE + 1000 if (cid == 3 and got[STRANGER][0] == 0) else 0
            assert superblock(path).current_offset == last + extra, cid
        # new writes land over the garbage and survive a crash and a scan
        with srv.client() as c:
            for fid in range(100, 110):
                assert c.write(fid, payload(fid, 3000)) == Err.SUCCESS
        srv.kill9()
        if os.path.exists(snapshot_path(srv)):
            os.unlink(snapshot_path(srv))
        srv.start()
        sizes |= {f: 3000 for f in range(100, 110)}
        got = read_all(srv.port, sizes)
        check_never_wrong(got, sizes)
        assert all(got[f][0] == Err.SUCCESS for f in list(range(1, 21)) + list(range(100, 110)))
    finally:
        srv.discard()


def test_truncated_chunk_files(tmp_path):
    """Chunk 1 cut inside a record, chunk 2 cut to 20 bytes: the start-up scan cuts the index
    there; chunk 3 is untouched; the server writes and restarts normally afterwards."""
    srv = filled_server(tmp_path, "trunc", nfiles=15, chunks=3)
    recs = records(srv.data_dir)
    third = recs[3]
    os.truncate(third.path, third.data_offset + 100)
    os.truncate(recs[6].path, 20)
    sizes = {f: FILE for f in range(1, 16)}
    try:
        srv.start()  # the snapshot is refused (a chunk was truncated): a full scan
        got = read_all(srv.port, sizes)
        check_never_wrong(got, sizes)
        ok = [f for f in sizes if got[f][0] == Err.SUCCESS]
        assert ok == [1, 2, 11, 12, 13, 14, 15], got
        assert all(got[f] == NOT_FOUND for f in sizes if f not in ok)
        log = srv.log()
        assert "was truncated" in log
        assert f"chunk_1_1.chunk: cut at offset {third.offset}" in log
        assert "chunk_1_2.chunk: superblock unusable" in log
        with srv.client() as c:
            for fid in range(3, 11):  # the lost fids can be written again (e.g. by repair)
                assert c.write(fid, payload(fid, FILE)) == Err.SUCCESS
        srv.kill9()
        srv.start()
        got = read_all(srv.port, sizes)
        assert all(got[f] == (Err.SUCCESS, payload(f, FILE)) for f in sizes)
    finally:
        srv.discard()


def test_chunk_of_another_group_refuses_start(tmp_path):
    """A group-2 chunk file dropped into a group-1 data dir: exit 1, one clear line, and
    the data dir left as it was."""
    srv = filled_server(tmp_path, "foreign", nfiles=6, chunks=2)
    src = os.path.join(srv.data_dir, "chunk_1_1.chunk")
    stranger = os.path.join(srv.data_dir, "chunk_2_1.chunk")
    with open(src, "rb") as f, open(stranger, "wb") as g:
        g.write(f.read())

    def digests() -> dict[str, str]:
        return {n: hashlib.sha256(open(os.path.join(srv.data_dir, n), "rb").read()).hexdigest()
                for n in sorted(os.listdir(srv.data_dir)) if n.endswith(".chunk")}

    before = digests()
    r = subprocess.run([PYTHON, SPY_SERVER, "--master_ip=127.0.0.1", "--master_port=1",
                        "--group_id=1", f"--data_dir={srv.data_dir}", f"--port={free_port()}",
                        f"--chunk_size={MiB}", "--chunks=2", "--workers=1", "--mem_blocks=4"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, r.stderr
    assert "chunk_2_1.chunk: chunk file of group 2" in errors[0] and "--group_id=1" in errors[0]
    assert "Traceback" not in r.stderr
    assert digests() == before
    os.rename(stranger, os.path.join(str(tmp_path), "moved-away.chunk"))
    try:
        srv.start()
        got = read_all(srv.port, range(1, 7))
        assert all(got[f] == (Err.SUCCESS, payload(f, FILE)) for f in range(1, 7))
    finally:
        srv.discard()


# -- damage under a running server -----------------------------------------------------

BIG = 3 * MiB  # larger than the worker's whole-read limit: verified, then streamed


def test_damage_under_a_live_server(tmp_path):
    """Bytes changed on disk while the server runs: READ_ERROR (or FILE_NOT_FOUND for a
    record marked deleted), never the wrong bytes; the other files keep reading fine."""
    srv = make_server(tmp_path, "live", chunks=2, chunk_size=8 * MiB, workers=2, mem_blocks=64)
    sizes = {f: 40_000 + f for f in range(1, 10)} | {20: BIG, 21: BIG}
    try:
        srv.start()
        with srv.client() as c:
            for fid, size in sizes.items():
                assert c.write(fid, payload(fid, size)) == Err.SUCCESS
            assert c.read(20) == (Err.SUCCESS, payload(20, BIG))  # cached, then damaged
        recs = records(srv.data_dir)
        # header fields: fid u64 @0, ref u16 @8, size u32 @10, checksum u64 @14, ts u64 @22
        damage = {
            1: ("data bit", lambda r: flip(r.path, r.data_offset + 1234)),
            2: ("last data byte", lambda r: flip(r.path, r.data_offset + r.size - 1, 0x01)),
            3: ("fid", lambda r: flip(r.path, r.offset + 7, 0x01)),
            4: ("size +1", lambda r: flip(r.path, r.offset + 13, 0x01)),
            5: ("size 2^32-1", lambda r: patch(r.path, r.offset + 10, b"\xff" * 4)),
            6: ("checksum", lambda r: flip(r.path, r.offset + 21, 0x01)),
            7: ("ref 2", lambda r: patch(r.path, r.offset + 8, b"\x00\x02")),
            8: ("ref 0 (deleted)", lambda r: patch(r.path, r.offset + 8, b"\x00\x00")),
            9: ("size 2^31-1, past the file", lambda r: patch(r.path, r.offset + 10,
                                                            b"\x7f\xff\xff\xff")),
            20: ("data bit of a streamed read", lambda r: flip(r.path, r.data_offset + 2 * MiB)),
        }
        for fid, (_what, hurt) in damage.items():
            hurt(recs[fid])
        t0 = time.monotonic()
        got = read_all(srv.port, sizes)
        seconds = time.monotonic() - t0
        check_never_wrong(got, sizes)
        for fid, (what, _hurt) in damage.items():
            want = Err.FILE_NOT_FOUND if fid == 8 else Err.READ_ERROR
            assert got[fid][0] == want, (what, got[fid][0])
        assert got[21] == (Err.SUCCESS, payload(21, BIG))
        print(f"{len(sizes)} reads of damaged/undamaged records in {seconds:.2f} s")
        with srv.client() as c:  # the connection and the server are fine
            assert c.write(30, b"still writable") == Err.SUCCESS
            assert c.read(30) == (Err.SUCCESS, b"still writable")
    finally:
        srv.discard()


def test_damage_between_verify_and_send_of_a_large_read(tmp_path):
    """A large READ is verified in a first pass and sent in a second: a byte changed on
    disk while the send is blocked on a full socket must not reach the client as SUCCESS."""
    srv = make_server(tmp_path, "toctou", chunks=1, chunk_size=32 * MiB, workers=1,
                      mem_blocks=64)
    size = 16 * MiB
    data = payload(5, size)
    try:
        srv.start()
        with srv.client() as c:
            assert c.write(5, data) == Err.SUCCESS
        rec = records(srv.data_dir)[5]
        with srv.client() as c:
            c.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
            c.send(Op.READ, encode_file_key(1, 5))
            time.sleep(1.0)  # the verify pass is over; the send pass waits on the socket
            flip(rec.path, rec.data_offset + size - 10)
            try:
                _op, err, body = c.response()
            except EOFError:  # the server closed the connection: no wrong byte was accepted
                assert "changed on disk while it was sent" in srv.log()
                return
        assert err != Err.SUCCESS or body == data, "SUCCESS with a wrong byte"
    finally:
        srv.discard()
