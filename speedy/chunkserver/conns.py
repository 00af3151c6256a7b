"""A worker's client connections: limits per worker and per source address, idle ones
parked, closed to make room or after --idle_timeout.

A new connection is counted against ``--max_conns`` (this worker) and
``--max_conns_per_ip`` (its source address, in this worker). When one of them is
reached, the oldest idle connection (between requests) of that source, or of anyone for
the worker's limit, is closed to make room, so a flood of idle connections never locks
a new client out; only when every counted connection is busy is the new one closed at
once.

Between requests a connection waits in its greenlet (no cost on the request path); once
it has waited PARK_AFTER seconds it is parked: its greenlet ends, its receive buffer is
dropped and an I/O watcher resumes it (a new greenlet) when bytes come, so an idle
connection costs about a kilobyte. The sweep, every SWEEP_EVERY seconds, parks and
closes the connections idle for ``--idle_timeout``, oldest first.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Callable

from speedy.chunkserver.conn import Closed

log = logging.getLogger("speedy.chunkserver.conns")

PARK_AFTER = 0.25  # seconds a connection waits in its greenlet before it is parked
SWEEP_EVERY = 0.25
REPORT_EVERY = 10.0  # seconds between two log lines about evictions and refusals


class Park(Exception):
    """Thrown into a greenlet waiting for its connection's next request: park it."""


class ConnTable:
    """Counted connections; the idle ones in the order they went idle."""

    def __init__(self, max_conns: int, per_source: int, loop,
                 resume: Callable, end: Callable) -> None:
        self.max_conns = max_conns
        self.per_source = per_source
        self.loop = loop  # the gevent hub's loop (I/O watchers, callbacks)
        self.resume = resume  # resume(conn): serve a parked connection that has bytes
        self.end = end  # end(conn): close an uncounted connection's socket
        self.count = 0
        self.by_source: dict[str, int] = {}
        self.idle: OrderedDict = OrderedDict()  # conn -> None, oldest idle first
        self.idle_of: dict[str, OrderedDict] = {}  # source -> its idle conns, in order
        self.waiting: OrderedDict = OrderedDict()  # idle conns still in their greenlet
        self.closed_idle = 0
        self.refused = 0
        self.reported = 0.0

    # -- counting
    def admit(self, source: str) -> bool:
        """Count a new connection of source, closing the oldest idle one that stands in
        its way; False (nothing counted) when every connection in its way is busy."""
        if self.by_source.get(source, 0) >= self.per_source and \
                not self.evict(self.idle_of.get(source)):
            return self.refuse(source, "its source address")
        if self.count >= self.max_conns and not self.evict(self.idle):
            return self.refuse(source, "this worker")
        self.count += 1
        self.by_source[source] = self.by_source.get(source, 0) + 1
        return True

    def leave(self, conn) -> None:
        """A counted connection ends (once)."""
        if conn.counted:
            conn.counted = False
            self.idle_end(conn)
            self.count -= 1
            n = self.by_source.get(conn.peer, 0) - 1
            if n > 0:
                self.by_source[conn.peer] = n
            else:
                self.by_source.pop(conn.peer, None)

    # -- idle
    def idle_start(self, conn, greenlet) -> None:
        """conn waits in greenlet for its next request."""
        conn.idle_since = time.monotonic()
        conn.waiter = greenlet  # serve() clears it when the wait ends
        self.idle[conn] = None
        mine = self.idle_of.get(conn.peer)
        if mine is None:  # (setdefault would build an OrderedDict on every request)
            mine = self.idle_of[conn.peer] = OrderedDict()
        mine[conn] = None
        self.waiting[conn] = None

    def idle_end(self, conn) -> None:
        """A request began on conn (or it ended)."""
        self.waiting.pop(conn, None)
        if conn in self.idle:
            del self.idle[conn]
            mine = self.idle_of[conn.peer]
            del mine[conn]
            if not mine:
                del self.idle_of[conn.peer]

    def park(self, conn) -> None:
        """conn's greenlet ends: an I/O watcher resumes conn when bytes come."""
        conn.waiter = None
        self.waiting.pop(conn, None)
        watcher = conn.watcher = self.loop.io(conn.sock.fileno(), 1)
        watcher.start(self._unpark, conn)

    def _unpark(self, conn) -> None:
        """A parked connection has bytes (or its peer closed): serve it (hub callback)."""
        self._stop_watching(conn)
        self.idle_end(conn)
        self.resume(conn)

    def close(self, conn) -> None:
        """Close an idle connection: to make room, idle too long, or stopping."""
        greenlet = conn.waiter
        self.leave(conn)
        if greenlet is not None:  # its greenlet ends the connection (or sees it uncounted)
            self.loop.run_callback(self._throw_if_waiting, conn, greenlet,
                                   Closed("closed while idle"))
        else:
            self._stop_watching(conn)
            self.end(conn)

    def close_all_idle(self) -> None:
        """A graceful stop: every idle connection goes."""
        for conn in list(self.idle):
            self.close(conn)

    @staticmethod
    def _stop_watching(conn) -> None:
        watcher, conn.watcher = conn.watcher, None
        if watcher is not None:
            watcher.stop()
            close = getattr(watcher, "close", None)
            if close is not None:
                close()

    def sweep(self, idle_timeout: float) -> None:
        """Park the connections that waited PARK_AFTER s; close those idle for idle_timeout."""
        now = time.monotonic()
        while self.waiting:
            conn = next(iter(self.waiting))
            if conn.idle_since > now - PARK_AFTER:
                break
            del self.waiting[conn]
            self.loop.run_callback(self._throw_if_waiting, conn, conn.waiter, Park())
        while self.idle:
            conn = next(iter(self.idle))
            if conn.idle_since > now - idle_timeout:
                break
            log.debug("connection from %s closed: idle for %gs", conn.peer, idle_timeout)
            self.close(conn)

    @staticmethod
    def _throw_if_waiting(conn, greenlet, exc: Exception) -> None:
        """(hub) Throw exc into greenlet if it still waits for conn's next request."""
        if greenlet is not None and conn.waiter is greenlet and not greenlet.dead:
            greenlet.throw(exc)

    # -- limits
    def evict(self, queue) -> bool:
        """Close the oldest idle connection of queue; False if there is none."""
        if not queue:
            return False
        self.close(next(iter(queue)))
        self.closed_idle += 1
        self.report()
        return True

    def refuse(self, source: str, limit: str) -> bool:
        """A new connection of source is not served (every one counted is busy)."""
        self.refused += 1
        log.debug("connection from %s refused: every connection of %s is busy", source, limit)
        self.report()
        return False

    def report(self) -> None:
        """Log, at most every REPORT_EVERY seconds, what the limits did."""
        now = time.monotonic()
        if now - self.reported >= REPORT_EVERY:
            self.reported = now
            log.warning("connection limits (--max_conns %d, --max_conns_per_ip %d per "
                        "worker): %d idle connections closed to make room, %d refused so "
                        "far; %d open", self.max_conns, self.per_source, self.closed_idle,
                        self.refused, self.count)
