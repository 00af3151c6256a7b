"""A streaming reader of the file in a multipart/form-data body (`curl -F file=@x`).

    f = FormFile(request)           # 400 when the body is not a form with a file part
    f.content_type                  # the part's Content-Type ("" when it gave none)
    f.read(65536)                   # the file's bytes, piece by piece; b"" at its end

The first part with a filename (or named "file") is the file; other fields before it
are skipped. Only a bounded window of the body is ever buffered.
"""
from __future__ import annotations

import re

from speedy.gateway.http import BODY_PIECE, HTTPError, Request

MAX_PART_HEADERS = 16 << 10
MAX_SKIPPED_FIELD = 1 << 20
BOUNDARY_RE = re.compile(r'boundary=(?:"([^"]{1,70})"|([^\s;,"]{1,70}))', re.I)
DISPOSITION_RE = re.compile(r'(\w+)\*?=(?:"((?:[^"\\]|\\.)*)"|([^;\s]*))')


def form_boundary(content_type: str) -> bytes:
    """The boundary parameter of a multipart/form-data Content-Type; 400 when absent."""
    m = BOUNDARY_RE.search(content_type)
    if not m:
        raise HTTPError(400, "multipart/form-data without a valid boundary parameter")
    return (m.group(1) or m.group(2)).encode("latin-1")


class FormFile:
    """The file part of a multipart/form-data request body, as a readable stream."""

    def __init__(self, req: Request):
        self.req = req
        self.sep = b"\r\n--" + form_boundary(req.content_type)
        self.buf = bytearray(b"\r\n")  # lets the first delimiter match like the others
        self.eof = False
        self.done = False
        self.content_type = ""
        self.filename = ""
        self._open_file_part()

    def _fill(self, want: int) -> bool:
        """Read until buf holds want bytes; False when the body ended first."""
        while len(self.buf) < want:
            if self.eof:
                return False
            data = self.req.read(max(BODY_PIECE, want - len(self.buf)))
            if not data:
                self.eof = True
                return False
            self.buf += data
        return True

    def _find(self, needle: bytes, limit: int, what: str) -> int:
        """Index of needle in buf, reading on; 400 past limit or at the body's end."""
        start = 0
        while True:
            i = self.buf.find(needle, start)
            if i >= 0:
                return i
            start = max(0, len(self.buf) - len(needle) + 1)
            if len(self.buf) > limit:
                raise HTTPError(400, f"malformed multipart body: {what} too long")
            if not self._fill(len(self.buf) + 1):
                raise HTTPError(400, f"malformed multipart body: {what} not terminated")

    def _open_file_part(self) -> None:
        """Skip to the file part's body."""
        while True:
            i = self._find(self.sep, MAX_SKIPPED_FIELD, "a form field")
            del self.buf[:i + len(self.sep)]
            if not self._fill(2):
                raise HTTPError(400, "malformed multipart body: truncated after a boundary")
            if self.buf[:2] == b"--":
                raise HTTPError(400, "multipart form without a file part "
                                     "(use curl -F file=@path)")
            j = self._find(b"\r\n\r\n", MAX_PART_HEADERS, "part headers")
            headers = _part_headers(bytes(self.buf[:j]))
            del self.buf[:j + 4]
            disp = _disposition(headers.get("content-disposition", ""))
            if "filename" in disp or disp.get("name") == "file":
                self.filename = disp.get("filename", "")
                self.content_type = headers.get("content-type", "").strip()
                return

    def read(self, n: int = BODY_PIECE) -> bytes:
        """Up to n bytes of the file; b"" at its end."""
        if self.done or n <= 0:
            return b""
        self._fill(n + len(self.sep))
        i = self.buf.find(self.sep)
        if i >= 0:
            take = min(i, n)
            if take == i:
                self.done = True
        elif self.eof:
            raise HTTPError(400, "truncated multipart body: the closing boundary is missing")
        else:
            take = min(n, len(self.buf) - len(self.sep) + 1)
        out = bytes(self.buf[:take])
        del self.buf[:take]
        if self.done:
            self.req.drain()
        return out


def _part_headers(raw: bytes) -> dict[str, str]:
    """The headers of one part, lower-case names."""
    out: dict[str, str] = {}
    for line in raw.decode("utf-8", "replace").split("\r\n"):
        if not line.strip():
            continue
        if ":" not in line:
            raise HTTPError(400, "malformed multipart body: bad part header line")
        name, value = line.split(":", 1)
        out[name.strip().lower()] = value.strip()
    return out


def _disposition(value: str) -> dict[str, str]:
    """The parameters of a Content-Disposition value."""
    if not value.lower().startswith("form-data"):
        return {}
    return {m.group(1).lower(): (m.group(2) if m.group(2) is not None else m.group(3))
            for m in DISPOSITION_RE.finditer(value[len("form-data"):])}
