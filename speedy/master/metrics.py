"""The master's Prometheus metrics: a prometheus_client registry whose collector reads the
master's state (database and request counts) at scrape time. Served at GET /metrics."""
from __future__ import annotations

import bisect
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, ProcessCollector
from prometheus_client import generate_latest
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)
from prometheus_client.registry import Collector

from speedy import __version__
from speedy.wire.master import Status

CONTENT_TYPE = CONTENT_TYPE_LATEST
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


@dataclass
class Latency:
    """Per-bucket (not cumulative) counts of one route's answer times, last = above all."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(LATENCY_BUCKETS) + 1))
    total: float = 0.0

    def observe(self, seconds: float) -> None:
        """Count one answer."""
        self.counts[bisect.bisect_left(LATENCY_BUCKETS, seconds)] += 1
        self.total += seconds

    def cumulative(self) -> list[tuple[str, float]]:
        """(le, cumulative count) pairs ending with +Inf."""
        out, running = [], 0
        for bound, n in zip(list(LATENCY_BUCKETS) + [float("inf")], self.counts):
            running += n
            out.append(("+Inf" if bound == float("inf") else repr(bound), running))
        return out


@dataclass
class Counts:
    """What the app counts as it serves (everything else is read at scrape time)."""

    requests: dict[tuple[str, int], int] = field(default_factory=dict)
    latency: dict[str, Latency] = field(default_factory=dict)
    heartbeats: int = 0
    silent_to_ro: int = 0
    monitor_errors: int = 0
    deletes_finished: int = 0
    rejected_connections: int = 0

    def observe(self, route: str, status: int, seconds: float) -> None:
        """Count one request."""
        key = (route, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        self.latency.setdefault(route, Latency()).observe(seconds)


@dataclass
class Snapshot:
    """The master's state read at scrape time."""

    servers: list  # speedy.master.db.Chunkserver rows
    fid_high_water: int
    fids_issued: int
    pending_deletes: int
    started: float
    open_connections: int = 0


class MasterCollector(Collector):
    """Turns a Snapshot and the Counts into metric families at every scrape."""

    def __init__(self, snapshot: Callable[[], Snapshot], counts: Counts) -> None:
        self.snapshot, self.counts = snapshot, counts

    def collect(self) -> Iterator[Metric]:
        """Every family, in a stable order."""
        s, c, now = self.snapshot(), self.counts, time.time()
        build = GaugeMetricFamily("speedy_build_info", "speedy version, always 1.",
                                  labels=["version"])
        build.add_metric([__version__], 1)
        yield build
        by_status = GaugeMetricFamily("speedy_master_servers",
                                      "Chunkservers registered, by status.", labels=["status"])
        for st in Status:
            by_status.add_metric([st.name.lower()], sum(1 for cs in s.servers
                                                        if cs.status == st))
        yield by_status
        per_server = [
            ("speedy_master_heartbeat_age_seconds", "Seconds since each chunkserver's last "
             "report.", lambda cs: round(max(0.0, now - cs.update_time), 3)),
            ("speedy_master_server_status", "Status of each chunkserver (0 INIT, 1 RW, 2 RO, "
             "3 ERR).", lambda cs: int(cs.status)),
            ("speedy_master_server_free_bytes", "Free bytes each chunkserver reported "
             "(TotalFreeSpace).", lambda cs: cs.total_free_space),
            ("speedy_master_server_max_free_bytes", "Largest free bytes in one chunk each "
             "chunkserver reported (MaxFreeSpace).", lambda cs: cs.max_free_space),
            ("speedy_master_server_pending_deletes", "Deletes the master still has to "
             "finish on each chunkserver.", lambda cs: cs.pending_deletes),
        ]
        for name, text, value in per_server:
            fam = GaugeMetricFamily(name, text, labels=["group", "server"])
            for cs in s.servers:
                fam.add_metric([str(cs.group_id), f"{cs.ip}:{cs.port}"], value(cs))
            yield fam
        yield GaugeMetricFamily("speedy_master_groups", "Groups known.",
                                value=len({cs.group_id for cs in s.servers}))
        yield CounterMetricFamily("speedy_master_fids_issued_total", "File ids handed out.",
                                  value=s.fids_issued)
        yield GaugeMetricFamily("speedy_master_fid_high_water",
                                "First fid never reserved in the database.",
                                value=s.fid_high_water)
        yield GaugeMetricFamily("speedy_master_pending_deletes",
                                "Deletes the master still has to finish, all servers.",
                                value=s.pending_deletes)
        requests = CounterMetricFamily("speedy_master_http_requests_total",
                                       "HTTP requests, by route and status.",
                                       labels=["route", "code"])
        for (route, code), n in sorted(c.requests.copy().items(),
                                       key=lambda kv: (kv[0][0], kv[0][1])):
            requests.add_metric([route, str(code)], n)
        yield requests
        hist = HistogramMetricFamily("speedy_master_http_request_duration_seconds",
                                     "Time to answer an HTTP request, by route.",
                                     labels=["route"])
        for route, lat in sorted(c.latency.copy().items()):
            hist.add_metric([route], lat.cumulative(), round(lat.total, 6))
        yield hist
        for name, text, value in (
                ("speedy_master_heartbeats_total", "Heartbeats accepted.", c.heartbeats),
                ("speedy_master_silent_to_ro_total", "RW chunkservers turned RO for lack of "
                 "heartbeats.", c.silent_to_ro),
                ("speedy_master_monitor_errors_total", "Failed health checks.", c.monitor_errors),
                ("speedy_master_deletes_finished_total", "Pending deletes the master finished on "
                 "a chunkserver.", c.deletes_finished),
                ("speedy_master_rejected_connections_total", "Connections closed by a limit: "
                 "idle ones evicted and new ones refused.", c.rejected_connections)):
            yield CounterMetricFamily(name, text, value=value)
        yield GaugeMetricFamily("speedy_master_connections", "Open HTTP connections.",
                                value=s.open_connections)
        yield GaugeMetricFamily("speedy_master_start_time_seconds",
                                "Unix time the master started.", value=round(s.started, 3))


class MasterMetrics:
    """The registry: the master's collector plus process_* metrics."""

    def __init__(self, snapshot: Callable[[], Snapshot], counts: Counts) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        self.registry.register(MasterCollector(snapshot, counts))
        ProcessCollector(registry=self.registry)
        self._lock = threading.Lock()

    def render(self) -> bytes:
        """The text exposition format."""
        with self._lock:
            return generate_latest(self.registry)
