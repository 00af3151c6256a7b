#!/usr/bin/env python3
"""GET through the HTTP gateway vs straight through the client library, in one run.

Starts a temporary master, one group of two chunkservers and a gateway (`--workers 1`:
on this 2-core machine, shared with the chunkservers and the load, one worker batches
more reads per chunkserver round trip and did 0.45-0.51x where two did 0.34-0.37x)
on loopback, then runs `speedy bench --gateway ... --client-baseline MASTER` for 4 KiB
and 1 MiB blobs (PUT then GET over keep-alive HTTP, the same load through
speedy.client, the sink and disk baselines) and stops everything. "CPU per request:
server" is the gateway's (supervisor and workers).

    .venv/bin/python bench/gateway.py                  # both sizes
    .venv/bin/python bench/gateway.py --size 4k -n 20000 -c 16
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchcluster import bench_cluster  # noqa: E402

RUNS = [("4k", 20000, 16), ("1m", 1000, 8)]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", help="one size only (default: 4k and 1m)")
    p.add_argument("-n", type=int, help="files (default 20000 at 4k, 1000 at 1m)")
    p.add_argument("-c", type=int, help="connections (default 16 at 4k, 8 at 1m)")
    p.add_argument("--workers", type=int, default=1, help="gateway workers (default 1)")
    p.add_argument("--rounds", type=int, default=5,
                   help="GET phases of gateway and client library in turn (default 5)")
    p.add_argument("--no-baseline", action="store_true", help="skip the sink and disk runs")
    p.add_argument("--access-log", metavar="PATH",
                   help="the gateway writes its access log there (default: none)")
    args = p.parse_args()
    defaults = {size: (n, c) for size, n, c in RUNS}
    n0, c0 = defaults.get(args.size, (20000, 16))
    runs = [(args.size, args.n or n0, args.c or c0)] if args.size else RUNS
    extra = [f"--access_log={os.path.abspath(args.access_log)}"] if args.access_log else []
    with bench_cluster("speedy-gwbench-", args.workers, extra) as c:
        for size, n, conns in runs:
            cmd = [sys.executable, "-m", "speedy", "bench", "--gateway",
                   f"127.0.0.1:{c.gateway_port}", "--client-baseline",
                   f"127.0.0.1:{c.master_port}", "--size", size, "-n", str(n), "-c", str(conns),
                   "--disk-dir", c.root, "--disk-size", "64m", "--rounds", str(args.rounds),
                   "--server-pgid", str(c.procs[-1].pid)]  # the gateway's CPU per request
            cmd += ["--no-baseline"] if args.no_baseline else []
            print("$ speedy " + " ".join(cmd[3:]), flush=True)
            subprocess.run(cmd, check=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
