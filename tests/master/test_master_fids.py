"""kill -9 of spy_master.py during fid allocation, in a loop: no fid is handed out twice."""
from __future__ import annotations

import http.client as httpclient
import json
import random
import sqlite3
import threading
import time

import pytest



def _hammer(port: int, got: list, stop: threading.Event) -> None:
    """GET /fid on one keep-alive connection until stopped or the master dies."""
    conn = httpclient.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        while not stop.is_set():
            conn.request("GET", "/v1/chunkmaster/fid")
            r = conn.getresponse()
            body = r.read()
            assert r.status == 200, body
            d = json.loads(body)
            got.append((d["FidBegin"], d["FidEnd"]))
    except (OSError, httpclient.HTTPException):
        pass  # killed under us: the answer in flight was never received, so not handed out
    finally:
        conn.close()


def _high_water(db: str) -> int:
    """The durable high-water mark, read as a restarted master would (WAL recovered)."""
    c = sqlite3.connect(db, timeout=10)
    try:
        return c.execute("SELECT high_water FROM fid_state WHERE id = 1").fetchone()[0]
    finally:
        c.close()


def kill_loop(masters, tmp_path, ranges: int, kills: int, clients: int = 2,
              seed: int = 1, life: tuple[float, float] = (0.05, 0.6)) -> dict:
    """Take fid ranges from `clients` threads, kill -9 the master at random moments, restart;
    check that every range handed out is fresh and below the durable high-water mark."""
    rng = random.Random(seed)
    m = masters(tmp_path)
    got: list[tuple[int, int]] = []
    done_kills = 0
    t0 = time.monotonic()
    while len(got) < ranges or done_kills < kills:
        stop = threading.Event()
        threads = [threading.Thread(target=_hammer, args=(m.port, got, stop))
                   for _ in range(clients)]
        for t in threads:
            t.start()
        time.sleep(rng.uniform(*life))
        m.kill()  # SIGKILL in the middle of the allocation loop
        stop.set()
        for t in threads:
            t.join(20)
        done_kills += 1
        hw = _high_water(m.db)
        assert not got or max(e for _, e in got) <= hw, "a fid above the durable mark"
        m.start()
    elapsed = time.monotonic() - t0
    assert all(e - b == 100 for b, e in got)
    ordered = sorted(got)
    assert len(set(ordered)) == len(ordered), "a range was handed out twice"
    for (b1, e1), (b2, e2) in zip(ordered, ordered[1:]):
        assert e1 <= b2, f"ranges [{b1},{e1}) and [{b2},{e2}) overlap"
    assert ordered[0][0] >= 1
    return {"ranges": len(got), "kills": done_kills, "seconds": round(elapsed, 1),
            "fids": 100 * len(got)}


def test_kill_9_during_fid_allocation_short(masters, tmp_path):
    figures = kill_loop(masters, tmp_path, ranges=1500, kills=6, life=(0.02, 0.2))
    print("fid kill loop:", figures)


@pytest.mark.slow
def test_kill_9_during_fid_allocation_10000_ranges(masters, tmp_path):
    figures = kill_loop(masters, tmp_path, ranges=10000, kills=100, clients=3, seed=7,
                        life=(0.02, 0.3))
    print("fid kill loop:", figures)
    assert figures["ranges"] >= 10000
