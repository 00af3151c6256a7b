"""Pipelined READs: many callers share one connection per chunkserver.

PROTOCOL.md: requests that arrive back to back on one connection are answered in order.
A Pipe is one connection with a queue of callers waiting for their answers, in the order
their requests went out; one reader thread (a greenlet under gevent) receives the answers
and hands each to the caller at the head of the queue:

    caller A --READ a--\\                          /--> A gets answer a
    caller B --READ b---> [READ a|READ b|READ c] --> reader: a, b, c in order --> B ...
    caller C --READ c--/      one send                one receive (or a few)

A caller takes a connection that is not receiving a large answer (LARGE_ANSWER), so
small answers do not wait behind a large one for long; a second connection (up to
MAX_PIPES) is made only when every one is. Requests made close together go out in one
send: the first caller of a batch yields once
(time.sleep(0): under gevent the other ready greenlets run and queue theirs) and sends
what has queued. A busy server then also reads several requests per receive. This is
what a process with many concurrent readers (the HTTP gateway) wants; a program with one
caller at a time gains nothing and uses the ConnPool.

Failures: a connection that ends or breaks fails every caller still waiting on it; a
caller whose answer had not begun gets StaleConnection and is retried once on a new
connection (READ is idempotent). No answer byte within the timeout while callers wait:
the connection is dropped and they get ChunkError (their read fails over). A watchdog
thread per pipe checks that a few times per timeout, so the socket waits carry no timer
of their own (under gevent a timer per wait costs more than the rest of a small READ).
"""
from __future__ import annotations

import socket
import threading
import time
from collections import deque

from speedy.client.chunkconn import (DEFAULT_CONNECT_TIMEOUT, DEFAULT_TIMEOUT, ChunkError,
                                     Reply, StaleConnection, describe, format_addr)
from speedy.common.sockets import send_all, shut
from speedy.wire import protocol as p
from speedy.wire.protocol import Op

MAX_PIPES = 4              # per server: one, and more only while large answers stream
LARGE_ANSWER = 256 << 10   # an answer this large makes new requests take another pipe
RECV_SIZE = 256 << 10
HEADER = p.RESPONSE_HEADER_SIZE


class CutShort(ChunkError):
    """The connection ended inside an answer: the answers behind it had not begun."""


class Ticket:
    """One caller's place in a pipe's queue: set when its answer (or error) is in."""

    __slots__ = ("done", "reply", "error")

    def __init__(self) -> None:
        self.done = threading.Event()   # under gevent its Event: the cheapest hand-over
        self.reply: Reply | None = None
        self.error: ChunkError | None = None

    def settle(self, reply: Reply | None, error: ChunkError | None = None) -> None:
        """Hand the caller its answer or error and wake it."""
        self.reply, self.error = reply, error
        self.done.set()

    def wait(self) -> Reply:
        """The answer (the pipe's watchdog enforces the timeout); the error, raised."""
        self.done.wait()
        if self.error is not None:
            raise self.error
        assert self.reply is not None
        return self.reply


