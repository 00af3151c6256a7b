"""The path routes served by the gateway daemon's gevent workers: chunked uploads, streamed
multi-part reads, concurrent clients, both databases."""
from __future__ import annotations

import http.client
import json
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.gateway.conftest import http_call
from tests.support.cluster import blob, cluster_fixture
from tests.support.gateway import Gateway

PART = 64 << 10
cluster = cluster_fixture(groups=1, per_group=2)


@pytest.fixture
def addr(cluster, meta_url, tmp_path):
    with Gateway(cluster, tmp_path, workers=2, metadb=meta_url,
                 extra=[f"--part_size={PART}"]) as daemon:
        yield "127.0.0.1", daemon.port


def test_chunked_upload_and_streamed_read(addr):
    data = blob(5 * PART + 123, 21)
    conn = http.client.HTTPConnection(*addr, timeout=30)
    hs = {"Path": "/gevent/chunked", "Fragment-Index": "0", "Bytes-Range": f"0-{len(data)}",
          "Is-Last": "true"}
    conn.request("POST", "/v1/file", body=iter([data[i:i + 10000]
                                                for i in range(0, len(data), 10000)]),
                 headers=hs, encode_chunked=True)
    r = conn.getresponse()
    assert (r.status, r.read()) == (200, b"")
    conn.request("GET", "/v1/file", headers={"Path": "/gevent/chunked", "Fragment-Index": "0",
                                             "Bytes-Range": f"0-{len(data)}"})
    r = conn.getresponse()                    # the same keep-alive connection
    assert r.status == 200 and r.getheader("Content-Type") == "octet-stream"
    assert r.read() == data
    conn.close()


def test_chunked_upload_longer_than_its_range_is_400(addr):
    conn = http.client.HTTPConnection(*addr, timeout=30)
    conn.request("POST", "/v1/file", body=iter([b"abc", b"def"]), encode_chunked=True,
                 headers={"Path": "/gevent/long", "Fragment-Index": "0", "Bytes-Range": "0-4"})
    r = conn.getresponse()
    assert (r.status, r.read()) == (400, b"length of data and range are different\n")
    conn.close()
    assert http_call(addr, "GET", "/v1/fileinfo", {"Path": "/gevent/long"}).status == 404


def test_concurrent_clients(addr):
    def one(i: int) -> bytes:
        data = blob(1000 + (i % 3) * PART, 100 + i)
        path = f"/gevent/c/{i}"
        a = http_call(addr, "POST", "/v1/file", {"Path": path, "Fragment-Index": "0",
                                                 "Bytes-Range": f"0-{len(data)}",
                                                 "Is-Last": "true"}, data)
        assert a.status == 200, a.text
        a = http_call(addr, "GET", "/v1/file", {"Path": path, "Fragment-Index": "0",
                                                "Bytes-Range": f"0-{len(data)}"})
        assert a.status == 200 and a.body == data
        return path.encode()
    with ThreadPoolExecutor(8) as ex:
        assert len(list(ex.map(one, range(24)))) == 24
    listed = json.loads(http_call(addr, "GET", "/v1/list_descendant",
                                  {"Path": "/gevent/c/"}).body)["path-descendant"]
    assert len(listed) == 24
    with ThreadPoolExecutor(8) as ex:
        statuses = list(ex.map(lambda i: http_call(addr, "DELETE", "/v1/file",
                                                   {"Path": f"/gevent/c/{i}"}).status, range(24)))
    assert statuses == [204] * 24
