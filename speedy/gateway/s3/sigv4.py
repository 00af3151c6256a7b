"""AWS Signature Version 4 for S3: verify header-signed and presigned (query) requests.

    Authorization: AWS4-HMAC-SHA256 Credential=<key>/<yyyymmdd>/<region>/s3/aws4_request,
                   SignedHeaders=host;x-amz-content-sha256;x-amz-date, Signature=<64 hex>

    canonical request = METHOD \\n URI \\n QUERY \\n headers (name:value\\n...) \\n
                        signed header names \\n payload hash
    string to sign    = AWS4-HMAC-SHA256 \\n <amz date> \\n <scope> \\n hex(sha256(canonical))
    signing key       = HMAC(HMAC(HMAC(HMAC("AWS4" + secret, date), region), "s3"), "aws4_request")

Pure functions: the caller passes the request's method, decoded path, raw query string and
headers (lower-case names) and a lookup of secret keys; nothing here does I/O.
"""
from __future__ import annotations

import calendar
import hashlib
import hmac
import re
import time
from dataclasses import dataclass
from typing import Callable, Mapping
from urllib.parse import quote, unquote

ALGORITHM = "AWS4-HMAC-SHA256"
EMPTY_SHA256 = hashlib.sha256(b"").hexdigest()
UNSIGNED_PAYLOAD = "UNSIGNED-PAYLOAD"
STREAMING_SIGNED = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD"
STREAMING_SIGNED_TRAILER = "STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER"
STREAMING_UNSIGNED_TRAILER = "STREAMING-UNSIGNED-PAYLOAD-TRAILER"
STREAMING = (STREAMING_SIGNED, STREAMING_SIGNED_TRAILER, STREAMING_UNSIGNED_TRAILER)
MAX_SKEW = 15 * 60          # seconds a header-signed request's date may be off
MAX_EXPIRES = 7 * 24 * 3600  # presigned URLs live at most a week (as S3)
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_AUTH = re.compile(r"^AWS4-HMAC-SHA256\s+(.*)$", re.S)


class AuthError(Exception):
    """A request that fails authentication: an S3 error code and a message."""

    def __init__(self, code: str, message: str, status: int = 403) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


@dataclass(frozen=True)
class Scope:
    """The credential scope: <access key>/<date>/<region>/<service>/aws4_request."""

    access_key: str
    date: str
    region: str
    service: str

    @property
    def text(self) -> str:
        """The scope without the access key, as it stands in the string to sign."""
        return f"{self.date}/{self.region}/{self.service}/aws4_request"

    @classmethod
    def parse(cls, credential: str) -> "Scope":
        """Scope from 'AKID/20130524/us-east-1/s3/aws4_request'."""
        parts = credential.split("/")
        if len(parts) != 5 or parts[4] != "aws4_request" or not re.fullmatch(r"\d{8}", parts[1]):
            raise AuthError("AuthorizationHeaderMalformed",
                            f"the credential '{credential}' is not <key>/<date>/<region>/s3/aws4_request",
                            400)
        if parts[3] != "s3":
            raise AuthError("AuthorizationHeaderMalformed",
                            f"the credential's service is '{parts[3]}', expected 's3'", 400)
        return cls(*parts[:4])


@dataclass(frozen=True)
class Verified:
    """What a verified request carries on: who signed it, and what its body must be."""

    access_key: str
    payload_hash: str   # hex sha256, UNSIGNED-PAYLOAD or a STREAMING-* mode
    amz_date: str
    scope: Scope
    signature: str      # the seed signature of a streaming (aws-chunked) body
    signing_key: bytes


def signing_key(secret: str, scope: Scope) -> bytes:
    """The derived key for one day, region and service."""
    k = _hmac(("AWS4" + secret).encode(), scope.date)
    k = _hmac(k, scope.region)
    k = _hmac(k, scope.service)
    return _hmac(k, "aws4_request")


def _hmac(key: bytes, msg: str) -> bytes:
    return hmac.new(key, msg.encode(), hashlib.sha256).digest()


def sign(key: bytes, string_to_sign: str) -> str:
    """Hex HMAC-SHA256 of the string to sign."""
    return hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()


def canonical_uri(path: str) -> str:
    """The (decoded) path as S3 signs it: each byte outside A-Za-z0-9-._~/ percent-encoded."""
    return quote(path, safe="/~")


