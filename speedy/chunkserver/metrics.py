"""The chunkserver's Prometheus metrics: a prometheus_client collector over the shared counters.

Nothing is counted here: at each scrape the collector asks the supervisor for its totals
(every worker's slot and the writer's values of the counters segment, summed; see
shm/counters.py) and turns them into families. The registry adds the supervisor's
``process_*`` and ``python_*`` metrics. Names follow the Prometheus conventions:
``speedy_`` prefix, base units (seconds, bytes), counters end in ``_total``, no per-fid
labels; opcodes and error codes are bounded label values (``unknown`` for the rest).
"""
from __future__ import annotations

import logging
from enum import IntEnum
from typing import Any, Callable, Iterator, Mapping

from prometheus_client import (CollectorRegistry, GCCollector, PlatformCollector,
                               ProcessCollector, start_http_server)
from prometheus_client.core import (CounterMetricFamily, GaugeMetricFamily,
                                    HistogramMetricFamily, Metric)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from speedy import __version__
from speedy.common.metrics import LATENCY_BUCKETS
from speedy.wire.protocol import Err, Op

log = logging.getLogger("speedy.chunkserver.metrics")

Totals = Mapping[str, Any]

GAUGES = (  # totals key, metric name, help
    ("pool_blocks_in_use", "speedy_pool_blocks_in_use", "Upload memory blocks (1 MiB) in use."),
    ("pool_blocks_total", "speedy_pool_blocks", "Upload memory blocks (1 MiB) in the pool."),
    ("pending_writes", "speedy_pending_writes", "Writes waiting for a chunk with room."),
    ("files", "speedy_files", "Live files stored."),
    ("recovery_seconds", "speedy_recovery_seconds",
     "Seconds the start-up recovery of the chunk files took."),
    ("connections", "speedy_connections", "Open client connections."),
    ("workers", "speedy_workers", "Worker processes alive."),
    ("read_only", "speedy_read_only", "1 when the server is read-only (RO), else 0."),
    ("compacting", "speedy_compacting_chunk", "Id of the chunk being compacted, 0 if none."),
    ("compact_max_slice_seconds", "speedy_compaction_longest_slice_seconds",
     "The longest slice of a compaction: how long a request waited behind it at most."))
BYTE_COUNTERS = (
    ("read_bytes", "speedy_read_bytes_total", "File bytes sent to readers."),
    ("write_bytes", "speedy_write_bytes_total", "File bytes stored by writes."),
    ("compactions", "speedy_compactions_total", "Chunks compacted."),
    ("compact_freed", "speedy_compaction_freed_bytes_total",
     "Bytes compactions gave back to the chunks' avail_space."),
    ("compact_moved", "speedy_compaction_moved_bytes_total",
     "Live record bytes compactions copied."))


def enum_label(kind: type[IntEnum], value: Any) -> str:
    """A member of kind (int, member or name) as a bounded label value, in lower case
    ('write', 'file_not_found'); 'unknown' for anything else."""
    if isinstance(value, str):
        return value.lower() if value.upper() in kind.__members__ else "unknown"
    try:
        return kind(int(value)).name.lower()
    except ValueError:
        return "unknown"


def op_label(op: Any) -> str:
    """An opcode as a label value."""
    return enum_label(Op, op)


def code_label(code: Any) -> str:
    """An error code as a label value."""
    return enum_label(Err, code)


def relabel(mapping: Mapping[Any, float], label: Callable[[Any], Any]) -> dict[Any, float]:
    """The mapping keyed by label(key), values of keys that collapse added up."""
    out: dict[Any, float] = {}
    for key, value in mapping.items():
        new = label(key)
        out[new] = out.get(new, 0) + value
    return out


def latency_family(latency: Mapping[Any, Mapping[str, Any]]) -> HistogramMetricFamily:
    """speedy_request_duration_seconds{op} from {opcode: {"counts": [...], "sum": s}}:
    per-bucket (not cumulative) counts over LATENCY_BUCKETS, the last above them all."""
    n = len(LATENCY_BUCKETS) + 1
    merged: dict[str, tuple[list[int], float]] = {}
    for op, h in latency.items():
        if len(h["counts"]) != n:
            raise ValueError(f"latency of {op_label(op)}: {len(h['counts'])} counts, "
                             f"expected {n}")
        counts, total = merged.get(op_label(op), ([0] * n, 0.0))
        merged[op_label(op)] = ([a + b for a, b in zip(counts, h["counts"])], total + h["sum"])
    fam = HistogramMetricFamily("speedy_request_duration_seconds",
                                "Time from a request's header to its answer, by opcode.",
                                labels=["op"])
    bounds = [floatToGoString(b) for b in LATENCY_BUCKETS] + ["+Inf"]
    for op in sorted(merged):
        counts, total = merged[op]
        running, buckets = 0, []
        for bound, count in zip(bounds, counts):
            running += count
            buckets.append((bound, running))
        fam.add_metric([op], buckets, total)
    return fam


