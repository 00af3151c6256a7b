#!/usr/bin/env python3
"""The gateway's own CPU per small request, in-process: the HTTP server, the app, the
blob route, the record lookup and the metrics, without the chunkserver round trip.

One HTTPServer.serve_one per request on a connection whose socket keeps nothing
(send() takes everything), a GatewayApp with a real record table (SQLite in a temporary
directory) and a cluster client whose read() hands back 4 KiB at once: what is left is
the Python work the gateway adds to every GET, the steady figure behind the noisy
`bench/gateway.py` ratios. Prints microseconds per request (best of 5 rounds).

    .venv/bin/python bench/gateway_own.py             # 50,000 requests a round
    .venv/bin/python bench/gateway_own.py -n 200000
    .venv/bin/python bench/gateway_own.py --access-log /tmp/access.log   # with an access log
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from typing import Callable

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from speedy.gateway.access import AccessLog  # noqa: E402
from speedy.gateway.app import GatewayApp  # noqa: E402
from speedy.gateway.meta import open_meta  # noqa: E402
from speedy.gateway.records import BlobRecord, RecordStore  # noqa: E402
from speedy.gateway.server import Conn, HTTPServer  # noqa: E402

KEY = "3,10452"
BLOB = os.urandom(4096)
CURL = b"Host: 127.0.0.1:8088\r\nUser-Agent: curl/8.5.0\r\nAccept: */*\r\n"
BROWSER = (b"Host: img.example.com\r\nUser-Agent: Mozilla/5.0 (X11; Linux x86_64; rv:126.0) "
           b"Gecko/20100101 Firefox/126.0\r\nAccept: image/avif,image/webp,*/*\r\n"
           b"Accept-Language: en-US,en;q=0.5\r\nAccept-Encoding: gzip, deflate, br\r\n"
           b"Referer: https://www.example.com/\r\nSec-Fetch-Dest: image\r\n"
           b"Sec-Fetch-Mode: no-cors\r\nSec-Fetch-Site: same-site\r\nConnection: keep-alive\r\n")


class ReadOnlyClient:
    """A cluster client whose blobs are all BLOB, read at once (no chunkserver)."""

    def read(self, key, *, size_hint=None):
        return BLOB


class SinkSocket:
    """A connected socket that takes every answer whole."""

    def send(self, data) -> int:
        return len(data)

    def sendall(self, data) -> None:
        pass

    def sendmsg(self, parts) -> int:
        return sum(len(p) for p in parts)

    def getsockname(self) -> tuple[str, int]:
        return ("127.0.0.1", 8088)

    def settimeout(self, seconds) -> None:
        pass


class NoStreamServer:
    """Stands for gevent's StreamServer: serve_one is called directly here."""

    def __init__(self, *args, **kwargs):
        pass


def per_request(serve: Callable[[], None], n: int) -> float:
    """Microseconds per call of serve, best of 5 rounds of n."""
    serve()
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(n):
            serve()
        best = min(best, (time.perf_counter() - t0) / n * 1e6)
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("-n", type=int, default=50000, help="requests a round (default 50000)")
    p.add_argument("--access-log", metavar="PATH",
                   help="also write the access log there (default: none)")
    args = p.parse_args()
    root = tempfile.mkdtemp(prefix="speedy-gwown-")
    try:
        meta = open_meta(f"sqlite:///{root}/g.db")
        records = RecordStore(meta)
        records.put(BlobRecord(KEY, "image/jpeg", len(BLOB), "ab" * 16, 1700000000))
        app = GatewayApp(ReadOnlyClient(), meta, records=records)
        access = AccessLog(args.access_log) if args.access_log else None
        server = HTTPServer(SinkSocket(), app, NoStreamServer, None, access=access)
        conn = Conn(SinkSocket())
        base = dict(server.base, REMOTE_ADDR="127.0.0.1", REMOTE_PORT="50000")
        etag = b'"' + b"ab" * 16 + b'"'
        cases = [("GET 4 KiB, curl's headers", b"GET", CURL),
                 ("GET 4 KiB, a browser's headers", b"GET", BROWSER),
                 ("HEAD, curl's headers", b"HEAD", CURL),
                 ("GET -> 304 (If-None-Match)", b"GET", CURL + b"If-None-Match: " + etag
                  + b"\r\n"),
                 ("GET -> 206 (Range)", b"GET", CURL + b"Range: bytes=0-99\r\n")]
        for name, method, headers in cases:
            request = method + b" /" + KEY.encode() + b" HTTP/1.1\r\n" + headers + b"\r\n"

            def serve() -> None:
                conn.buf += request
                if not server.serve_one(conn, base):
                    raise SystemExit(f"{name}: the connection was closed")
            print(f"{name:34s} {per_request(serve, args.n):6.2f} us per request")
        meta.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
