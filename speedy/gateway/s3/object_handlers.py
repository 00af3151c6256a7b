"""S3 object requests: put, copy, get and head objects, and multipart uploads."""
from __future__ import annotations

import base64
import hashlib
import re
import time
from typing import TYPE_CHECKING, Callable, Iterator
from urllib.parse import quote, unquote

from speedy.client import parse_key
from speedy.gateway.blobs import (byte_range, content_safety, http_date, http_date_text,
                                  stream_parts)
from speedy.gateway.http import Request, Response
from speedy.gateway.garbage import forget_blob, free_blobs
from speedy.gateway.s3 import sigv4, xml
from speedy.gateway.s3.bucket_handlers import check_bucket, int_param, ok_xml
from speedy.gateway.s3.chunked import AwsChunkedReader, Checksum, header_checksum
from speedy.gateway.s3.objects import MAX_PARTS, ObjectInfo, Part, S3Error
from speedy.wire.manifest import Key

if TYPE_CHECKING:
    from speedy.gateway.app import GatewayApp
    from speedy.gateway.s3.api import S3Service

MAX_OBJECT = 5 << 30            # a single PUT (and a part) at most 5 GiB, as S3
MIN_PART = 5 << 20              # every part but the last at least 5 MiB, as S3
DEFAULT_TYPE = "binary/octet-stream"   # what S3 answers for an object stored without one


class Body:
    """The request body as a file: aws-chunked decoded, counted and hashed (MD5, SHA-256)."""

    def __init__(self, req: Request, v: sigv4.Verified | None, limit: int) -> None:
        mode = v.payload_hash if v else sigv4.UNSIGNED_PAYLOAD
        self.expected_sha256 = mode if len(mode) == 64 else None
        decoded = req.header("x-amz-decoded-content-length")
        if mode in sigv4.STREAMING or "aws-chunked" in (req.header("content-encoding") or ""):
            if decoded is None or not decoded.isdigit():
                raise S3Error("MissingContentLength", "aws-chunked needs x-amz-decoded-content-length", 411)
            self.length: int | None = int(decoded)
            self.source = AwsChunkedReader(req.read, mode, v, req.header("x-amz-trailer") or "",
                                           self.length)
        else:
            if req.content_length is None and not req.chunked:
                raise S3Error("MissingContentLength", "You must provide the Content-Length HTTP header.", 411)
            self.length = req.content_length
            self.source = req
        if self.length is not None and self.length > limit:
            raise S3Error("EntityTooLarge", f"Your proposed upload of {self.length} bytes exceeds "
                          f"the maximum allowed object size of {limit} bytes.", 400)
        self.limit = limit
        self.md5 = hashlib.md5()
        self.sha = hashlib.sha256() if self.expected_sha256 else None
        self.checksum: Checksum | None = header_checksum(req.headers)
        self.size = 0
        self.content_md5 = req.header("content-md5")

    def read(self, n: int = 1 << 20) -> bytes:
        data = self.source.read(min(n, 1 << 20) if n and n > 0 else 1 << 20)
        if data:
            self.size += len(data)
            if self.size > self.limit:
                raise S3Error("EntityTooLarge", f"the body is larger than {self.limit} bytes", 400)
            self.md5.update(data)
            if self.sha is not None:
                self.sha.update(data)
            if self.checksum is not None:
                self.checksum.update(data)
        return data

    def check(self) -> None:
        """After the whole body: lengths, Content-MD5, SHA-256 and checksums, or an S3Error."""
        if self.length is not None and self.size != self.length:
            raise S3Error("IncompleteBody", f"You did not provide the number of bytes specified "
                          f"by the Content-Length HTTP header ({self.size} of {self.length}).", 400)
        if self.content_md5 is not None and \
                base64.b64encode(self.md5.digest()).decode() != self.content_md5.strip():
            raise S3Error("BadDigest", "The Content-MD5 you specified did not match what we received.", 400)
        if self.sha is not None and self.sha.hexdigest() != self.expected_sha256:
            raise S3Error("XAmzContentSHA256Mismatch", "The provided 'x-amz-content-sha256' "
                          "header does not match what was computed.", 400)
        if self.checksum is not None:
            self.checksum.check()


