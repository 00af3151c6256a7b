"""Prometheus metrics in text exposition format 0.0.4, rendered without a dependency.

    # HELP speedy_master_http_requests_total HTTP requests, by route and status.
    # TYPE speedy_master_http_requests_total counter
    speedy_master_http_requests_total{route="/v1/chunkmaster/fid",code="200"} 42

Families are built fresh for every scrape (no global state): the master turns its
figures into families with master_families(). The chunkserver's metrics are served by
prometheus_client (speedy/chunkserver/metrics.py); it shares LATENCY_BUCKETS and
bucket_index (the layout of its counters segment). Names follow the Prometheus
conventions: speedy_ prefix, base units (seconds, bytes), counters end in _total, no
per-fid labels.
"""
from __future__ import annotations

import bisect
import math
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping, Sequence

from speedy import __version__

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
KINDS = ("counter", "gauge", "histogram", "untyped")
NAME_RE = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
LABEL_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
HISTOGRAM_SUFFIXES = ("_bucket", "_sum", "_count")

# Request latency buckets (seconds) of both daemons: 0.5 ms .. 10 s.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

Labels = Mapping[str, Any]


def format_value(value: float) -> str:
    """A sample value as Prometheus writes it (+Inf, -Inf, NaN, integers without .0)."""
    if isinstance(value, bool):
        return "1" if value else "0"
    if isinstance(value, int):
        return str(value)
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


def format_bound(bound: float) -> str:
    """A histogram bucket bound for the le label (0.5, 1.0, +Inf)."""
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def escape_label_value(text: str) -> str:
    """Escape backslash, double quote and newline in a label value."""
    return text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def escape_help(text: str) -> str:
    """Escape backslash and newline in a HELP text."""
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def bucket_index(buckets: Sequence[float], seconds: float) -> int:
    """Index of the first bucket with bound >= seconds; len(buckets) means above them all."""
    return bisect.bisect_left(buckets, seconds)


@dataclass
class Sample:
    """One line: family name + suffix, labels, value."""

    suffix: str
    labels: tuple[tuple[str, str], ...]
    value: float


@dataclass
class Family:
    """A metric family: name, kind, help text and its samples."""

    name: str
    kind: str
    help: str
    buckets: tuple[float, ...] = ()
    samples: list[Sample] = field(default_factory=list)
    _seen: set = field(default_factory=set, repr=False, compare=False)

    def __post_init__(self) -> None:
        if not NAME_RE.match(self.name) or self.name.startswith("__"):
            raise ValueError(f"invalid metric name {self.name!r}")
        if self.kind not in KINDS:
            raise ValueError(f"invalid metric type {self.kind!r} for {self.name}")
        if self.kind == "counter" and not self.name.endswith("_total"):
            raise ValueError(f"counter {self.name} must end in _total")
        if self.kind == "histogram":
            if self.name.endswith(HISTOGRAM_SUFFIXES):
                raise ValueError(f"histogram name {self.name} must not end in _bucket/_sum/_count")
            bounds = tuple(float(b) for b in self.buckets if not math.isinf(b))
            if not bounds or list(bounds) != sorted(set(bounds)):
                raise ValueError(f"histogram {self.name} needs increasing finite buckets")
            self.buckets = bounds
        elif self.buckets:
            raise ValueError(f"only histograms have buckets ({self.name})")

    def _labels(self, labels: Labels | None) -> tuple[tuple[str, str], ...]:
        """Checked, stringified labels, in the given order; rejects a repeated label set."""
        pairs = tuple((str(k), str(v)) for k, v in (labels or {}).items())
        for key, _ in pairs:
            if not LABEL_RE.match(key) or key.startswith("__"):
                raise ValueError(f"invalid label name {key!r} on {self.name}")
            if key == "le" and self.kind == "histogram":
                raise ValueError(f"label le is reserved on histogram {self.name}")
        ident = tuple(sorted(pairs))
        if ident in self._seen:
            raise ValueError(f"duplicate sample {self.name}{dict(pairs)}")
        self._seen.add(ident)
        return pairs

    def add(self, value: float, labels: Labels | None = None) -> "Family":
        """Add one counter/gauge sample."""
        if self.kind == "histogram":
            raise ValueError(f"use add_histogram on histogram {self.name}")
        if self.kind == "counter" and not value >= 0:
            raise ValueError(f"counter {self.name} cannot be {value}")
        self.samples.append(Sample("", self._labels(labels), value))
        return self

    def add_histogram(self, counts: Sequence[int], total: float,
                      labels: Labels | None = None) -> "Family":
        """Add one histogram from per-bucket counts (not cumulative; one more than buckets:
        the last counts observations above the largest bound) and the sum of observations."""
        if self.kind != "histogram":
            raise ValueError(f"{self.name} is not a histogram")
        if len(counts) != len(self.buckets) + 1:
            raise ValueError(f"{self.name}: {len(counts)} counts for "
                             f"{len(self.buckets)} buckets (+1 overflow expected)")
        if any(c < 0 for c in counts):
            raise ValueError(f"{self.name}: negative bucket count")
        pairs = self._labels(labels)
        running = 0
        for bound, count in zip(self.buckets + (math.inf,), counts):
            running += count
            self.samples.append(Sample("_bucket", pairs + (("le", format_bound(bound)),),
                                       running))
        self.samples.append(Sample("_sum", pairs, total))
        self.samples.append(Sample("_count", pairs, running))
        return self


