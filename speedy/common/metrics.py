"""What the daemons' Prometheus metrics share: the request latency buckets.

The metrics themselves are served by prometheus_client (speedy/chunkserver/metrics.py,
speedy/master/metrics.py, speedy/gateway/stats.py). The chunkserver's and the gateway's
workers count latencies in shared memory, one slot per bucket: these bounds are that
layout. Names follow the Prometheus conventions: speedy_ prefix, base units (seconds,
bytes), counters end in _total, no per-fid labels.
"""
from __future__ import annotations

import bisect
from typing import Sequence

# Request latency buckets (seconds) of every daemon: 0.5 ms .. 10 s.
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


def bucket_index(buckets: Sequence[float], seconds: float) -> int:
    """Index of the first bucket with bound >= seconds; len(buckets) means above them all."""
    return bisect.bisect_left(buckets, seconds)
