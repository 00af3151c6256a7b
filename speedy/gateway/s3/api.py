"""The S3 REST API on the gateway (path-style: /<bucket>/<key>), over speedy blobs.

    GET /                         ListBuckets
    PUT|HEAD|DELETE /b            CreateBucket, HeadBucket, DeleteBucket (only when empty)
    GET /b                        ListObjectsV2 (list-type=2) or ListObjects (v1 markers);
                                  ?location, ?uploads (ListMultipartUploads), ?acl
    POST /b?delete                DeleteObjects
    PUT /b/k                      PutObject; CopyObject with x-amz-copy-source;
                                  ?partNumber&uploadId: UploadPart (UploadPartCopy)
    GET|HEAD /b/k                 GetObject, HeadObject; ?uploadId: ListParts
    DELETE /b/k                   DeleteObject; ?uploadId: AbortMultipartUpload
    POST /b/k?uploads | ?uploadId CreateMultipartUpload, CompleteMultipartUpload

Any other sub-resource answers NotImplemented (501). Requests are authenticated with
SigV4 (header or presigned URL); a bucket made public-read serves GET/HEAD to anyone.
"""
from __future__ import annotations

import base64
import hashlib
import logging
import re
import time
from typing import TYPE_CHECKING, Callable, Iterator
from urllib.parse import quote, unquote

from speedy.client import ClusterError, NotFoundError, SpeedyError, parse_key
from speedy.gateway.blobs import (byte_range, content_safety, http_date, http_date_text,
                                  stream_parts)
from speedy.gateway.http import HTTPError, Request, Response
from speedy.gateway.garbage import forget_blob, free_blobs
from speedy.wire.manifest import Key
from speedy.gateway.s3 import sigv4, xml
from speedy.gateway.s3.chunked import AwsChunkedReader, BodyError, Checksum, header_checksum
from speedy.gateway.s3.objects import MAX_PARTS, ObjectInfo, Part, S3Error, S3Objects
from speedy.gateway.s3.sigv4 import AuthError

if TYPE_CHECKING:
    from speedy.gateway.app import GatewayApp

log = logging.getLogger("speedy.gateway.s3")

MAX_OBJECT = 5 << 30            # a single PUT (and a part) at most 5 GiB, as S3
MIN_PART = 5 << 20              # every part but the last at least 5 MiB, as S3
BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
RESERVED = {"blobs", "v1", "metrics", "ui", "healthz"}   # the gateway's own routes
SUBRESOURCES_501 = ("tagging", "lifecycle", "policy", "cors", "website", "replication",
                    "encryption", "logging", "notification", "object-lock", "retention",
                    "legal-hold", "torrent", "restore", "select", "analytics", "metrics",
                    "inventory", "intelligent-tiering", "accelerate", "requestPayment",
                    "ownershipControls", "publicAccessBlock", "attributes", "versions")
DEFAULT_TYPE = "binary/octet-stream"   # what S3 answers for an object stored without one


class S3Service:
    """The S3 face of one gateway: credentials, region and the metadata operations."""

    def __init__(self, objects: S3Objects, keys: dict[str, str], region: str = "us-east-1",
                 upload_ttl: float = 7 * 24 * 3600) -> None:
        self.objects = objects
        self.keys = dict(keys)
        self.region = region
        self.upload_ttl = upload_ttl

    def secret(self, access_key: str) -> str | None:
        return self.keys.get(access_key)


def is_s3(req: Request) -> bool:
    """True when the request is for the S3 API (signed, or a bucket-shaped path)."""
    if req.header("authorization", "").startswith("AWS4-HMAC-SHA256") or \
            "X-Amz-Algorithm" in req.query:
        return True
    first = req.path.lstrip("/").split("/", 1)[0]
    return bool(BUCKET_RE.match(first)) and first not in RESERVED