def store_body(app: "GatewayApp", body: Body) -> tuple[str, int, str]:
    """Put the body as one cluster blob; (key or "" when empty, size, md5 hex)."""
    first = body.read(1 << 20)
    if not first:
        body.check()
        return "", 0, body.md5.hexdigest()
    key = app.client.put(_Prefixed(first, body))
    try:
        body.check()
    except Exception:
        forget_blob(app, key)
        raise
    return key, body.size, body.md5.hexdigest()


class _Prefixed:
    """A file whose first bytes were already read."""

    def __init__(self, head: bytes, rest: Body) -> None:
        self.head, self.rest = head, rest

    def read(self, n: int = -1) -> bytes:
        if self.head:
            out, self.head = (self.head, b"") if n < 0 or n >= len(self.head) \
                else (self.head[:n], self.head[n:])
            return out
        return self.rest.read(n)


def record_blob(app: "GatewayApp", blob: str, record: Callable[[], list[Key]]) -> None:
    """Run record() (metadata naming the just-written blob; it returns the blobs it
    replaced, which are freed); when it fails the blob is deleted again."""
    try:
        replaced = record()
    except Exception:
        if blob:
            forget_blob(app, blob)
        raise
    free_blobs(app, replaced)


def user_meta(req: Request) -> dict[str, str]:
    meta = {k[len("x-amz-meta-"):]: v for k, v in req.headers.items() if k.startswith("x-amz-meta-")}
    if sum(len(k) + len(v) for k, v in meta.items()) > 2048:
        raise S3Error("MetadataTooLarge", "Your metadata headers exceed the maximum allowed "
                      "metadata size (2 KB).", 400)
    return meta


def object_headers(o: ObjectInfo) -> list[tuple[str, str]]:
    hs = [("ETag", f'"{o.etag}"'), ("Last-Modified", http_date_text(o.mtime)),
          ("Accept-Ranges", "bytes")]
    hs += [(f"x-amz-meta-{k}", v) for k, v in o.meta.items()]
    return hs


def put_object(app: "GatewayApp", s3: S3Service, req: Request, bucket: str, key: str,
               v: sigv4.Verified | None) -> Response:
    if len(key.encode()) > 1024:
        raise S3Error("KeyTooLongError", "Your key is too long (at most 1024 bytes).", 400)
    body = Body(req, v, MAX_OBJECT)
    blob, size, md5 = store_body(app, body)
    obj = ObjectInfo(bucket, key, size, md5, req.header("content-type") or DEFAULT_TYPE,
                     user_meta(req), time.time(), [(blob, size)] if blob else [])
    record_blob(app, blob, lambda: s3.objects.put_object(obj))
    return Response(200, [("ETag", f'"{md5}"'), ("Content-Length", "0")])


def copy_source(s3: S3Service, req: Request) -> ObjectInfo:
    raw = unquote(req.header("x-amz-copy-source") or "").lstrip("/")
    src_bucket, _, src_key = raw.partition("/")
    src_key = src_key.split("?versionId=", 1)[0]
    if not src_bucket or not src_key:
        raise S3Error("InvalidArgument", "x-amz-copy-source must be <bucket>/<key>", 400)
    check_bucket(s3, src_bucket)
    src = s3.objects.get_object(src_bucket, src_key)
    if src is None:
        raise S3Error("NoSuchKey", "The specified key does not exist.", 404)
    check_conditions(req, src, prefix="x-amz-copy-source-")
    return src


def copy_bytes(app: "GatewayApp", src: ObjectInfo, start: int, end: int) -> tuple[str, int, str]:
    """Copy bytes start..end of src into a new blob; (key, size, md5 hex)."""
    md5 = hashlib.md5()
    if end <= start:
        return "", 0, md5.hexdigest()

    class Source:
        def __init__(self) -> None:
            self.it = read_range(app, src, start, end)
            self.buf = b""

        def read(self, n: int = -1) -> bytes:
            while (n < 0 or len(self.buf) < n):
                piece = next(self.it, None)
                if piece is None:
                    break
                self.buf += piece
            out, self.buf = (self.buf, b"") if n < 0 else (self.buf[:n], self.buf[n:])
            md5.update(out)
            return out
    key = app.client.put(Source())
    return key, end - start, md5.hexdigest()


