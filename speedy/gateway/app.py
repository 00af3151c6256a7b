"""STAND-IN (branch gateway-paths): the part of branch `gateway`'s GatewayApp that the path
routes need: /v1/... goes to speedy.gateway.paths.handle. The lead keeps branch gateway's file.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable

from speedy.client import Client
from speedy.gateway import paths
from speedy.gateway.http import HTTPError, Request, Response, status_line

log = logging.getLogger("speedy.gateway")


class GatewayApp:
    """WSGI callable: the path routes of a speedy cluster."""

    def __init__(self, client: Client, meta: Any = None, **_: Any):
        self.client = client
        self.meta = meta

    def __call__(self, environ: dict, start_response: Callable) -> Iterable[bytes]:
        req: Request | None = None
        try:
            req = Request(environ)
            if not req.path.startswith("/v1/"):
                raise HTTPError(404, f"no route for {req.method} {req.path[:100]}")
            resp = paths.handle(self, req)
        except HTTPError as e:
            resp = e.response()
        except Exception as e:  # noqa: BLE001 (every error is an answer)
            log.exception("internal error")
            resp = Response.text(500, f"internal error: {type(e).__name__}")
        if req is not None and resp.status >= 400 and req.has_body:
            req.drain()
        start_response(status_line(resp.status), resp.headers)
        if isinstance(resp.body, (bytes, bytearray)):
            if resp.on_close is not None:
                resp.on_close()
            return [bytes(resp.body)]
        return _Body(resp.body, resp.on_close)


class _Body:
    """A streamed WSGI body that runs on_close when the server is done with it."""

    def __init__(self, pieces: Iterable[bytes], on_close: Callable[[], None] | None):
        self._pieces, self._it, self._on_close = pieces, iter(pieces), on_close

    def __iter__(self) -> "_Body":
        return self

    def __next__(self) -> bytes:
        return next(self._it)

    def close(self) -> None:
        try:
            close = getattr(self._pieces, "close", None)
            if close is not None:
                close()
        finally:
            if self._on_close is not None:
                self._on_close()