def split_path(path: str) -> tuple[str, str]:
    """(bucket, key) of /bucket/key (either may be empty)."""
    bucket, _, key = path.lstrip("/").partition("/")
    return bucket, key


def handle(app: "GatewayApp", req: Request) -> Response:
    """Answer one S3 request; every error is an S3 XML error document."""
    s3: S3Service = app.s3
    bucket, key = split_path(req.path)
    try:
        verified = authenticate(s3, req, bucket)
        return route(app, s3, req, bucket, key, verified)
    except (S3Error, AuthError, BodyError) as e:
        return error(e.code, e.message, e.status, req.path)
    except xml.XMLError as e:
        return error("MalformedXML", str(e), 400, req.path)
    except HTTPError as e:
        code = {400: "InvalidArgument", 411: "MissingContentLength", 413: "EntityTooLarge",
                416: "InvalidRange", 405: "MethodNotAllowed"}.get(e.status, "InvalidRequest")
        return error(code, e.reason, e.status, req.path)
    except NotFoundError as e:
        log.error("s3 %s %s: a blob is missing: %s", req.method, req.path, e)
        return error("InternalError", f"stored bytes are missing: {e}", 500, req.path)
    except ClusterError as e:
        return error("ServiceUnavailable", str(e), 503, req.path)
    except SpeedyError as e:
        return error("InternalError", str(e), 500, req.path)


def error(code: str, message: str, status: int, resource: str = "") -> Response:
    body = xml.error(code, message, resource)
    return Response.raw(status, body, "application/xml")


def authenticate(s3: S3Service, req: Request, bucket: str) -> sigv4.Verified | None:
    """The verified signature; None for an anonymous read of a public-read bucket."""
    auth = req.header("authorization")
    if auth:
        return sigv4.verify_header(req.method, req.path, req.query_string, req.headers, s3.secret)
    if "X-Amz-Algorithm" in req.query or "X-Amz-Signature" in req.query:
        return sigv4.verify_presigned(req.method, req.path, req.query_string, req.query,
                                      req.headers, s3.secret)
    if req.method in ("GET", "HEAD") and bucket:
        found = s3.objects.bucket(bucket)
        if found is not None and found[2]:
            return None
    raise AuthError("AccessDenied", "Access Denied: sign the request (AWS Signature Version 4)")


def route(app: "GatewayApp", s3: S3Service, req: Request, bucket: str, key: str,
          v: sigv4.Verified | None) -> Response:
    """Dispatch by method, path and sub-resource."""
    q, m = req.query, req.method
    for name in SUBRESOURCES_501:
        if name in q:
            return error("NotImplemented", f"the ?{name} sub-resource is not implemented here",
                         501, req.path)
    if not bucket:
        if m in ("GET", "HEAD"):
            return ok_xml(xml.list_buckets(s3.objects.buckets()))
        raise S3Error("MethodNotAllowed", "only GET is allowed on /", 405)
    if not key:
        return bucket_op(app, s3, req, bucket, v)
    if "uploads" in q and m == "POST":
        return create_upload(s3, req, bucket, key)
    if "uploadId" in q:
        if m == "PUT":
            return upload_part(app, s3, req, bucket, key, v)
        if m == "POST":
            return complete_upload(app, s3, req, bucket, key)
        if m == "DELETE":
            upload = s3.objects.upload(bucket, key, q["uploadId"])
            free_blobs(app, s3.objects.abort_upload(upload.upload_id))
            return Response(204, [])
        if m == "GET":
            return list_parts(s3, req, bucket, key)
    if m == "PUT":
        if req.header("x-amz-copy-source"):
            return copy_object(app, s3, req, bucket, key)
        return put_object(app, s3, req, bucket, key, v)
    if m in ("GET", "HEAD"):
        return get_object(app, s3, req, bucket, key)
    if m == "DELETE":
        check_bucket(s3, bucket)
        free_blobs(app, s3.objects.delete_object(bucket, key))
        return Response(204, [])
    raise S3Error("MethodNotAllowed", f"{m} is not allowed on an object", 405)


