"""Unit tests of the client's pure parts: keys, manifest codec, group choice, fid cache."""
from __future__ import annotations

import hashlib
import random
import struct
import subprocess
import sys
import threading

import pytest
from hypothesis import given, settings, strategies as st

from tests.support import ROOT
from speedy.wire import manifest as mf
from speedy.client.chunkconn import format_addr, parse_addr
from speedy.client import (INIT, RO, RW, ClusterError, FidAllocator, ServerInfo, Route,
                           choose_group, explain_no_group, read_order)


# -- keys -------------------------------------------------------------------------------

def test_plain_keys_of_the_original_front_ends_parse():
    k = mf.parse_key("3,10452")
    assert (k.group_id, k.fid, k.multipart) == (3, 10452, False)
    assert str(k) == "3,10452"
    assert mf.parse_key(" 65535,18446744073709551615\n") == mf.Key(65535, 2**64 - 1)


def test_multipart_keys_say_so():
    k = mf.parse_key("2,77m")
    assert k.multipart and str(k) == "2,77m" and k.blob() == mf.Key(2, 77)


@pytest.mark.parametrize("bad", ["", "3", "3,", ",5", "3;5", "a,5", "3,5x", "3,5M", "-3,5",
                                 "+3,5", "3,-5", "0,5", "65536,5", "3,18446744073709551616",
                                 "3, 5", "3,5m,", "0x3,5", "3,5mm", "١,٢"])
def test_bad_keys_are_rejected(bad):
    with pytest.raises(mf.KeyFormatError):
        mf.parse_key(bad)


def test_non_text_key_is_rejected():
    with pytest.raises(mf.KeyFormatError):
        mf.parse_key(b"3,5")  # type: ignore[arg-type]


@given(st.integers(1, 65535), st.integers(0, 2**64 - 1), st.booleans())
def test_key_text_round_trips(g, fid, multi):
    k = mf.Key(g, fid, multi)
    assert mf.parse_key(str(k)) == k


# -- manifest ---------------------------------------------------------------------------

def sample_manifest() -> mf.Manifest:
    data = [b"a" * 10, b"b" * 10, b"c" * 3]
    parts = [mf.Part(1 + i, 100 + i, len(d), hashlib.sha256(d).digest())
             for i, d in enumerate(data)]
    return mf.Manifest(23, 10, parts)


def test_manifest_layout_is_documented_bytes():
    blob = sample_manifest().encode()
    assert len(blob) == mf.manifest_size(3) == 64 + 50 * 3
    assert blob[:8] == b"SPDYMANI" and blob[8] == 1 and blob[9] == 1
    assert struct.unpack(">QQI", blob[12:32]) == (23, 10, 3)
    assert struct.unpack(">HQQ", blob[32:50]) == (1, 100, 10)
    assert blob[50:82] == hashlib.sha256(b"a" * 10).digest()
    assert blob[-32:] == hashlib.sha256(blob[:-32]).digest()


def test_manifest_round_trips():
    m = sample_manifest()
    assert mf.Manifest.decode(m.encode()) == m


def test_empty_manifest_round_trips():
    assert mf.Manifest.decode(mf.Manifest(0, 4096, []).encode()).parts == []


@pytest.mark.parametrize("mutate", [
    lambda b: b[:-1],                                   # truncated
    lambda b: b + b"\0",                                # trailing garbage
    lambda b: b"X" + b[1:],                             # magic
    lambda b: b[:8] + b"\x02" + b[9:],                  # version
    lambda b: b[:40] + bytes([b[40] ^ 1]) + b[41:],     # a part fid (checksum catches it)
    lambda b: b[:-1] + bytes([b[-1] ^ 1]),              # the checksum itself
    lambda b: b"",
])
def test_damaged_manifests_are_rejected(mutate):
    with pytest.raises(mf.ManifestError):
        mf.Manifest.decode(mutate(sample_manifest().encode()))


def resign(body: bytes) -> bytes:
    return body + hashlib.sha256(body).digest()


def test_inconsistent_manifest_with_a_valid_checksum_is_rejected():
    body = sample_manifest().encode()[:-32]
    wrong_total = body[:12] + struct.pack(">Q", 24) + body[20:]
    with pytest.raises(mf.ManifestError, match="add up"):
        mf.Manifest.decode(resign(wrong_total))
    wrong_count = body[:28] + struct.pack(">I", 4) + body[32:]
    with pytest.raises(mf.ManifestError, match="length"):
        mf.Manifest.decode(resign(wrong_count))
    zero_group = body[:32] + b"\0\0" + body[34:]
    with pytest.raises(mf.ManifestError, match="bad key"):
        mf.Manifest.decode(resign(zero_group))


def test_encode_refuses_parts_larger_than_part_size():
    m = mf.Manifest(11, 10, [mf.Part(1, 1, 11, b"\0" * 32)])
    with pytest.raises(mf.ManifestError):
        m.encode()


@settings(max_examples=50)
@given(st.binary(max_size=400))
def test_random_bytes_never_crash_the_decoder(blob):
    with pytest.raises(mf.ManifestError):
        mf.Manifest.decode(blob)


# -- addresses --------------------------------------------------------------------------

