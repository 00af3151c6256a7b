"""The blob routes: POST /blobs, GET and HEAD /<key>, DELETE /<key>.

Uploads stream through the client library (parts and a manifest above its part size);
downloads stream part by part (at most two parts in memory), with Range, ETag and
If-None-Match / If-Modified-Since. The Content-Type, ETag and upload time of keys
uploaded here are kept in the record table (speedy.gateway.records); keys written by
other clients get a sniffed Content-Type and the key itself as their ETag.
"""
from __future__ import annotations

import functools
import hashlib
import re
import time
from email.utils import formatdate, parsedate_to_datetime
from typing import TYPE_CHECKING, Iterator

from speedy.client import NotFoundError, parse_key
from speedy.gateway import signing
from speedy.gateway.form import FormFile
from speedy.gateway.http import BODY_PIECE, HTTPError, Request, Response
from speedy.gateway.garbage import forget_blob
from speedy.gateway.records import BlobRecord, RecordError
from speedy.wire.manifest import Key, Manifest

if TYPE_CHECKING:
    from speedy.gateway.app import GatewayApp

CACHE_CONTROL = "public, max-age=31536000, immutable"
DEFAULT_TYPE = "application/octet-stream"
NO_TYPE = ("", "application/x-www-form-urlencoded")  # curl --data-binary's default
MAGIC: tuple[tuple[bytes, int, str], ...] = (   # (bytes, offset, type): binary magic only
    (b"\xff\xd8\xff", 0, "image/jpeg"),
    (b"\x89PNG\r\n\x1a\n", 0, "image/png"),
    (b"GIF87a", 0, "image/gif"),
    (b"GIF89a", 0, "image/gif"),
    (b"WEBP", 8, "image/webp"),
    (b"ftypavif", 4, "image/avif"),
    (b"ftyp", 4, "video/mp4"),
    (b"%PDF-", 0, "application/pdf"),
    (b"\x1f\x8b", 0, "application/gzip"),
    (b"PK\x03\x04", 0, "application/zip"),
    (b"\x00\x00\x01\x00", 0, "image/x-icon"),
)


def sniff(head: bytes) -> str:
    """The Content-Type told by the first bytes' magic number, or octet-stream."""
    for magic, at, ctype in MAGIC:
        if head[at:at + len(magic)] == magic and (ctype != "image/webp"
                                                  or head[:4] == b"RIFF"):
            return ctype
    return DEFAULT_TYPE


ACTIVE_TYPES = ("text/html", "application/xhtml", "image/svg", "text/xml", "application/xml",
                "text/javascript", "application/javascript", "application/x-javascript")


def content_safety(ctype: str) -> list[tuple[str, str]]:
    """Headers that keep stored bytes from running as this origin's page (stored XSS).

    Every blob is served with nosniff; a type a browser would run (HTML, SVG, XML,
    scripts) also gets a sandbox policy, so an uploaded page cannot act as the console.
    """
    hs = [("X-Content-Type-Options", "nosniff")]
    if is_active(ctype):
        hs.append(("Content-Security-Policy", "sandbox"))
    return hs


@functools.lru_cache(maxsize=256)
def is_active(ctype: str) -> bool:
    """True for a Content-Type a browser would run (HTML, SVG, XML, scripts)."""
    return ctype.split(";", 1)[0].strip().lower().startswith(ACTIVE_TYPES)


def check_signature(app: "GatewayApp", req: Request) -> None:
    """403 unless the request carries a valid signature (when --signing_key is set)."""
    if app.signing_key:
        try:
            signing.check(app.signing_key, req.method, req.path, req.query)
        except signing.SignatureError as e:
            raise HTTPError(403, str(e)) from None


def valid_content_type(value: str) -> str:
    """value when it is a sane media type; 400 otherwise."""
    value = value.strip()
    if len(value) > 255 or "/" not in value or not value.isprintable() or \
            not value.isascii():
        raise HTTPError(400, "malformed Content-Type header")
    return value


# -- upload ------------------------------------------------------------------------------


