"""Binding a daemon's listening TCP socket (before daemonizing, so that errors reach the
terminal), for the chunkserver, the master and the gateway."""
from __future__ import annotations

import errno
import socket

from speedy.common.daemonize import StartError

BACKLOG = 1024


def bind_listener(ip: str, port: int, inheritable: bool = False) -> socket.socket:
    """A listening socket on ip:port (SO_REUSEADDR); StartError with a one-line reason.

    inheritable: the pre-forked workers share it (chunkserver, gateway)."""
    try:
        family, kind, proto, _name, addr = socket.getaddrinfo(
            ip, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as e:
        raise StartError(f"cannot listen on {ip}:{port}: --ip {ip}: {e.strerror}") from None
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(BACKLOG)
    except OSError as e:
        sock.close()
        hint = " (is another server running?)" if e.errno == errno.EADDRINUSE else ""
        raise StartError(f"cannot listen on {ip}:{port}: {e.strerror}{hint}") from None
    sock.set_inheritable(inheritable)
    return sock
