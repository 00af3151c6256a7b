"""The gateway under faults: vanishing clients, a dead chunkserver, a dead master, memory."""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import time

from speedy.gateway.health import CACHE_SECONDS as PING_CACHE, PING_WAIT
from speedy.wire.protocol import Err
from tests.support.cluster import Cluster, blob
from tests.support.daemon import wait_ready
from tests.support.gateway import Gateway

CLUSTER = dict(groups=1, per_group=2, chunks=4, chunk_size=32 << 20, mem_blocks=32)


def upload(gw, body: bytes) -> str:
    status, _, data = gw.request("POST", "/blobs", body, {"Content-Type": "text/plain"})
    assert status == 201, data
    return json.loads(data)["key"]


def vm_kib(pid: int, field: str) -> int:
    """A VmRSS / VmHWM figure of /proc/pid/status, in KiB."""
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def test_vanished_uploads_leave_no_fid_behind(tmp_path):
    with Cluster(tmp_path, **CLUSTER) as c, Gateway(c, tmp_path, workers=1) as gw:
        before = upload(gw, b"before")
        with socket.create_connection(("127.0.0.1", gw.port), timeout=20) as s:
            s.sendall(b"POST /blobs HTTP/1.1\r\nHost: x\r\nContent-Length: 100000\r\n\r\n")
            s.sendall(blob(5000))   # a small body cut short: nothing was written yet
        with socket.create_connection(("127.0.0.1", gw.port), timeout=20) as s:
            s.sendall(b"POST /blobs HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                      % (20 << 20))
            s.sendall(blob(13 << 20, seed=5))   # three parts written, then the client goes
        time.sleep(1.0)
        after = upload(gw, b"after")
        g, lo = map(int, before.split(","))
        hi = int(after.split(",")[1])
        assert hi > lo + 1  # the cut upload did take fids ...
        deadline = time.monotonic() + 10
        while True:   # ... and every one of them is free again on every replica
            left = [(fid, d.name) for fid in range(lo + 1, hi) for d in c.servers
                    if c.read_direct(d, g, fid).err != Err.FILE_NOT_FOUND]
            if not left or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert left == []
        assert gw.request("GET", "/" + before)[2] == b"before"


def test_reads_fail_over_when_a_chunkserver_dies(tmp_path):
    with Cluster(tmp_path, **CLUSTER) as c, Gateway(c, tmp_path, workers=1) as gw:
        small, large = blob(20_000, seed=1), blob(6 << 20, seed=2)
        k1, k2 = upload(gw, small), upload(gw, large)
        c.kill(c.servers[0])
        for _ in range(5):  # whichever replica the client tries first
            assert gw.request("GET", "/" + k1)[:3:2] == (200, small)
            status, _, data = gw.request("GET", "/" + k2)
            assert status == 200 and data == large
        c.kill(c.servers[1])
        status, _, data = gw.request("GET", "/" + k1)
        assert status in (502, 503) and data.count(b"\n") == 1, data
        status, _, data = gw.request("POST", "/blobs", b"x")
        assert status in (502, 503), data


def test_hung_chunkservers_give_a_502_not_a_hang(tmp_path):
    """Calls time out (--timeout); /healthz says 503 within its own PING wait even when
    the calls' timeout is longer (the second gateway's)."""
    with Cluster(tmp_path, **CLUSTER) as c, \
            Gateway(c, tmp_path, workers=1, extra=["--timeout=1"]) as gw, \
            Gateway(c, tmp_path, workers=1, extra=["--timeout=20"]) as patient:
        key = upload(gw, b"frozen")
        assert patient.request("GET", "/healthz")[0] == 200
        time.sleep(PING_CACHE)
        for d in c.servers:   # alive but silent: every call must time out
            os.killpg(d.proc.pid, signal.SIGSTOP)
        try:
            # (a hang would time out the test client's own 30 s wait and fail here)
            status, _, data = gw.request("GET", "/" + key)
            assert status in (502, 503) and data.count(b"\n") == 1, data
            status, _, data = gw.request("POST", "/blobs", b"x")
            assert status in (502, 503), data
            t0 = time.monotonic()
            status, _, data = patient.request("GET", "/healthz")
            took = time.monotonic() - t0
            assert (status, data) == (503, b"unavailable: no chunkserver answers (1 group)\n")
            assert took < PING_WAIT + 3, took   # not the 20 s of a call's timeout
        finally:
            for d in c.servers:
                os.killpg(d.proc.pid, signal.SIGCONT)
        assert gw.request("GET", "/" + key)[2] == b"frozen"


def test_starts_without_a_master_and_answers_503_until_it_has_a_route(tmp_path):
    c = Cluster(tmp_path, **CLUSTER)
    try:
        with Gateway(None, tmp_path, master=c.master_addr) as gw:
            status, _, data = gw.request("POST", "/blobs", b"early")
            assert status == 503 and b"master" in data, data
            assert gw.request("GET", "/1,5")[0] == 503
            status, _, data = gw.request("GET", "/healthz")
            assert status == 503 and data.startswith(b"unavailable: no route from the master")
            c.start()
            key = upload(gw, b"late")
            assert gw.request("GET", "/" + key)[2] == b"late"
            wait_ready(lambda: gw.request("GET", "/healthz")[::2] ==
                       (200, b"ok: 1 group, 1 readable, 1 writable\n"), 5, "/healthz ok")
    finally:
        c.stop()


def test_a_48_mb_upload_and_download_keep_the_worker_small(tmp_path):
    """The body streams through in parts: the worker grows by far less than the blob."""
    with Cluster(tmp_path, **CLUSTER) as c, Gateway(c, tmp_path, workers=1) as gw:
        upload(gw, b"warm up")
        (worker,) = gw.worker_pids()
        base = vm_kib(worker, "VmRSS")
        size = 48 << 20
        piece = blob(1 << 20, seed=9)
        conn = gw.conn()
        conn.putrequest("POST", "/blobs")
        conn.putheader("Content-Length", str(size))
        conn.endheaders()
        for _ in range(size // len(piece)):
            conn.send(piece)
        r = conn.getresponse()
        assert r.status == 201, r.read()
        key = json.loads(r.read())["key"]
        conn.request("GET", "/" + key)
        r = conn.getresponse()
        got, sha = 0, hashlib.sha256()
        while True:
            data = r.read(1 << 20)
            if not data:
                break
            sha.update(data)
            got += len(data)
        conn.close()
        assert got == size
        assert sha.digest() == hashlib.sha256(piece * (size // len(piece))).digest()
        peak = vm_kib(worker, "VmHWM")
        grew = (peak - base) / 1024
        print(f"worker RSS {base / 1024:.1f} MiB before, peak {peak / 1024:.1f} MiB "
              f"(+{grew:.1f} MiB) for a {size >> 20} MiB upload and download")
        assert grew < 28, f"the worker grew by {grew:.1f} MiB for a 48 MiB blob"
