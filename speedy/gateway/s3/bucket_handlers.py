"""S3 bucket requests: create, head, delete, list (v1 and v2), ACLs, DeleteObjects."""
from __future__ import annotations

import base64
import hashlib
import re
from typing import TYPE_CHECKING

from speedy.gateway.http import Request, Response
from speedy.gateway.garbage import free_blobs
from speedy.gateway.s3 import sigv4, xml
from speedy.gateway.s3.chunked import header_checksum
from speedy.gateway.s3.objects import S3Error

if TYPE_CHECKING:
    from speedy.gateway.app import GatewayApp
    from speedy.gateway.s3.api import S3Service

BUCKET_RE = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]$")
RESERVED = {"blobs", "v1", "metrics", "ui", "healthz"}   # the gateway's own routes


def ok_xml(body: bytes, status: int = 200, headers: list | None = None) -> Response:
    return Response.raw(status, body, "application/xml", headers)


def check_bucket(s3: S3Service, bucket: str) -> tuple[str, float, bool]:
    found = s3.objects.bucket(bucket)
    if found is None:
        raise S3Error("NoSuchBucket", "The specified bucket does not exist", 404)
    return found


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