def copy_object(app: "GatewayApp", s3: S3Service, req: Request, bucket: str, key: str) -> Response:
    src = copy_source(s3, req)
    directive = (req.header("x-amz-metadata-directive") or "COPY").upper()
    if directive not in ("COPY", "REPLACE"):
        raise S3Error("InvalidArgument", "x-amz-metadata-directive is COPY or REPLACE", 400)
    if (src.bucket, src.key) == (bucket, key) and directive == "COPY":
        raise S3Error("InvalidRequest", "This copy request is illegal because it is trying to "
                      "copy an object to itself without changing the object's metadata.", 400)
    blob, size, md5 = copy_bytes(app, src, 0, src.size)
    etag = md5 if len(src.blobs) <= 1 else src.etag
    ctype, meta = (src.content_type, src.meta) if directive == "COPY" else \
        (req.header("content-type") or DEFAULT_TYPE, user_meta(req))
    obj = ObjectInfo(bucket, key, size, etag, ctype, meta, time.time(), [(blob, size)] if blob else [])
    record_blob(app, blob, lambda: s3.objects.put_object(obj))
    return ok_xml(xml.copy_result(obj.etag, obj.mtime))


def check_conditions(req: Request, o: ObjectInfo, prefix: str = "") -> bool:
    """412 for a failed If-Match/If-Unmodified-Since; True for a 304 (If-None-Match...)."""
    etag = f'"{o.etag}"'
    im = req.header(prefix + "if-match")
    if im is not None and not any(t.strip() in (etag, "*", o.etag) for t in im.split(",")):
        raise S3Error("PreconditionFailed", "At least one of the pre-conditions you "
                      "specified did not hold", 412)
    ius = req.header(prefix + "if-unmodified-since")
    if ius is not None and im is None and int(o.mtime) > http_date(ius):
        raise S3Error("PreconditionFailed", "At least one of the pre-conditions you "
                      "specified did not hold", 412)
    inm = req.header(prefix + "if-none-match")
    if inm is not None:
        hit = any(t.strip() in (etag, "*", o.etag) for t in inm.split(","))
        if hit and prefix:
            raise S3Error("PreconditionFailed", "At least one of the pre-conditions you "
                          "specified did not hold", 412)
        return hit
    ims = req.header(prefix + "if-modified-since")
    if ims is not None and int(o.mtime) <= http_date(ims):
        if prefix:
            raise S3Error("PreconditionFailed", "At least one of the pre-conditions you "
                          "specified did not hold", 412)
        return True
    return False


def get_object(app: "GatewayApp", s3: S3Service, req: Request, bucket: str, key: str) -> Response:
    o = s3.objects.get_object(bucket, key)
    if o is None:
        check_bucket(s3, bucket)   # NoSuchBucket before NoSuchKey
        raise S3Error("NoSuchKey", "The specified key does not exist.", 404)
    headers = object_headers(o)
    if check_conditions(req, o):
        return Response(304, headers)
    ctype = req.query.get("response-content-type") or o.content_type
    for q, h in (("response-content-disposition", "Content-Disposition"),
                 ("response-cache-control", "Cache-Control"),
                 ("response-content-encoding", "Content-Encoding")):
        if req.query.get(q):
            headers.append((h, req.query[q]))
    headers[:0] = [("Content-Type", ctype)] + content_safety(ctype)
    start, end, status = 0, o.size, 200
    if req.header("range") is not None and o.size == 0:
        raise S3Error("InvalidRange", "The requested range is not satisfiable", 416)
    span = byte_range(req, o.size, f'"{o.etag}"', int(o.mtime))
    if span is not None:
        start, end, status = span[0], span[1], 206
        headers.append(("Content-Range", f"bytes {start}-{end - 1}/{o.size}"))
    if req.method == "HEAD":
        return Response(status, headers + [("Content-Length", str(end - start))])
    return Response.stream(status, read_range(app, o, start, end), end - start, headers)


