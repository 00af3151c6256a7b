"""Pipelined READs (speedy.client.pipeline) against a real chunkserver: every caller gets
its own answer in any interleaving, dead and silent connections fail or retry, never hang."""
from __future__ import annotations

import os
import random
import signal
import socket
import threading
import time
from contextlib import closing

import pytest

from tests.support.cluster import Cluster
from tests.support.server import servers  # noqa: F401 (fixture)

from speedy.client.chunkconn import ChunkError, ConnPool
from speedy.client.client import LARGE_READ
from speedy.client.pipeline import Pipe, PipeSet
from speedy.wire.protocol import Err


def stored(pool: ConnPool, addr, sizes: dict[int, int]) -> dict[int, bytes]:
    """Write one blob per fid (of the given sizes) through a plain pool; {fid: bytes}."""
    blobs = {}
    for fid, size in sizes.items():
        data = os.urandom(size)
        assert pool.write(addr, 1, fid, data).ok
        blobs[fid] = data
    return blobs


def test_concurrent_callers_each_get_their_own_answer(servers):
    srv = servers("cs")
    addr = ("127.0.0.1", srv.port)
    kinds = [0, 1, 4096, 70_000, 300_000]   # the last one is a large answer
    sizes = {fid: kinds[fid % len(kinds)] for fid in range(1, 41)}   # 3 MB in all
    with closing(ConnPool()) as pool:
        blobs = stored(pool, addr, sizes)
    pipes = PipeSet(timeout=10, max_pipes=3)
    errors: list[str] = []

    def reader(seed: int) -> None:
        rnd = random.Random(seed)
        for _ in range(60):
            fid = rnd.choice(list(blobs) + [999])   # 999: not stored
            r = pipes.read(addr, 1, fid)
            if fid == 999:
                if r.err != Err.FILE_NOT_FOUND:
                    errors.append(f"fid 999: {r.err}")
            elif not r.ok or bytes(r.body) != blobs[fid]:
                errors.append(f"fid {fid}: wrong answer ({r.err}, {len(r.body)} bytes)")

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(12)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(60)
        assert not any(t.is_alive() for t in threads)
        assert errors == []
        live = pipes._pipes[addr]
        assert 1 <= len(live) <= 3   # twelve callers shared at most max_pipes connections
    finally:
        pipes.close()


def test_small_answers_share_one_connection_and_a_large_one_makes_room(servers):
    srv = servers("cs")
    addr = ("127.0.0.1", srv.port)
    with closing(ConnPool()) as pool:
        blobs = stored(pool, addr, {1: 4096, 2: 4096, 3: 3 << 20})
    with closing(PipeSet(timeout=10)) as pipes:
        threads = [threading.Thread(target=lambda f=f: pipes.read(addr, 1, f))
                   for f in [1, 2] * 20]
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
        assert len(pipes._pipes[addr]) == 1   # forty small reads, one connection
        [first] = pipes._pipes[addr]
        caught = False
        for _ in range(20):   # until a choice is made while the 3 MiB answer streams
            big = threading.Thread(target=lambda: pipes.read(addr, 1, 3))
            big.start()
            deadline = time.monotonic() + 10
            while not first.large and big.is_alive() and time.monotonic() < deadline:
                time.sleep(0.0005)
            if first.large:
                chosen = pipes._pipe(addr)
                if first.large:   # streaming before and after: the choice went around it
                    assert chosen is not first
                    assert bytes(chosen.read(1, 1).body) == blobs[1]
                    caught = True
            big.join(30)
            if caught:
                break
        assert caught, "no pipe was chosen while a large answer streamed"
        assert bytes(pipes.read(addr, 1, 2).body) == blobs[2]


def test_a_connection_the_server_closed_is_replaced_without_an_error(servers):
    srv = servers("cs", idle_timeout=1)
    addr = ("127.0.0.1", srv.port)
    with closing(ConnPool()) as pool:
        blobs = stored(pool, addr, {5: 3000})
    with closing(PipeSet(timeout=10)) as pipes:
        assert bytes(pipes.read(addr, 1, 5).body) == blobs[5]
        [first] = pipes._pipes[addr]
        deadline = time.monotonic() + 20
        while not first.dead and time.monotonic() < deadline:
            time.sleep(0.1)       # the server drops the idle connection
        assert first.dead
        assert bytes(pipes.read(addr, 1, 5).body) == blobs[5]
        srv.stop()
        srv.start()               # same port: the pipe made before the restart is dead
        assert bytes(pipes.read(addr, 1, 5).body) == blobs[5]


def test_a_silent_server_fails_every_waiting_caller_within_the_timeout(servers):
    srv = servers("cs")
    addr = ("127.0.0.1", srv.port)
    with closing(ConnPool()) as pool:
        stored(pool, addr, {6: 100})
    pipe = Pipe(addr, timeout=1.0)
    results: list[str] = []

    def call() -> None:
        try:
            pipe.read(1, 6)
            results.append("answered")
        except ChunkError as e:
            results.append(str(e))

    os.killpg(srv.pid, signal.SIGSTOP)
    try:
        t0 = time.monotonic()
        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        took = time.monotonic() - t0
    finally:
        os.killpg(srv.pid, signal.SIGCONT)
    assert not any(t.is_alive() for t in threads)
    assert len(results) == 4 and all("timed out" in r for r in results), results
    assert took < 5
    assert pipe.dead


def test_an_answer_nobody_asked_for_ends_the_pipe_with_an_error():
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen()
        addr = listener.getsockname()

        def serve() -> None:   # a peer that answers a READ with a PING response
            conn, _ = listener.accept()
            with conn:
                conn.recv(100)
                conn.sendall(bytes([10, 0, 0, 0, 0, 0]))
                time.sleep(1)

        t = threading.Thread(target=serve)
        t.start()
        pipe = Pipe(addr, timeout=5)
        with pytest.raises(ChunkError, match="opcode 10"):
            pipe.read(1, 1)
        t.join()
        assert pipe.dead


def test_client_reads_fail_over_between_replicas_through_pipes(tmp_path):
    with Cluster(tmp_path, groups=1, per_group=2) as cluster, \
            cluster.client(pipelined=True, timeout=5) as c:
        key = c.put(b"pipelined" * 1000)
        for _ in range(4):
            assert c.get(key) == b"pipelined" * 1000
        assert isinstance(c.reads, PipeSet) and c.reads._pipes   # reads went through pipes
        cluster.kill(cluster.servers[0])
        for _ in range(4):   # whichever replica it tries first, the read answers
            assert c.get(key) == b"pipelined" * 1000


def test_a_large_read_takes_a_connection_of_its_own(tmp_path):
    big = os.urandom(LARGE_READ + 1)
    with Cluster(tmp_path, groups=1, per_group=2) as cluster, \
            cluster.client(pipelined=True, timeout=5, part_size=1 << 20) as c:
        small_key, big_key = c.put(b"small"), c.put(big)
        assert bytes(c.read(big_key, size_hint=len(big))) == big
        assert not c.reads._pipes and any(c.pool._idle.values())   # the pool, no pipe
        assert bytes(c.read(small_key)) == b"small"
        assert c.reads._pipes                                    # small: through a pipe
        assert bytes(c.read(big_key)) == big   # no hint: a pipe too, the answer whole
        with pytest.raises(ValueError, match="multi-part"):
            c.read(c.put(os.urandom((1 << 20) + 1)))
