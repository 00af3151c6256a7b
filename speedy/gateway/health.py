"""GET /healthz: whether this gateway can serve blobs, for load balancers and probes.

    200  ok: 2 groups, 2 readable, 1 writable
    503  unavailable: no route from the master (...)
    503  unavailable: no chunkserver answers (2 groups)
    503  unavailable: draining before a stop

The worker takes its route (the client library's: refetched from the master when older
than its TTL, the last one kept while the master is down) and PINGs every chunkserver in
it, all at once. A group is readable when one of its chunkservers answers, writable when
the placement rule would choose it and every chunkserver answers. 200 means at least one
group is readable: reads can be served (writes need a writable group too: the count is
in the body, not in the status, so that a full or read-only cluster still serves its
reads through the balancer). The master keeps a silent chunkserver in its route (as RO),
hence the PINGs. A chunkserver that has not answered within PING_WAIT seconds counts as
down. A worker answers probes from one round of PINGs for CACHE_SECONDS and runs one
round at a time (probes that come meanwhile wait for it), so a probe every few
milliseconds costs at most one round a second. From SIGTERM to the stop the worker
drains (--drain_seconds): requests are served, /healthz says 503 so that balancers take
the gateway out before it stops accepting.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import Executor, wait
from typing import TYPE_CHECKING, Callable

from speedy.client import ClusterError, Route, ServerInfo, choose_group
from speedy.client.chunkconn import ConnPool
from speedy.gateway.http import HTTPError, Request, Response

if TYPE_CHECKING:
    from speedy.gateway.app import GatewayApp

CACHE_SECONDS = 1.0
PING_WAIT = 2.0          # seconds a round of PINGs waits for the slowest answer
HEADERS = [("Cache-Control", "no-store")]


def health_line(route: Route, answers: Callable[[ServerInfo], bool],
                min_replicas: int) -> tuple[bool, str]:
    """(healthy, one line) for a route, given which chunkservers answered."""
    groups = route.groups
    readable = writable = 0
    for g, servers in groups.items():
        up = [answers(s) for s in servers]
        readable += any(up)
        writable += bool(servers) and all(up) and \
            choose_group({g: servers}, 0, min_replicas) is not None
    n = f"{len(groups)} group{'' if len(groups) == 1 else 's'}"
    if not readable:
        return False, f"unavailable: no chunkserver answers ({n})"
    return True, f"ok: {n}, {readable} readable, {writable} writable"


def ping_all(pool: ConnPool, route: Route, io: Executor) -> set[tuple[str, int]]:
    """The addresses in route whose chunkserver answers PING (all asked at once)."""
    addrs = {s.addr for servers in route.groups.values() for s in servers}

    def ping(addr: tuple[str, int]) -> bool:
        try:
            return pool.ping(addr).ok
        except Exception:  # noqa: BLE001 (any failure: it does not answer)
            return False
    futures = {addr: io.submit(ping, addr) for addr in addrs}
    wait(futures.values(), timeout=PING_WAIT)
    return {addr for addr, f in futures.items() if f.done() and f.result()}


class HealthCheck:
    """One worker's /healthz, answered from PINGs at most CACHE_SECONDS old."""

    def __init__(self) -> None:
        self._answer: tuple[float, int, str] = (-CACHE_SECONDS, 0, "")
        self._lock = threading.Lock()   # one round of PINGs at a time
        self.draining = False   # set on SIGTERM with --drain_seconds

    def check(self, app: "GatewayApp", req: Request) -> Response:
        """The answer to GET or HEAD /healthz."""
        if req.method not in ("GET", "HEAD"):
            raise HTTPError(405, "use GET for /healthz", [("Allow", "GET, HEAD")])
        if self.draining:
            return Response.text(503, "unavailable: draining before a stop", HEADERS)
        at, status, line = self._answer
        if time.monotonic() - at >= CACHE_SECONDS:
            with self._lock:
                at, status, line = self._answer
                if time.monotonic() - at >= CACHE_SECONDS:   # nobody probed meanwhile
                    status, line = self.probe(app)
                    self._answer = (time.monotonic(), status, line)
        return Response.text(status, line, HEADERS)

    def probe(self, app: "GatewayApp") -> tuple[int, str]:
        """(status, line) from the route and a round of PINGs."""
        try:
            route = app.client.route()
        except ClusterError as e:
            return 503, f"unavailable: no route from the master ({e})"
        up = ping_all(app.client.pool, route, app.io)
        healthy, line = health_line(route, lambda s: s.addr in up, app.client.min_replicas)
        return (200 if healthy else 503), line
