"""Unit tests of the wire codec: byte-exact layouts and clean errors on bad input."""
from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings, strategies as st

from speedy.wire import protocol as p


def test_request_header_is_5_bytes_big_endian():
    assert p.encode_request(p.Op.READ, b"\x00\x03" + struct.pack(">Q", 7)) == \
        b"\x01\x00\x00\x00\x0a\x00\x03\x00\x00\x00\x00\x00\x00\x00\x07"
    assert p.decode_request_header(b"\x28\x00\x00\x01\x00") == (40, 256)


def test_response_header_is_6_bytes():
    assert p.encode_response(p.Op.WRITE, p.Err.FILE_EXISTS) == b"\x00\x04\x00\x00\x00\x00"
    assert p.encode_response(21, 0, b"\x01") == b"\x15\x00\x00\x00\x00\x01\x01"
    assert p.decode_response_header(b"\x01\x03\x00\x00\x00\x00") == (1, 3, 0)


def test_opcode_and_error_values_match_the_spec():
    assert [int(o) for o in p.Op] == [0, 1, 2, 10, 11, 20, 21, 30, 31, 32, 40,
                                      41, 42]  # new: QUERY_GARBAGE, COMPACT (README)
    assert [int(e) for e in p.Err] == list(range(13))


def test_compaction_bodies():
    chunks = [p.ChunkGarbage(1, 300, 1000, 5000), p.ChunkGarbage(2, 0, 0, 9000)]
    body = p.encode_garbage(2, chunks)
    assert len(body) == 12 + 2 * 32
    assert p.decode_garbage(body) == (2, chunks)
    with pytest.raises(p.ProtocolError):
        p.decode_garbage(body[:-1])
    with pytest.raises(p.ProtocolError):
        p.decode_garbage(b"\x00" * 11)
    assert p.encode_compact_request(0.3, True) == bytes.fromhex("000493e001")
    assert p.encode_compact_request(None, False) == bytes.fromhex("ffffffff00")
    assert p.decode_compact_request(bytes.fromhex("000493e001")) == (300000, True)
    assert p.decode_compact_request(bytes.fromhex("ffffffff00")) == (p.SERVER_THRESHOLD, False)
    for bad in (b"", bytes.fromhex("000f424101"), bytes.fromhex("0000000002"), b"\x00" * 6):
        with pytest.raises(p.ProtocolError):
            p.decode_compact_request(bad)
    with pytest.raises(ValueError):
        p.encode_compact_request(1.5, False)


def test_file_key():
    assert p.encode_file_key(3, 1099511627785) == bytes.fromhex("00030000010000000009")
    assert p.decode_file_key(bytes.fromhex("00030000010000000009") + b"data") == \
        (3, 1099511627785)
    with pytest.raises(p.ProtocolError):
        p.decode_file_key(b"\x00" * 9)


def test_io_status():
    body = p.encode_io_status(1, 2, 3)
    assert body == b"\x00\x00\x00\x01\x00\x00\x00\x02\x00\x00\x00\x03"
    assert p.decode_io_status(body) == (1, 2, 3)


def test_detail_info_layout_is_76_plus_16n():
    info = p.DetailInfo(1, 2, 3, 4, 5, 6, 7, 8, 9, 10, [(1, 100), (2, 200)], 42)
    body = p.encode_detail_info(info)
    assert len(body) == 76 + 16 * 2
    assert body[:4] == b"\x00\x00\x00\x01"
    assert body[64:68] == b"\x00\x00\x00\x02"  # n_chunks after 4 u32 and 6 u64
    assert p.decode_detail_info(body) == info
    with pytest.raises(p.ProtocolError):
        p.decode_detail_info(body[:-1])


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_decoders_never_raise_anything_but_protocol_error(data):
    for fn in (p.decode_detail_info, p.decode_io_status, p.decode_file_key,
               p.decode_request_header, p.decode_response_header):
        try:
            fn(data)
        except p.ProtocolError:
            pass


@settings(max_examples=200, deadline=None)
@given(st.integers(0, 0xFFFF), st.integers(0, 2**64 - 1), st.binary(max_size=64))
def test_write_body_round_trip(group, fid, data):
    body = p.encode_file_key(group, fid) + data
    frame = p.encode_request(p.Op.WRITE, body)
    op, n = p.decode_request_header(frame[:5])
    assert (op, n) == (0, len(body))
    assert p.decode_file_key(frame[5:]) == (group, fid)
    assert frame[15:] == data
