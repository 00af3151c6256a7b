"""The chunk file format: superblock and record layout, sizes, byte order, checksum."""
from __future__ import annotations

import struct
import zlib

import pytest

from speedy.format import chunkfile
from speedy.format.chunkfile import (MAGIC, RECORD_HEADER_SIZE, SUPERBLOCK_SIZE, FormatError,
                              RecordHeader, Superblock)


def test_sizes():
    assert SUPERBLOCK_SIZE == 55
    assert RECORD_HEADER_SIZE == 30
    assert chunkfile.record_size(100) == 130


def test_superblock_round_trip_and_layout():
    sb = Superblock(7, files_alloc=3, files_count=2, current_offset=1000, avail_space=5000)
    raw = sb.encode()
    assert len(raw) == 55
    assert raw[:15] == MAGIC == b"CHUNK_SB_MAGIC!"
    # big-endian fields at fixed offsets
    assert raw[15:23] == (7).to_bytes(8, "big")
    assert raw[23:27] == (3).to_bytes(4, "big")
    assert raw[27:31] == (2).to_bytes(4, "big")
    assert raw[31:39] == (1000).to_bytes(8, "big")
    assert raw[39:47] == (5000).to_bytes(8, "big")
    # checksum is adler32 from 0 (not the usual 1) of the first 47 bytes
    assert raw[47:55] == zlib.adler32(raw[:47], 0).to_bytes(8, "big")
    assert zlib.adler32(raw[:47], 0) != zlib.adler32(raw[:47])
    assert Superblock.decode(raw) == sb


def test_superblock_rejects_bad_magic_and_checksum():
    raw = bytearray(Superblock.empty(1, 1 << 20).encode())
    bad = bytearray(raw)
    bad[0] ^= 1
    with pytest.raises(FormatError):
        Superblock.decode(bytes(bad))
    bad = bytearray(raw)
    bad[30] ^= 1
    with pytest.raises(FormatError):
        Superblock.decode(bytes(bad))
    with pytest.raises(FormatError):
        Superblock.decode(bytes(raw[:54]))


def test_empty_superblock():
    sb = Superblock.empty(3, 2147483648)
    assert (sb.files_alloc, sb.files_count, sb.current_offset) == (0, 0, 55)
    assert sb.avail_space == 2147483648 - 55


def test_record_header_round_trip_and_layout():
    data = b"hello world"
    csum = chunkfile.checksum(data)
    assert csum == zlib.adler32(data, 0)
    raw = chunkfile.encode_record_header(2**64 - 1, len(data), csum, 1700000000)
    assert len(raw) == 30
    assert raw == struct.pack(">QHIQQ", 2**64 - 1, 1, len(data), csum, 1700000000)
    assert raw[8:10] == b"\x00\x01"  # ref at offset 8, big-endian
    h = RecordHeader.decode(raw)
    assert (h.fid, h.ref, h.size, h.checksum, h.timestamp) == (2**64 - 1, 1, 11, csum, 1700000000)
    assert h.live and h.encode() == raw
    deleted = chunkfile.encode_record_header(5, 0, 0, 1, ref=chunkfile.REF_DELETED)
    assert not RecordHeader.decode(deleted).live
    with pytest.raises(FormatError):
        RecordHeader.decode(raw[:29])


def test_checksum_starts_from_zero():
    assert chunkfile.checksum(b"") == 0
    assert chunkfile.checksum(bytes(1000)) == 0  # zeros stay 0 when started from 0
    assert chunkfile.checksum(b"a") == zlib.adler32(b"a", 0) == 0x00610061


def test_fits_is_strict():
    assert chunkfile.fits(131, 100)
    assert not chunkfile.fits(130, 100)
    size = 1 << 20
    biggest = chunkfile.max_data_size(size)
    assert chunkfile.fits(size - 55, biggest)
    assert not chunkfile.fits(size - 55, biggest + 1)


def test_chunk_names():
    assert chunkfile.chunk_name(3, 12) == "chunk_3_12.chunk"
    assert chunkfile.parse_chunk_name("chunk_3_12.chunk") == (3, 12)
    for bad in ("chunk_3_12.chunk.tmp", "xchunk_3_1.chunk", "chunk_3.chunk", "chunk_a_1.chunk"):
        assert chunkfile.parse_chunk_name(bad) is None
