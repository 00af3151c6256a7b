"""A lean HTTP/1.1 server for the gateway's WSGI app, on one gevent StreamServer.

    server = HTTPServer(listening_socket, app)      # in a worker, after gevent patched
    server.start(); ...; server.stop(timeout=20)    # stop: idle keep-alive connections close

What the gateway needs and no more: keep-alive (HTTP/1.1, or 1.0 with
`Connection: keep-alive`), request bodies with Content-Length or chunked, `Expect:
100-continue`, answers with Content-Length (one send for the head and a small body) or
chunked, a one-line plain-text 4xx for a malformed request line or header block, a line
per answer in the access log when it is given one (speedy.gateway.access), and a
timeout: a connection may wait for its next request, and then take to send its head, at
most `timeout` seconds (a head cut off by it gets 408); a body or an answer that makes no
progress for that long is cut. It
costs a fifth of the CPU per request of gevent.pywsgi (measured: 12 vs 60 us for a
4 KiB answer), which is most of what the gateway spends on a small GET.

gevent is imported by the caller (the worker, after fork); this module only uses the
gevent objects it is handed through the socket and StreamServer.
"""
from __future__ import annotations

import functools
import logging
import re
import socket
import sys
import threading
import time
from typing import Any, Callable, Iterable
from urllib.parse import unquote_to_bytes

from speedy.common.sockets import send_all, send_parts, shut
from speedy.gateway.access import AccessLog
from speedy.gateway.http import BODY_KEYS, chunk_size, environ_key, one_line, status_line

log = logging.getLogger("speedy.gateway.http")

MAX_HEAD = 64 << 10          # request line + headers
MAX_HEADERS = 100
RECV = 256 << 10
COALESCE = 64 << 10          # a body up to this size goes out in one send with the head
DRAIN_LIMIT = 1 << 20        # unread request body read and dropped to keep the connection
CHUNK_LINE = 4096


class BadRequest(Exception):
    """A request that cannot be parsed: answered with status and a one-line reason."""

    def __init__(self, status: int, reason: str):
        super().__init__(reason)
        self.status = status


class Closed(Exception):
    """The client closed the connection."""


