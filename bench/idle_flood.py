"""A chunkserver under a flood of idle connections: health-check latency and memory.

Starts a real spy_server.py (2 workers) on loopback, opens --conns idle connections to it
from --sources flood processes (each from its own address 127.0.0.<2+i>), then times
--checks health checks (a new connection, PING, answer, close) and one WRITE + READ, and
prints p50/p99/max, the workers' memory and what the server holds. Run once with the
default limits (the flood is held back) and once with limits that hold every flood
connection (--max_conns_per_ip high), unless --flags is given.

    .venv/bin/python bench/idle_flood.py                      # 20,000 connections, both runs
    .venv/bin/python bench/idle_flood.py --conns 2000 --flags "--max_conns=500"
"""
from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import shlex
import socket
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench.scale import call  # noqa: E402  (one request, its error and body)
from speedy.bench.runner import free_port  # noqa: E402
from speedy.wire.protocol import Err, Op, decode_detail_info, encode_file_key  # noqa: E402


def flood(port: int, source: str, n: int, ready, done) -> None:
    """Open n idle connections from source and hold them until done is set."""
    resource.setrlimit(resource.RLIMIT_NOFILE, (resource.getrlimit(resource.RLIMIT_NOFILE)[1],) * 2)
    socks = []
    failed = 0
    for _ in range(n):
        s = socket.socket()
        try:
            s.bind((source, 0))
            s.settimeout(10)
            s.connect(("127.0.0.1", port))
            socks.append(s)
        except OSError:
            failed += 1
            s.close()
    ready.put((len(socks), failed))
    done.wait()
    closed = 0
    for s in socks:
        s.setblocking(False)
        try:
            closed += s.recv(1) == b""
        except BlockingIOError:
            pass
        except OSError:
            closed += 1
        s.close()
    ready.put(closed)


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    return 0


def workers_of(pid: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    stat = f.read()
                with open(f"/proc/{entry}/comm") as f:
                    comm = f.read().strip()
            except OSError:
                continue
            if int(stat[stat.rindex(")") + 2:].split()[1]) == pid and comm.startswith("spy_worker"):
                out.append(int(entry))
    return sorted(out)


def health_checks(port: int, n: int) -> tuple[list[float], int]:
    """n times: connect, PING, answer, close; the latencies (s) and the failures."""
    lat, failures = [], 0
    for _ in range(n):
        t0 = time.perf_counter()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                if call(s, Op.PING)[0] != Err.SUCCESS:
                    failures += 1
                    continue
        except (OSError, EOFError):
            failures += 1
            continue
        lat.append(time.perf_counter() - t0)
        time.sleep(0.01)
    return lat, failures


def pct(values: list[float], p: float) -> float:
    s = sorted(values)
    return s[min(len(s) - 1, int(len(s) * p))] * 1000 if s else float("nan")


def run(conns: int, sources: int, checks: int, flags: list[str]) -> None:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        argv = [sys.executable, os.path.join(ROOT, "spy_server.py"), f"--port={port}",
                f"--data_dir={tmp}", "--workers=2", "--chunks=2", "--chunk_size=67108864",
                "--mem_blocks=16", "--group_id=1", "--master_ip=127.0.0.1",
                "--master_port=1", "--report_interval=60", f"--error_log={tmp}/log", *flags]
        srv = subprocess.Popen(argv)
        try:
            for _ in range(200):
                try:
                    with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                        call(s, Op.PING)
                    break
                except OSError:
                    time.sleep(0.05)
            workers = workers_of(srv.pid)
            rss0 = [rss_kib(w) for w in workers]
            ready, done = mp.Queue(), mp.Event()
            procs = [mp.Process(target=flood, args=(port, f"127.0.0.{2 + i}", conns // sources,
                                                    ready, done)) for i in range(sources)]
            t0 = time.monotonic()
            for p in procs:
                p.start()
            opened = failed = 0
            for _ in procs:
                o, f = ready.get()
                opened, failed = opened + o, failed + f
            t_open = time.monotonic() - t0
            time.sleep(1.0)
            lat, failures = health_checks(port, checks)
            t1 = time.perf_counter()
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=5) as s:
                    w = Err(call(s, Op.WRITE, encode_file_key(1, 1) + b"x" * 4096)[0]).name
                    r = Err(call(s, Op.READ, encode_file_key(1, 1))[0]).name
                    wr_ms = (time.perf_counter() - t1) * 1000
                    held = decode_detail_info(call(s, Op.QUERY_DETAIL_INFOS)[1]).conn_count
            except (OSError, EOFError) as e:
                w = r = f"failed ({e})"
                wr_ms = (time.perf_counter() - t1) * 1000
                held = -1
            rss1 = [rss_kib(w) for w in workers]
            done.set()
            closed = sum(ready.get() for _ in procs)
            for p in procs:
                p.join()
            print(f"flags: {' '.join(flags) or '(defaults)'}")
            print(f"  flood: {opened} connections opened from {sources} addresses in "
                  f"{t_open:.1f}s ({failed} failed); the server holds {held}, closed "
                  f"{closed} of them to make room")
            print(f"  health check (connect + PING) x{len(lat) + failures}: p50 "
                  f"{pct(lat, 0.5):.1f} ms, p99 {pct(lat, 0.99):.1f} ms, max "
                  f"{max(lat) * 1000 if lat else float('nan'):.1f} ms, {failures} failed")
            print(f"  WRITE + READ of 4 KiB on a new connection: {w}, {r}, "
                  f"{wr_ms:.1f} ms")
            print(f"  worker RSS: {' + '.join(f'{a // 1024}' for a in rss0)} MiB before, "
                  f"{' + '.join(f'{b // 1024}' for b in rss1)} MiB with the flood")
        finally:
            srv.terminate()
            srv.wait(60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--conns", type=int, default=20000)
    ap.add_argument("--sources", type=int, default=10)
    ap.add_argument("--checks", type=int, default=500)
    ap.add_argument("--flags", default=None, help="server flags of a single run")
    args = ap.parse_args()
    runs = [shlex.split(args.flags)] if args.flags is not None else \
        [[], [f"--max_conns_per_ip={args.conns}", f"--max_conns={args.conns}"]]
    for flags in runs:
        run(args.conns, args.sources, args.checks, flags)


if __name__ == "__main__":
    main()
