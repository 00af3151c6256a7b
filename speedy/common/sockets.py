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
