"""Small shared HTTP helpers for the gateway's WSGI app: Request, Response, HTTPError.

    req = Request(environ)            # method, path, query, headers, remote_addr
    data = req.read(65536)            # bounded by Content-Length; b"" at the end
    for piece in req.iter_body():     # the whole body, piece by piece
        ...
    return Response.text(404, "no such key")
    return Response.json(201, {"key": key})
    return Response.stream(200, pieces, length=n, headers=[("Content-Type", "image/png")])
    raise HTTPError(400, "bad Range header")   # the app answers it as one plain-text line

Everything is plain Python: importing this module patches nothing (no gevent).
"""
from __future__ import annotations

import functools

import json as _json
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Callable, Iterable, Iterator
from urllib.parse import parse_qsl

from speedy.client.client import read_full

__all__ = ["HTTPError", "Request", "Response", "status_line", "BODY_PIECE", "BODY_KEYS"]

BODY_PIECE = 64 << 10          # default size of the pieces a body is read in
HEX_DIGITS = frozenset(b"0123456789abcdefABCDEF")


class HTTPError(Exception):
    """An HTTP error answer: the app turns it into `status` with a one-line plain-text body."""

    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]] | None = None):
        super().__init__(reason)
        self.status = status
        self.reason = one_line(reason)
        self.headers = list(headers or [])

    def response(self) -> "Response":
        """The plain-text answer for this error."""
        r = Response.text(self.status, self.reason)
        r.headers.extend(self.headers)
        return r


def one_line(text: str, limit: int = 300) -> str:
    """text on one line, without control characters, at most limit characters."""
    flat = " ".join(str(text).split())
    flat = "".join(c if c.isprintable() else "?" for c in flat)
    return flat[:limit]


def chunk_size(text: bytes) -> int | None:
    """The size a chunked body's size line gives (1-15 hex digits, before any ";"
    extension), or None when it is not that: int() alone would take 0x, +, _ and spaces."""
    if not 0 < len(text) <= 15 or not HEX_DIGITS.issuperset(text):
        return None
    return int(text, 16)


@functools.lru_cache(maxsize=256)
def status_line(status: int) -> str:
    """'404 Not Found' for 404 (WSGI's status string)."""
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Unknown"


class Request:
    """One HTTP request as the WSGI server handed it over."""

    def __init__(self, environ: dict, max_body: int | None = None):
        self.environ = environ
        self.method: str = environ.get("REQUEST_METHOD", "GET").upper()
        raw_path = environ.get("PATH_INFO", "") or "/"
        if not raw_path.isascii():  # WSGI hands over latin-1 decoded bytes; URLs are UTF-8
            try:
                raw_path = raw_path.encode("latin-1").decode("utf-8")
            except (UnicodeEncodeError, UnicodeDecodeError):
                raise HTTPError(400, "request path is not valid UTF-8") from None
        self.path: str = raw_path
        self.query_string: str = environ.get("QUERY_STRING", "")
        try:
            pairs = parse_qsl(self.query_string, keep_blank_values=True,
                              strict_parsing=False, errors="strict") if self.query_string else []
        except (UnicodeDecodeError, ValueError):
            raise HTTPError(400, "malformed query string") from None
        self.query: dict[str, str] = dict(pairs)
        self.remote_addr: str = environ.get("REMOTE_ADDR", "")
        self.content_type: str = environ.get("CONTENT_TYPE", "") or ""
        self.content_length: int | None = _content_length(environ)
        if (max_body is not None and self.content_length is not None
                and self.content_length > max_body):
            raise HTTPError(413, f"body of {self.content_length} bytes is larger than the "
                                 f"limit of {max_body}")
        self.max_body = max_body
        self.route = "other"   # the metrics label the app gives this request
        self._input = environ.get("wsgi.input")
        self._left = self.content_length       # None: read to the end (chunked)
        self._got = 0

    @functools.cached_property
    def headers(self) -> dict[str, str]:
        """The request headers, lower-case names (built when first asked for)."""
        return _headers(self.environ)

    def header(self, name: str, default: str | None = None) -> str | None:
        """The value of header `name` (any case), or default."""
        key = environ_key(name)
        value = self.environ.get(key)
        if value is None or (not value and key in BODY_KEYS):
            return default   # an empty Content-Type or Content-Length counts as absent
        return value

    @property
    def chunked(self) -> bool:
        """True when the body comes with Transfer-Encoding: chunked."""
        return "chunked" in self.header("transfer-encoding", "").lower()

    def read(self, n: int = BODY_PIECE) -> bytes:
        """Up to n bytes of the body (b"" at its end); 400 when the client stops early."""
        if self._input is None or n <= 0 or self._left == 0:
            return b""
        if self._left is None and not self.chunked:
            return b""
        want = n if self._left is None else min(n, self._left)
        try:
            data = self._input.read(want)
        except (OSError, ValueError) as e:
            raise HTTPError(400, f"request body could not be read: {e}") from None
        if not data:
            if self._left is not None:
                raise HTTPError(400, f"truncated body: {self._got} of "
                                     f"{self.content_length} bytes arrived")
            self._left = 0
            return b""
        self._got += len(data)
        if self._left is not None:
            self._left -= len(data)
        if self.max_body is not None and self._got > self.max_body:
            raise HTTPError(413, f"body is larger than the limit of {self.max_body} bytes")
        return data

    def read_exactly(self, n: int) -> bytes:
        """Up to n bytes, fewer only at the body's end."""
        return read_full(self, n)

    def iter_body(self, piece: int = BODY_PIECE) -> Iterator[bytes]:
        """The rest of the body in pieces of at most `piece` bytes."""
        while True:
            b = self.read(piece)
            if not b:
                return
            yield b

    def drain(self, limit: int = 1 << 20) -> None:
        """Read and drop up to limit bytes of an unread body (keeps keep-alive usable)."""
        try:
            while limit > 0:
                b = self.read(min(BODY_PIECE, limit))
                if not b:
                    return
                limit -= len(b)
        except HTTPError:
            return

