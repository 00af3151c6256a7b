#!/usr/bin/env python3
"""S3 PUT/GET through the gateway vs the gateway's own blob routes, in one run.

Starts a temporary master, one group of two chunkservers and a gateway with an S3 key
on loopback, then, per size, stores N objects with C keep-alive connections through
`POST /blobs` and through S3 PutObject (SigV4-signed by botocore, payload hashed, as the
SDKs sign over plain HTTP), reads them back through `GET /<key>` and S3 GetObject, and
prints ops/s, MB/s, p50/p99 and the S3/blob ratio. It also times SigV4 verification
alone (what the gateway adds per request) against the mean request time.

    .venv/bin/python bench/s3.py                        # 4 KiB and 1 MiB
    .venv/bin/python bench/s3.py --size 4k -n 5000 -c 16
"""
from __future__ import annotations

import argparse
import http.client
import json
import os
import sys
import threading
import time
import timeit

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from botocore.auth import S3SigV4Auth  # noqa: E402
from botocore.awsrequest import AWSRequest  # noqa: E402
from botocore.credentials import Credentials  # noqa: E402

from benchcluster import bench_cluster  # noqa: E402
from speedy.bench.runner import parse_size  # noqa: E402
from speedy.gateway.s3 import sigv4  # noqa: E402

AKID, SECRET = "AKIABENCH00000000001", "bench-secret-0000000000000000000000000001"
RUNS = [("4k", 4000, 16), ("1m", 300, 8)]




def signed_headers(method: str, url: str, body: bytes) -> dict[str, str]:
    """The headers botocore's S3 signer adds (payload hashed: plain HTTP)."""
    req = AWSRequest(method=method, url=url, data=body)
    S3SigV4Auth(Credentials(AKID, SECRET), "s3", "us-east-1").add_auth(req)
    return dict(req.headers.items())


def phase(port: int, jobs: list, conns: int, call) -> tuple[float, list[float]]:
    """Run call(conn, job) for every job on `conns` keep-alive connections; (seconds, latencies)."""
    lat: list[float] = []
    lock = threading.Lock()
    it = iter(jobs)

    def worker() -> None:
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine = []
        while True:
            with lock:
                job = next(it, None)
            if job is None:
                break
            t0 = time.perf_counter()
            call(c, job)
            mine.append(time.perf_counter() - t0)
        c.close()
        with lock:
            lat.extend(mine)
    threads = [threading.Thread(target=worker) for _ in range(conns)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return time.perf_counter() - t0, lat


def report(name: str, n: int, size: int, secs: float, lat: list[float]) -> float:
    lat.sort()
    ops = n / secs
    print(f"  {name:<10} {ops:9.0f} ops/s  {ops * size / 1e6:8.1f} MB/s  "
          f"p50 {lat[len(lat) // 2] * 1e3:6.2f} ms  p99 {lat[int(len(lat) * 0.99)] * 1e3:7.2f} ms",
          flush=True)
    return ops


def run(port: int, size: int, n: int, conns: int) -> None:
    body = os.urandom(size)
    keys: list[str] = []

    def blob_put(c, i):
        c.request("POST", "/blobs", body=body, headers={"Content-Type": "application/octet-stream"})
        r = c.getresponse()
        data = r.read()
        assert r.status == 201, data
        keys.append(json.loads(data)["key"])

    def blob_get(c, key):
        c.request("GET", f"/{key}")
        r = c.getresponse()
        assert len(r.read()) == size and r.status == 200

    def s3_put(c, i):
        url = f"http://127.0.0.1:{port}/bench/o{i}"
        c.request("PUT", f"/bench/o{i}", body=body, headers=signed_headers("PUT", url, body))
        r = c.getresponse()
        data = r.read()
        assert r.status == 200, data

    def s3_get(c, i):
        url = f"http://127.0.0.1:{port}/bench/o{i}"
        c.request("GET", f"/bench/o{i}", headers=signed_headers("GET", url, b""))
        r = c.getresponse()
        assert len(r.read()) == size and r.status == 200

    print(f"size {size} B, {n} objects, {conns} connections", flush=True)
    res = {}
    res["blob PUT"] = report("blob PUT", n, size, *phase(port, list(range(n)), conns, blob_put))
    res["S3 PUT"] = report("S3 PUT", n, size, *phase(port, list(range(n)), conns, s3_put))
    res["blob GET"] = report("blob GET", n, size, *phase(port, list(keys), conns, blob_get))
    res["S3 GET"] = report("S3 GET", n, size, *phase(port, list(range(n)), conns, s3_get))
    print(f"  ratio S3/blob: PUT {res['S3 PUT'] / res['blob PUT']:.2f}x, "
          f"GET {res['S3 GET'] / res['blob GET']:.2f}x", flush=True)


def verify_cost() -> None:
    """Microseconds to verify one signed GET, in this process."""
    url = "http://127.0.0.1:8088/bench/o1"
    h = {k.lower(): v for k, v in signed_headers("GET", url, b"").items()}
    h["host"] = "127.0.0.1:8088"
    keys = {AKID: SECRET}.get
    n = 20000
    secs = timeit.timeit(lambda: sigv4.verify_header("GET", "/bench/o1", "", h, keys), number=n)
    sign = timeit.timeit(lambda: signed_headers("GET", url, b""), number=2000) / 2000
    print(f"SigV4 verification: {secs / n * 1e6:.1f} us per request in the gateway "
          f"(botocore signing one request: {sign * 1e6:.0f} us on the client)", flush=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", help="one size only (default: 4k and 1m)")
    p.add_argument("-n", type=int, help="objects per phase")
    p.add_argument("-c", type=int, help="connections")
    p.add_argument("--workers", type=int, default=2, help="gateway workers (default 2)")
    args = p.parse_args()
    runs = [(args.size, args.n or 4000, args.c or 16)] if args.size else RUNS
    with bench_cluster("speedy-s3bench-", args.workers,
                       [f"--s3_access_key={AKID}", f"--s3_secret_key={SECRET}"]) as cl:
        gport = cl.gateway_port
        c = http.client.HTTPConnection("127.0.0.1", gport, timeout=30)
        c.request("PUT", "/bench", headers=signed_headers("PUT", f"http://127.0.0.1:{gport}/bench", b""))
        assert c.getresponse().status == 200
        c.close()
        verify_cost()
        for size, n, conns in runs:
            run(gport, parse_size(size), n, conns)
    return 0


if __name__ == "__main__":
    sys.exit(main())
