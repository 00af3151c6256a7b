"""The path routes (IMAGESERVER-API.md) over real HTTP, a real cluster and real databases.

Every test runs twice: metadata in SQLite and in PostgreSQL. The gateway is the real
daemon (`speedy gateway`, tests.support.gateway) with a small --part_size.
"""
from __future__ import annotations

import json
import re
import socket

import pytest

from speedy.gateway.meta import open_meta
from speedy.wire.protocol import Err
from tests.gateway.conftest import http_call
from tests.support.cluster import blob, cluster_fixture
from tests.support.gateway import Gateway

PART = 64 << 10      # the gateway's client part size: larger fragments are multi-part blobs
cluster = cluster_fixture(groups=1, per_group=2)

MODTIME = r'"ModTime":"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ"'


class PathAPI:
    """A gateway's address, its metadata database (own connection), path API helpers."""

    def __init__(self, addr, meta):
        self.addr, self.meta = addr, meta

    def call(self, method: str, route: str, headers: dict | None = None,
             body: bytes | None = None):
        return http_call(self.addr, method, route, headers, body)

    def put(self, path: str, data: bytes, index: int = 0, start: int = 0, last: bool = True,
            **extra):
        hs = {"Path": path, "Fragment-Index": str(index),
              "Bytes-Range": f"{start}-{start + len(data)}", "Is-Last": "true" if last else ""}
        hs.update(extra)
        return self.call("POST", "/v1/file", hs, data)

    def get(self, path: str, index: int, start: int, end: int):
        return self.call("GET", "/v1/file", {"Path": path, "Fragment-Index": str(index),
                                             "Bytes-Range": f"{start}-{end}"})

    def blob_of(self, path: str, index: int = 0):
        return self.meta.get_fragment(path, index).blob


@pytest.fixture
def gw(cluster, meta_url, tmp_path):
    """A gateway daemon on meta_url with a PART part size, and our own metadata connection."""
    with Gateway(cluster, tmp_path, metadb=meta_url, extra=[f"--part_size={PART}"]) as daemon:
        ours = open_meta(meta_url)
        yield PathAPI(("127.0.0.1", daemon.port), ours)
        ours.close()


def stored_on(cluster, key_blob) -> list[bool]:
    """For each server of the blob's group: does it hold the (manifest) blob?"""
    out = []
    for d in cluster.group(key_blob.group_id):
        r = cluster.read_direct(d, key_blob.group_id, key_blob.fid)
        assert r.ok or r.err == Err.FILE_NOT_FOUND, r
        out.append(r.ok)
    return out


def test_ping(gw):
    a = gw.call("POST", "/v1/_ping")
    assert (a.status, a.body, a.headers["content-type"]) == (200, b"{OK}",
                                                            "text/plain; charset=utf-8")


def test_upload_download_fileinfo(gw):
    data = blob(5000, seed=1)
    a = gw.put("/images/abc/layer", data)
    assert (a.status, a.body, a.headers["content-length"]) == (200, b"", "0")
    assert "content-type" not in a.headers
    a = gw.get("/images/abc/layer", 0, 0, 5000)
    assert (a.status, a.body, a.headers["content-type"]) == (200, data, "octet-stream")
    a = gw.call("GET", "/v1/fileinfo", {"Path": "/images/abc/layer"})
    assert a.status == 200 and a.headers["content-type"] == "text/plain; charset=utf-8"
    assert re.fullmatch(r'\{"fragment-info":\[\{"Index":0,"Start":0,"End":5000,"IsLast":true,'
                        + MODTIME + r"\}\]\}", a.text), a.text


def test_fragments_and_a_multipart_fragment(gw):
    parts = [blob(1000, 2), blob(3 * PART + 17, 3), blob(10, 4)]   # the middle: 4 blobs + manifest
    start = 0
    for i, p in enumerate(parts):
        assert gw.put("/big", p, i, start, last=i == 2).status == 200
        start += len(p)
    assert gw.blob_of("/big", 1).multipart
    start = 0
    for i, p in enumerate(parts):
        a = gw.get("/big", i, start, start + len(p))
        assert a.status == 200 and a.body == p and a.headers["content-length"] == str(len(p))
        start += len(p)
    info = json.loads(gw.call("GET", "/v1/fileinfo", {"Path": "/big"}).body)["fragment-info"]
    assert [(f["Index"], f["IsLast"]) for f in info] == [(2, True), (1, False), (0, False)]
    assert gw.call("GET", "/v1/list_descendant", {"Path": "/bi"}).body == \
        b'{"path-descendant":["/big","/big","/big"]}'


