"""The blob routes: POST /blobs, GET/HEAD/DELETE /<key> (filled in below)."""
from __future__ import annotations

from typing import TYPE_CHECKING

from speedy.gateway.http import HTTPError, Request, Response

if TYPE_CHECKING:
    from speedy.gateway.app import GatewayApp


def upload(app: "GatewayApp", req: Request) -> Response:
    """POST /blobs."""
    raise HTTPError(501, "not implemented yet")


def download(app: "GatewayApp", req: Request, key: str) -> Response:
    """GET/HEAD /<key>."""
    raise HTTPError(501, "not implemented yet")


def remove(app: "GatewayApp", req: Request, key: str) -> Response:
    """DELETE /<key>."""
    raise HTTPError(501, "not implemented yet")
