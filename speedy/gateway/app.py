"""The gateway's WSGI app: routes HTTP requests to the blob routes and the path routes.

    app = GatewayApp(Client("127.0.0.1:8099"), open_meta("sqlite:///./speedy_gateway.db"))
    GET /metrics                      -> Prometheus text
    GET /healthz                      -> speedy.gateway.health (200 ok / 503 unavailable)
    POST /blobs                       -> blobs.upload
    GET | HEAD | DELETE /<key>        -> blobs.download / blobs.remove  (key: 3,10452 or 3,10460m)
    /v1/...                           -> speedy.gateway.paths.handle(app, request)
    /ui/...                           -> speedy.gateway.console.handle (the web console)
    anything else                     -> 404

Handlers return a Response or raise HTTPError; every error becomes a one-line plain-text
answer. Client errors map to HTTP: NotFoundError 404, a master without a route 503, a
chunkserver failure 502.
"""
from __future__ import annotations

import logging
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Iterable

from prometheus_client import CONTENT_TYPE_LATEST

from speedy.client import Client, ClusterError, IntegrityError, MasterError, NotFoundError
from speedy.client import KeyFormatError, SpeedyError
from speedy.gateway import blobs, console, paths
from speedy.gateway.health import HealthCheck
from speedy.gateway.s3 import api as s3api
from speedy.gateway.http import HTTPError, Request, Response, status_line
from speedy.gateway.records import RecordStore
from speedy.gateway.stats import GatewayStats
from speedy.wire.manifest import KEY_RE

log = logging.getLogger("speedy.gateway")

BLOB_METHODS = ("GET", "HEAD", "DELETE")
DEFAULT_MAX_BODY = 5 << 30     # 5 GiB: larger bodies are refused with 413


class GatewayApp:
    """WSGI callable: the HTTP face of a speedy cluster."""

    def __init__(self, client: Client, meta: Any = None, *, signing_key: str | None = None,
                 max_body: int = DEFAULT_MAX_BODY, stats: GatewayStats | None = None,
                 metrics: Callable[[], bytes] | None = None,
                 records: RecordStore | None = None):
        self.client = client
        self.meta = meta
        self.records = records
        self.io = ThreadPoolExecutor(32, thread_name_prefix="gateway-io")
        self.signing_key = signing_key or None
        self.max_body = max_body
        self.stats = stats or GatewayStats()
        self.metrics = metrics
        self.s3 = None            # an S3Service when S3 keys are configured
        self.health = HealthCheck()

    # -- WSGI --------------------------------------------------------------------------

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        """Answer one WSGI request."""
        t0 = time.monotonic()
        req: Request | None = None
        try:
            req = Request(environ, self.max_body)
            resp = self.dispatch(req)
        except HTTPError as e:
            resp = e.response()
        except Exception as e:  # noqa: BLE001 (every error is an answer, never a traceback)
            resp = self.error_response(e)
        route = req.route if req is not None else route_of(environ.get("PATH_INFO", ""))
        if req is not None and req.method == "HEAD":
            resp = resp.without_body()
        self.stats.observe(route, resp.status, time.monotonic() - t0)
        start_response(status_line(resp.status), resp.headers)
        body = resp.body
        if isinstance(body, (bytes, bytearray)):
            if resp.on_close is not None:
                resp.on_close()
            return [body]  # bytes, or the bytearray the client read (no copy)
        return _Body(body, resp.on_close)

    def error_response(self, e: Exception) -> Response:
        """The answer for an exception a handler let out."""
        if isinstance(e, NotFoundError):
            return Response.text(404, str(e))
        if isinstance(e, KeyFormatError):
            return Response.text(400, f"malformed key: {e}")
        if isinstance(e, IntegrityError):
            return Response.text(502, f"stored bytes failed their check: {e}")
        if isinstance(e, ClusterError):
            text = str(e)
            unavailable = isinstance(e, MasterError) or text.startswith("master ") or \
                "no writable group" in text or "route is empty" in text
            return Response.text(503 if unavailable else 502, text)
        if isinstance(e, SpeedyError):
            return Response.text(502, str(e))
        if isinstance(e, (OSError, TimeoutError)):
            return Response.text(502, f"chunkserver unavailable: {e}")
        log.exception("internal error")
        return Response.text(500, f"internal error: {type(e).__name__}")

    # -- routing -----------------------------------------------------------------------

    def dispatch(self, req: Request) -> Response:
        """The answer to one request."""
        path, method = req.path, req.method
        key = key_text(path)
        if key is not None:
            if method in ("GET", "HEAD"):
                req.route = "get"
                return blobs.download(self, req, key)
            if method == "DELETE":
                req.route = "delete"
                return blobs.remove(self, req, key)
            raise HTTPError(405, f"method {method} is not allowed on a key",
                            [("Allow", ", ".join(BLOB_METHODS))])
        if path == "/metrics":
            req.route = "metrics"
            if method not in ("GET", "HEAD"):
                raise HTTPError(405, "use GET for /metrics", [("Allow", "GET, HEAD")])
            if self.metrics is None:
                raise HTTPError(404, "metrics are not served here")
            return Response.raw(200, self.metrics(), CONTENT_TYPE_LATEST)
        if path == "/healthz":
            req.route = "health"
            return self.health.check(self, req)
        if console.wants(path):
            req.route = "other"
            return console.handle(self, req)
        if path == "/blobs" or path == "/blobs/":
            req.route = "upload"
            if method != "POST":
                raise HTTPError(405, "use POST to upload to /blobs", [("Allow", "POST")])
            return blobs.upload(self, req)
        if path.startswith("/v1/"):
            req.route = "paths"
            return paths.handle(self, req)
        if self.s3 is not None and s3api.is_s3(req):
            req.route = "s3"
            return s3api.handle(self, req)
        req.route = "other"
        if path.startswith("/") and "," in path and len(path) < 64:
            raise HTTPError(404, f"malformed key {path[1:]!r} (expected like 3,10452)")
        raise HTTPError(404, f"no route for {method} {path[:100]}")


def key_text(path: str) -> str | None:
    """The key a blob route's path names ("/3,10452" -> "3,10452"), or None."""
    if "," not in path or not path.startswith("/"):
        return None
    m = KEY_RE.match(path[1:])   # the one key grammar (speedy.wire.manifest)
    return m.group(0) if m else None


def route_of(path: str) -> str:
    """The metrics label of a request path."""
    if path in ("/blobs", "/blobs/"):
        return "upload"
    if path == "/metrics":
        return "metrics"
    if path == "/healthz":
        return "health"
    if path.startswith("/v1/"):
        return "paths"
    return "get" if key_text(path) is not None else "other"


class _Body:
    """A streamed WSGI body that runs on_close when the server is done with it."""

    def __init__(self, pieces: Iterable[bytes], on_close: Callable[[], None] | None):
        self._it = iter(pieces)
        self._pieces = pieces
        self._on_close = on_close

    def __iter__(self) -> "_Body":
        return self

    def __next__(self) -> bytes:
        return next(self._it)

    def close(self) -> None:
        close = getattr(self._pieces, "close", None)
        try:
            if close is not None:
                close()
        finally:
            if self._on_close is not None:
                self._on_close()
