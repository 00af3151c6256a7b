"""The client's side of unfinished deletes and a repair that runs while puts run."""
from __future__ import annotations

import io

from speedy.client import repair
from speedy.client.master import RW, ServerInfo, read_order
from tests.support.cluster import Cluster, blob


def test_read_order_skips_servers_with_pending_deletes():
    servers = [ServerInfo(1, "10.0.0.1", 8000, RW), ServerInfo(1, "10.0.0.2", 8000, RW,
                                                                 pending_deletes=3)]
    assert [s.ip for s in read_order(servers)] == ["10.0.0.1"]
    assert read_order(servers[1:]) == []


def test_repair_counts_a_file_an_inflight_put_wrote_as_in_place(tmp_path):
    with Cluster(tmp_path, groups=1, per_group=2) as c:
        a, b = c.servers
        servers = c.master_api().group_info(1)
        data = blob(3000, 7)
        assert c.pool.write(a.addr, 1, 4242, data).ok  # a put has reached one replica ...
        invs = [repair.take_inventory(c.pool, s, 1) for s in servers]
        assert c.pool.write(b.addr, 1, 4242, data).ok  # ... and the other, after the scan
        copy, delete, lost, _ = repair.plan(invs)
        assert [i.server.port for i in copy[4242]] == [b.port]
        rep = repair.RepairSummary()
        repair.apply_plan(c.pool, invs, 1, copy, delete, rep)
        assert rep.failed == [] and rep.in_place == 1 and rep.copied == 0
        out = io.StringIO()
        assert repair.repair_group(c.pool, servers, 1, out=out).failed == []
