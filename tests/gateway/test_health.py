"""GET /healthz over real HTTP: ok with a readable group, 503 when none can be read."""
from __future__ import annotations

import json
import signal
import time

from speedy.client import RO, RW, Route, ServerInfo
from speedy.gateway.health import health_line
from tests.support.cluster import Cluster
from tests.support.daemon import wait_ready
from tests.support.gateway import Gateway

FREE = 1 << 30


def server(port: int, status: int) -> ServerInfo:
    return ServerInfo(group_id=1, ip="127.0.0.1", port=port, status=status,
                      max_free_space=FREE, total_free_space=FREE)


def test_health_line_counts_readable_and_writable_groups():
    route = Route({1: [server(1, RW), server(2, RW)], 2: [server(3, RO), server(4, RW)],
                   3: [server(5, RW), server(6, RW)], 4: []})
    every = lambda s: True   # noqa: E731
    assert health_line(route, every, 2) == (True, "ok: 4 groups, 3 readable, 2 writable")
    assert health_line(route, every, 3) == (True, "ok: 4 groups, 3 readable, 0 writable")
    assert health_line(route, lambda s: s.port != 1, 2) == \
        (True, "ok: 4 groups, 3 readable, 1 writable")   # group 1 has one replica left
    assert health_line(route, lambda s: s.port in (1, 3), 2) == \
        (True, "ok: 4 groups, 2 readable, 0 writable")
    assert health_line(route, lambda s: False, 1) == \
        (False, "unavailable: no chunkserver answers (4 groups)")
    assert health_line(Route({}), every, 1) == \
        (False, "unavailable: no chunkserver answers (0 groups)")


def test_healthz_follows_the_chunkservers(tmp_path):
    """ok while a replica answers, 503 once both are killed (the master still lists
    them), ok again after one restart; HEAD answers the same, other methods 405; the
    probes have their metric."""
    c = Cluster(tmp_path, groups=1, per_group=2, chunks=2)
    with c, Gateway(c, tmp_path) as gw:
        status, h, data = gw.request("GET", "/healthz")
        assert (status, data) == (200, b"ok: 1 group, 1 readable, 1 writable\n")
        assert h["cache-control"] == "no-store" and h["content-type"].startswith("text/plain")
        status, h, data = gw.request("HEAD", "/healthz")
        assert (status, data, h["content-length"]) == (200, b"", str(len("ok: 1 group, "
                                                                         "1 readable, 1 writable\n")))
        status, h, data = gw.request("POST", "/healthz", b"")
        assert status == 405 and h["allow"] == "GET, HEAD"
        metrics = gw.request("GET", "/metrics")[2].decode()
        assert 'speedy_gateway_http_requests_total{code="200",route="health"} 2.0' in metrics
        for d in c.servers:
            c.kill(d)

        def unavailable() -> bool:
            return gw.request("GET", "/healthz")[::2] == \
                (503, b"unavailable: no chunkserver answers (1 group)\n")
        wait_ready(unavailable, 10, "/healthz to say 503")
        c.restart(c.servers[0])
        wait_ready(lambda: gw.request("GET", "/healthz")[0] == 200, 40, "/healthz to say 200")
        assert gw.request("GET", "/healthz")[2].startswith(b"ok: 1 group, 1 readable")


def test_drain_says_503_while_it_still_serves(tmp_path):
    """--drain_seconds: after SIGTERM /healthz says 503 and requests are still answered,
    on new connections too; the gateway stops when the drain is over."""
    with Cluster(tmp_path, groups=1, per_group=2, chunks=2) as c, \
            Gateway(c, tmp_path, workers=2, extra=["--drain_seconds=4"]) as gw:
        status, _, data = gw.request("POST", "/blobs", b"still here")
        assert status == 201, data
        key = json.loads(data)["key"]
        assert gw.request("GET", "/healthz")[0] == 200
        t0 = time.monotonic()
        gw.proc.send_signal(signal.SIGTERM)
        wait_ready(lambda: gw.request("GET", "/healthz")[::2] ==
                   (503, b"unavailable: draining before a stop\n"), 3, "/healthz 503")
        for _ in range(10):   # both workers still serve
            assert gw.request("GET", "/" + key)[::2] == (200, b"still here")
        assert gw.proc.wait(30) == 0
        took = time.monotonic() - t0
        assert 3.5 < took < 4 + 20, took
        assert "draining for 4 s before it stops" in open(gw.log).read()
