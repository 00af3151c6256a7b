"""The original front end's path routes (IMAGESERVER-API.md), answered byte for byte.

    handle(app, request) -> Response        # app.client: speedy.client.Client, app.meta: MetaStore

Answers are shaped like the original's (Go net/http + gorilla/mux): errors are
`http.Error` bodies ("reason\\n", text/plain; charset=utf-8, X-Content-Type-Options:
nosniff), JSON is Go's compact json.Marshal with HTML escaping (and, being sniffed by
Go, goes out as text/plain; charset=utf-8), an unknown route or method is
"404 page not found\\n". Fixes relative to the original: 0-byte fragments are stored; a
fragment's blob is freed on the chunkservers once no path refers to it (DELETE,
replacing uploads, move onto an existing path); reads fail over between replicas;
moving a missing source is 404; a master without a route is 503.
"""
from __future__ import annotations

import json
import logging
import re
import time
from typing import Any, Callable

from speedy.client import MasterError, SpeedyError
from speedy.gateway.blobs import stream_parts
from speedy.gateway.garbage import free_blobs
from speedy.gateway.http import HTTPError, Request, Response
from speedy.gateway.meta import MAX_PATH_BYTES, Fragment, Key, MetaError
from speedy.wire.manifest import parse_key

log = logging.getLogger("speedy.gateway.paths")

H_PATH, H_INDEX, H_RANGE, H_LAST = "Path", "Fragment-Index", "Bytes-Range", "Is-Last"
H_VERSION, H_SOURCE, H_DEST = "Registry-Version", "Source-Path", "Dest-Path"
GO_TEXT = "text/plain; charset=utf-8"          # what Go sniffs for JSON and {OK}
NOSNIFF = [("X-Content-Type-Options", "nosniff")]
NOT_FOUND_PAGE = "404 page not found"
FRAGMENT_NOT_FOUND = "fragment metainfo not found"
BAD_RANGE = "bytesRange error!"
BAD_LENGTH = "length of data and range are different"
MAX_VALUE = 2 ** 63 - 1                         # the metadata database's integers
U64 = 2 ** 64 - 1
RANGE_RE = re.compile(r"^(\d{1,20})-(\d{1,20})$")


# -- answers ---------------------------------------------------------------------------


def fail(status: int, reason: str) -> HTTPError:
    """An error answered as Go's http.Error(w, reason, status)."""
    return HTTPError(status, reason, NOSNIFF)


def empty(status: int) -> Response:
    """A status with no body (Go: WriteHeader without Write)."""
    return Response(status, [] if status == 204 else [("Content-Length", "0")], b"")


def go_body(status: int, body: bytes) -> Response:
    """A body written without a Content-Type, which Go sniffs as plain text."""
    return Response(status, [("Content-Type", GO_TEXT), ("Content-Length", str(len(body)))],
                    body)


def go_json(obj: Any) -> bytes:
    """Go's json.Marshal: compact, UTF-8, with <, >, &, U+2028 and U+2029 escaped."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
    for c, esc in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026"),
                   ("\u2028", "\\u2028"), ("\u2029", "\\u2029")):
        text = text.replace(c, esc)
    return text.encode("utf-8")


def rfc3339(t: float) -> str:
    """Unix seconds as RFC 3339 in UTC, whole seconds ("2026-12-04T22:23:38Z")."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def fragment_info(f: Fragment) -> dict:
    """One element of GET /v1/fileinfo (Go's MetaInfoValue without GroupId/FileId)."""
    return {"Index": f.index, "Start": f.start, "End": f.end, "IsLast": f.is_last,
            "ModTime": rfc3339(f.mtime)}


# -- request headers --------------------------------------------------------------------


def header(req: Request, name: str) -> str:
    """A header's value as UTF-8 text ("" when absent); 400 when it is not UTF-8."""
    raw = req.header(name) or ""
    try:
        return raw.encode("latin-1").decode("utf-8")
    except UnicodeEncodeError:
        return raw  # already decoded by the server
    except UnicodeDecodeError:
        raise fail(400, f"{name} header is not valid UTF-8") from None


