"""Socket helpers shared by the client library and the daemons' request loops."""
from __future__ import annotations

import socket


def send_all(sock: socket.socket, data: bytes | bytearray | memoryview) -> None:
    """sock.sendall(data), but one plain send when the kernel takes it all at once.

    Under gevent, sendall costs a getsockopt, a timer and a Python loop per call; a
    send that fits the socket buffer (every small answer or request) needs none of
    them. Only the rest of a partial send goes through sendall.
    """
    n = sock.send(data)
    if n < len(data):
        sock.sendall(memoryview(data)[n:])


def send_parts(sock: socket.socket, parts: list) -> None:
    """Send the concatenation of parts (a head and a large body) without joining them:
    one sendmsg, then sendall of what it left."""
    n = sock.sendmsg(parts)
    for part in parts:
        size = len(part)
        if n >= size:
            n -= size
            continue
        sock.sendall(memoryview(part)[n:])
        n = 0


def shut(sock: socket.socket, how: int = socket.SHUT_RDWR) -> None:
    """sock.shutdown(how), ignoring a socket already closed or never connected: a greenlet
    waiting in its recv reads the end of the stream."""
    try:
        sock.shutdown(how)
    except OSError:
        pass
