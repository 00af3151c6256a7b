"""Connection limits of the master's HTTP server: a flood of idle connections never locks
out reports, routes or fids.

Every connection is idle (waiting for a request line) or busy (a request is being read or
answered). At a limit (connections from one source, or in all) a new connection evicts
the connection idle for longest (of that source, or of any); when none is idle it is
closed at once. Idle connections are closed after idle_timeout; a request must be read
whole (line, headers, body) within read_timeout of its first line.
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Any

from speedy.common.sockets import shut


@dataclass
class Limits:
    """The master's connection limits (flags of the same names)."""

    max_connections: int = 4096
    max_source_connections: int = 1024
    read_timeout: float = 10.0
    idle_timeout: float = 60.0


@dataclass(eq=False)
class Conn:
    """One accepted connection."""

    sock: Any
    source: str
    idle: bool = True


@dataclass
class ConnTable:
    """The open connections, by source, oldest idle first."""

    limits: Limits
    counts: Any = None  # speedy.master.metrics.Counts (rejected_connections)
    total: int = 0
    by_source: dict[str, int] = field(default_factory=dict)
    idle: "OrderedDict[Conn, None]" = field(default_factory=OrderedDict)
    evicted: int = 0
    refused: int = 0

    def open(self, sock: Any, source: str) -> Conn | None:
        """Admit a new connection (evicting an idle one at a limit); None when refused."""
        if self.by_source.get(source, 0) >= self.limits.max_source_connections:
            if not self._evict(lambda c: c.source == source):
                return self._refuse()
        if self.total >= self.limits.max_connections:
            if not self._evict(lambda c: True):
                return self._refuse()
        conn = Conn(sock, source)
        self.total += 1
        self.by_source[source] = self.by_source.get(source, 0) + 1
        self.idle[conn] = None
        return conn

    def set_idle(self, conn: Conn) -> None:
        """The connection waits for its next request (most recently idle last)."""
        conn.idle = True
        self.idle[conn] = None
        self.idle.move_to_end(conn)

    def set_busy(self, conn: Conn) -> None:
        """A request arrived on the connection: it cannot be evicted until answered."""
        conn.idle = False
        self.idle.pop(conn, None)

    def close(self, conn: Conn) -> None:
        """Forget a connection that ended."""
        if conn.sock is None:
            return
        conn.sock = None
        self.idle.pop(conn, None)
        self.total -= 1
        n = self.by_source.get(conn.source, 1) - 1
        if n:
            self.by_source[conn.source] = n
        else:
            self.by_source.pop(conn.source, None)

    def _evict(self, match: Any) -> bool:
        """Shut down the connection idle for longest among those matching; False if none."""
        for conn in self.idle:
            if match(conn):
                sock = conn.sock
                self.close(conn)
                shut(sock)   # its greenlet reads EOF and ends
                self.evicted += 1
                self._count()
                return True
        return False

    def _refuse(self) -> None:
        """Count a refused connection."""
        self.refused += 1
        self._count()
        return None

    def _count(self) -> None:
        if self.counts is not None:
            self.counts.rejected_connections += 1