class HashingReader:
    """A file-like view of a body that counts, hashes and keeps the first bytes."""

    def __init__(self, source, stats) -> None:
        self.source = source
        self.stats = stats
        self.sha = hashlib.sha256()
        self.size = 0
        self.head = b""

    def read(self, n: int = BODY_PIECE) -> bytes:
        data = self.source.read(min(n, 1 << 20) if n and n > 0 else BODY_PIECE)
        if data:
            self.sha.update(data)
            if len(self.head) < 64:
                self.head += data[:64 - len(self.head)]
            self.size += len(data)
            self.stats.add_bytes(received=len(data))
        return data


def upload(app: "GatewayApp", req: Request) -> Response:
    """POST /blobs: store the body (raw, or a form's file part); 201 with key, size, etag."""
    check_signature(app, req)
    if req.content_length is None and not req.chunked:
        raise HTTPError(411, "Content-Length required (or Transfer-Encoding: chunked)")
    ctype = req.content_type.strip()
    source = req
    if ctype.lower().startswith("multipart/form-data"):
        source = FormFile(req)
        ctype = source.content_type
    ctype = "" if ctype.lower() in NO_TYPE else valid_content_type(ctype)
    body = HashingReader(source, app.stats)
    key = app.client.put(body)
    rec = BlobRecord(key, ctype or sniff(body.head), body.size,
                     body.sha.hexdigest()[:32], int(time.time()))
    if app.records is not None:
        try:
            app.records.put(rec)
        except RecordError as e:
            forget_blob(app, key)
            raise HTTPError(503, f"upload undone: {e}") from None
    return Response.json(201, {"key": key, "size": rec.size, "etag": rec.etag},
                         [("Location", f"/{key}"), ("ETag", f'"{rec.etag}"')])


# -- download ----------------------------------------------------------------------------


def download(app: "GatewayApp", req: Request, key: str) -> Response:
    """GET or HEAD /<key>: the bytes, a range of them, or 304."""
    check_signature(app, req)
    k = parse_key(key)
    rec = app.records.get(key) if app.records is not None else None
    first: bytes | bytearray | None = None
    manifest: Manifest | None = None
    try:
        if k.multipart:
            manifest = app.client.manifest(k)
            size = manifest.total_size
        else:
            first = app.client.read(k, size_hint=rec.size if rec is not None else None)
            size = len(first)
    except NotFoundError:
        raise HTTPError(404, f"{key} not found") from None
    if rec is not None and rec.size != size:
        rec = None  # a record of another cluster's fid: ignore it
    if rec is None and first is None and manifest.parts:
        first = app.client.read_part(k, 0, manifest.parts[0])
    ctype = rec.content_type if rec else sniff(first or b"")
    etag = f'"{rec.etag}"' if rec else f'"{key}"'
    headers = [("ETag", etag), ("Cache-Control", CACHE_CONTROL), ("Accept-Ranges", "bytes")]
    if rec is not None:
        headers.append(("Last-Modified", http_date_text(rec.mtime)))
    if not_modified(req, etag, rec.mtime if rec else None):
        return Response(304, headers)
    headers[:0] = [("Content-Type", ctype)] + content_safety(ctype)
    span = byte_range(req, size, etag, rec.mtime if rec else None)
    start, end, status = 0, size, 200
    if span is not None:
        start, end, status = span[0], span[1], 206
        headers.append(("Content-Range", f"bytes {start}-{end - 1}/{size}"))
    if req.method == "HEAD":
        return Response(status, headers + [("Content-Length", str(end - start))])
    if manifest is None:
        piece = first[start:end] if (start, end) != (0, size) else first
        app.stats.add_bytes(sent=len(piece))
        return Response.raw(status, piece, "", headers)
    return Response.stream(status, stream_parts(app, k, manifest, start, end, first),
                           end - start, headers)


def stream_parts(app: "GatewayApp", k: Key, m: Manifest, start: int, end: int,
                 first: bytes | None) -> Iterator[bytes]:
    """Bytes start..end of a multi-part key, reading the next part while one is sent."""
    wanted, off = [], 0
    for i, p in enumerate(m.parts):
        if off < end and off + p.size > start:
            wanted.append((i, p, off))
        off += p.size

    def fetch(i, p):
        if i == 0 and first is not None:
            return first
        return app.client.read_part(k, i, p)
    nxt = app.io.submit(fetch, *wanted[0][:2]) if wanted else None
    try:
        for n, (i, p, off) in enumerate(wanted):
            data = nxt.result()
            nxt = app.io.submit(fetch, *wanted[n + 1][:2]) if n + 1 < len(wanted) else None
            lo, hi = max(0, start - off), min(p.size, end - off)
            piece = data if (lo, hi) == (0, p.size) else data[lo:hi]
            del data
            app.stats.add_bytes(sent=len(piece))
            yield piece
    finally:
        if nxt is not None:
            nxt.cancel()