def counter(name: str, help: str) -> Family:
    """A new counter family (name must end in _total)."""
    return Family(name, "counter", help)


def gauge(name: str, help: str) -> Family:
    """A new gauge family."""
    return Family(name, "gauge", help)


def histogram(name: str, help: str, buckets: Sequence[float] = LATENCY_BUCKETS) -> Family:
    """A new histogram family with the given upper bounds (+Inf is implied)."""
    return Family(name, "histogram", help, tuple(buckets))


@dataclass
class HistogramData:
    """An in-process histogram accumulator (one per label set), for add_histogram."""

    buckets: tuple[float, ...] = LATENCY_BUCKETS
    counts: list[int] = field(default_factory=list)
    total: float = 0.0

    def __post_init__(self) -> None:
        if not self.counts:
            self.counts = [0] * (len(self.buckets) + 1)

    def observe(self, seconds: float) -> None:
        """Count one observation."""
        self.counts[bucket_index(self.buckets, seconds)] += 1
        self.total += seconds


def render(families: Iterable[Family]) -> bytes:
    """The text exposition (format 0.0.4) of the families, UTF-8."""
    out: list[str] = []
    names: set[str] = set()
    for fam in families:
        if fam.name in names:
            raise ValueError(f"metric family {fam.name} rendered twice")
        names.add(fam.name)
        out.append(f"# HELP {fam.name} {escape_help(fam.help)}\n")
        out.append(f"# TYPE {fam.name} {fam.kind}\n")
        for s in fam.samples:
            if s.labels:
                inner = ",".join(f'{k}="{escape_label_value(v)}"' for k, v in s.labels)
                out.append(f"{fam.name}{s.suffix}{{{inner}}} {format_value(s.value)}\n")
            else:
                out.append(f"{fam.name}{s.suffix} {format_value(s.value)}\n")
    return "".join(out).encode("utf-8")


class Registry:
    """Collect callables, each returning families; collect() concatenates them."""

    def __init__(self) -> None:
        self._collectors: list[Callable[[], list[Family]]] = []
        self._lock = threading.Lock()

    def register(self, collect: Callable[[], list[Family]]) -> None:
        """Add a collector, called on every scrape."""
        with self._lock:
            self._collectors.append(collect)

    def collect(self) -> list[Family]:
        """Every registered collector's families, in registration order."""
        with self._lock:
            collectors = list(self._collectors)
        families: list[Family] = []
        for c in collectors:
            families.extend(c())
        return families


# --- WSGI -------------------------------------------------------------------------


def metrics_wsgi_response(families: Iterable[Family]) -> tuple[str, list[tuple[str, str]], bytes]:
    """(status, headers, body) of a /metrics answer, for a WSGI app."""
    body = render(families)
    return "200 OK", [("Content-Type", CONTENT_TYPE),
                      ("Content-Length", str(len(body)))], body


