"""A client connection of a worker: buffered receive, the pace rule, the admin policy.

Pace rule (slow-loris): between requests a connection may wait without limit. From the
first byte of a request to its last, every wait for more bytes ends within IDLE seconds
(SPEEDY_STALL_TIMEOUT, the socket timeout the worker sets) and, once IDLE seconds have
passed since the request began, its bytes must have come at an average of at least
MIN_RATE bytes/s (SPEEDY_MIN_RATE): at time t, received >= MIN_RATE x (t - start - IDLE).
A client that trickles is dropped (and its pool blocks freed) about IDLE seconds after
its request began.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import socket
import time

STALL_ENV = "SPEEDY_STALL_TIMEOUT"
DEFAULT_STALL = 30.0
MIN_RATE_ENV = "SPEEDY_MIN_RATE"
DEFAULT_MIN_RATE = 16384.0
RECV_BUF = 16384

log = logging.getLogger("speedy.chunkserver.conn")


class Closed(Exception):
    """The connection ends here (peer gone, or nothing on it can be trusted any more)."""


class TooSlow(Exception):
    """A request whose bytes come slower than the pace rule allows (see MIN_RATE_ENV)."""


def positive_env(name: str, default: float) -> float:
    """A number > 0 from the environment; default when unset or invalid."""
    try:
        value = float(os.environ.get(name, default))
    except ValueError:
        return default
    return value if value > 0 else default


def stall_timeout() -> float:
    """Seconds a request may make no progress before it is dropped (SPEEDY_STALL_TIMEOUT)."""
    return positive_env(STALL_ENV, DEFAULT_STALL)


def min_rate() -> float:
    """Bytes/s a request must average after its first IDLE seconds (SPEEDY_MIN_RATE)."""
    return positive_env(MIN_RATE_ENV, DEFAULT_MIN_RATE)


class AdminPolicy:
    """Who may send admin opcodes: exact addresses, networks (CIDR) or host names.

    A host name is resolved once, when the policy is made (every address it has, v4
    and v6); a name that does not resolve is logged and allows nobody.
    """

    def __init__(self, allow: list[str]) -> None:
        self.networks: list = []
        for entry in allow:
            try:
                self.networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                self.networks.extend(resolve_host(entry))

    def allows(self, peer: str) -> bool:
        """Whether peer (an address string) may send admin opcodes."""
        try:
            ip = ipaddress.ip_address(peer.split("%", 1)[0])
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.networks)


def resolve_host(name: str) -> list:
    """The addresses of a host name as single-address networks; [] (logged) if it fails."""
    try:
        infos = socket.getaddrinfo(name, None, proto=socket.IPPROTO_TCP)
    except (socket.gaierror, UnicodeError) as e:
        log.warning("--admin_allow %s: cannot resolve (%s); it allows nobody", name, e)
        return []
    nets = []
    for _family, _type, _proto, _name, addr in infos:
        ip = ipaddress.ip_address(addr[0].split("%", 1)[0])
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        nets.append(ipaddress.ip_network(ip))
    return nets


class Conn:
    """A client socket with a small receive buffer (headers, small bodies), held only
    while a request is under way: an idle connection has none."""

    __slots__ = ("sock", "peer", "buf", "mv", "r", "w", "start", "got", "grace", "rate",
                 "idle_since", "watcher", "waiter", "counted")

    def __init__(self, sock, peer: str = "", grace: float = DEFAULT_STALL,
                 rate: float = DEFAULT_MIN_RATE) -> None:
        self.sock = sock
        self.peer = peer  # the source address
        self.idle_since = 0.0  # when its last request ended
        self.watcher = None  # the I/O watcher of a parked connection
        self.waiter = None  # the greenlet waiting for its next request, if any
        self.counted = True  # in its worker's connection count
        self.buf: bytearray | None = None
        self.mv: memoryview | None = None
        self.r = self.w = 0
        self.start = 0.0  # when the current request began; 0 between requests
        self.got = 0
        self.grace = grace
        self.rate = rate

    def pace(self, n: int) -> None:
        """Count n bytes received for the current request; TooSlow if behind the pace rule."""
        if self.start:
            self.got += n
            late = time.monotonic() - self.start - self.grace
            if late > 0 and self.got < late * self.rate:
                raise TooSlow(f"{self.got} bytes in {late + self.grace:.1f}s")

    def release(self) -> None:
        """Drop the buffer (nothing is buffered: the connection is between requests)."""
        if self.r == self.w and self.buf is not None:
            self.buf = self.mv = None
            self.r = self.w = 0

    def ensure_buffer(self) -> memoryview:
        """The buffer's view, made when the connection first needs one."""
        if self.mv is None:
            self.buf = bytearray(RECV_BUF)
            self.mv = memoryview(self.buf)
        return self.mv

    def fill(self) -> None:
        """Receive more into the buffer (Closed on EOF)."""
        self.ensure_buffer()
        if self.r == self.w:
            self.r = self.w = 0
        elif self.w == RECV_BUF:
            n = self.w - self.r
            self.buf[:n] = self.buf[self.r:self.w]
            self.r, self.w = 0, n
        n = self.sock.recv_into(self.mv[self.w:])
        if not n:
            raise Closed("peer closed")
        self.w += n
        self.pace(n)

    def wait_buffered(self, n: int) -> None:
        """Receive until n bytes (n <= RECV_BUF) are buffered."""
        while self.w - self.r < n:
            self.fill()

    def fill_now(self) -> bool:
        """Receive what has arrived, without waiting; False if nothing has."""
        sock = self.sock
        sock.settimeout(0.0)
        try:
            self.fill()
            return True
        except (BlockingIOError, TimeoutError):
            return False
        finally:
            sock.settimeout(self.grace)

    def read_exact(self, n: int) -> bytes:
        """n bytes (n <= RECV_BUF)."""
        while self.w - self.r < n:
            self.fill()
        out = bytes(self.mv[self.r:self.r + n])
        self.r += n
        return out

    def read_into(self, dest: memoryview) -> None:
        """Fill dest: buffered bytes first, then straight from the socket."""
        k = min(self.w - self.r, len(dest))
        if k:
            dest[:k] = self.mv[self.r:self.r + k]
            self.r += k
        recv_into = self.sock.recv_into
        total = len(dest)
        while k < total:
            n = recv_into(dest[k:])
            if not n:
                raise Closed("peer closed in the middle of a body")
            k += n
            self.pace(n)

    def skip(self, n: int) -> None:
        """Discard n bytes of the stream, in bounded reads."""
        k = min(self.w - self.r, n)
        self.r += k
        n -= k
        mv = self.ensure_buffer() if n > 0 else self.mv
        while n > 0:
            self.r = self.w = 0
            got = self.sock.recv_into(mv[:min(n, RECV_BUF)])
            if not got:
                raise Closed("peer closed in the middle of a body")
            n -= got
            self.pace(got)