class Conn:
    """One client connection: a receive buffer over the socket."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.buf = bytearray()
        self.late = False   # the sweeper cut its wait for a request head

    def fill(self) -> None:
        """Receive more bytes; Closed at the end of the stream."""
        data = self.sock.recv(RECV)
        if not data:
            raise Closed()
        self.buf += data

    def take(self, n: int) -> bytes:
        """Up to n bytes: buffered ones, or straight from one receive."""
        if not self.buf:
            data = self.sock.recv(min(n, RECV))
            if not data:
                raise Closed()
            return data
        out = bytes(self.buf[:n])
        del self.buf[:n]
        return out

    def line(self) -> bytes:
        """One CRLF-terminated line (the CRLF dropped), at most CHUNK_LINE bytes."""
        while True:
            i = self.buf.find(b"\r\n")
            if i >= 0:
                out = bytes(self.buf[:i])
                del self.buf[:i + 2]
                return out
            if len(self.buf) > CHUNK_LINE:
                raise BadRequest(400, "chunk size line too long")
            self.fill()


class Body:
    """wsgi.input: the request body, by Content-Length or chunked; b"" at its end."""

    def __init__(self, conn: Conn | None, length: int | None, chunked: bool,
                 on_first_read: Callable[[], None] | None):
        self.conn = conn
        self.left = length or 0        # bytes left: of the body, or of the current chunk
        self.chunked = chunked
        self.done = not chunked and not length
        self.on_first_read = on_first_read

    def read(self, n: int = -1) -> bytes:
        """Up to n bytes (n < 0: the rest, for small bodies only); ValueError when the
        chunked framing is broken, OSError when the client stops sending."""
        if self.on_first_read is not None:
            self.on_first_read()
            self.on_first_read = None
        if n is None or n < 0:
            return b"".join(iter(lambda: self.read(RECV), b""))
        if self.done or n == 0:
            return b""
        if self.chunked and self.left == 0:
            self._next_chunk()
            if self.done:
                return b""
        try:
            data = self.conn.take(min(n, self.left))
        except Closed:
            raise OSError("the client closed the connection in the body") from None
        self.left -= len(data)
        if self.left == 0 and not self.chunked:
            self.done = True
        if self.left == 0 and self.chunked and self._line() != b"":
            raise ValueError("malformed chunked body: no CRLF after a chunk")
        return data

    def _next_chunk(self) -> None:
        size = chunk_size(self._line().split(b";", 1)[0].strip())
        if size is None:
            raise ValueError("malformed chunked body: bad chunk size")
        self.left = size
        if self.left == 0:
            while self._line():   # trailers, up to the empty line
                pass
            self.done = True

    def _line(self) -> bytes:
        """One line of the chunked framing; ValueError when it is too long or cut short."""
        try:
            return self.conn.line()
        except (Closed, BadRequest) as e:
            raise ValueError(f"malformed chunked body: {e or 'cut short'}") from None

    def drain(self, limit: int = DRAIN_LIMIT) -> bool:
        """Read and drop the unread body; True when it ended within limit bytes."""
        if self.on_first_read is not None and not self.done:
            return False  # the client waits for a 100 Continue nobody sent: just close
        try:
            while not self.done and limit > 0:
                limit -= len(self.read(min(RECV, limit)) or b"")
        except (OSError, ValueError):
            return False
        return self.done


TARGET_BAD = re.compile(rb"[\x00-\x20\x7f]")   # bytes a request target must not hold
HEADER_KEYS_MAX = 1024       # header names remembered by header_key
ASCII_SPACE = " \t\n\r\x0b\x0c"   # what bytes.strip() strips: str.strip() strips more


@functools.lru_cache(maxsize=HEADER_KEYS_MAX)
def header_key(name: str) -> str:
    """The environ key of a header field name (HTTP_USER_AGENT, CONTENT_TYPE); 400 when
    the name is malformed. Valid names are remembered (a malformed one raises: not kept)."""
    if not name or name != name.strip(ASCII_SPACE) or " " in name:
        raise BadRequest(400, "malformed header field")
    return environ_key(name)


NO_BODY = Body(None, None, False, None)   # the wsgi.input of every request without a body


def parse_head(head: bytes, environ: dict) -> tuple[str, bool]:
    """Fill environ from the request line and headers; (protocol, keep-alive wanted)."""
    request_line, _, fields = head.partition(b"\r\n")
    parts = request_line.split(b" ")
    if len(parts) != 3:
        raise BadRequest(400, "malformed request line")
    method, target, proto = parts
    if proto == b"HTTP/1.1":
        version = "HTTP/1.1"
    elif proto == b"HTTP/1.0":
        version = "HTTP/1.0"
    else:
        raise BadRequest(505 if proto.startswith(b"HTTP/") else 400,
                         "unsupported HTTP version")
    if not method.isalpha() or not method.isupper() or len(method) > 16:
        raise BadRequest(400, "malformed method")
    if target.startswith((b"http://", b"https://")):
        target = b"/" + target.split(b"/", 3)[3] if target.count(b"/") >= 3 else b"/"
    if not target.startswith(b"/") or TARGET_BAD.search(target):
        raise BadRequest(400, "malformed request target")
    path, _, query = target.partition(b"?")
    environ["REQUEST_METHOD"] = method.decode()
    environ["PATH_INFO"] = (unquote_to_bytes(path) if b"%" in path else path).decode("latin-1")
    environ["QUERY_STRING"] = query.decode("latin-1")
    environ["SERVER_PROTOCOL"] = version
    lines = fields.decode("latin-1").split("\r\n") if fields else []
    if len(lines) > MAX_HEADERS:
        raise BadRequest(431, "too many header fields")
    for line in lines:
        name, colon, value = line.partition(":")
        if not colon:
            raise BadRequest(400, "malformed header field")
        key = header_key(name)
        text = value.strip(" \t")
        if not text.isprintable() and any(c < " " and c != "\t" for c in text):
            raise BadRequest(400, f"control character in header {name}")
        if key in BODY_KEYS:
            if key == "CONTENT_LENGTH" and key in environ and environ[key] != text:
                raise BadRequest(400, "conflicting Content-Length headers")
            environ[key] = text
        elif key in environ:
            environ[key] += "," + text
        else:
            environ[key] = text
    conn_opts = environ.get("HTTP_CONNECTION", "").lower()
    if version == "HTTP/1.1":
        return version, "close" not in conn_opts
    return version, "keep-alive" in conn_opts


def content_length(headers: list[tuple[str, str]]) -> str | None:
    """The value of an answer's Content-Length header, or None."""
    for k, v in headers:
        if len(k) == 14 and k.lower() == "content-length":
            return v
    return None


def ignore_write(data: bytes) -> None:
    """WSGI's write() callable: the gateway's app never uses it."""