def ok_xml(body: bytes, status: int = 200, headers: list | None = None) -> Response:
    return Response.raw(status, body, "application/xml", headers)


def check_bucket(s3: S3Service, bucket: str) -> tuple[str, float, bool]:
    found = s3.objects.bucket(bucket)
    if found is None:
        raise S3Error("NoSuchBucket", "The specified bucket does not exist", 404)
    return found


# -- buckets -----------------------------------------------------------------------------


def bucket_op(app: "GatewayApp", s3: S3Service, req: Request, bucket: str,
              v: sigv4.Verified | None) -> Response:
    m, q = req.method, req.query
    if m == "PUT":
        if "acl" in q:
            check_bucket(s3, bucket)
            s3.objects.set_public_read(bucket, canned_acl(req))
            return Response(200, [("Content-Length", "0")])
        if "versioning" in q:
            raise S3Error("NotImplemented", "versioning is not implemented here", 501)
        if not BUCKET_RE.match(bucket) or ".." in bucket or bucket in RESERVED:
            raise S3Error("InvalidBucketName", f"The specified bucket is not valid: '{bucket}' "
                          f"(3-63 of a-z 0-9 . -; not {', '.join(sorted(RESERVED))})", 400)
        body = req.read_exactly(xml.MAX_XML_BODY + 1)
        if len(body) > xml.MAX_XML_BODY:
            raise S3Error("MaxMessageLengthExceeded", "the bucket configuration is too large", 400)
        if not s3.objects.create_bucket(bucket, canned_acl(req)):
            raise S3Error("BucketAlreadyOwnedByYou", "Your previous request to create the "
                          "named bucket succeeded and you already own it.", 409)
        return Response(200, [("Location", f"/{bucket}"), ("Content-Length", "0")])
    if m == "DELETE":
        free_blobs(app, s3.objects.delete_bucket(bucket))
        return Response(204, [])
    if m == "POST" and "delete" in q:
        return delete_objects(app, s3, req, bucket)
    found = check_bucket(s3, bucket)
    if m == "HEAD":
        return Response(200, [("x-amz-bucket-region", s3.region), ("Content-Length", "0")])
    if m != "GET":
        raise S3Error("MethodNotAllowed", f"{m} is not allowed on a bucket", 405)
    if "location" in q:
        return ok_xml(xml.location("" if s3.region == "us-east-1" else s3.region))
    if "versioning" in q:
        return ok_xml(xml.HEAD.encode() + b'<VersioningConfiguration xmlns="'
                      + xml.NS.encode() + b'"/>')
    if "acl" in q:
        return ok_xml(acl_document(found[2]))
    if "uploads" in q:
        return list_uploads(s3, req, bucket)
    return list_objects(s3, req, bucket)


def canned_acl(req: Request) -> bool:
    """True for x-amz-acl: public-read; private when absent; NotImplemented otherwise."""
    acl = (req.header("x-amz-acl") or "private").strip()
    if acl not in ("private", "public-read"):
        raise S3Error("NotImplemented", f"the canned ACL '{acl}' is not implemented "
                      "(private and public-read are)", 501)
    return acl == "public-read"


def acl_document(public: bool) -> bytes:
    grants = ('<Grant><Grantee xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
              'xsi:type="CanonicalUser"><ID>speedy</ID><DisplayName>speedy</DisplayName>'
              '</Grantee><Permission>FULL_CONTROL</Permission></Grant>')
    if public:
        grants += ('<Grant><Grantee xmlns:xsi="http://www.w3.org/2001/XMLSchema-instance" '
                   'xsi:type="Group"><URI>http://acs.amazonaws.com/groups/global/AllUsers</URI>'
                   '</Grantee><Permission>READ</Permission></Grant>')
    return (f'{xml.HEAD}<AccessControlPolicy xmlns="{xml.NS}">{xml.owner()}'
            f'<AccessControlList>{grants}</AccessControlList></AccessControlPolicy>').encode()