@functools.lru_cache(maxsize=4096)
def http_date_text(seconds: int) -> str:
    """An HTTP-date (IMF-fixdate) for unix seconds."""
    return formatdate(seconds, usegmt=True)


def http_date(value: str) -> int:
    """Unix seconds of an HTTP-date; 400 when malformed."""
    try:
        dt = parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        raise HTTPError(400, "malformed HTTP date in a conditional header") from None
    if dt.tzinfo is None:
        raise HTTPError(400, "HTTP date without GMT in a conditional header")
    return int(dt.timestamp())


ETAG_ITEM_RE = re.compile(r'\s*(\*|(?:W/)?"[\x21\x23-\x7e\x80-\xff]*")\s*(,|$)')


def etag_list(value: str) -> list[str]:
    """The entity tags of an If-None-Match value (weakness dropped); 400 when malformed."""
    tags, pos = [], 0
    while pos < len(value):
        m = ETAG_ITEM_RE.match(value, pos)
        if not m or m.end() == pos:
            raise HTTPError(400, "malformed entity tag in If-None-Match")
        tag = m.group(1)
        tags.append(tag[2:] if tag.startswith("W/") else tag)
        pos = m.end()
    if not tags:
        raise HTTPError(400, "empty If-None-Match header")
    return tags


def not_modified(req: Request, etag: str, mtime: int | None) -> bool:
    """True when the client's copy is current (If-None-Match, else If-Modified-Since)."""
    inm = req.header("if-none-match")
    if inm is not None:
        tags = etag_list(inm)
        return "*" in tags or etag in tags
    ims = req.header("if-modified-since")
    if ims is not None:
        when = http_date(ims)
        return mtime is not None and mtime <= when
    return False


def byte_range(req: Request, size: int, etag: str, mtime: int | None) -> tuple[int, int] | None:
    """(start, end) of a single satisfiable byte range; None: send everything; 416/400."""
    value = req.header("range")
    if value is None:
        return None
    if_range = req.header("if-range")
    if if_range is not None:
        if if_range.startswith(('"', "W/")):
            if if_range.strip() != etag:
                return None
        elif mtime is None or http_date(if_range) != mtime:
            return None
    unit, _, spec = value.partition("=")
    if unit.strip().lower() != "bytes":
        return None  # an unknown range unit is ignored (RFC 9110 14.2)
    if "," in spec:
        return None  # several ranges: the whole representation instead (allowed)
    first, dash, last = spec.strip().partition("-")
    if not dash or (first and not first.isdigit()) or (last and not last.isdigit()) \
            or not (first or last) or len(first) > 19 or len(last) > 19:
        raise HTTPError(400, "malformed Range header (expected bytes=first-last)")
    if not first:
        n = int(last)
        if n == 0 or size == 0:
            raise _unsatisfiable(size)
        return max(0, size - n), size
    start = int(first)
    end = int(last) + 1 if last else size
    if last and end <= start:
        raise HTTPError(400, "malformed Range header (last byte before first)")
    if start >= size:
        raise _unsatisfiable(size)
    return start, min(end, size)


def _unsatisfiable(size: int) -> HTTPError:
    return HTTPError(416, f"range not satisfiable: the blob has {size} bytes",
                     [("Content-Range", f"bytes */{size}")])


# -- delete ------------------------------------------------------------------------------


def remove(app: "GatewayApp", req: Request, key: str) -> Response:
    """DELETE /<key>: 204 once every replica dropped it."""
    check_signature(app, req)
    k = parse_key(key)
    try:
        missed = app.client.delete(k)
    except NotFoundError:
        _drop_record(app, key)
        raise HTTPError(404, f"{key} not found") from None
    if missed:
        raise HTTPError(502, f"{key} deleted, but not on {', '.join(missed)}: retry")
    _drop_record(app, key)
    return Response(204, [])


def _drop_record(app: "GatewayApp", key: str) -> None:
    if app.records is not None:
        try:
            app.records.delete(key)
        except RecordError:
            pass