def test_zero_byte_file_is_stored(gw):
    """Fix: the original refuses Bytes-Range 0-0, so it cannot store an empty file."""
    a = gw.call("POST", "/v1/file", {"Path": "/empty", "Fragment-Index": "0",
                                      "Bytes-Range": "0-0", "Is-Last": "TRUE"}, b"")
    assert a.status == 200, a.text
    a = gw.get("/empty", 0, 0, 0)
    assert (a.status, a.body, a.headers["content-type"]) == (200, b"", "octet-stream")
    assert re.fullmatch(r'\{"fragment-info":\[\{"Index":0,"Start":0,"End":0,"IsLast":true,'
                        + MODTIME + r"\}\]\}",
                        gw.call("GET", "/v1/fileinfo", {"Path": "/empty"}).text)


def test_bad_input_answers_like_the_original(gw):
    def post(rng: str, index: str = "0", body: bytes = b"abc", path: str = "/x"):
        return gw.call("POST", "/v1/file", {"Path": path, "Fragment-Index": index,
                                            "Bytes-Range": rng}, body)
    for rng in ("", "abc", "5-3", "3", "-1-2", "1-2-3"):
        a = post(rng)
        assert (a.status, a.body) == (400, b"bytesRange error!\n"), rng
        assert a.headers["content-type"] == "text/plain; charset=utf-8"
        assert a.headers["x-content-type-options"] == "nosniff"
    a = post("0-3", "x1")
    assert (a.status, a.text) == (400, 'strconv.ParseUint: parsing "x1": invalid syntax\n')
    a = post("0-3", "")
    assert (a.status, a.text) == (400, 'strconv.ParseUint: parsing "": invalid syntax\n')
    a = post("0-3", "99999999999999999999")
    assert a.status == 400 and a.text.endswith(": value out of range\n")
    a = post("0-4", body=b"abc")
    assert (a.status, a.text) == (400, "length of data and range are different\n")
    a = post("0-2", body=b"abc")
    assert (a.status, a.text) == (400, "length of data and range are different\n")
    assert post("0-3", path="").status == 400
    assert post("0-3", path="/" + "x" * 255).status == 400
    assert gw.call("GET", "/v1/fileinfo", {"Path": "/x"}).status == 404
    # reads
    a = gw.get("/nothing", 0, 0, 3)
    assert (a.status, a.text) == (404, "fragment metainfo not found\n")
    assert gw.put("/y", b"abc").status == 200
    assert gw.get("/y", 0, 0, 2).status == 404 and gw.get("/y", 1, 0, 3).status == 404
    a = gw.call("GET", "/v1/fileinfo", {"Path": "/nothing"})
    assert (a.status, a.body, "content-type" in a.headers) == (404, b"", False)
    # routes and methods
    for method, route in (("GET", "/v1/nothing"), ("PUT", "/v1/file"), ("GET", "/v1/_ping"),
                          ("POST", "/v1/fileinfo"), ("GET", "/v1/file/")):
        a = gw.call(method, route)
        assert (a.status, a.text) == (404, "404 page not found\n"), (method, route)


def test_delete_frees_the_bytes(gw, cluster):
    """Fix: the original's DELETE dropped the metadata and leaked the chunk data."""
    gw.put("/del/a", blob(2000, 5), 0, 0, last=False)
    gw.put("/del/a", blob(2 * PART + 1, 6), 1, 2000, last=True)
    blobs = [gw.blob_of("/del/a", 0), gw.blob_of("/del/a", 1)]
    for b in blobs:
        assert stored_on(cluster, b) == [True, True]
    a = gw.call("DELETE", "/v1/file", {"Path": "/del/a"})
    assert (a.status, a.body) == (204, b"")
    for b in blobs:
        assert stored_on(cluster, b) == [False, False]
    assert gw.meta.garbage() == []
    assert gw.call("GET", "/v1/fileinfo", {"Path": "/del/a"}).status == 404
    assert gw.call("DELETE", "/v1/file", {"Path": "/del/a"}).status == 204   # unknown: 204


def test_replacing_upload_frees_the_old_bytes(gw, cluster):
    gw.put("/rep", b"old bytes")
    old = gw.blob_of("/rep")
    gw.put("/rep", b"new bytes!")
    assert stored_on(cluster, old) == [False, False]
    assert gw.get("/rep", 0, 0, 10).body == b"new bytes!"


