"""Deletes during a replica's outage never come back (issue 11, item 5), for real:
a cluster of one group of two chunkservers, one killed while keys are deleted."""
from __future__ import annotations

import pytest

from speedy.client import NotFoundError
from speedy.wire.manifest import parse_key
from speedy.wire.protocol import Err
from tests.support.cluster import Cluster, blob
from tests.support import wait_for


def _pending(c: Cluster) -> dict[str, int]:
    return {s.name: s.pending_deletes for s in c.master_api().route().groups[1]}


def test_a_delete_during_an_outage_never_comes_back(tmp_path):
    with Cluster(tmp_path, groups=1, per_group=2, heartbeat_timeout=30.0,
                 report_interval=0.3) as c:
        cl = c.client()
        keys = [cl.put(blob(2000, i)) for i in range(12)]
        down = c.servers[1]
        c.kill(down)
        for k in keys:
            assert cl.delete(k) == [down.name_addr]
        assert _pending(c)[down.name_addr] == len(keys)
        c.restart(down)  # it reports again: the master finishes the deletes
        for k in keys:   # never readable again, neither before nor after they are done
            with pytest.raises(NotFoundError):
                cl.get(k)
        wait_for(lambda: _pending(c)[down.name_addr] == 0, timeout=20,
                 what="the master to finish the pending deletes")
        for k in keys:
            assert c.read_direct(down, 1, parse_key(k).fid).err == Err.FILE_NOT_FOUND
            with pytest.raises(NotFoundError):
                c.client().get(k)
        cl.close()
