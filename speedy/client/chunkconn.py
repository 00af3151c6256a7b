"""Blocking protocol connections to chunkservers, and a per-server connection pool.

Plain sockets, no gevent: safe in any Python program and in threads. Every socket
operation has a timeout. A connection goes back to the pool only after a whole response
was read; one that saw any error is closed. A pooled connection is reused for a read
(or any idempotent request) without a readiness check: when the server closed it
meanwhile, the failed exchange says so (StaleConnection) and the request is sent again
on a new connection. Writes still check the pooled connection first, since a write
whose connection dies is never sent twice.
"""
from __future__ import annotations

import select
import socket
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Iterator, Sequence

from speedy.common.sockets import send_all
from speedy.wire import protocol as p
from speedy.wire.protocol import Err, Op

DEFAULT_CONNECT_TIMEOUT = 3.0
DEFAULT_TIMEOUT = 10.0
DEFAULT_MAX_IDLE = 8
IDLE_LIFETIME = 60.0
MAX_BODY = 0xFFFFFFFF
STREAM_BLOCK = 1 << 20
SMALL_REQUEST = 64 << 10
FIRST_RECV = 64 << 10     # the first receive of a response: its header and a small body
IDEMPOTENT = frozenset({Op.READ, Op.PING, Op.CHECK_DISK, Op.GET_STATUS,
                        Op.QUERY_IO_STATUS, Op.QUERY_DETAIL_INFOS, Op.DUMP_CHUNK,
                        Op.SET_STATUS})


class ChunkError(Exception):
    """A chunkserver that could not be reached or spoke garbage (not an error code)."""


class StaleConnection(ChunkError):
    """A pooled connection that died before any byte of the response arrived."""


def parse_addr(text: str, default_port: int = 8000) -> tuple[str, int]:
    """("host", port) from "host:port" (or "host", or "[v6]:port"); ValueError if bad."""
    text = text.strip()
    if not text:
        raise ValueError("empty address")
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
        if rest and not rest.startswith(":"):
            raise ValueError(f"bad address {text!r}")
    elif text.count(":") == 1:
        host, port_text = text.split(":")
    else:
        host, port_text = text, ""
    if not host:
        raise ValueError(f"bad address {text!r}: no host")
    if port_text == "":
        if ":" in text and not text.startswith("["):
            raise ValueError(f"bad address {text!r}: no port")
        return host, default_port
    if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
        raise ValueError(f"bad address {text!r}: port must be 1..65535")
    return host, int(port_text)


def format_addr(addr: tuple[str, int]) -> str:
    """"host:port" ("[v6]:port" for IPv6)."""
    host, port = addr
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


@dataclass
class Reply:
    """A chunkserver response: error code and body."""

    err: int
    body: bytes | bytearray = b""

    @property
    def ok(self) -> bool:
        """True for SUCCESS."""
        return self.err == Err.SUCCESS

    @property
    def err_name(self) -> str:
        """The error code's name (or its number when unknown)."""
        try:
            return Err(self.err).name
        except ValueError:
            return f"error {self.err}"