def families(t: Totals) -> list[Metric]:
    """The chunkserver's families from its totals (a missing key leaves its family out).

    Keys: requests {opcode: n}, errors {(opcode, code): n}, read_bytes, write_bytes,
    latency (see latency_family), chunk_free_bytes {chunk name: bytes}, reads_in_flight,
    writes_in_flight, and the gauges of GAUGES.
    """
    build = GaugeMetricFamily("speedy_build_info", "speedy version, always 1.",
                              labels=["version"])
    build.add_metric([__version__], 1)
    fams: list[Metric] = [build]
    if "requests" in t:
        f = CounterMetricFamily("speedy_requests_total", "Requests answered, by opcode.",
                                labels=["op"])
        for op, n in sorted(relabel(t["requests"], op_label).items()):
            f.add_metric([op], n)
        fams.append(f)
    if "errors" in t:
        f = CounterMetricFamily("speedy_request_errors_total",
                                "Requests answered with an error, by opcode and error code.",
                                labels=["op", "code"])
        keyed = relabel(t["errors"], lambda k: (op_label(k[0]), code_label(k[1])))
        for (op, code), n in sorted(keyed.items()):
            f.add_metric([op, code], n)
        fams.append(f)
    for key, name, text in BYTE_COUNTERS:
        if key in t:
            fams.append(CounterMetricFamily(name, text, value=t[key]))
    if "latency" in t:
        fams.append(latency_family(t["latency"]))
    for key, name, text in GAUGES:
        if key in t:
            fams.append(GaugeMetricFamily(name, text, value=t[key]))
    if "reads_in_flight" in t or "writes_in_flight" in t:
        f = GaugeMetricFamily("speedy_requests_in_flight", "Reads and writes being served now.",
                              labels=["kind"])
        for kind in ("read", "write"):
            if f"{kind}s_in_flight" in t:
                f.add_metric([kind], t[f"{kind}s_in_flight"])
        fams.append(f)
    if "chunk_free_bytes" in t:
        f = GaugeMetricFamily("speedy_chunk_free_bytes", "Free bytes per chunk file.",
                              labels=["chunk"])
        for chunk, free in sorted(t["chunk_free_bytes"].items(), key=lambda kv: str(kv[0])):
            f.add_metric([str(chunk)], free)
        fams.append(f)
    if "chunk_garbage_bytes" in t:
        f = GaugeMetricFamily("speedy_chunk_garbage_bytes",
                              "Bytes of deleted records per chunk file (compaction frees them).",
                              labels=["chunk"])
        for chunk, g in sorted(t["chunk_garbage_bytes"].items(), key=lambda kv: str(kv[0])):
            f.add_metric([str(chunk)], g)
        fams.append(f)
    return fams


class ChunkserverCollector(Collector):
    """Reads the server's totals at scrape time (in the scraping thread)."""

    def __init__(self, totals: Callable[[], Totals]) -> None:
        self.totals = totals

    def collect(self) -> Iterator[Metric]:
        try:
            fams = families(self.totals())
        except Exception as e:  # a scrape during the stop, say: process_* metrics only
            log.error("metrics collection failed: %s", e)
            return iter(())
        return iter(fams)


def registry(totals: Callable[[], Totals]) -> CollectorRegistry:
    """A registry of the chunkserver's families and the process's own metrics."""
    reg = CollectorRegistry(auto_describe=False)
    reg.register(ChunkserverCollector(totals))
    ProcessCollector(registry=reg)
    PlatformCollector(registry=reg)
    GCCollector(registry=reg)
    return reg


def serve_metrics(ip: str, port: int, totals: Callable[[], Totals]):
    """Serve the metrics over HTTP on ip:port from a daemon thread; the server (stop it with
    shutdown() then server_close()). OSError when the address cannot be bound."""
    server, _thread = start_http_server(port, addr=ip, registry=registry(totals))
    log.info("metrics on http://%s:%d/metrics", ip, server.server_address[1])
    return server
