#!/usr/bin/env python3
"""How close the gateway comes to the least any gevent proxy can do, in one run.

Starts the bench cluster (bench/benchcluster.py: master, two chunkservers, a gateway with
one worker), stores N blobs through the gateway, then alternates rounds of T seconds of
GETs at C connections through:

  client   speedy.client in C threads (2 processes): the issue's baseline
  gateway  the gateway (`GET /<key>`, keep-alive HTTP/1.1)
  floor    a minimal gevent proxy in one process: it reads a request line, sends a
           pipelined READ (batched like the gateway's) and answers with a fixed head; no
           HTTP parsing, records, headers, metrics, timeouts or failover
  +client  the floor reading through speedy.client (Client(pipelined=True).read, as the
           gateway does): the floor and +client differ by the client's read path, +client
           and the gateway by the HTTP server and app

The HTTP load is one selector loop per process (2 processes), lighter than the client
library's load. The floor shows what a Python proxy hop costs on this machine by itself:
the gateway's GET/s over the floor's is the part its own work takes.

    .venv/bin/python bench/gateway_floor.py                    # 4 KiB, 3 rounds
    .venv/bin/python bench/gateway_floor.py --size 1m -n 300 -c 8
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import random
import selectors
import socket
import struct
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchcluster import bench_cluster, free_port  # noqa: E402
from speedy.common.config import byte_size  # noqa: E402


def http_get_load(port: int, keys: list[str], size: int, conns: int, seconds: float,
                  q: mp.Queue) -> None:
    """GETs on conns keep-alive connections from one selector loop; puts the count."""
    sel = selectors.DefaultSelector()
    for _ in range(conns):
        s = socket.create_connection(("127.0.0.1", port))
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        s.setblocking(False)
        buf = bytearray(size + 65536)
        st = {"s": s, "mv": memoryview(buf), "buf": buf, "w": 0, "need": 0}
        sel.register(s, selectors.EVENT_READ, st)
        s.send(b"GET /%s HTTP/1.1\r\nHost: x\r\n\r\n" % random.choice(keys).encode())
    done, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        for key, _ in sel.select(1):
            st = key.data
            n = st["s"].recv_into(st["mv"][st["w"]:])
            if not n:
                raise SystemExit("the server closed a connection")
            st["w"] += n
            if not st["need"]:
                i = st["buf"].find(b"\r\n\r\n", 0, st["w"])
                if i < 0:
                    continue
                head = bytes(st["buf"][:i]).lower()
                if not head.startswith(b"http/1.1 200"):
                    raise SystemExit(f"answer {head[:40]!r}")
                j = head.find(b"content-length:")
                st["need"] = i + 4 + int(head[j + 15:].split(b"\r\n")[0])
            if st["w"] < st["need"]:
                continue
            st["w"] = st["need"] = 0
            done += 1
            st["s"].send(b"GET /%s HTTP/1.1\r\nHost: x\r\n\r\n" % random.choice(keys).encode())
    q.put(done)


def client_get_load(master: str, keys: list[str], conns: int, seconds: float,
                    q: mp.Queue) -> None:
    """GETs through speedy.client from conns threads; puts the count."""
    from speedy.client import Client
    client = Client(master)
    counts: list[int] = []

    def loop() -> None:
        n, end = 0, time.monotonic() + seconds
        while time.monotonic() < end:
            client.get(random.choice(keys))
            n += 1
        counts.append(n)
    threads = [threading.Thread(target=loop) for _ in range(conns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    q.put(sum(counts))


def rate(target, *args, conns: int, seconds: float) -> float:
    """GET/s of target's load from 2 processes with conns/2 connections each."""
    q: mp.Queue = mp.Queue()
    procs = [mp.Process(target=target, args=(*args, max(1, conns // 2), seconds, q))
             for _ in range(2)]
    for p in procs:
        p.start()
    total = sum(q.get(timeout=seconds + 60) for _ in procs)
    for p in procs:
        p.join()
    return total / seconds


def serve_floor(port: int, master: str) -> None:
    """The floor proxy (run in its own process)."""
    from gevent import monkey
    monkey.patch_all()
    import gevent
    from gevent.event import AsyncResult

    from speedy.client import Client
    servers = [s.addr for s in Client(master)._group(1)]
    request = struct.Struct(">BIHQ")

    class Pipe:
        def __init__(self, addr):
            self.s = socket.create_connection(addr)
            self.s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.waiting, self.out, self.batching = [], [], False
            gevent.spawn(self.reader)

        def reader(self):
            buf = b""
            while True:
                data = self.s.recv(262144)
                if not data:
                    return
                buf += data
                while len(buf) >= 6:
                    n = struct.unpack(">I", buf[2:6])[0]
                    if len(buf) < 6 + n:
                        break
                    self.waiting.pop(0).set(buf[6:6 + n])
                    buf = buf[6 + n:]

        def read(self, g, fid):
            r = AsyncResult()
            self.waiting.append(r)
            self.out.append(request.pack(1, 10, g, fid))
            if not self.batching:
                self.batching = True
                gevent.sleep(0)
                out, self.out, self.batching = b"".join(self.out), [], False
                self.s.sendall(out)
            return r.get()

    pipes = [Pipe(a) for a in servers]

    def read(key: bytes) -> bytes:
        g, fid = key.split(b",")
        return random.choice(pipes).read(int(g), int(fid))
    proxy_gets(port, read)


def proxy_gets(port: int, read) -> None:
    """Answer `GET /<key>` on port with read(key bytes), a fixed head, keep-alive; nothing
    else of HTTP (the proxies' common loop, under gevent)."""
    import gevent.server

    def handle(sock, addr):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = sock.recv(65536)
                    if not data:
                        return
                    buf += data
                head, _, buf = buf.partition(b"\r\n\r\n")
                body = read(head.split(b" ", 2)[1][1:])
                sock.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % len(body)
                             + body)
        except OSError:
            pass   # the load closes its connections at the end
    gevent.server.StreamServer(("127.0.0.1", port), handle).serve_forever()


def serve_floor_client(port: int, master: str) -> None:
    """The floor proxy reading through speedy.client's pipelined reads (its own process)."""
    from gevent import monkey
    monkey.patch_all()

    from speedy.client import Client
    client = Client(master, pipelined=True)
    proxy_gets(port, lambda key: client.read(key.decode()))


def put_blobs(port: int, n: int, size: int) -> list[str]:
    """n random blobs stored through the gateway; their keys."""
    keys = []
    with socket.create_connection(("127.0.0.1", port)) as s:
        f = s.makefile("rb")
        for _ in range(n):
            body = os.urandom(size)
            s.sendall(b"POST /blobs HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n"
                      % size + body)
            length = 0
            while (line := f.readline()) not in (b"\r\n", b""):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            keys.append(json.loads(f.read(length))["key"])
    return keys


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--size", default="4k", help="blob size (default 4k)")
    p.add_argument("-n", type=int, default=2000, help="blobs (default 2000)")
    p.add_argument("-c", type=int, default=16, help="connections (default 16)")
    p.add_argument("-t", type=float, default=5.0, help="seconds per measurement (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="alternated rounds (default 3)")
    args = p.parse_args()
    size = byte_size(args.size)
    with bench_cluster("speedy-floor-", 1) as c:
        master = f"127.0.0.1:{c.master_port}"
        floor_port, plus_port = free_port(), free_port()
        proxies = [subprocess.Popen([sys.executable, __file__, flag, str(port), master])
                   for flag, port in (("--serve-floor", floor_port),
                                      ("--serve-floor-client", plus_port))]
        try:
            keys = put_blobs(c.gateway_port, args.n, size)
            time.sleep(1)
            print(f"{args.n} blobs of {size} bytes, c={args.c}, {args.t:g} s per figure")
            for r in range(args.rounds):
                cl = rate(client_get_load, master, keys, conns=args.c, seconds=args.t)
                gw = rate(http_get_load, c.gateway_port, keys, size, conns=args.c,
                          seconds=args.t)
                fl = rate(http_get_load, floor_port, keys, size, conns=args.c,
                          seconds=args.t)
                pl = rate(http_get_load, plus_port, keys, size, conns=args.c,
                          seconds=args.t)
                print(f"round {r + 1}: client {cl:,.0f} GET/s | gateway {gw:,.0f} "
                      f"({gw / cl:.2f}x client) | floor {fl:,.0f} ({fl / cl:.2f}x client) "
                      f"| +client {pl:,.0f} ({pl / cl:.2f}x client) | gateway/floor "
                      f"{gw / fl:.2f}", flush=True)
        finally:
            for proxy in proxies:
                proxy.terminate()
                proxy.wait(10)
    return 0


if __name__ == "__main__":
    if len(sys.argv) == 4 and sys.argv[1] == "--serve-floor":
        serve_floor(int(sys.argv[2]), sys.argv[3])
    elif len(sys.argv) == 4 and sys.argv[1] == "--serve-floor-client":
        serve_floor_client(int(sys.argv[2]), sys.argv[3])
    else:
        sys.exit(main())