def test_move(gw, cluster):
    gw.put("/mv/src", b"source")
    gw.put("/mv/dst", b"destination")
    replaced = gw.blob_of("/mv/dst")
    a = gw.call("POST", "/v1/move", {"Source-Path": "/mv/src", "Dest-Path": "/mv/dst"})
    assert (a.status, a.body) == (200, b"")
    assert gw.get("/mv/dst", 0, 0, 6).body == b"source"
    assert gw.call("GET", "/v1/fileinfo", {"Path": "/mv/src"}).status == 404
    assert stored_on(cluster, replaced) == [False, False]
    # fix: the original answers 200 for a missing source
    a = gw.call("POST", "/v1/move", {"Source-Path": "/mv/src", "Dest-Path": "/mv/other"})
    assert a.status == 404 and a.text.startswith("source path not found")


def test_v1_registry_directory(gw):
    v1 = {"Registry-Version": "v1"}
    assert gw.put("/repositories/u/ubuntu/tag_latest", b"abc123", **v1).status == 200
    assert gw.put("/repositories/u/ubuntu/tag_v1", b"def456", **v1).status == 200
    assert gw.put("/repositories/u/ubuntu/tag_v9", b"no v1").status == 200
    assert gw.put("/repositories/u/ubuntu/json", b"{}", **v1).status == 200
    a = gw.call("GET", "/v1/list_directory", {"Path": "/repositories/u/ubuntu"})
    assert a.status == 200 and a.headers["content-type"] == "text/plain; charset=utf-8"
    assert sorted(json.loads(a.body)["file-list"]) == ["tag_latest", "tag_v1"]
    gw.call("DELETE", "/v1/file", {"Path": "/repositories/u/ubuntu/tag_latest"})
    gw.call("DELETE", "/v1/file", {"Path": "/repositories/u/ubuntu/tag_v1"})
    a = gw.call("GET", "/v1/list_directory", {"Path": "/repositories/u/ubuntu"})
    assert (a.status, a.body) == (404, b"")


def test_list_descendant(gw):
    for p in ("/ld/a<b>&c", "/ld/b", "/le/c"):
        gw.put(p, b"x")
    a = gw.call("GET", "/v1/list_descendant", {"Path": "/ld/"})
    assert a.body == b'{"path-descendant":["/ld/a\\u003cb\\u003e\\u0026c","/ld/b"]}'
    everything = json.loads(gw.call("GET", "/v1/list_descendant", {}).body)["path-descendant"]
    assert {"/ld/b", "/le/c"} <= set(everything)
    a = gw.call("GET", "/v1/list_descendant", {"Path": "/l_"})
    assert (a.status, a.body) == (404, b"")


def test_utf8_paths(gw):
    path = "/images/caf\u00e9/\U0001f600"
    raw = path.encode("utf-8").decode("latin-1")        # how http.client sends it
    assert gw.call("POST", "/v1/file", {"Path": raw, "Fragment-Index": "0",
                                        "Bytes-Range": "0-2", "Is-Last": "true"}, b"ok").status == 200
    a = gw.call("GET", "/v1/list_descendant", {"Path": "/images/caf\u00e9".encode().decode("latin-1")})
    assert json.loads(a.body) == {"path-descendant": [path]}
    a = gw.call("GET", "/v1/fileinfo", {"Path": "\xff\xfe"})
    assert a.status == 400 and "not valid UTF-8" in a.text


def test_client_vanishing_mid_upload_leaves_no_metadata_and_no_blob(gw, cluster):
    """Parts stored before the client went away are deleted (fids between two uploads)."""
    import time
    gw.put("/before", b"x")
    before = gw.blob_of("/before")
    size = 3 * PART
    with socket.create_connection(gw.addr, timeout=10) as s:
        s.sendall(f"POST /v1/file HTTP/1.1\r\nHost: x\r\nPath: /gone\r\nFragment-Index: 0\r\n"
                  f"Bytes-Range: 0-{size}\r\nIs-Last: true\r\nContent-Length: {size}\r\n\r\n"
                  .encode() + blob(PART + 100, 7))
        time.sleep(0.5)    # the first part reaches the chunkservers
    deadline = time.monotonic() + 20
    while True:
        time.sleep(0.2)
        gw.put("/after", b"y")
        after = gw.blob_of("/after")
        held = [fid for fid in range(before.fid + 1, after.fid)
                if any(stored_on(cluster, type(before)(before.group_id, fid)))]
        if not held or time.monotonic() > deadline:
            break
    assert after.fid > before.fid + 1, "the vanished upload stored no part: test is void"
    assert held == [], f"orphaned fids {held}"
    assert gw.meta.fragments("/gone") == []
    assert gw.call("GET", "/v1/fileinfo", {"Path": "/gone"}).status == 404
