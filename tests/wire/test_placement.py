"""speedy.wire.placement: the one write placement policy (client and master console)."""
from __future__ import annotations

import random

from speedy.wire.master import GlobalStatus, ServerStatus, Status
from speedy.wire.placement import (choose_group, explain_no_group, group_problem, server_name,
                                   status_name)


def server(port: int, status: int = Status.RW, free: int = 1000, ip: str = "10.0.0.1",
           **kw) -> ServerStatus:
    return ServerStatus(1, ip, port, status=status, max_free_space=free, **kw)


def test_reasons_name_the_servers_and_the_rule():
    assert group_problem([], 10, 2, overhead=30) == "no servers"
    assert group_problem([server(1, Status.RO), server(2, Status.INIT)], 10, 2, overhead=30) \
        == "10.0.0.1:1 is RO, 10.0.0.1:2 is INIT"
    assert group_problem([server(1, global_status=GlobalStatus.TRANSFERRING), server(2)], 10,
                         2, overhead=30) == "transferring"
    assert group_problem([server(1)], 10, 2, overhead=30) == "only 1 RW server(s), need 2"
    assert group_problem([server(1), server(2, free=40)], 10, 2, overhead=30) == \
        "no room for 10 bytes"                      # 10 + 30 is not below 40
    assert group_problem([server(1), server(2, free=41)], 10, 2, overhead=30) is None
    assert group_problem([server(1), server(2, Status.ERR)], 10, 1, overhead=30) is None


def test_choose_and_explain_use_the_same_reasons():
    groups = {1: [server(1), server(2, Status.RO)], 2: [server(3), server(4)]}
    assert choose_group(groups, 10, 2, overhead=30, rng=random.Random(1)) == 2
    assert choose_group(groups, 10, 2, exclude=[2], overhead=30) is None
    assert explain_no_group({1: groups[1]}, 10, 2, overhead=30) == \
        "no writable group for 10 bytes (group 1: 10.0.0.1:2 is RO)"
    assert "route is empty" in explain_no_group({}, 10, 2, overhead=30)


def test_names():
    assert server_name(server(8000, ip="::1")) == "[::1]:8000"
    assert server_name(server(8000)) == "10.0.0.1:8000"
    assert [status_name(s) for s in (0, 1, 2, 3, 9)] == ["INIT", "RW", "RO", "ERR", "9"]