def read_range(app: "GatewayApp", o: ObjectInfo, start: int, end: int) -> Iterator[bytes]:
    """Bytes start..end of an object, blob after blob (a multi-part blob part by part)."""
    off = 0
    for blob, size in o.blobs:
        if off < end and off + size > start:
            lo, hi = max(0, start - off), min(size, end - off)
            k = parse_key(blob)
            if k.multipart:
                m = app.client.manifest(k)
                yield from stream_parts(app, k, m, lo, hi, None)
            else:
                data = app.client.read(k, size_hint=size)
                yield data if (lo, hi) == (0, len(data)) else data[lo:hi]
        off += size


# -- multipart uploads -------------------------------------------------------------------


def create_upload(s3: S3Service, req: Request, bucket: str, key: str) -> Response:
    if len(key.encode()) > 1024:
        raise S3Error("KeyTooLongError", "Your key is too long (at most 1024 bytes).", 400)
    uid = s3.objects.create_upload(bucket, key, req.header("content-type") or DEFAULT_TYPE,
                                   user_meta(req))
    return ok_xml(xml.initiate_upload(bucket, key, uid))


def part_number(req: Request) -> int:
    raw = req.query.get("partNumber", "")
    if not raw.isdigit() or not 1 <= int(raw) <= MAX_PARTS:
        raise S3Error("InvalidArgument", "Part number must be an integer between 1 and 10000, "
                      "inclusive", 400)
    return int(raw)


def upload_part(app: "GatewayApp", s3: S3Service, req: Request, bucket: str, key: str,
                v: sigv4.Verified | None) -> Response:
    n = part_number(req)
    upload = s3.objects.upload(bucket, key, req.query["uploadId"])
    if req.header("x-amz-copy-source"):
        src = copy_source(s3, req)
        start, end = 0, src.size
        rng = req.header("x-amz-copy-source-range")
        if rng:
            m = re.fullmatch(r"bytes=(\d+)-(\d+)", rng.strip())
            if not m or int(m.group(2)) < int(m.group(1)) or int(m.group(2)) >= src.size:
                raise S3Error("InvalidRange", "The x-amz-copy-source-range is not satisfiable", 416)
            start, end = int(m.group(1)), int(m.group(2)) + 1
        blob, size, md5 = copy_bytes(app, src, start, end)
    else:
        blob, size, md5 = store_body(app, Body(req, v, MAX_OBJECT))
    record_blob(app, blob, lambda: s3.objects.put_part(upload.upload_id,
                                                       Part(n, size, md5, blob, time.time())))
    if req.header("x-amz-copy-source"):
        return ok_xml(xml.copy_result(md5, time.time(), "CopyPartResult"))
    return Response(200, [("ETag", f'"{md5}"'), ("Content-Length", "0")])


def complete_upload(app: "GatewayApp", s3: S3Service, req: Request, bucket: str,
                    key: str) -> Response:
    upload = s3.objects.upload(bucket, key, req.query["uploadId"])
    body = req.read_exactly(xml.MAX_XML_BODY + 1)
    chosen = xml.parse_complete(body)
    obj, garbage = s3.objects.complete_upload(upload, chosen, MIN_PART)
    free_blobs(app, garbage)
    location = f"/{quote(bucket)}/{quote(key)}"
    return ok_xml(xml.complete_upload(location, bucket, key, obj.etag))


def list_parts(s3: S3Service, req: Request, bucket: str, key: str) -> Response:
    upload = s3.objects.upload(bucket, key, req.query["uploadId"])
    marker = int_param(req.query, "part-number-marker", 0, 0, MAX_PARTS)
    limit = int_param(req.query, "max-parts", 1000)
    parts = s3.objects.parts(upload.upload_id, marker, limit + 1)
    truncated = len(parts) > limit
    parts = parts[:limit]
    infos = [xml.PartInfo(p.number, p.size, p.etag, p.mtime) for p in parts]
    return ok_xml(xml.list_parts(bucket, key, upload.upload_id, infos, marker=marker,
                                 max_parts=limit, truncated=truncated))


def sweep_uploads(app: "GatewayApp", s3: S3Service, now: float | None = None) -> int:
    """Abort uploads older than the upload TTL and free their parts; how many."""
    stale = s3.objects.stale_uploads((now or time.time()) - s3.upload_ttl)
    freed: list[Key] = []
    for uid in stale:
        try:
            freed += s3.objects.abort_upload(uid)
        except S3Error:
            pass
    free_blobs(app, freed)
    return len(stale)
