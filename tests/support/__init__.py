"""Test support: real daemons on loopback, chunk files under tmp_path, small clients."""
from __future__ import annotations

import collections
import os
import random
import socket
import sys
import time
from typing import Any, Callable

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PYTHON = sys.executable


LOW_PORTS = 10000                  # free_port() draws from here to the ephemeral range
_recent: collections.deque = collections.deque(maxlen=256)   # ports handed out lately
_draw = random.Random(os.getpid())


def ephemeral_low() -> int:
    """The lowest port the kernel gives outgoing connections (ip_local_port_range)."""
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now, below the kernel's ephemeral range (so
    no outgoing connection can take it before the daemon it is meant for binds it) and
    not handed out lately."""
    low = ephemeral_low()
    for _ in range(200 if low - LOW_PORTS >= 1000 else 0):
        port = _draw.randrange(LOW_PORTS, low)
        if port in _recent:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _recent.append(port)
        return port
    with socket.socket() as s:   # no room below the range: the kernel's choice
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_port(port: int, timeout: float = 20.0, host: str = "127.0.0.1") -> None:
    """Wait until something accepts on host:port (a daemon the test did not spawn)."""
    from tests.support.daemon import listening, wait_ready
    wait_ready(lambda: listening(port, host), timeout, f"{host}:{port}")


def wait_for(predicate: Callable[[], Any], timeout: float = 20.0, interval: float = 0.05,
             what: str = "") -> Any:
    """Poll predicate until it returns a true value; that value (AssertionError after
    timeout seconds)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g}s waiting for "
                                 f"{what or getattr(predicate, '__name__', 'a condition')}")
        time.sleep(interval)


class Started:
    """A context manager over start() and stop(): stop() runs also when start() fails
    part-way, so nothing it began is left running."""

    def start(self) -> Any:
        raise NotImplementedError

    def stop(self) -> None:
        raise NotImplementedError

    def __enter__(self):
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