def path_header(req: Request, name: str = H_PATH) -> str:
    """A path to store under: 1 to 255 bytes of UTF-8."""
    p = header(req, name)
    if not p:
        raise fail(400, f"missing {name} header")
    if len(p.encode("utf-8")) > MAX_PATH_BYTES:
        raise fail(400, f"{name} header is longer than {MAX_PATH_BYTES} bytes")
    return p


def go_quote(s: str) -> str:
    """Go's strconv.Quote for the printable text of an error message."""
    out = []
    for c in s:
        if c in '"\\':
            out.append("\\" + c)
        elif c.isprintable():
            out.append(c)
        else:
            out.append(f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}")
    return '"' + "".join(out) + '"'


def parse_index(req: Request) -> int:
    """Fragment-Index as strconv.ParseUint(s, 10, 64) reads it; 400 with Go's message."""
    s = header(req, H_INDEX)
    if not s.isascii() or not s.isdigit():
        raise fail(400, f"strconv.ParseUint: parsing {go_quote(s)}: invalid syntax")
    v = int(s)
    if v > U64:
        raise fail(400, f"strconv.ParseUint: parsing {go_quote(s)}: value out of range")
    if v > MAX_VALUE:
        raise fail(400, f"Fragment-Index {v} is larger than {MAX_VALUE}")
    return v


def parse_range(req: Request) -> tuple[int, int]:
    """Bytes-Range "start-end" (end exclusive, start <= end: 0-byte fragments are allowed)."""
    m = RANGE_RE.match(header(req, H_RANGE).strip())
    if not m:
        raise fail(400, BAD_RANGE)
    start, end = int(m.group(1)), int(m.group(2))
    if start > end or end > MAX_VALUE:
        raise fail(400, BAD_RANGE)
    return start, end


# -- cluster errors ---------------------------------------------------------------------


def cluster_failure(e: Exception, doing: str) -> HTTPError:
    """The answer for a client library error: 503 without a master route, else 500.

    The client library says "master HOST:PORT unreachable" (a ClusterError) when it has
    never had a route; MasterError is an HTTP error from the master."""
    if isinstance(e, MasterError) or str(e).startswith("master "):
        return fail(503, f"master unavailable: {e}")
    return fail(500, f"{doing}: {e}")


# -- routes -----------------------------------------------------------------------------


class FragmentBody:
    """The request body as a file object of exactly `size` bytes for Client.put.

    Raises HTTPError 400 (which the client passes on after deleting what it stored)
    when the body is shorter or longer than the declared range.
    """

    def __init__(self, req: Request, size: int):
        self.req, self.left = req, size

    def read(self, n: int = -1) -> bytes:
        if self.left == 0:
            if self.req.read(1):
                raise fail(400, BAD_LENGTH)
            return b""
        want = self.left if n is None or n < 0 else min(n, self.left)
        try:
            data = self.req.read(want)
        except HTTPError as e:
            if e.status != 400:      # 413 (over the gateway's body limit) stays
                raise
            raise fail(400, BAD_LENGTH) from None
        if not data:
            raise fail(400, BAD_LENGTH)
        self.left -= len(data)
        return data


def upload(app: Any, req: Request) -> Response:
    """POST /v1/file: one fragment's bytes to the cluster, then its metadata."""
    start, end = parse_range(req)
    index = parse_index(req)
    path = path_header(req)
    is_last = header(req, H_LAST) in ("true", "TRUE")
    v1 = header(req, H_VERSION) == "v1"
    size = end - start
    if req.content_length is not None and req.content_length != size:
        raise fail(400, BAD_LENGTH)
    blob: Key | None = None
    if size == 0:
        FragmentBody(req, 0).read()
    else:
        try:
            blob = parse_key(app.client.put(FragmentBody(req, size), size=size))
        except SpeedyError as e:
            raise cluster_failure(e, "upload failed") from None
    try:
        freed = app.meta.put_fragment(Fragment(path, index, start, end, blob, is_last), v1)
    except MetaError as e:
        if blob is not None:
            free_blobs(app, [blob], queued=False)
        raise fail(500, str(e)) from None
    free_blobs(app, freed)
    return empty(200)