def canonical_query(raw_query: str, drop: str = "") -> list[str]:
    """Candidate canonical query strings: re-encoded (the rule), and as sent (pieces sorted)."""
    pairs = [p.partition("=") for p in raw_query.split("&") if p] if raw_query else []
    pairs = [(k, v) for k, _, v in pairs if unquote(k) != drop]
    encoded = sorted((quote(unquote(k), safe="-_.~"), quote(unquote(v), safe="-_.~"))
                     for k, v in pairs)
    out = ["&".join(f"{k}={v}" for k, v in encoded)]
    raw = "&".join(f"{k}={v}" for k, v in sorted(pairs))
    if raw != out[0]:
        out.append(raw)
    return out


def canonical_headers(headers: Mapping[str, str], signed: list[str]) -> str:
    """'name:value\\n' for each signed header, values trimmed and inner spaces folded."""
    lines = []
    for name in signed:
        value = headers.get(name)
        if value is None:
            raise AuthError("SignatureDoesNotMatch",
                            f"the signed header '{name}' is missing from the request")
        lines.append(f"{name}:{' '.join(value.split())}\n")
    return "".join(lines)


def string_to_sign(amz_date: str, scope: Scope, canonical_request: str) -> str:
    """The string the signature is an HMAC of."""
    digest = hashlib.sha256(canonical_request.encode()).hexdigest()
    return f"{ALGORITHM}\n{amz_date}\n{scope.text}\n{digest}"


def parse_amz_date(text: str) -> float:
    """Unix seconds of an ISO 8601 basic date such as 20130524T000000Z."""
    try:
        return float(calendar.timegm(time.strptime(text, "%Y%m%dT%H%M%SZ")))
    except (ValueError, OverflowError):
        raise AuthError("AccessDenied", f"the date '{text}' is not YYYYMMDDTHHMMSSZ") from None


def parse_authorization(value: str) -> tuple[Scope, list[str], str]:
    """(scope, signed header names, signature) of an Authorization header."""
    m = _AUTH.match(value.strip())
    if not m:
        raise AuthError("AuthorizationHeaderMalformed",
                        "the Authorization header is not AWS4-HMAC-SHA256 (only SigV4 is supported)",
                        400)
    fields = {}
    for part in m.group(1).split(","):
        k, sep, v = part.strip().partition("=")
        if sep:
            fields[k.strip()] = v.strip()
    missing = [k for k in ("Credential", "SignedHeaders", "Signature") if k not in fields]
    if missing:
        raise AuthError("AuthorizationHeaderMalformed",
                        f"the Authorization header lacks {', '.join(missing)}", 400)
    return Scope.parse(fields["Credential"]), fields["SignedHeaders"].split(";"), fields["Signature"]


def _check(method: str, path: str, queries: list[str], headers: Mapping[str, str],
           signed: list[str], payload_hash: str, amz_date: str, scope: Scope, key: bytes,
           signature: str) -> None:
    """Raise SignatureDoesNotMatch unless one canonical form gives the signature."""
    hdrs = canonical_headers(headers, signed)
    uri = canonical_uri(path)
    for query in queries:
        cr = "\n".join([method, uri, query, hdrs, ";".join(signed), payload_hash])
        if hmac.compare_digest(sign(key, string_to_sign(amz_date, scope, cr)), signature):
            return
    raise AuthError("SignatureDoesNotMatch",
                    "The request signature we calculated does not match the signature you provided. "
                    "Check your key and signing method.")


def _secret(secrets: Callable[[str], str | None], scope: Scope) -> bytes:
    secret = secrets(scope.access_key)
    if secret is None:
        raise AuthError("InvalidAccessKeyId",
                        "The AWS Access Key Id you provided does not exist in our records.")
    return signing_key(secret, scope)


