"""``speedy bench --gateway``: one keep-alive HTTP/1.1 connection to the gateway per thread.

PUT is ``POST /blobs`` (the key comes back in the JSON answer), GET is ``GET /<key>``;
like the other connections, every payload starts with its index so a GET checks that it
got the right blob, not just the right number of bytes. The requests are written and
the answers parsed by hand on a plain socket (Content-Length bodies only), so that the
load generator spends little CPU next to the gateway it measures.

The gateway closes keep-alive connections left idle (--idle_timeout), for instance while
the client library's rounds run. A connection idle for IDLE_CHECK seconds is checked
before it is used again and reopened when the gateway closed it; a GET that still finds
its reused connection closed before any byte of the answer is sent once more on a new
one. A PUT never is: the gateway may have stored it before the connection broke.
"""
from __future__ import annotations

import json
import select
import socket
import struct
import time
from typing import Any

PREFIX = 8
U64 = struct.Struct(">Q")
HEAD_LIMIT = 16 << 10
IDLE_CHECK = 0.5          # seconds idle after which a connection is checked before use


class HTTPAnswerError(Exception):
    """The gateway's answer could not be parsed."""


class StaleConnection(Exception):
    """A kept-alive connection was closed by the gateway before it answered."""


class GatewayConnection:
    """put/get through the gateway's blob routes on one persistent connection."""

    def __init__(self, target: Any, payload: bytes, keys: dict) -> None:
        self.target = target
        self.size = len(payload)
        self.prefix = min(PREFIX, self.size)
        self.tail = bytes(payload[self.prefix:])
        self.keys = keys
        self.detail = ""
        self.sock: socket.socket | None = None
        self.reused = False       # the connection has answered before (it may have gone stale)
        self.used = 0.0           # when it last answered (time.monotonic)
        self.buf = b""
        self.host = f"Host: {target.host}:{target.port}\r\n".encode()

    def connect(self) -> None:
        """Open the connection (it is reopened after an error)."""
        self.sock = socket.create_connection((self.target.host, self.target.port),
                                             timeout=self.target.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reused = False
        self.buf = b""

    def close(self) -> None:
        """Close the connection."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _answer(self) -> tuple[int, bytes]:
        """(status, body) of the next answer; StaleConnection when a reused connection
        was closed before any byte of it (the gateway closes idle connections)."""
        sock = self.sock
        while b"\r\n\r\n" not in self.buf:
            try:
                data = sock.recv(65536)
            except ConnectionError:
                if self.reused and not self.buf:
                    raise StaleConnection("closed while idle") from None
                raise
            if not data:
                if self.reused and not self.buf:
                    raise StaleConnection("closed while idle")
                raise HTTPAnswerError("connection closed")
            self.buf += data
            if len(self.buf) > HEAD_LIMIT and b"\r\n\r\n" not in self.buf:
                raise HTTPAnswerError("answer headers too long")
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        status = int(head[9:12])
        low = head.lower()
        i = low.find(b"\r\ncontent-length:")
        if i < 0:
            raise HTTPAnswerError("answer without Content-Length")
        n = int(low[i + 17:low.find(b"\r\n", i + 2) if low.find(b"\r\n", i + 2) > 0
                    else len(low)])
        if len(rest) >= n:
            self.buf = rest[n:]
            return status, rest[:n]
        body = bytearray(n)
        view = memoryview(body)
        view[:len(rest)] = rest
        got = len(rest)
        while got < n:
            k = sock.recv_into(view[got:], n - got)
            if not k:
                raise HTTPAnswerError("connection closed in the body")
            got += k
        self.buf = b""
        return status, body

    def _call(self, head: bytes, body: bytes, retry: bool) -> tuple[int, bytes]:
        """One exchange; when retry, once more on a new connection if a reused one turns
        out to have been closed while idle (the gateway shut it before it read the request)."""
        try:
            return self._once(head, body)
        except StaleConnection:
            if not retry:
                raise
            return self._once(head, body)   # on a new connection: never stale

    def _closed_while_idle(self) -> bool:
        """True when a connection idle for a while was closed by the gateway meanwhile."""
        if time.monotonic() - self.used < IDLE_CHECK:
            return False
        return bool(select.select([self.sock], [], [], 0)[0])   # EOF (or stray bytes)

    def _once(self, head: bytes, body: bytes) -> tuple[int, bytes]:
        if self.sock is not None and self.reused and self._closed_while_idle():
            self.close()
        if self.sock is None:
            self.connect()
        try:
            try:
                self.sock.sendall(head + body if len(body) < 65536 else head)
                if len(body) >= 65536:
                    self.sock.sendall(body)
            except ConnectionError:
                if not self.reused:
                    raise
                raise StaleConnection("closed while idle") from None
            answer = self._answer()
        except (OSError, ValueError, HTTPAnswerError, StaleConnection):
            self.close()  # the next request reconnects
            raise
        self.reused = True
        self.used = time.monotonic()
        return answer

    def _exchange(self, head: bytes, body: bytes, want: int,
                  retry: bool) -> tuple[str | None, bytes]:
        """(None, answer body) when the status is want, else (error name, b"")."""
        try:
            status, data = self._call(head, body, retry)
        except (OSError, ValueError, HTTPAnswerError, StaleConnection) as e:
            self.detail = str(e)
            return type(e).__name__, b""
        if status != want:
            self.detail = data[:200].decode("utf-8", "replace").strip()
            return f"HTTP {status}", b""
        return None, data

    def put(self, index: int) -> str | None:
        """POST one blob; remember its key under its index."""
        body = U64.pack(index)[:self.prefix] + self.tail
        head = (b"POST /blobs HTTP/1.1\r\n" + self.host +
                b"Content-Type: application/octet-stream\r\nContent-Length: %d\r\n\r\n"
                % len(body))
        err, data = self._exchange(head, body, 201, retry=False)
        if err is None:
            self.keys[index] = json.loads(data)["key"]
        return err

    def get(self, item: tuple[str, int]) -> str | None:
        """GET one blob by key; check its size and index prefix."""
        key, index = item
        err, data = self._exchange(b"GET /%s HTTP/1.1\r\n%s\r\n" % (key.encode(), self.host),
                                   b"", 200, retry=True)
        if err is not None:
            return err
        if len(data) != self.size:
            return "wrong size"
        if data[:self.prefix] != U64.pack(index)[:self.prefix]:
            return "wrong data"
        return None