# --- the daemons' metric sets ---------------------------------------------------------


def _summed(mapping: Mapping[Any, float], key: Callable[[Any], Any]) -> dict[Any, float]:
    """Re-key a mapping, adding up values whose keys collapse (e.g. unknown opcodes)."""
    out: dict[Any, float] = {}
    for k, v in mapping.items():
        nk = key(k)
        out[nk] = out.get(nk, 0) + v
    return out


def _histograms(fam: Family, data: Mapping[Any, Mapping[str, Any]], label: str,
                key: Callable[[Any], str]) -> Family:
    """Fill fam from {label_key: {"counts": [...], "sum": s}}, summing collapsed keys."""
    merged: dict[str, tuple[list[int], float]] = {}
    for k, h in data.items():
        nk = key(k)
        counts, total = merged.get(nk, ([0] * (len(fam.buckets) + 1), 0.0))
        if len(h["counts"]) != len(counts):
            raise ValueError(f"{fam.name}: {len(h['counts'])} counts for {nk}, "
                             f"expected {len(counts)}")
        merged[nk] = ([a + b for a, b in zip(counts, h["counts"])], total + h["sum"])
    for nk in sorted(merged):
        counts, total = merged[nk]
        fam.add_histogram(counts, total, {label: nk})
    return fam


def build_info() -> Family:
    """speedy_build_info{version} 1."""
    return gauge("speedy_build_info", "speedy version, always 1.").add(1, {"version": __version__})


MASTER_STATUS = {0: "init", 1: "rw", 2: "ro", 3: "err"}


def status_label(status: Any) -> str:
    """A master-side chunkserver status (0..3 or name) as a label value."""
    if isinstance(status, str):
        return status.lower() if status.lower() in MASTER_STATUS.values() else "unknown"
    return MASTER_STATUS.get(int(status), "unknown")


def master_families(totals: Mapping[str, Any]) -> list[Family]:
    """The master's families.

    Keys of totals (each optional):
      servers_by_status     {status: count}             status 0..3 or INIT/RW/RO/ERR
                            (every status is shown, 0 when absent)
      heartbeat_age_seconds {(group_id, "ip:port"): s}  seconds since each server's report
      groups                int                          groups known
      fids_issued           int                          fids handed out (high-water mark - 1)
      requests              {(route, http_status): n}   HTTP requests answered
      latency               {route: {"counts": [...], "sum": s}}  per-bucket (not
                            cumulative) counts, the last above LATENCY_BUCKETS
    """
    fams: list[Family] = [build_info()]
    if "servers_by_status" in totals:
        f = gauge("speedy_master_servers", "Chunkservers registered, by status.")
        by = _summed(totals["servers_by_status"], status_label)
        for name in list(MASTER_STATUS.values()) + sorted(set(by) - set(MASTER_STATUS.values())):
            f.add(by.get(name, 0), {"status": name})
        fams.append(f)
    if "heartbeat_age_seconds" in totals:
        f = gauge("speedy_master_heartbeat_age_seconds",
                  "Seconds since each chunkserver's last report.")
        for (group, server), age in sorted(totals["heartbeat_age_seconds"].items(),
                                           key=lambda kv: (int(kv[0][0]), str(kv[0][1]))):
            f.add(age, {"group": group, "server": server})
        fams.append(f)
    if "groups" in totals:
        fams.append(gauge("speedy_master_groups", "Groups known.").add(totals["groups"]))
    if "fids_issued" in totals:
        fams.append(counter("speedy_master_fids_issued_total",
                            "File ids handed out.").add(totals["fids_issued"]))
    if "requests" in totals:
        f = counter("speedy_master_http_requests_total", "HTTP requests, by route and status.")
        for (route, code), n in sorted(totals["requests"].items(),
                                       key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
            f.add(n, {"route": route, "code": code})
        fams.append(f)
    if "latency" in totals:
        fams.append(_histograms(
            histogram("speedy_master_http_request_duration_seconds",
                      "Time to answer an HTTP request, by route."),
            totals["latency"], "route", str))
    return fams
