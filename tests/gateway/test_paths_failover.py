"""Path routes when daemons fail: reads fail over between replicas; no master is a 503."""
from __future__ import annotations

import time

import pytest

from speedy.client import RW
from speedy.gateway.meta import open_meta
from tests.gateway.conftest import http_call
from tests.support import free_port
from tests.support.cluster import blob, cluster_fixture
from tests.support.gateway import Gateway

PART = 64 << 10
cluster = cluster_fixture(groups=1, per_group=2, heartbeat_timeout=60.0)


@pytest.fixture
def addr_meta(cluster, tmp_path):
    """A gateway daemon (small parts, short timeouts, a sweep every second) and its database."""
    with Gateway(cluster, tmp_path, extra=[f"--part_size={PART}", "--timeout=3",
                                           "--maintenance_interval=1"]) as daemon:
        meta = open_meta(daemon.metadb)
        yield ("127.0.0.1", daemon.port), meta
        meta.close()


def put(addr, path: str, data: bytes):
    return http_call(addr, "POST", "/v1/file", {"Path": path, "Fragment-Index": "0",
                                                "Bytes-Range": f"0-{len(data)}",
                                                "Is-Last": "true"}, data)


def get(addr, path: str, size: int):
    return http_call(addr, "GET", "/v1/file", {"Path": path, "Fragment-Index": "0",
                                               "Bytes-Range": f"0-{size}"})


def test_reads_fail_over_to_the_other_replica(cluster, addr_meta):
    """Fix: the original read one random replica and answered 500 when it was down."""
    addr, _ = addr_meta
    small, large = blob(3000, 11), blob(2 * PART + 5, 12)
    assert put(addr, "/fo/small", small).status == 200
    assert put(addr, "/fo/large", large).status == 200
    for victim in cluster.group(1):
        cluster.kill(victim)
        try:
            assert cluster.statuses().get(victim.addr) == RW   # still tried first, half the time
            for _ in range(6):   # the master still lists the dead server as RW
                a = get(addr, "/fo/small", len(small))
                assert (a.status, a.body) == (200, small), a.body[:200]
                a = get(addr, "/fo/large", len(large))
                assert (a.status, a.body) == (200, large), a.body[:200]
        finally:
            cluster.restart(victim)


def test_no_master_is_503(tmp_path):
    with Gateway(None, tmp_path, master=f"127.0.0.1:{free_port()}") as daemon:
        addr = ("127.0.0.1", daemon.port)
        a = put(addr, "/x", b"abc")
        assert a.status == 503 and a.body.startswith(b"master unavailable"), a.body
        assert http_call(addr, "POST", "/v1/_ping").status == 200


def test_bytes_of_a_delete_during_an_outage_are_freed_later(cluster, addr_meta):
    """DELETE with every replica down answers 204, queues the blob, and worker 0's
    maintenance frees it once the replicas are back."""
    from speedy.wire.protocol import Err
    addr, meta = addr_meta
    assert put(addr, "/outage", b"bytes to free").status == 200
    b = meta.get_fragment("/outage", 0).blob
    servers = cluster.group(1)
    for d in servers:
        cluster.kill(d)
    try:
        a = http_call(addr, "DELETE", "/v1/file", {"Path": "/outage"})
        assert a.status == 204
        assert meta.garbage() == [b]
    finally:
        for d in servers:
            cluster.restart(d)
    deadline = time.monotonic() + 60
    while meta.garbage() and time.monotonic() < deadline:
        time.sleep(0.5)
    assert meta.garbage() == []
    assert all(cluster.read_direct(d, b.group_id, b.fid).err == Err.FILE_NOT_FOUND
               for d in servers)