def int_param(q: dict, name: str, default: int, lo: int = 0, hi: int = 1000) -> int:
    raw = q.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit():
        raise S3Error("InvalidArgument", f"{name} must be a non-negative integer", 400)
    return max(lo, min(int(raw), hi))


def list_objects(s3: S3Service, req: Request, bucket: str) -> Response:
    q = req.query
    v2 = q.get("list-type") == "2"
    prefix, delimiter = q.get("prefix", ""), q.get("delimiter", "")
    encoding = q.get("encoding-type", "")
    if encoding not in ("", "url"):
        raise S3Error("InvalidArgument", "encoding-type must be url", 400)
    max_keys = int_param(q, "max-keys", 1000)
    token = q.get("continuation-token", "")
    if v2:
        after = decode_token(token) if token else q.get("start-after", "")
    else:
        after = q.get("marker", "")
    if max_keys == 0:
        entries, prefixes, truncated, last = [], [], False, after
    else:
        entries, prefixes, truncated, last = s3.objects.list_objects(
            bucket, prefix, delimiter, after, max_keys)
    listed = [xml.Entry(o.key, o.size, o.etag, o.mtime) for o in entries]
    body = xml.list_objects(bucket, listed, prefixes, prefix=prefix, delimiter=delimiter,
                            max_keys=max_keys, truncated=truncated, v2=v2,
                            marker=q.get("marker", ""),
                            next_marker=last if delimiter else "",
                            start_after=q.get("start-after", ""), token=token,
                            next_token=encode_token(last) if truncated else "", encoding=encoding)
    return ok_xml(body)


def encode_token(key: str) -> str:
    return base64.urlsafe_b64encode(key.encode()).decode()


def decode_token(token: str) -> str:
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except (ValueError, UnicodeDecodeError):
        raise S3Error("InvalidArgument", "The continuation token provided is incorrect", 400) from None


def delete_objects(app: "GatewayApp", s3: S3Service, req: Request, bucket: str) -> Response:
    check_bucket(s3, bucket)
    body = req.read_exactly(xml.MAX_XML_BODY + 1)
    check_content_md5(req, body)
    keys, quiet = xml.parse_delete(body)
    deleted, errors, freed = [], [], []
    for key in keys:
        try:
            freed += s3.objects.delete_object(bucket, key)
            deleted.append(key)
        except Exception as e:  # noqa: BLE001 (one key's failure is reported in the document)
            errors.append((key, "InternalError", str(e)[:200]))
    free_blobs(app, freed)   # one pass (and one look at the garbage queue) for them all
    return ok_xml(xml.delete_result(deleted, errors, quiet))


def check_content_md5(req: Request, body: bytes) -> None:
    want = req.header("content-md5")
    if want is not None and base64.b64encode(hashlib.md5(body).digest()).decode() != want.strip():
        raise S3Error("BadDigest", "The Content-MD5 you specified did not match what we received.", 400)
    ck = header_checksum(req.headers)
    if ck is not None:
        ck.update(body)
        ck.check()


# -- objects -----------------------------------------------------------------------------


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


def list_uploads(s3: S3Service, req: Request, bucket: str) -> Response:
    q = req.query
    limit = int_param(q, "max-uploads", 1000)
    rows = s3.objects.uploads(bucket, q.get("prefix", ""), q.get("key-marker", ""),
                              q.get("upload-id-marker", ""), limit + 1)
    truncated = len(rows) > limit
    return ok_xml(xml.list_uploads(bucket, rows[:limit], prefix=q.get("prefix", ""),
                                   key_marker=q.get("key-marker", ""),
                                   upload_id_marker=q.get("upload-id-marker", ""),
                                   max_uploads=limit, truncated=truncated))


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
