"""The gateway's counters, shared by the pre-forked workers in one anonymous mmap, and their
Prometheus families (prometheus_client).

Each worker owns one slot (a row of int64 counters) and only writes its own, so no lock
is needed; a scrape (GET /metrics on any worker, or --metrics_port in the supervisor)
sums all slots into families at scrape time.
"""
from __future__ import annotations

import mmap
from typing import Iterator

from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from speedy import __version__
from speedy.common.metrics import LATENCY_BUCKETS, bucket_index

ROUTES = ("upload", "get", "delete", "paths", "s3", "metrics", "health", "other")
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
ROUTE_INDEX = {route: i for i, route in enumerate(ROUTES)}
CODE_INDEX = {code: i for i, code in enumerate(CODES)}


class GatewayStats(Collector):
    """Request counts, latencies and bytes of every worker; a prometheus_client collector."""

    def __init__(self, workers: int = 1):
        self.workers = max(1, workers)
        self._map = mmap.mmap(-1, 8 * SLOT * self.workers)   # MAP_SHARED: survives fork
        self._all = memoryview(self._map).cast("q")
        self.slot = 0
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(self)

    def use_slot(self, index: int) -> None:
        """Count into slot index from now on (one per worker)."""
        self.slot = index % self.workers

    def observe(self, route: str, status: int, seconds: float) -> None:
        """Count one answered request."""
        r = ROUTE_INDEX.get(route, len(ROUTES) - 1)
        c = CODE_INDEX.get(status, len(CODES))
        b, a = self.slot * SLOT, self._all
        a[b + _REQ + r * (len(CODES) + 1) + c] += 1
        a[b + _LAT + r * NB + bucket_index(LATENCY_BUCKETS, seconds)] += 1
        a[b + _SUM + r] += int(seconds * 1e6)

    def add_bytes(self, received: int = 0, sent: int = 0) -> None:
        """Count body bytes received and sent."""
        b = self.slot * SLOT
        self._all[b + _BIN] += received
        self._all[b + _BOUT] += sent

    def _total(self, offset: int) -> int:
        return sum(self._all[w * SLOT + offset] for w in range(self.workers))

    def collect(self) -> Iterator[Metric]:
        """The summed figures of all workers as Prometheus families."""
        build = GaugeMetricFamily("speedy_build_info", "speedy version, always 1.",
                                  labels=["version"])
        build.add_metric([__version__], 1)
        req = CounterMetricFamily("speedy_gateway_http_requests_total",
                                  "HTTP requests, by route and status.", labels=["route", "code"])
        lat = HistogramMetricFamily("speedy_gateway_http_request_duration_seconds",
                                    "Time to answer an HTTP request (to the first body byte), "
                                    "by route.", labels=["route"])
        bounds = [floatToGoString(b) for b in LATENCY_BUCKETS] + ["+Inf"]
        for r, route in enumerate(ROUTES):
            for c, code in enumerate(list(CODES) + ["other"]):
                n = self._total(_REQ + r * (len(CODES) + 1) + c)
                if n:
                    req.add_metric([route, str(code)], n)
            counts = [self._total(_LAT + r * NB + i) for i in range(NB)]
            if any(counts):
                running = [sum(counts[:i + 1]) for i in range(NB)]
                lat.add_metric([route], list(zip(bounds, running)),
                               self._total(_SUM + r) / 1e6)
        yield from (build, req, lat)
        yield CounterMetricFamily("speedy_gateway_received_bytes_total",
                                  "Request body bytes received.", value=self._total(_BIN))
        yield CounterMetricFamily("speedy_gateway_sent_bytes_total",
                                  "Response body bytes sent.", value=self._total(_BOUT))

    def render(self) -> bytes:
        """The text exposition of every worker's figures (for GET /metrics)."""
        return generate_latest(self.registry)

    def serve(self, ip: str, port: int):
        """Serve the figures on ip:port/metrics from a daemon thread; the server (stop it
        with shutdown() then server_close()). OSError when the address cannot be bound."""
        server, _thread = start_http_server(port, addr=ip, registry=self.registry)
        return server