class ChunkConn:
    """One blocking connection to a chunkserver."""

    def __init__(self, addr: tuple[str, int], timeout: float = DEFAULT_TIMEOUT,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT):
        self.addr = addr
        self.timeout = timeout
        self.used = False
        self.idle_since = time.monotonic()
        try:
            self.sock = socket.create_connection(addr, timeout=connect_timeout)
        except OSError as e:
            raise ChunkError(f"{format_addr(addr)}: cannot connect: {describe(e)}") from None
        self.sock.settimeout(timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def close(self) -> None:
        """Close the socket (idempotent)."""
        try:
            self.sock.close()
        except OSError:
            pass

    def healthy(self, check: bool = True) -> bool:
        """False when the idle connection is too old or (check) was closed by the server
        or has stray bytes."""
        if time.monotonic() - self.idle_since > IDLE_LIFETIME:
            return False
        if not check:
            return True
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return False
        return not readable

    def send(self, op: int, parts: Sequence[bytes | memoryview]) -> None:
        """Send one request whose body is the concatenation of parts."""
        size = sum(len(x) for x in parts)
        if size > MAX_BODY:
            raise ChunkError(f"{format_addr(self.addr)}: request body too large ({size})")
        try:
            head = p.encode_request_header(op, size)
            if size < SMALL_REQUEST:  # one segment for small requests
                send_all(self.sock, b"".join([head, *parts]))
                return
            send_all(self.sock, head)
            for x in parts:
                if len(x):
                    send_all(self.sock, x)
        except OSError as e:
            if self.used and isinstance(e, ConnectionError):
                # the server closed the pooled connection: it got no whole request
                raise StaleConnection(f"{format_addr(self.addr)}: {describe(e)}") from None
            raise ChunkError(f"{format_addr(self.addr)}: send failed: {describe(e)}") from None

    def recv_header(self, op: int) -> tuple[int, int]:
        """(error, body_len) of the response to op."""
        head = self.recv_exact(p.RESPONSE_HEADER_SIZE, first=True)
        rop, err, size = p.decode_response_header(head)
        if rop != op:
            raise ChunkError(f"{format_addr(self.addr)}: response opcode {rop} "
                             f"to request {op}")
        return err, size

    def recv_reply(self, op: int) -> Reply:
        """The whole response to op; the header and a small body from one receive."""
        first = b""
        while len(first) < p.RESPONSE_HEADER_SIZE:
            more = self._recv(FIRST_RECV, first=not first)
            first = first + more if first else more
        rop, err, size = p.decode_response_header(first[:p.RESPONSE_HEADER_SIZE])
        if rop != op:
            raise ChunkError(f"{format_addr(self.addr)}: response opcode {rop} "
                             f"to request {op}")
        have = len(first) - p.RESPONSE_HEADER_SIZE
        if have > size:
            raise ChunkError(f"{format_addr(self.addr)}: {have - size} bytes after the "
                             f"response")
        if have == size:
            return Reply(err, first[p.RESPONSE_HEADER_SIZE:] if size else b"")
        body = bytearray(size)
        body[:have] = memoryview(first)[p.RESPONSE_HEADER_SIZE:]
        self.recv_exact(size - have, into=memoryview(body)[have:])
        return Reply(err, body)

    def _recv(self, n: int, first: bool = False) -> bytes:
        """Up to n bytes (at least one) from one receive."""
        try:
            data = self.sock.recv(n)
        except socket.timeout:
            raise ChunkError(f"{format_addr(self.addr)}: timed out after "
                             f"{self.timeout:g} s") from None
        except OSError as e:
            if first and self.used:
                raise StaleConnection(f"{format_addr(self.addr)}: {describe(e)}") from None
            raise ChunkError(f"{format_addr(self.addr)}: receive failed: "
                             f"{describe(e)}") from None
        if not data:
            if first and self.used:
                raise StaleConnection(f"{format_addr(self.addr)}: closed by peer")
            raise ChunkError(f"{format_addr(self.addr)}: connection closed mid-response")
        return data

    def recv_exact(self, n: int, first: bool = False,
                   into: memoryview | None = None) -> bytearray | memoryview:
        """Exactly n bytes (into the given view, when one is given); StaleConnection when a
        reused socket gave nothing at all."""
        buf = bytearray(n) if into is None else into
        view = memoryview(buf)
        got = 0
        while got < n:
            try:
                k = self.sock.recv_into(view[got:], min(n - got, STREAM_BLOCK))
            except socket.timeout:
                raise ChunkError(f"{format_addr(self.addr)}: timed out after "
                                 f"{self.timeout:g} s") from None
            except OSError as e:
                if first and got == 0 and self.used:
                    raise StaleConnection(f"{format_addr(self.addr)}: {describe(e)}") from None
                raise ChunkError(f"{format_addr(self.addr)}: receive failed: "
                                 f"{describe(e)}") from None
            if k == 0:
                if first and got == 0 and self.used:
                    raise StaleConnection(f"{format_addr(self.addr)}: closed by peer")
                raise ChunkError(f"{format_addr(self.addr)}: connection closed "
                                 f"mid-response")
            got += k
        return buf

    def call(self, op: int, parts: Sequence[bytes | memoryview] = ()) -> Reply:
        """Send a request and read its whole response."""
        self.send(op, parts)
        return self.recv_reply(op)


def describe(e: BaseException) -> str:
    """A short text for a socket error."""
    if isinstance(e, socket.timeout):
        return "timed out"
    return getattr(e, "strerror", None) or str(e) or type(e).__name__


class ConnPool:
    """Idle connections kept per chunkserver address; thread-safe (list pop and append
    are atomic, so taking and giving back a connection takes no lock)."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 max_idle: int = DEFAULT_MAX_IDLE):
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_idle = max_idle
        self._idle: dict[tuple[str, int], list[ChunkConn]] = {}
        self._lock = threading.Lock()
        self._closed = False

    def _take(self, addr: tuple[str, int], check: bool = True) -> ChunkConn | None:
        """An idle connection to addr (a healthy one when check), or None."""
        conns = self._idle.get(addr)
        while conns:
            try:
                conn = conns.pop()   # atomic: no lock on the hot path
            except IndexError:
                return None
            if conn.healthy(check):
                return conn
            conn.close()
        return None

    def _give(self, conn: ChunkConn) -> None:
        """Return a clean connection to the pool (or close it when the pool is full)."""
        conn.used = True
        conn.idle_since = time.monotonic()
        conns = self._idle.get(conn.addr)
        if conns is None:
            with self._lock:
                conns = self._idle.setdefault(conn.addr, [])
        if self._closed or len(conns) >= self.max_idle:
            conn.close()
            return
        conns.append(conn)
        if self._closed:   # close() ran meanwhile: it may have missed this one
            conn.close()

    @contextmanager
    def connection(self, addr: tuple[str, int], fresh: bool = False) -> Iterator[ChunkConn]:
        """A connection for one or more whole request/response exchanges."""
        conn = None if fresh else self._take(addr)
        if conn is None:
            conn = ChunkConn(addr, self.timeout, self.connect_timeout)
        try:
            yield conn
        except BaseException:
            conn.close()
            raise
        self._give(conn)

    def call(self, addr: tuple[str, int], op: int,
             parts: Sequence[bytes | memoryview] = ()) -> Reply:
        """One request; an idempotent one goes out on a pooled connection unchecked and
        is retried once on a fresh connection when that one turns out to be dead."""
        retry = op in IDEMPOTENT
        conn = self._take(addr, check=not retry)
        if conn is not None:
            try:
                reply = conn.call(op, parts)
            except StaleConnection:
                conn.close()
                if not retry:
                    raise
            except BaseException:
                conn.close()
                raise
            else:
                self._give(conn)
                return reply
        conn = ChunkConn(addr, self.timeout, self.connect_timeout)
        try:
            reply = conn.call(op, parts)
        except BaseException:
            conn.close()
            raise
        self._give(conn)
        return reply

    def close(self) -> None:
        """Close every idle connection; later connections are not pooled."""
        with self._lock:
            self._closed = True
            lists = list(self._idle.values())
        for lst in lists:
            while lst:
                try:
                    lst.pop().close()
                except IndexError:
                    break

    # -- the opcodes -------------------------------------------------------------------

    def write(self, addr: tuple[str, int], group_id: int, fid: int,
              data: bytes | memoryview) -> Reply:
        """WRITE fid with data (never retried: the caller decides)."""
        return self.call(addr, Op.WRITE, [p.encode_file_key(group_id, fid), data])

    def read(self, addr: tuple[str, int], group_id: int, fid: int) -> Reply:
        """READ fid: the whole file in the reply body."""
        return self.call(addr, Op.READ, [p.encode_file_key(group_id, fid)])

    def delete(self, addr: tuple[str, int], group_id: int, fid: int) -> Reply:
        """DELETE fid (retried on a dead pooled connection: deleting twice is harmless)."""
        try:
            with self.connection(addr) as conn:
                return conn.call(Op.DELETE, [p.encode_file_key(group_id, fid)])
        except StaleConnection:
            with self.connection(addr, fresh=True) as conn:
                return conn.call(Op.DELETE, [p.encode_file_key(group_id, fid)])

    def ping(self, addr: tuple[str, int]) -> Reply:
        """PING."""
        return self.call(addr, Op.PING)

    def set_status(self, addr: tuple[str, int], status: int) -> Reply:
        """SET_STATUS (0 RW, 1 RO)."""
        return self.call(addr, Op.SET_STATUS, [bytes([status])])

    def detail_info(self, addr: tuple[str, int]) -> p.DetailInfo:
        """QUERY_DETAIL_INFOS, decoded."""
        reply = self.call(addr, Op.QUERY_DETAIL_INFOS)
        if not reply.ok:
            raise ChunkError(f"{format_addr(addr)}: QUERY_DETAIL_INFOS answered "
                             f"{reply.err_name}")
        try:
            return p.decode_detail_info(reply.body)
        except p.ProtocolError as e:
            raise ChunkError(f"{format_addr(addr)}: {e}") from None

    def garbage(self, addr: tuple[str, int]) -> tuple[int, list[p.ChunkGarbage]]:
        """QUERY_GARBAGE (new, admin): (chunk being compacted or 0, per chunk garbage)."""
        reply = self.call(addr, Op.QUERY_GARBAGE)
        if not reply.ok:
            raise ChunkError(f"{format_addr(addr)}: QUERY_GARBAGE answered {reply.err_name}"
                             + (" (is this host in the server's --admin_allow?)"
                                if reply.err == Err.INTERNAL_ERROR else ""))
        try:
            return p.decode_garbage(reply.body)
        except p.ProtocolError as e:
            raise ChunkError(f"{format_addr(addr)}: {e}") from None

    def compact(self, addr: tuple[str, int], threshold: float | None,
                wait: bool) -> tuple[int, int]:
        """COMPACT (new, admin): (chunks at the threshold, bytes freed if wait); with wait
        the answer comes when the server has compacted them (no time limit)."""
        body = p.encode_compact_request(threshold, wait)
        conn = ChunkConn(addr, None if wait else self.timeout, self.connect_timeout)
        try:
            reply = conn.call(Op.COMPACT, [body])
        finally:
            conn.close()
        if not reply.ok or len(reply.body) != p.COMPACT_RESULT.size:
            raise ChunkError(f"{format_addr(addr)}: COMPACT answered {reply.err_name}"
                             + (" (is this host in the server's --admin_allow?)"
                                if reply.err == Err.INTERNAL_ERROR else ""))
        return p.COMPACT_RESULT.unpack(reply.body)