def verify_header(method: str, path: str, raw_query: str, headers: Mapping[str, str],
                  secrets: Callable[[str], str | None], now: float | None = None) -> Verified:
    """Check an Authorization-header signature; headers have lower-case names."""
    scope, signed, signature = parse_authorization(headers["authorization"])
    if "host" not in signed:
        raise AuthError("AuthorizationHeaderMalformed", "the signed headers must include host", 400)
    amz_date = headers.get("x-amz-date", "")
    if not amz_date:
        raise AuthError("AccessDenied", "AWS authentication requires an x-amz-date header")
    skew = abs((now if now is not None else time.time()) - parse_amz_date(amz_date))
    if skew > MAX_SKEW:
        raise AuthError("RequestTimeTooSkewed",
                        "The difference between the request time and the current time is too large.")
    if amz_date[:8] != scope.date:
        raise AuthError("SignatureDoesNotMatch", "the credential date is not the x-amz-date's day")
    payload_hash = headers.get("x-amz-content-sha256", "")
    if not payload_hash:
        raise AuthError("InvalidRequest", "Missing required header for this request: "
                        "x-amz-content-sha256", 400)
    if payload_hash not in (UNSIGNED_PAYLOAD, *STREAMING) and not _HEX64.match(payload_hash):
        raise AuthError("InvalidArgument", "x-amz-content-sha256 must be UNSIGNED-PAYLOAD, "
                        "STREAMING-* or a lower-case hex SHA-256", 400)
    key = _secret(secrets, scope)
    _check(method, path, canonical_query(raw_query), headers, signed, payload_hash,
           amz_date, scope, key, signature)
    return Verified(scope.access_key, payload_hash, amz_date, scope, signature, key)


def verify_presigned(method: str, path: str, raw_query: str, query: Mapping[str, str],
                     headers: Mapping[str, str], secrets: Callable[[str], str | None],
                     now: float | None = None) -> Verified:
    """Check a presigned URL (X-Amz-Algorithm, -Credential, -Date, -Expires, -Signature)."""
    if query.get("X-Amz-Algorithm") != ALGORITHM:
        raise AuthError("AuthorizationQueryParametersError",
                        "X-Amz-Algorithm must be AWS4-HMAC-SHA256", 400)
    missing = [k for k in ("X-Amz-Credential", "X-Amz-Date", "X-Amz-Expires",
                           "X-Amz-SignedHeaders", "X-Amz-Signature") if k not in query]
    if missing:
        raise AuthError("AuthorizationQueryParametersError",
                        f"the presigned URL lacks {', '.join(missing)}", 400)
    scope = Scope.parse(query["X-Amz-Credential"])
    try:
        expires = int(query["X-Amz-Expires"])
    except ValueError:
        raise AuthError("AuthorizationQueryParametersError",
                        "X-Amz-Expires must be a number of seconds", 400) from None
    if not 1 <= expires <= MAX_EXPIRES:
        raise AuthError("AuthorizationQueryParametersError",
                        "X-Amz-Expires must be between 1 and 604800 seconds", 400)
    amz_date = query["X-Amz-Date"]
    signed_at = parse_amz_date(amz_date)
    now = now if now is not None else time.time()
    if now > signed_at + expires:
        raise AuthError("AccessDenied", "Request has expired")
    if signed_at > now + MAX_SKEW:
        raise AuthError("AccessDenied", "the presigned URL is dated in the future")
    signed = query["X-Amz-SignedHeaders"].split(";")
    payload_hash = headers.get("x-amz-content-sha256", UNSIGNED_PAYLOAD) \
        if "x-amz-content-sha256" in signed else UNSIGNED_PAYLOAD
    key = _secret(secrets, scope)
    _check(method, path, canonical_query(raw_query, drop="X-Amz-Signature"), headers,
           signed, payload_hash, amz_date, scope, key, query["X-Amz-Signature"])
    return Verified(scope.access_key, payload_hash, amz_date, scope, query["X-Amz-Signature"], key)


def chunk_string_to_sign(v: Verified, previous: str, chunk_sha256: str) -> str:
    """What one aws-chunked chunk's signature signs (STREAMING-AWS4-HMAC-SHA256-PAYLOAD)."""
    return (f"AWS4-HMAC-SHA256-PAYLOAD\n{v.amz_date}\n{v.scope.text}\n{previous}\n"
            f"{EMPTY_SHA256}\n{chunk_sha256}")


def trailer_string_to_sign(v: Verified, previous: str, trailer: bytes) -> str:
    """What the trailer signature of a signed streaming body signs."""
    return (f"AWS4-HMAC-SHA256-TRAILER\n{v.amz_date}\n{v.scope.text}\n{previous}\n"
            f"{hashlib.sha256(trailer).hexdigest()}")
