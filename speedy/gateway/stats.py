"""The gateway's counters, shared by the pre-forked workers in one anonymous mmap.

Each worker owns one slot (a row of int64 counters) and only writes its own, so no lock
is needed; /metrics (on any worker, or on --metrics_port in the supervisor) sums all
slots into Prometheus families with speedy.common.metrics.
"""
from __future__ import annotations

import mmap
from typing import Iterable

from speedy.common.metrics import (LATENCY_BUCKETS, Family, bucket_index, build_info, counter,
                                   histogram, render)

ROUTES = ("upload", "get", "delete", "paths", "metrics", "other")
CODES = (200, 201, 204, 206, 304, 400, 403, 404, 405, 409, 411, 413, 416, 500, 502, 503)
NB = len(LATENCY_BUCKETS) + 1
# per slot: requests[route][code + other] | latency counts[route][NB] | latency sum_us[route]
#           | bytes_in | bytes_out
_REQ = 0
_LAT = _REQ + len(ROUTES) * (len(CODES) + 1)
_SUM = _LAT + len(ROUTES) * NB
_BIN = _SUM + len(ROUTES)
_BOUT = _BIN + 1
SLOT = _BOUT + 1


class GatewayStats:
    """Request counts, latencies and bytes of every worker."""

    def __init__(self, workers: int = 1):
        self.workers = max(1, workers)
        self._map = mmap.mmap(-1, 8 * SLOT * self.workers)   # MAP_SHARED: survives fork
        self._all = memoryview(self._map).cast("q")
        self.slot = 0

    def use_slot(self, index: int) -> None:
        """Count into slot index from now on (one per worker)."""
        self.slot = index % self.workers

    def _base(self) -> int:
        return self.slot * SLOT

    def observe(self, route: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        r = ROUTES.index(route) if route in ROUTES else len(ROUTES) - 1
        c = CODES.index(status) if status in CODES else len(CODES)
        b, a = self._base(), self._all
        a[b + _REQ + r * (len(CODES) + 1) + c] += 1
        a[b + _LAT + r * NB + bucket_index(LATENCY_BUCKETS, seconds)] += 1
        a[b + _SUM + r] += int(seconds * 1e6)

    def add_bytes(self, received: int = 0, sent: int = 0) -> None:
        """Count body bytes received and sent."""
        b = self._base()
        self._all[b + _BIN] += received
        self._all[b + _BOUT] += sent

    def _total(self, offset: int) -> int:
        return sum(self._all[w * SLOT + offset] for w in range(self.workers))

    def families(self) -> list[Family]:
        """The summed figures of all workers as Prometheus families."""
        req = counter("speedy_gateway_http_requests_total", "HTTP requests, by route and status.")
        lat = histogram("speedy_gateway_http_request_duration_seconds",
                        "Time to answer an HTTP request (to the first body byte), by route.")
        for r, route in enumerate(ROUTES):
            for c, code in enumerate(list(CODES) + ["other"]):
                n = self._total(_REQ + r * (len(CODES) + 1) + c)
                if n:
                    req.add(n, {"route": route, "code": code})
            counts = [self._total(_LAT + r * NB + i) for i in range(NB)]
            if any(counts):
                lat.add_histogram(counts, self._total(_SUM + r) / 1e6, {"route": route})
        fams: list[Family] = [build_info(), req, lat]
        fams.append(counter("speedy_gateway_received_bytes_total",
                            "Request body bytes received.").add(self._total(_BIN)))
        fams.append(counter("speedy_gateway_sent_bytes_total",
                            "Response body bytes sent.").add(self._total(_BOUT)))
        return fams

    def render(self, extra: Iterable[Family] = ()) -> bytes:
        """The Prometheus text of families() and extra."""
        return render(list(self.families()) + list(extra))
