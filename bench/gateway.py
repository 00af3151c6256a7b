#!/usr/bin/env python3
"""GET through the HTTP gateway vs straight through the client library, in one run.

Starts a temporary master, one group of two chunkservers and a gateway (`--workers 2`)
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
import shutil
import socket
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from speedy.cli import local  # noqa: E402
from speedy.client import Master  # noqa: E402

RUNS = [("4k", 5000, 16), ("1m", 500, 8)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", help="one size only (default: 4k and 1m)")
    p.add_argument("-n", type=int, help="files (default 5000 at 4k, 500 at 1m)")
    p.add_argument("-c", type=int, help="connections (default 16 at 4k, 8 at 1m)")
    p.add_argument("--workers", type=int, default=2, help="gateway workers (default 2)")
    p.add_argument("--no-baseline", action="store_true", help="skip the sink and disk runs")
    args = p.parse_args()
    runs = [(args.size, args.n or 5000, args.c or 16)] if args.size else RUNS
    root = tempfile.mkdtemp(prefix="speedy-gwbench-")
    procs: list = []
    try:
        mport, gport = free_port(), free_port()
        os.makedirs(f"{root}/master")
        procs.append(local.spawn(local.master_cmd(mport, f"{root}/master/m.db",
                                                  f"{root}/master/m.log"), f"{root}/out.log"))
        local.wait_until(lambda: local.listening(mport), 30, "the master")
        master = Master(f"127.0.0.1:{mport}")
        addrs = []
        for i in range(2):
            sport = free_port()
            os.makedirs(f"{root}/cs{i}/data")
            master.init_server(1, "127.0.0.1", sport)
            procs.append(local.spawn(local.server_cmd(
                sport, 1, f"{root}/cs{i}/data", f"{root}/cs{i}/s.log", mport, chunks=8,
                chunk_size=256 << 20, mem_blocks=64), f"{root}/out.log"))
            addrs.append(("127.0.0.1", sport))
        local.wait_until(lambda: local.all_rw(master, addrs), 60, "the chunkservers")
        procs.append(local.spawn(local.gateway_cmd(gport, mport, f"{root}/g.db", f"{root}/g.log",
                                                   workers=args.workers), f"{root}/out.log"))
        local.wait_until(lambda: local.listening(gport), 30, "the gateway")
        for size, n, c in runs:
            cmd = [sys.executable, "-m", "speedy", "bench", "--gateway", f"127.0.0.1:{gport}",
                   "--client-baseline", f"127.0.0.1:{mport}", "--size", size, "-n", str(n),
                   "-c", str(c), "--disk-dir", root, "--disk-size", "64m",
                   "--server-pgid", str(procs[-1].pid)]  # the gateway's CPU per request
            cmd += ["--no-baseline"] if args.no_baseline else []
            print("$ speedy " + " ".join(cmd[3:]), flush=True)
            subprocess.run(cmd, check=False)
    finally:
        for proc in reversed(procs):
            local.stop_group(proc.pid, root, timeout=20, proc=proc)
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
