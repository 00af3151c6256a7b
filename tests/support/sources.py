"""Connections from a chosen loopback source address (per-source limits, admin policy)."""
from __future__ import annotations

import socket

from tests.support.server import Client


def connect(port: int, source: str = "127.0.0.1", timeout: float = 10.0) -> socket.socket:
    """A plain TCP connection to 127.0.0.1:port from source."""
    sock = socket.socket()
    sock.bind((source, 0))
    sock.settimeout(timeout)
    sock.connect(("127.0.0.1", port))
    return sock


def client_from(port: int, source: str = "127.0.0.1", timeout: float = 20.0) -> Client:
    """A Client whose connection comes from source."""
    c = Client.__new__(Client)
    c.sock = connect(port, source, timeout)
    return c