BODY_KEYS = ("CONTENT_TYPE", "CONTENT_LENGTH")   # the header keys WSGI gives without HTTP_


@functools.lru_cache(maxsize=256)
def environ_key(name: str) -> str:
    """The WSGI environ key of header `name` (any case): HTTP_IF_NONE_MATCH, CONTENT_TYPE."""
    key = name.upper().replace("-", "_")
    return key if key in BODY_KEYS else "HTTP_" + key


def _headers(environ: dict) -> dict[str, str]:
    """The request headers, lower-case names."""
    out: dict[str, str] = {}
    for k, v in environ.items():
        if k.startswith("HTTP_"):
            out[k[5:].replace("_", "-").lower()] = v
    if environ.get("CONTENT_TYPE"):
        out["content-type"] = environ["CONTENT_TYPE"]
    if environ.get("CONTENT_LENGTH"):
        out["content-length"] = environ["CONTENT_LENGTH"]
    return out


def _content_length(environ: dict) -> int | None:
    """Content-Length as a number; None when absent; 400 when malformed."""
    raw = (environ.get("CONTENT_LENGTH") or "").strip()
    if not raw:
        return None
    if not raw.isdigit() or len(raw) > 18:
        raise HTTPError(400, "malformed Content-Length header")
    return int(raw)


@dataclass
class Response:
    """A status, headers and a body (bytes or an iterable of bytes)."""

    status: int
    headers: list[tuple[str, str]] = field(default_factory=list)
    body: bytes | Iterable[bytes] = b""
    on_close: Callable[[], None] | None = None

    @classmethod
    def text(cls, status: int, reason: str,
             headers: list[tuple[str, str]] | None = None) -> "Response":
        """A one-line plain-text answer."""
        body = (one_line(reason) + "\n").encode() if reason else b""
        return cls(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body)))] + list(headers or []), body)

    @classmethod
    def json(cls, status: int, obj: object,
             headers: list[tuple[str, str]] | None = None) -> "Response":
        """A JSON answer."""
        body = _json.dumps(obj, separators=(",", ":")).encode()
        return cls(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body)))] + list(headers or []), body)

    @classmethod
    def raw(cls, status: int, body: bytes, content_type: str = "application/octet-stream",
            headers: list[tuple[str, str]] | None = None) -> "Response":
        """An answer with these exact body bytes and Content-Type."""
        hs = [("Content-Length", str(len(body)))] + list(headers or [])
        if content_type:
            hs.insert(0, ("Content-Type", content_type))
        return cls(status, hs, body)

    @classmethod
    def stream(cls, status: int, pieces: Iterable[bytes], length: int | None = None,
               headers: list[tuple[str, str]] | None = None,
               on_close: Callable[[], None] | None = None) -> "Response":
        """A streamed body: pieces are sent as they come (Content-Length when known)."""
        hs = list(headers or [])
        if length is not None:
            hs.append(("Content-Length", str(length)))
        return cls(status, hs, pieces, on_close)

    def header(self, name: str) -> str | None:
        """The first value of response header `name` (any case)."""
        low = name.lower()
        for k, v in self.headers:
            if k.lower() == low:
                return v
        return None

    def without_body(self) -> "Response":
        """The same answer with no body (HEAD, 304): the headers stay."""
        if self.on_close is not None:
            self.on_close()
        close = getattr(self.body, "close", None)
        if close is not None:
            close()
        return Response(self.status, list(self.headers), b"")
