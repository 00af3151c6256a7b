"""Replicas compact on their own (offsets differ, fids do not): `speedy admin repair` works
across a compacted and an uncompacted member, and a delete that reached only one of them
is propagated, never undone; `speedy admin compact`, `admin garbage` and `status`."""
from __future__ import annotations

import json

import pytest

from speedy.wire.protocol import Err, Op, decode_garbage
from tests.support.cluster import Cluster, blob
from tests.support import wait_for

GROUP = 1


@pytest.fixture
def cluster(tmp_path):
    c = Cluster(tmp_path, groups=1, per_group=2, chunks=2, chunk_size=4 << 20)
    for d in c.servers:  # only the command compacts here
        d.cmd.append("--compact_threshold=0")
    with c:
        yield c


def garbage_of(cluster: Cluster, d) -> int:
    reply = cluster.pool.call(d.addr, Op.QUERY_GARBAGE)
    assert reply.ok
    return sum(g.garbage_bytes for g in decode_garbage(reply.body)[1])


def test_repair_across_a_compacted_and_an_uncompacted_replica(cluster):
    a, b = cluster.group(GROUP)
    keys = {}
    with cluster.client() as c:
        for i in range(60):
            data = blob(20_000 + 37 * i, i)
            keys[c.put(data)] = data
        fids = {k: int(k.split(",")[1]) for k in keys}
        names = sorted(keys)
        for k in names[:30]:  # deleted everywhere
            c.delete(k)
        only_a = names[30:35]  # a DELETE that reached a only
        for k in only_a:
            assert cluster.pool.delete(a.addr, GROUP, fids[k]).err == Err.SUCCESS
    assert garbage_of(cluster, a) > 0
    r = cluster.cli("admin", "compact", str(GROUP), "--server", a.name_addr, "--threshold",
                    "0", "--wait", timeout=120)
    assert r.returncode == 0, r.stderr.decode()
    assert "chunks compacted" in r.stdout.decode() and "freed" in r.stdout.decode()
    assert garbage_of(cluster, a) == 0 and garbage_of(cluster, b) > 0
    r = cluster.cli("admin", "garbage", str(GROUP))
    assert r.returncode == 0 and b.name_addr in r.stdout.decode(), r.stderr.decode()
    wait_for(lambda: any(row["garbage"] > 0 for row in json.loads(
        cluster.cli("status", "--json").stdout)["servers"]), timeout=20)  # b's, reported
    assert "GARBAGE" in cluster.cli("status").stdout.decode()

    r = cluster.cli("admin", "repair", str(GROUP), timeout=300)
    out = r.stdout.decode()
    assert r.returncode == 0, out + r.stderr.decode()
    for k, data in keys.items():
        for d in (a, b):
            reply = cluster.read_direct(d, GROUP, fids[k])
            if k in names[:35]:  # deleted: on both now (the one-sided delete propagated)
                assert reply.err == Err.FILE_NOT_FOUND, (k, d.name)
            else:
                assert (reply.err, bytes(reply.body)) == (Err.SUCCESS, data), (k, d.name)
    # b compacts too; offsets differ, a second repair finds nothing to do
    assert cluster.cli("admin", "compact", str(GROUP), "--threshold", "0",
                       "--wait", timeout=120).returncode == 0
    r = cluster.cli("admin", "repair", str(GROUP), timeout=300)
    out = r.stdout.decode()
    assert r.returncode == 0 and "copied 0" in out and "deleted 0" in out, out
