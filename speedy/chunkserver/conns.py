"""A worker's table of client connections: limits per worker and per source address.

A new connection is counted against ``--max_conns`` (this worker) and
``--max_conns_per_ip`` (its source address, in this worker). When one of them is
reached, the oldest idle connection (between requests) of that source, or of anyone for
the worker's limit, is closed to make room, so a flood of idle connections never locks
a new client out; only when every counted connection is busy is the new one closed at
once. An idle connection is parked (no greenlet, no buffer: an I/O watcher resumes it)
and closed after ``--idle_timeout`` seconds by the worker's sweep.
"""
from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Callable

log = logging.getLogger("speedy.chunkserver.conns")

REPORT_EVERY = 10.0  # seconds between two log lines about evictions and refusals


class ConnTable:
    """Counted connections, and the idle ones in the order they went idle."""

    def __init__(self, max_conns: int, per_source: int, close_idle: Callable) -> None:
        self.max_conns = max_conns
        self.close_idle = close_idle  # closes a parked connection and calls leave()
        self.per_source = per_source
        self.count = 0
        self.by_source: dict[str, int] = {}
        self.idle: OrderedDict = OrderedDict()  # connection -> source, oldest idle first
        self.idle_of: dict[str, OrderedDict] = {}  # source -> its idle connections, in order
        self.closed_idle = 0
        self.refused = 0
        self.reported = 0.0

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

    def leave(self, conn, source: str) -> None:
        """A counted connection ended."""
        self.idle_end(conn, source)
        self.uncount(source)

    def idle_start(self, conn, source: str) -> None:
        """The connection waits for its next request: it may be closed to make room."""
        self.idle[conn] = source
        self.idle_of.setdefault(source, OrderedDict())[conn] = None

    def idle_end(self, conn, source: str) -> None:
        """A request began (or the connection ended)."""
        if self.idle.pop(conn, None) is not None:
            mine = self.idle_of[source]
            mine.pop(conn, None)
            if not mine:
                del self.idle_of[source]

    def idle_conns(self) -> list:
        """The idle connections, oldest idle first."""
        return list(self.idle)

    def oldest_idle(self):
        """The connection idle the longest, or None."""
        return next(iter(self.idle), None)

    def evict(self, queue) -> bool:
        """Close the oldest idle connection of queue; False if there is none."""
        if not queue:
            return False
        self.close_idle(next(iter(queue)))
        self.closed_idle += 1
        self.report()
        return True

    def uncount(self, source: str) -> None:
        """One connection of source less."""
        self.count -= 1
        n = self.by_source.get(source, 0) - 1
        if n > 0:
            self.by_source[source] = n
        else:
            self.by_source.pop(source, None)

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
