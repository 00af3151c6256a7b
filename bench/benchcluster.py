"""A temporary master, one group of two chunkservers and a gateway on loopback, for the
gateway benchmarks (bench/gateway.py, bench/s3.py)."""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Iterator

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from speedy.bench.runner import free_port  # noqa: E402
from speedy.cli import local  # noqa: E402
from speedy.client import Master  # noqa: E402


@dataclass
class BenchCluster:
    """Where the cluster runs: its directory and ports."""

    root: str
    master_port: int
    gateway_port: int
    procs: list = field(default_factory=list)


@contextmanager
def bench_cluster(prefix: str, workers: int = 2,
                  gateway_args: list[str] | None = None) -> Iterator[BenchCluster]:
    """Start everything, yield it, stop every process and remove the directory."""
    c = BenchCluster(tempfile.mkdtemp(prefix=prefix), free_port(), free_port())
    root = c.root
    try:
        os.makedirs(f"{root}/master")
        c.procs.append(local.spawn(local.master_cmd(c.master_port, f"{root}/master/m.db",
                                                    f"{root}/master/m.log"), f"{root}/out.log"))
        local.wait_until(lambda: local.listening(c.master_port), 30, "the master")
        master = Master(f"127.0.0.1:{c.master_port}")
        addrs = []
        for i in range(2):
            sport = free_port()
            os.makedirs(f"{root}/cs{i}/data")
            master.init_server(1, "127.0.0.1", sport)
            c.procs.append(local.spawn(local.server_cmd(
                sport, 1, f"{root}/cs{i}/data", f"{root}/cs{i}/s.log", c.master_port,
                chunks=16, chunk_size=256 << 20, mem_blocks=64), f"{root}/out.log"))
            addrs.append(("127.0.0.1", sport))
        local.wait_until(lambda: local.all_rw(master, addrs), 60, "the chunkservers")
        cmd = local.gateway_cmd(c.gateway_port, c.master_port, f"{root}/g.db", f"{root}/g.log",
                                workers=workers) + list(gateway_args or [])
        c.procs.append(local.spawn(cmd, f"{root}/out.log"))
        local.wait_until(lambda: local.listening(c.gateway_port), 30, "the gateway")
        yield c
    finally:
        for proc in reversed(c.procs):
            local.stop_group(proc.pid, root, timeout=20, proc=proc)
        shutil.rmtree(root, ignore_errors=True)