class Pipe:
    """One connection carrying pipelined READs, with its reader thread."""

    def __init__(self, addr: tuple[str, int], timeout: float = DEFAULT_TIMEOUT,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT):
        self.addr = addr
        self.name = format_addr(addr)
        self.timeout = timeout
        try:
            self.sock = socket.create_connection(addr, timeout=connect_timeout)
            self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            self.sock.settimeout(None)   # the watchdog keeps the time
        except OSError as e:
            raise ChunkError(f"{self.name}: cannot connect: {describe(e)}") from None
        self.waiting: deque[Ticket] = deque()
        self.out: list[bytes] = []
        self.lock = threading.Lock()       # waiting and out: one order on the wire
        self.send_lock = threading.Lock()  # one batch on the socket at a time
        self.batching = False
        self.large = False              # receiving a large answer: new requests go elsewhere
        self.dead = False
        self.since = time.monotonic()   # last progress: bytes in, or the first caller
        threading.Thread(target=self._receive, name=f"pipe-{self.name}", daemon=True).start()
        threading.Thread(target=self._watch, name=f"pipe-watch-{self.name}",
                         daemon=True).start()

    def __len__(self) -> int:
        return len(self.waiting)

    def read(self, group_id: int, fid: int) -> Reply:
        """READ fid: the whole file in the reply body (StaleConnection: try a new pipe)."""
        ticket = Ticket()
        request = p.encode_request(Op.READ, p.encode_file_key(group_id, fid))
        with self.lock:
            if self.dead:
                raise StaleConnection(f"{self.name}: connection closed")
            if not self.waiting:
                self.since = time.monotonic()
            self.waiting.append(ticket)
            self.out.append(request)
            lead = not self.batching
            self.batching = True
        if lead:
            time.sleep(0)  # let the other ready callers queue theirs: one send for all
            self._flush()
        return ticket.wait()

    def _flush(self) -> None:
        """Send every queued request, in queue order."""
        with self.send_lock:
            with self.lock:
                data = b"".join(self.out)
                self.out.clear()
                self.batching = False
            if not data:
                return
            try:
                send_all(self.sock, data)
            except OSError as e:
                self.fail(StaleConnection(f"{self.name}: send failed: {describe(e)}"), 0)

    def _receive(self) -> None:
        """The reader: answers in order to the callers in the queue, until the end."""
        buf = bytearray()
        try:
            while True:
                while len(buf) < HEADER:
                    buf += self._recv_some(partial=bool(buf))
                op, err, size = p.RESPONSE_HEADER.unpack_from(buf)
                if op != Op.READ:
                    raise ChunkError(f"{self.name}: response opcode {op} to a READ")
                have = len(buf) - HEADER
                if have >= size:
                    with memoryview(buf) as view:   # one copy out (a slice would be two)
                        body: bytes | bytearray = bytes(view[HEADER:HEADER + size])
                    del buf[:HEADER + size]
                else:
                    body = bytearray(size)
                    body[:have] = buf[HEADER:]
                    buf.clear()
                    self.large = size >= LARGE_ANSWER
                    self._recv_into(memoryview(body)[have:])
                    self.large = False
                with self.lock:
                    ticket = self.waiting.popleft() if self.waiting else None
                if ticket is None:
                    raise ChunkError(f"{self.name}: an answer nobody asked for")
                ticket.settle(Reply(err, body))
        except StaleConnection as e:
            self.fail(e, stale_from=0)
        except CutShort as e:
            self.fail(e, stale_from=1)
        except ChunkError as e:
            self.fail(e)
        except Exception as e:  # noqa: BLE001 (the reader never dies leaving callers waiting)
            self.fail(ChunkError(f"{self.name}: receive failed: {describe(e)}"))

    def _watch(self) -> None:
        """Fail the pipe when callers wait and no byte came for the timeout."""
        tick = min(1.0, self.timeout / 4)
        while not self.dead:
            time.sleep(tick)
            if self.waiting and time.monotonic() - self.since > self.timeout:
                self.fail(ChunkError(f"{self.name}: timed out after {self.timeout:g} s"))

    def _recv_some(self, partial: bool) -> bytes:
        """Some bytes. StaleConnection when the connection ends before an answer began
        (partial: it had begun)."""
        try:
            data = self.sock.recv(RECV_SIZE)
        except OSError as e:
            cls = CutShort if partial else StaleConnection
            raise cls(f"{self.name}: receive failed: {describe(e)}") from None
        if not data:
            cls = CutShort if partial else StaleConnection
            raise cls(f"{self.name}: closed by peer")
        self.since = time.monotonic()
        return data

    def _recv_into(self, view: memoryview) -> None:
        """Fill view from the socket (the rest of a large answer)."""
        got = 0
        while got < len(view):
            try:
                n = self.sock.recv_into(view[got:])
            except OSError as e:
                raise CutShort(f"{self.name}: receive failed: {describe(e)}") from None
            if not n:
                raise CutShort(f"{self.name}: connection closed mid-response")
            self.since = time.monotonic()
            got += n

    def fail(self, error: ChunkError, stale_from: int | None = None) -> None:
        """End the pipe: close it and fail everyone still waiting. The callers from
        position stale_from on had no byte of their answer: they may try once more."""
        with self.lock:
            if self.dead and not self.waiting:
                return
            self.dead = True
            waiting, self.waiting = self.waiting, deque()
        shut(self.sock)
        try:
            self.sock.close()
        except OSError:
            pass
        for i, ticket in enumerate(waiting):
            if stale_from is not None and i >= stale_from:
                ticket.settle(None, StaleConnection(str(error)))
            else:
                ticket.settle(None, error)

    def close(self) -> None:
        """Close the connection (waiting callers fail)."""
        if not self.dead:
            self.fail(ChunkError(f"{self.name}: closed"))


class PipeSet:
    """Pipes per chunkserver address, made on first use; thread-safe."""

    def __init__(self, timeout: float = DEFAULT_TIMEOUT,
                 connect_timeout: float = DEFAULT_CONNECT_TIMEOUT,
                 max_pipes: int = MAX_PIPES):
        self.timeout = timeout
        self.connect_timeout = connect_timeout
        self.max_pipes = max(1, max_pipes)
        self._pipes: dict[tuple[str, int], list[Pipe]] = {}
        self._making: dict[tuple[str, int], threading.Lock] = {}
        self._lock = threading.Lock()
        self._closed = False

    def read(self, addr: tuple[str, int], group_id: int, fid: int) -> Reply:
        """READ fid on addr; a request whose connection died unanswered goes again once."""
        try:
            return self._pipe(addr).read(group_id, fid)
        except StaleConnection:
            return self._pipe(addr).read(group_id, fid)   # that pipe is dead by now

    def _pipe(self, addr: tuple[str, int]) -> Pipe:
        """A live pipe to addr that is not receiving a large answer (one pipe carries the
        most requests per send and per receive); a new one when there is none, up to
        max_pipes."""
        for pipe in self._pipes.get(addr, ()):
            if not pipe.dead and not pipe.large:
                return pipe
        with self._lock:
            making = self._making.setdefault(addr, threading.Lock())
        with making:   # one connect at a time per server; the others use what is there
            with self._lock:
                if self._closed:
                    raise ChunkError(f"{format_addr(addr)}: client closed")
                pipes = [x for x in self._pipes.get(addr, []) if not x.dead]
                self._pipes[addr] = pipes
            free = [x for x in pipes if not x.large]
            if free or len(pipes) >= self.max_pipes:
                return free[0] if free else min(pipes, key=len)
            pipe = Pipe(addr, self.timeout, self.connect_timeout)
            with self._lock:
                self._pipes[addr] = pipes + [pipe]
                if self._closed:
                    pipe.close()
            return pipe

    def close(self) -> None:
        """Close every pipe; later reads fail."""
        with self._lock:
            self._closed = True
            pipes = [x for lst in self._pipes.values() for x in lst]
            self._pipes.clear()
        for pipe in pipes:
            pipe.close()
