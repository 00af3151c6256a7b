"""Signed URLs: ?expires=<unix seconds>&sig=<hex HMAC-SHA256>, for --signing_key.

    sig = HMAC-SHA256(signing_key, "<METHOD>\\n<path>\\n<expires>")   hex, lower case

METHOD is GET for GET and HEAD, DELETE for DELETE, POST for POST /blobs; path is the
request path ("/3,10452", "/blobs"). `speedy url KEY --expires 3600` prints such a URL.
"""
from __future__ import annotations

import hashlib
import hmac
import time
from urllib.parse import urlencode

__all__ = ["sign", "signed_query", "check", "SignatureError"]

MAX_EXPIRES = 1 << 40


class SignatureError(Exception):
    """A missing, expired or wrong signature; the message is the 403 reason."""


def _method(method: str) -> str:
    return "GET" if method.upper() == "HEAD" else method.upper()


def sign(secret: str, method: str, path: str, expires: int) -> str:
    """The hex signature of method on path until expires."""
    msg = f"{_method(method)}\n{path}\n{expires}".encode()
    return hmac.new(secret.encode(), msg, hashlib.sha256).hexdigest()


def signed_query(secret: str, method: str, path: str, lifetime: int,
                 now: float | None = None) -> str:
    """'expires=...&sig=...' valid for lifetime seconds from now."""
    expires = int(now if now is not None else time.time()) + lifetime
    return urlencode({"expires": expires, "sig": sign(secret, method, path, expires)})


def check(secret: str, method: str, path: str, query: dict[str, str],
          now: float | None = None) -> None:
    """Return when query holds a valid, unexpired signature; SignatureError otherwise."""
    raw, sig = query.get("expires"), query.get("sig")
    if raw is None or sig is None:
        raise SignatureError("this gateway needs a signed URL (?expires=...&sig=...)")
    if not raw.isdigit() or len(raw) > 13 or int(raw) > MAX_EXPIRES:
        raise SignatureError("malformed expires parameter (unix seconds expected)")
    expires = int(raw)
    if expires < (now if now is not None else time.time()):
        raise SignatureError("the signed URL has expired")
    if not hmac.compare_digest(sign(secret, method, path, expires).encode(),
                               sig.strip().lower().encode("ascii", "replace")):
        raise SignatureError("bad signature")