def download(app: Any, req: Request) -> Response:
    """GET /v1/file: one fragment's bytes (failing over between replicas)."""
    start, end = parse_range(req)
    index = parse_index(req)
    path = header(req, H_PATH)
    f = app.meta.get_fragment(path, index)
    if f is None or (f.start, f.end) != (start, end):
        raise fail(404, FRAGMENT_NOT_FOUND)
    headers = [("Content-Type", "octet-stream")]
    if f.blob is None:
        return Response.raw(200, b"", "", headers)
    k = f.blob
    try:
        if not k.multipart:
            data = app.client.read(k, size_hint=f.size)
            if len(data) != f.size:
                raise fail(500, f"stored blob {k} has {len(data)} bytes, expected {f.size}")
            return Response.raw(200, data, "", headers)
        m = app.client.manifest(k)   # and the first part now: a failure is still an answer
        first = app.client.read_part(k, 0, m.parts[0]) if m.parts else None
    except SpeedyError as e:
        raise cluster_failure(e, "read failed") from None
    return Response.stream(200, stream_parts(app, k, m, 0, f.size, first), f.size, headers)


def file_info(app: Any, req: Request) -> Response:
    """GET /v1/fileinfo: the path's fragments, newest first; 404 with no body if none."""
    frags = app.meta.fragments(header(req, H_PATH))
    if not frags:
        return empty(404)
    return go_body(200, go_json({"fragment-info": [fragment_info(f) for f in frags]}))


def list_directory(app: Any, req: Request) -> Response:
    """GET /v1/list_directory: the v1 tag entries of a directory; 404 with no body if none."""
    names = app.meta.list_directory(header(req, H_PATH))
    if not names:
        return empty(404)
    return go_body(200, go_json({"file-list": names}))


def list_descendant(app: Any, req: Request) -> Response:
    """GET /v1/list_descendant: every stored path starting with Path, once per fragment."""
    paths = app.meta.list_descendants(header(req, H_PATH))
    if not paths:
        return empty(404)
    return go_body(200, go_json({"path-descendant": paths}))


def move(app: Any, req: Request) -> Response:
    """POST /v1/move: rename Source-Path to Dest-Path (replacing it); 404 for a missing source."""
    src = header(req, H_SOURCE)
    dst = path_header(req, H_DEST)
    freed = app.meta.move(src, dst) if src else None
    if freed is None:
        raise fail(404, f"source path not found: {src}" if src else f"missing {H_SOURCE} header")
    free_blobs(app, freed)
    return empty(200)


def remove(app: Any, req: Request) -> Response:
    """DELETE /v1/file: the path's metadata, and its bytes on the chunkservers; always 204."""
    freed = app.meta.delete_path(header(req, H_PATH))
    free_blobs(app, freed)
    return empty(204)


def ping(app: Any, req: Request) -> Response:
    """POST /v1/_ping."""
    return go_body(200, b"{OK}")


ROUTES: dict[tuple[str, str], Callable[[Any, Request], Response]] = {
    ("POST", "/v1/file"): upload,
    ("GET", "/v1/file"): download,
    ("DELETE", "/v1/file"): remove,
    ("GET", "/v1/fileinfo"): file_info,
    ("GET", "/v1/list_directory"): list_directory,
    ("GET", "/v1/list_descendant"): list_descendant,
    ("POST", "/v1/move"): move,
    ("POST", "/v1/_ping"): ping,
}


def handle(app: Any, req: Request) -> Response:
    """The answer to one /v1/... request."""
    route = ROUTES.get((req.method, req.path))
    if route is None:
        raise fail(404, NOT_FOUND_PAGE)
    if app.meta is None and route is not ping:
        raise fail(503, "path routes need a metadata database (--metadb)")
    try:
        return route(app, req)
    except MetaError as e:
        raise fail(500, str(e)) from None
