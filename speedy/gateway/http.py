"""STAND-IN (branch gateway-paths): the subset of branch `gateway`'s speedy.gateway.http that
the path routes use. The lead keeps branch gateway's file when merging.
"""
from __future__ import annotations

import json as _json
from dataclasses import dataclass, field
from http import HTTPStatus
from typing import Callable, Iterable

BODY_PIECE = 64 << 10


class HTTPError(Exception):
    """An HTTP error answer: `status` with a one-line plain-text body."""

    def __init__(self, status: int, reason: str, headers: list[tuple[str, str]] | None = None):
        super().__init__(reason)
        self.status = status
        self.reason = " ".join(str(reason).split())[:300]
        self.headers = list(headers or [])

    def response(self) -> "Response":
        r = Response.text(self.status, self.reason)
        r.headers.extend(self.headers)
        return r


def status_line(status: int) -> str:
    try:
        return f"{status} {HTTPStatus(status).phrase}"
    except ValueError:
        return f"{status} Unknown"


class Request:
    """One HTTP request (method, path, query string, lower-case headers, bounded body)."""

    def __init__(self, environ: dict, max_body: int | None = None):
        self.environ = environ
        self.method: str = environ.get("REQUEST_METHOD", "GET").upper()
        self.path: str = environ.get("PATH_INFO", "") or "/"
        self.query_string: str = environ.get("QUERY_STRING", "")
        self.headers: dict[str, str] = {k[5:].replace("_", "-").lower(): v
                                        for k, v in environ.items() if k.startswith("HTTP_")}
        for k in ("CONTENT_TYPE", "CONTENT_LENGTH"):
            if environ.get(k):
                self.headers[k.replace("_", "-").lower()] = environ[k]
        self.remote_addr: str = environ.get("REMOTE_ADDR", "")
        raw = (environ.get("CONTENT_LENGTH") or "").strip()
        if raw and not raw.isdigit():
            raise HTTPError(400, "malformed Content-Length header")
        self.content_length: int | None = int(raw) if raw else None
        self._input = environ.get("wsgi.input")
        self._left = self.content_length
        self._got = 0

    def header(self, name: str, default: str | None = None) -> str | None:
        return self.headers.get(name.lower(), default)

    @property
    def chunked(self) -> bool:
        return "chunked" in self.headers.get("transfer-encoding", "").lower()

    @property
    def has_body(self) -> bool:
        return bool(self.content_length) or self.chunked

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
        return data

    def drain(self, limit: int = 1 << 20) -> None:
        try:
            while limit > 0:
                b = self.read(min(BODY_PIECE, limit))
                if not b:
                    return
                limit -= len(b)
        except HTTPError:
            return


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
        body = (reason + "\n").encode() if reason else b""
        return cls(status, [("Content-Type", "text/plain; charset=utf-8"),
                            ("Content-Length", str(len(body)))] + list(headers or []), body)

    @classmethod
    def json(cls, status: int, obj: object,
             headers: list[tuple[str, str]] | None = None) -> "Response":
        body = _json.dumps(obj, separators=(",", ":")).encode()
        return cls(status, [("Content-Type", "application/json"),
                            ("Content-Length", str(len(body)))] + list(headers or []), body)

    @classmethod
    def raw(cls, status: int, body: bytes, content_type: str = "application/octet-stream",
            headers: list[tuple[str, str]] | None = None) -> "Response":
        hs = [("Content-Length", str(len(body)))] + list(headers or [])
        if content_type:
            hs.insert(0, ("Content-Type", content_type))
        return cls(status, hs, body)

    @classmethod
    def stream(cls, status: int, pieces: Iterable[bytes], length: int | None = None,
               headers: list[tuple[str, str]] | None = None,
               on_close: Callable[[], None] | None = None) -> "Response":
        hs = list(headers or [])
        if length is not None:
            hs.append(("Content-Length", str(length)))
        return cls(status, hs, pieces, on_close)

    def header(self, name: str) -> str | None:
        low = name.lower()
        return next((v for k, v in self.headers if k.lower() == low), None)