def test_addresses():
    assert parse_addr("10.0.0.5:8000") == ("10.0.0.5", 8000)
    assert parse_addr("host") == ("host", 8000)
    assert parse_addr("[::1]:9") == ("::1", 9)
    assert format_addr(("::1", 9)) == "[::1]:9"
    for bad in ["", ":5", "h:", "h:0", "h:65536", "h:x", "[::1]x"]:
        with pytest.raises(ValueError):
            parse_addr(bad)


# -- route and group choice -------------------------------------------------------------

def srv(g, port, status=RW, free=1 << 30, pending=0, writing=0, gs=0) -> ServerInfo:
    return ServerInfo(g, "127.0.0.1", port, status, gs, free * 4, free, pending, writing)


def test_route_from_master_json_accepts_missing_zero_fields():
    r = Route.from_json({"1": [{"Ip": "10.0.0.5", "Port": 8000, "Status": 1}],
                         "2": [{"GroupId": 2, "Ip": "10.0.0.6", "Port": 8001,
                                "MaxFreeSpace": 5, "Extra": "ignored"}]})
    assert r.groups[1][0].group_id == 1 and r.groups[1][0].status == RW
    assert r.groups[1][0].max_free == 0
    assert r.groups[2][0].status == INIT and r.groups[2][0].max_free == 5
    for bad in [[], {"x": []}, {"1": {}}, {"1": [{"Ip": "a"}]},
                {"1": [{"Ip": "a", "Port": 1, "Status": "RW"}]}]:
        with pytest.raises(ClusterError):
            Route.from_json(bad)


def test_choose_group_follows_the_front_end_policy():
    groups = {
        1: [srv(1, 1), srv(1, 2), srv(1, 3, status=RO)],        # an RO server: out
        2: [srv(2, 4), srv(2, 5, status=INIT)],                 # INIT: out
        3: [srv(3, 6)],                                         # only one RW: out
        4: [srv(4, 7), srv(4, 8, free=100)],                    # too small for 100 bytes
        5: [srv(5, 9, gs=8), srv(5, 10)],                       # transferring: out
        6: [srv(6, 11), srv(6, 12)],
    }
    assert choose_group(groups, 100) == 6
    assert choose_group(groups, 100, exclude=[6]) is None
    assert choose_group(groups, 40) in (4, 6)                  # 40 + 30 < 100
    assert choose_group(groups, 100, min_replicas=1) in (3, 6)
    assert choose_group({}, 1) is None
    why = explain_no_group(groups, 100, 2)
    assert "127.0.0.1:3 is RO" in why and "need 2" in why and "no room" in why


def test_choose_group_prefers_less_loaded_groups():
    groups = {1: [srv(1, 1, pending=20), srv(1, 2)], 2: [srv(2, 3), srv(2, 4, writing=1)],
              3: [srv(3, 5, writing=30), srv(3, 6)]}
    rng = random.Random(1)
    picks = {choose_group(groups, 10, rng=rng) for _ in range(50)}
    assert picks == {2}
    groups[2][1].writing = 3
    groups[1][0].pending = 6
    picks = {choose_group(groups, 10, rng=rng) for _ in range(200)}
    assert picks == {1, 2}                                     # within the slack: spread


def test_read_order_puts_rw_servers_first():
    servers = [srv(1, 1, status=RO), srv(1, 2), srv(1, 3, status=INIT), srv(1, 4)]
    for _ in range(10):
        order = [s.port for s in read_order(servers)]
        assert set(order[:2]) == {2, 4} and order[2:] == [1, 3]


def test_read_order_spreads_reads_over_the_rw_servers():
    for servers in ([srv(1, 1), srv(1, 2)], [srv(1, 1), srv(1, 2), srv(1, 3)]):
        firsts = [read_order(servers)[0].port for _ in range(200)]
        assert set(firsts) == {s.port for s in servers}      # every one comes first
        assert all(sorted(s.port for s in read_order(servers)) ==
                   [s.port for s in servers] for _ in range(20))


# -- fid cache --------------------------------------------------------------------------

def test_fid_allocator_hands_out_each_fid_once_and_refills_ahead():
    calls = []
    lock = threading.Lock()

    def fetch():
        with lock:
            begin = 1 + 100 * len(calls)
            calls.append(begin)
        return begin, begin + 100
    fids = FidAllocator(fetch, low_water=30)
    got: list[int] = []

    def taker():
        for _ in range(250):
            got.append(fids.take())
    threads = [threading.Thread(target=taker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(got) == 1000 and len(set(got)) == 1000
    assert fids.available() >= 0 and len(calls) >= 10


def test_fid_allocator_reports_master_errors():
    def fetch():
        raise ClusterError("master down")
    with pytest.raises(ClusterError, match="master down"):
        FidAllocator(fetch).take()


# -- import hygiene ---------------------------------------------------------------------

def test_importing_the_client_patches_nothing():
    code = ("import sys, socket, threading, time\n"
            "orig = (socket.socket, threading.Thread, time.sleep)\n"
            "import speedy.client, speedy.cli\n"
            "assert 'gevent' not in sys.modules, 'gevent imported'\n"
            "assert (socket.socket, threading.Thread, time.sleep) == orig\n"
            "assert socket.socket.__module__ == 'socket'\n"
            "print('clean')\n")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == "clean", out.stderr
