"""The blob routes with --metadb on PostgreSQL: records shared by the workers (and by
several gateways). Uses the private PostgreSQL instance of tests.support.postgres (from
branch gateway-paths); skipped where that helper or the server binaries are missing."""
from __future__ import annotations

import json

import pytest

from tests.support.cluster import cluster_fixture
from tests.support.gateway import Gateway

pg_support = pytest.importorskip("tests.support.postgres")
cluster = cluster_fixture(groups=1, per_group=2, chunks=2, chunk_size=16 << 20,
                          mem_blocks=16)


@pytest.fixture(scope="module")
def pg_url():
    try:
        instance = pg_support.PostgresInstance()
    except pg_support.PostgresUnavailable as e:
        pytest.skip(str(e))
    with instance as pg:
        yield pg.new_database()


def test_two_gateways_share_the_records(cluster, pg_url, tmp_path):
    with Gateway(cluster, tmp_path, workers=2, metadb=pg_url) as a, \
            Gateway(cluster, tmp_path, workers=1, metadb=pg_url) as b:
        status, _, data = a.request("POST", "/blobs", b"\x00\x01 not sniffable",
                                    {"Content-Type": "image/x-custom"})
        assert status == 201, data
        obj = json.loads(data)
        for gw in (a, b, a, b):   # every worker of both gateways sees the record
            status, h, body = gw.request("GET", "/" + obj["key"])
            assert status == 200 and body == b"\x00\x01 not sniffable"
            assert h["content-type"] == "image/x-custom" and h["etag"] == f'"{obj["etag"]}"'
        assert b.request("DELETE", "/" + obj["key"])[0] == 204
        assert a.request("GET", "/" + obj["key"])[0] == 404
