"""The benchmark baseline: a loopback chunkserver look-alike that stores nothing.

It speaks just enough of the wire protocol (PROTOCOL.md) for ``speedy bench``:

    WRITE   the body is read and discarded, then SUCCESS with an empty body
    READ    SUCCESS with ``size`` bytes of a preallocated buffer whose first 8 bytes
            are the requested fid (big-endian), so the bench can check what it got
    PING, DELETE, CHECK_DISK, GET_STATUS...   SUCCESS with an empty body
    unknown opcode                           the connection is closed

A few pre-forked processes share one listening socket; each serves every connection in
its own thread with plain blocking sockets (the GIL is released in recv/send), parsing
frames straight out of a reusable receive buffer.  Whatever time ``speedy bench`` spends
beyond this server's is the cost of storage and request handling in the real one.
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import socket
import struct
import sys
import threading
import time
from dataclasses import dataclass, field

from speedy.wire.protocol import OPCODES, REQUEST_HEADER, RESPONSE_HEADER, Err, Op

RECV_BUFFER = 1 << 20
MAX_SMALL_BODY = 64 * 1024  # bodies of non-WRITE requests must fit the buffer
DEFAULT_PROCS = 2
FID_PREFIX = struct.Struct(">Q")


def parse_frames(conn: socket.socket, payload_tail: memoryview, size: int) -> None:
    """Answer requests on one connection until it closes or misbehaves."""
    buf = bytearray(RECV_BUFFER)
    mv = memoryview(buf)
    recv_into = conn.recv_into
    sendall = conn.sendall
    sendmsg = conn.sendmsg
    unpack_header = REQUEST_HEADER.unpack_from
    write_ok = RESPONSE_HEADER.pack(Op.WRITE, Err.SUCCESS, 0)
    read_ok = RESPONSE_HEADER.pack(Op.READ, Err.SUCCESS, size)
    prefix_len = min(size, FID_PREFIX.size)
    read_total = RESPONSE_HEADER.size + size
    pos = have = 0
    while True:
        if have - pos < REQUEST_HEADER.size:
            if pos:
                if pos == have:
                    pos = have = 0
                else:
                    buf[0:have - pos] = buf[pos:have]
                    have -= pos
                    pos = 0
            got = recv_into(mv[have:])
            if not got:
                return
            have += got
            continue
        op, n = unpack_header(buf, pos)
        start = pos + REQUEST_HEADER.size
        avail = have - start
        if op == Op.WRITE:
            if avail >= n:
                pos = start + n
            else:
                skip = n - avail
                pos = have = 0
                while skip > 0:
                    got = recv_into(mv, min(skip, RECV_BUFFER))
                    if not got:
                        return
                    skip -= got
            sendall(write_ok)
            continue
        if op not in OPCODES or n > MAX_SMALL_BODY:
            return
        if avail < n:  # the rest of a small body is still on the way
            if pos:
                buf[0:have - pos] = buf[pos:have]
                have -= pos
                pos = 0
            got = recv_into(mv[have:])
            if not got:
                return
            have += got
            continue
        pos = start + n
        if op != Op.READ:
            sendall(RESPONSE_HEADER.pack(op, Err.SUCCESS, 0))
            continue
        fid = bytes(buf[start + 2:start + 10]) if n >= 10 else bytes(8)
        sent = sendmsg([read_ok, fid[:prefix_len], payload_tail])
        if sent < read_total:  # a partial send (signal, or a socket timeout)
            rest = b"".join([read_ok, fid[:prefix_len], payload_tail])[sent:]
            sendall(rest)


def serve_connection(conn: socket.socket, payload_tail: memoryview, size: int) -> None:
    """One connection's thread: parse and answer frames, then close."""
    try:
        conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        parse_frames(conn, payload_tail, size)
    except OSError:
        pass
    finally:
        conn.close()


def serve(sock: socket.socket, size: int) -> None:
    """Accept connections on a listening socket forever, one thread each."""
    payload = bytearray(os.urandom(min(size, 4096)) * (size // 4096 + 1))[:size]
    tail = memoryview(bytes(payload))[min(size, FID_PREFIX.size):]
    while True:
        try:
            conn, _addr = sock.accept()
        except InterruptedError:
            continue
        except OSError:
            return
        threading.Thread(target=serve_connection, args=(conn, tail, size),
                         daemon=True).start()


def _child(sock: socket.socket, size: int) -> None:
    """Entry point of a sink process."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    serve(sock, size)


@dataclass
class Sink:
    """A running sink: its address and processes."""

    host: str
    port: int
    size: int
    procs: list = field(default_factory=list)

    @property
    def address(self) -> str:
        """host:port."""
        return f"{self.host}:{self.port}"

    def stop(self) -> None:
        """Terminate the sink's processes and wait for them."""
        for p in self.procs:
            if p.is_alive():
                p.terminate()
        for p in self.procs:
            p.join(5)
            if p.is_alive():
                p.kill()
                p.join(5)
        self.procs.clear()

    def __enter__(self) -> "Sink":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def start_sink(size: int, procs: int = DEFAULT_PROCS, host: str = "127.0.0.1",
               port: int = 0) -> Sink:
    """Bind host:port (0: a free port), fork ``procs`` sink processes, return the handle."""
    if size < 0 or size > 0xFFFFFFFF:
        raise ValueError(f"size {size} out of range")
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(1024)
    ctx = multiprocessing.get_context("fork")
    sink = Sink(host, sock.getsockname()[1], size)
    try:
        for i in range(max(1, procs)):
            p = ctx.Process(target=_child, args=(sock, size), name=f"speedy-sink-{i}",
                            daemon=True)
            p.start()
            sink.procs.append(p)
    except BaseException:
        sink.stop()
        raise
    finally:
        sock.close()  # the children hold it; later forks of ours must not
    return sink


def main(argv: list[str] | None = None) -> int:
    """``python -m speedy.bench.sink``: run a sink in the foreground until interrupted."""
    from speedy.bench.runner import parse_size  # one size syntax for both tools

    p = argparse.ArgumentParser(prog="speedy.bench.sink",
                                description="loopback protocol sink (benchmark baseline)")
    p.add_argument("--ip", default="127.0.0.1", help="listen address")
    p.add_argument("--port", type=int, default=0, help="listen port (0: any free one)")
    p.add_argument("--size", type=parse_size, default=4096,
                   help="bytes answered to every READ (4k, 64k, 1m...)")
    p.add_argument("--procs", type=int, default=DEFAULT_PROCS, help="server processes")
    args = p.parse_args(argv)
    try:
        sink = start_sink(args.size, args.procs, args.ip, args.port)
    except OSError as e:
        print(f"speedy.bench.sink: cannot listen on {args.ip}:{args.port}: {e.strerror or e}",
              file=sys.stderr)
        return 1
    print(f"sink listening on {sink.address} (READ answers {args.size} bytes)", flush=True)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    signal.signal(signal.SIGINT, _raise_interrupt)  # even when started with it ignored
    try:
        while all(proc.is_alive() for proc in sink.procs):
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        sink.stop()
    return 0


def _raise_interrupt(_sig, _frame) -> None:
    """SIGTERM in the foreground sink: stop like Ctrl-C."""
    raise KeyboardInterrupt


if __name__ == "__main__":
    sys.exit(main())
