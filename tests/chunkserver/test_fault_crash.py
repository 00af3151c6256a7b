"""kill -9 of the whole chunkserver during concurrent --sync=1 writes, again and again.

Each trial starts the real server on the same data dir, lets several connections write
fids concurrently, kills every process of the server with SIGKILL at a random moment,
starts it again and reads back: every acknowledged fid byte for byte, every fid whose
write was in flight either absent or intact. The default run does a few trials; the
`slow` run does 50 and prints the totals.
"""
from __future__ import annotations

import hashlib
import os
import random
import threading
import time

import pytest

from tests.support.server import Client, ServerProc
from speedy.format.chunkfile import SUPERBLOCK_SIZE, Superblock
from speedy.wire.protocol import Err

FLAGS = {"sync": 1, "workers": 2, "chunks": 4, "chunk_size": 64 << 20, "mem_blocks": 32}


def body_of(fid: int, size: int) -> bytes:
    """Deterministic bytes for fid: any mix-up of files or offsets shows."""
    seed = hashlib.sha256(fid.to_bytes(8, "big")).digest()
    return (seed * (size // 32 + 1))[:size]


def writer(port: int, fids: list[int], sizes: dict[int, int], acked: list[int],
           inflight: set[int], stop: threading.Event) -> None:
    """Write fids one by one on one connection until the server dies."""
    try:
        c = Client(port, timeout=10)
    except OSError:
        return
    try:
        for fid in fids:
            if stop.is_set():
                return
            inflight.add(fid)
            err = c.write(fid, body_of(fid, sizes[fid]))
            if err == Err.SUCCESS:
                acked.append(fid)
            inflight.discard(fid)
    except (OSError, EOFError):
        return
    finally:
        c.close()


SMALL_SIZES = (0, 1, 100, 4096, 20000, 70000)
MIXED_SIZES = (100, 4096, 300_000, 1_000_000)  # large records: commits of several chunks at once


def run_trials(tmp_path, trials: int, seed: int, sizes_of: tuple = SMALL_SIZES,
               conns: int = 4) -> dict[str, int]:
    """Run the kill -9 trials; returns the totals."""
    rng = random.Random(seed)
    data_dir = str(tmp_path / "data")
    totals = {"trials": 0, "acked": 0, "lost": 0, "corrupt": 0, "inflight": 0,
              "inflight_present": 0}
    next_fid = 1
    history: dict[int, int] = {}
    for trial in range(trials):
        srv = ServerProc(data_dir, str(tmp_path / "server.log"), flags=dict(FLAGS)).start()
        try:
            per_conn = [list(range(next_fid + i, next_fid + 4000, conns)) for i in range(conns)]
            next_fid += 4000
            sizes = {f: rng.choice(sizes_of)
                     for fl in per_conn for f in fl}
            acked: list[int] = []
            inflight: set[int] = set()
            stop = threading.Event()
            threads = [threading.Thread(target=writer, args=(srv.port, fl, sizes, acked,
                                                             inflight, stop), daemon=True)
                       for fl in per_conn]
            for t in threads:
                t.start()
            time.sleep(rng.uniform(0.05, 0.6))
            srv.kill9()
            stop.set()
            for t in threads:
                t.join(20)
            # in flight when killed: the writers' last fids that got no answer
            pending = set(inflight)
        finally:
            srv.kill9()
        srv = ServerProc(data_dir, str(tmp_path / "server.log"), flags=dict(FLAGS)).start()
        try:
            with srv.client() as c:
                for fid in acked:
                    err, got = c.read(fid)
                    if err != Err.SUCCESS:
                        totals["lost"] += 1
                    elif got != body_of(fid, sizes[fid]):
                        totals["corrupt"] += 1
                for fid in pending:
                    err, got = c.read(fid)
                    if err == Err.SUCCESS:
                        totals["inflight_present"] += 1
                        if got != body_of(fid, sizes[fid]):
                            totals["corrupt"] += 1
                    elif err not in (Err.FILE_NOT_FOUND,):
                        totals["corrupt"] += 1
                # earlier trials' files survive later crashes and recoveries
                for fid in rng.sample(sorted(history), min(50, len(history))):
                    err, got = c.read(fid)
                    if err != Err.SUCCESS or got != body_of(fid, history[fid]):
                        totals["lost"] += 1
        finally:
            srv.stop()
        history.update({f: sizes[f] for f in acked})
        totals["trials"] += 1
        totals["acked"] += len(acked)
        totals["inflight"] += len(pending)
    return totals


def test_kill9_during_synced_writes_loses_nothing_acknowledged(tmp_path):
    totals = run_trials(tmp_path, trials=3, seed=1)
    print("kill -9 trials:", totals)
    assert totals["acked"] > 0
    assert totals["lost"] == 0 and totals["corrupt"] == 0, totals


def chunks_used(data_dir: str) -> int:
    """How many chunk files hold records (their superblock's files_alloc)."""
    used = 0
    for name in os.listdir(data_dir):
        if name.endswith(".chunk"):
            with open(os.path.join(data_dir, name), "rb") as f:
                used += Superblock.decode(f.read(SUPERBLOCK_SIZE)).files_alloc > 0
    return used


def test_kill9_during_parallel_chunk_commits_loses_nothing_acknowledged(tmp_path):
    """Large and small records from 6 connections: the writer commits several chunks at
    once (I/O threads), each with its own fsync; kill -9 loses nothing acknowledged."""
    totals = run_trials(tmp_path, trials=3, seed=3, sizes_of=MIXED_SIZES, conns=6)
    print("kill -9 trials, parallel chunk commits:", totals)
    assert totals["acked"] > 0
    assert totals["lost"] == 0 and totals["corrupt"] == 0, totals
    assert chunks_used(str(tmp_path / "data")) >= 2


@pytest.mark.slow
def test_kill9_fifty_trials(tmp_path):
    totals = run_trials(tmp_path, trials=50, seed=2)
    print("kill -9 trials:", totals)
    assert totals["trials"] == 50 and totals["acked"] > 1000
    assert totals["lost"] == 0 and totals["corrupt"] == 0, totals


@pytest.mark.slow
def test_kill9_thirty_trials_of_parallel_chunk_commits(tmp_path):
    totals = run_trials(tmp_path, trials=30, seed=4, sizes_of=MIXED_SIZES, conns=6)
    print("kill -9 trials, parallel chunk commits:", totals)
    assert totals["trials"] == 30 and totals["acked"] > 300
    assert totals["lost"] == 0 and totals["corrupt"] == 0, totals
