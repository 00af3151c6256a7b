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

import logging
from typing import TYPE_CHECKING

from speedy.client import ClusterError, NotFoundError, SpeedyError
from speedy.gateway.http import HTTPError, Request, Response
from speedy.gateway.garbage import free_blobs
from speedy.gateway.s3 import sigv4, xml
from speedy.gateway.s3.bucket_handlers import (BUCKET_RE, RESERVED, bucket_op, check_bucket,
                                               ok_xml)
from speedy.gateway.s3.chunked import BodyError
from speedy.gateway.s3.object_handlers import (complete_upload, copy_object, create_upload,
                                               get_object, list_parts, put_object,
                                               upload_part)
from speedy.gateway.s3.objects import S3Error, S3Objects
from speedy.gateway.s3.sigv4 import AuthError

if TYPE_CHECKING:
    from speedy.gateway.app import GatewayApp

log = logging.getLogger("speedy.gateway.s3")

SUBRESOURCES_501 = ("tagging", "lifecycle", "policy", "cors", "website", "replication",
                    "encryption", "logging", "notification", "object-lock", "retention",
                    "legal-hold", "torrent", "restore", "select", "analytics", "metrics",
                    "inventory", "intelligent-tiering", "accelerate", "requestPayment",
                    "ownershipControls", "publicAccessBlock", "attributes", "versions")


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