class HTTPServer:
    """Serves a WSGI app on a listening gevent socket; one greenlet per connection."""

    def __init__(self, sock: Any, app: Callable, stream_server: Any, pool: Any,
                 timeout: float = 60.0, access: AccessLog | None = None):
        self.app = app
        self.timeout = timeout
        self.access = access   # the access log, or None
        self.heads: dict[Conn, float] = {}   # connections waiting for a request head: since
        self.stopping = False
        self.server = stream_server(sock, self.handle, spawn=pool)
        host, port = sock.getsockname()[:2]
        self.base = {"SERVER_NAME": str(host), "SERVER_PORT": str(port),
                     "SCRIPT_NAME": "", "wsgi.version": (1, 0), "wsgi.url_scheme": "http",
                     "wsgi.errors": sys.stderr, "wsgi.multithread": False,
                     "wsgi.multiprocess": True, "wsgi.run_once": False}
        self._date = (0, "")

    def start(self) -> None:
        """Start accepting, and the sweeper of late request heads."""
        self.server.start()
        threading.Thread(target=self.sweep, name="http-sweep", daemon=True).start()

    def stop(self, timeout: float) -> None:
        """Stop accepting, close idle keep-alive connections, let requests finish."""
        self.stopping = True
        self.server.close()
        for conn in list(self.heads):
            if not conn.buf:   # no byte of a next request yet: idle
                shut(conn.sock)
        self.server.stop(timeout=timeout)

    def sweep(self) -> None:
        """Cut the waits for a request head that passed the timeout, a few times per
        timeout. The head waits carry no timer of their own: under gevent, a timer per
        wait costs more than parsing a request."""
        tick = min(1.0, self.timeout / 4)
        while True:
            time.sleep(tick)
            now = time.monotonic()
            for conn, since in list(self.heads.items()):
                if now - since > self.timeout:
                    conn.late = True
                    shut(conn.sock, socket.SHUT_RD)   # its recv returns b"" at once

    def date(self) -> str:
        """The Date header's value, rendered once a second."""
        now = int(time.time())
        if self._date[0] != now:
            from email.utils import formatdate
            self._date = (now, formatdate(now, usegmt=True))
        return self._date[1]

    def handle(self, sock: socket.socket, addr: tuple) -> None:
        """Serve requests on one connection until it closes."""
        sock.settimeout(self.timeout)   # body reads and answers: per wait
        if sock.family in (socket.AF_INET, socket.AF_INET6):
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = Conn(sock)
        base = dict(self.base, REMOTE_ADDR=str(addr[0]),
                    REMOTE_PORT=str(addr[1]) if len(addr) > 1 else "")
        try:
            while not self.stopping and self.serve_one(conn, base):
                pass
        except (OSError, Closed):
            pass
        finally:
            sock.close()

    def read_head(self, conn: Conn) -> bytes | None:
        """The next request's head (None: the client closed, or stayed idle past the
        timeout, between requests). The sweeper keeps the time of the wait."""
        start = 0
        sock = conn.sock
        sock.settimeout(None)
        self.heads[conn] = time.monotonic()
        try:
            while True:
                i = conn.buf.find(b"\r\n\r\n", start)
                if i > MAX_HEAD:
                    raise BadRequest(431, "request head larger than 64 KiB")
                if i >= 0:
                    head = bytes(conn.buf[:i])
                    del conn.buf[:i + 4]
                    return head.lstrip(b"\r\n")
                if len(conn.buf) > MAX_HEAD:
                    raise BadRequest(431, "request head larger than 64 KiB")
                start = max(0, len(conn.buf) - 3)
                try:
                    conn.fill()
                except (Closed, OSError) as e:
                    if isinstance(e, OSError) and not conn.late:
                        raise   # the connection broke
                    if not conn.buf.strip():
                        return None
                    if conn.late:   # the sweeper's shutdown ends the wait either way
                        raise BadRequest(408, f"request head not received within "
                                              f"{self.timeout:g} s") from None
                    raise BadRequest(400, "request head cut short") from None
        finally:
            del self.heads[conn]
            sock.settimeout(self.timeout)

    def serve_one(self, conn: Conn, base: dict) -> bool:
        """Read one request, answer it; True when the connection stays open. base: the
        connection's environ entries (server, WSGI and remote address)."""
        head = None
        environ = base
        t0 = 0.0
        try:
            head = self.read_head(conn)
            if head is None:
                return False
            t0 = time.monotonic()
            environ = base.copy()
            proto, keep = parse_head(head, environ)
            body = self.request_body(conn, environ, proto)
        except BadRequest as e:
            sent = self.send_error(conn.sock, e.status, str(e))
            if self.access is not None:
                self.log_access(environ, head if head is not None else bytes(conn.buf),
                                e.status, sent, t0)
            return False
        keep = self.respond(conn.sock, environ, body, proto, keep, head, t0)
        return keep and body.drain()

    def log_access(self, environ: dict, head: bytes, status: int, sent: int,
                   t0: float) -> None:
        """Add one request's line to the access log."""
        self.access.record(environ.get("REMOTE_ADDR", ""), head, status, sent,
                           environ.get("HTTP_REFERER", ""), environ.get("HTTP_USER_AGENT", ""),
                           time.monotonic() - t0 if t0 else 0.0,
                           environ.get("HTTP_X_FORWARDED_FOR", ""))

    def request_body(self, conn: Conn, environ: dict, proto: str) -> Body:
        """The wsgi.input of a request (400 for a malformed length or framing)."""
        te = environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        raw = environ.get("CONTENT_LENGTH", "")
        if te and te != "chunked":
            raise BadRequest(501 if "chunked" not in te else 400,
                             f"unsupported Transfer-Encoding {te!r}")
        if te and raw:
            raise BadRequest(400, "both Content-Length and Transfer-Encoding")
        if raw and (not raw.isdigit() or len(raw) > 18):
            raise BadRequest(400, "malformed Content-Length header")
        continue_first = None
        if environ.get("HTTP_EXPECT", "").lower() == "100-continue" and proto == "HTTP/1.1":
            continue_first = lambda: conn.sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
        length = int(raw) if raw else None
        if length or te or continue_first is not None:
            body = Body(conn, length, te == "chunked", continue_first)
        else:
            body = NO_BODY
        environ["wsgi.input"] = body
        return body

    def respond(self, sock: socket.socket, environ: dict, body: Body, proto: str,
                keep: bool, head: bytes, t0: float) -> bool:
        """Run the app and send its answer (logged, as far as it got, in the access log);
        whether the connection may be kept."""
        started: list = []

        def start_response(status: str, headers: list, exc_info=None) -> Callable:
            started[:] = status, headers
            return ignore_write

        try:
            result: Iterable[bytes] = self.app(environ, start_response)
        except Exception:  # noqa: BLE001 (the gateway's app answers every error itself)
            log.exception("the app failed on %s %s", environ["REQUEST_METHOD"],
                          environ["PATH_INFO"][:100])
            sent = self.send_error(sock, 500, "internal error")
            if self.access is not None:
                self.log_access(environ, head, 500, sent, t0)
            return False
        code = sent = 0
        try:
            status, headers = started
            code = int(status[:3])
            length = content_length(headers)
            no_body = environ["REQUEST_METHOD"] == "HEAD" or code in (204, 304) or \
                code < 200
            chunked = length is None and not no_body and proto == "HTTP/1.1"
            keep = keep and not self.stopping and (length is not None or no_body or chunked)
            extra = "Transfer-Encoding: chunked\r\n" if chunked else ""
            if not keep:
                extra += "Connection: close\r\n"
            elif proto == "HTTP/1.0":
                extra += "Connection: keep-alive\r\n"
            out = (f"{proto} {status}\r\n" + "".join([f"{k}: {v}\r\n" for k, v in headers])
                   + f"Date: {self.date()}\r\n{extra}\r\n").encode("latin-1")
            if no_body:
                send_all(sock, out)
                return keep
            for piece in result:
                if not piece:
                    continue
                n = len(piece)
                if chunked:
                    piece = b"%x\r\n%s\r\n" % (n, piece)
                if out and len(piece) <= COALESCE:
                    send_all(sock, out + piece)
                elif out:
                    send_parts(sock, [out, piece])
                else:
                    send_all(sock, piece)
                out = b""
                sent += n
            if out:
                send_all(sock, out + (b"0\r\n\r\n" if chunked else b""))
            elif chunked:
                send_all(sock, b"0\r\n\r\n")
            if length is not None and sent != int(length):
                return False  # the app broke its own length: do not reuse
            return keep
        except Exception as e:  # noqa: BLE001 (a body that fails mid-way: cut the answer)
            if not isinstance(e, OSError):
                log.error("answer of %s %s cut short: %s", environ["REQUEST_METHOD"],
                          environ["PATH_INFO"][:100], one_line(str(e)))
            raise OSError("answer aborted") from None
        finally:
            close = getattr(result, "close", None)
            if close is not None:
                close()
            if self.access is not None:   # an answer cut short: the bytes it got
                self.log_access(environ, head, code, sent, t0)

    def send_error(self, sock: socket.socket, status: int, reason: str) -> int:
        """A one-line plain-text error answer (the connection closes after it); the body
        bytes sent."""
        body = (one_line(reason) + "\n").encode()
        try:
            send_all(sock, (f"HTTP/1.1 {status_line(status)}\r\nContent-Type: text/plain; "
                          f"charset=utf-8\r\nContent-Length: {len(body)}\r\nDate: "
                          f"{self.date()}\r\nConnection: close\r\n\r\n").encode() + body)
        except OSError:
            return 0
        return len(body)
