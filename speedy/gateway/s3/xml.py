"""S3's XML documents: errors, listings, multipart results, and the request bodies we parse.

Every answer is `<?xml version="1.0" encoding="UTF-8"?>` and one element in the
`http://s3.amazonaws.com/doc/2006-03-01/` namespace (errors have none), as S3 sends them.
"""
from __future__ import annotations

import time
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from typing import Iterable
from xml.sax.saxutils import escape

NS = "http://s3.amazonaws.com/doc/2006-03-01/"
HEAD = '<?xml version="1.0" encoding="UTF-8"?>\n'
MAX_XML_BODY = 1 << 20   # a request document (Delete, CompleteMultipartUpload) at most 1 MiB


class XMLError(Exception):
    """A request document that is not what the operation takes (MalformedXML)."""


def iso8601(ts: float) -> str:
    """2006-02-03T16:45:09.000Z, S3's listing date."""
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(ts)) + f".{int(ts * 1000) % 1000:03d}Z"


def _el(name: str, value: object) -> str:
    if isinstance(value, bool):
        value = "true" if value else "false"
    return f"<{name}>{escape(str(value))}</{name}>"


def _doc(root: str, body: str) -> bytes:
    return f'{HEAD}<{root} xmlns="{NS}">{body}</{root}>'.encode()


def error(code: str, message: str, resource: str = "", request_id: str = "", **extra: str) -> bytes:
    """<Error><Code>NoSuchKey</Code><Message>..</Message><Resource>..</Resource>..</Error>."""
    body = _el("Code", code) + _el("Message", message)
    if resource:
        body += _el("Resource", resource)
    for k, v in extra.items():
        body += _el(k, v)
    body += _el("RequestId", request_id)
    return f"{HEAD}<Error>{body}</Error>".encode()


@dataclass
class Entry:
    """One object as a listing shows it."""

    key: str
    size: int
    etag: str
    mtime: float
    storage_class: str = "STANDARD"

    def xml(self, tag: str = "Contents", extra: str = "") -> str:
        return (f"<{tag}>" + _el("Key", self.key) + _el("LastModified", iso8601(self.mtime))
                + _el("ETag", f'"{self.etag}"') + _el("Size", self.size)
                + _el("StorageClass", self.storage_class) + extra + f"</{tag}>")


def owner(name: str = "speedy") -> str:
    """The one owner every bucket has here."""
    return "<Owner>" + _el("ID", name) + _el("DisplayName", name) + "</Owner>"


def list_buckets(buckets: Iterable[tuple[str, float]]) -> bytes:
    """ListAllMyBucketsResult for (name, creation time) pairs."""
    items = "".join("<Bucket>" + _el("Name", n) + _el("CreationDate", iso8601(t)) + "</Bucket>"
                    for n, t in buckets)
    return _doc("ListAllMyBucketsResult", owner() + f"<Buckets>{items}</Buckets>")


def list_objects(bucket: str, entries: list[Entry], prefixes: list[str], *, prefix: str,
                 delimiter: str, max_keys: int, truncated: bool, v2: bool, marker: str = "",
                 next_marker: str = "", start_after: str = "", token: str = "",
                 next_token: str = "", encoding: str = "") -> bytes:
    """ListBucketResult (ListObjectsV2 when v2, else the v1 marker form)."""
    enc = (lambda s: _url_encode(s)) if encoding == "url" else (lambda s: s)
    body = _el("Name", bucket) + _el("Prefix", enc(prefix))
    if v2:
        if token:
            body += _el("ContinuationToken", token)
        if start_after:
            body += _el("StartAfter", enc(start_after))
        body += _el("KeyCount", len(entries) + len(prefixes))
    else:
        body += _el("Marker", enc(marker))
        if truncated and next_marker:
            body += _el("NextMarker", enc(next_marker))
    body += _el("MaxKeys", max_keys)
    if delimiter:
        body += _el("Delimiter", enc(delimiter))
    if encoding:
        body += _el("EncodingType", encoding)
    body += _el("IsTruncated", truncated)
    if v2 and truncated and next_token:
        body += _el("NextContinuationToken", next_token)
    for e in entries:
        e = Entry(enc(e.key), e.size, e.etag, e.mtime, e.storage_class)
        body += e.xml(extra="" if v2 else owner())
    for p in prefixes:
        body += "<CommonPrefixes>" + _el("Prefix", enc(p)) + "</CommonPrefixes>"
    return _doc("ListBucketResult", body)


def _url_encode(s: str) -> str:
    from urllib.parse import quote
    return quote(s, safe="/")


def initiate_upload(bucket: str, key: str, upload_id: str) -> bytes:
    return _doc("InitiateMultipartUploadResult",
                _el("Bucket", bucket) + _el("Key", key) + _el("UploadId", upload_id))


def complete_upload(location: str, bucket: str, key: str, etag: str) -> bytes:
    return _doc("CompleteMultipartUploadResult", _el("Location", location) + _el("Bucket", bucket)
                + _el("Key", key) + _el("ETag", f'"{etag}"'))


def copy_result(etag: str, mtime: float, tag: str = "CopyObjectResult") -> bytes:
    return _doc(tag, _el("LastModified", iso8601(mtime)) + _el("ETag", f'"{etag}"'))


@dataclass
class PartInfo:
    """One uploaded part of a multipart upload."""

    number: int
    size: int
    etag: str
    mtime: float


def list_parts(bucket: str, key: str, upload_id: str, parts: list[PartInfo], *, marker: int,
               max_parts: int, truncated: bool) -> bytes:
    body = (_el("Bucket", bucket) + _el("Key", key) + _el("UploadId", upload_id)
            + owner().replace("Owner", "Initiator") + owner() + _el("StorageClass", "STANDARD")
            + _el("PartNumberMarker", marker)
            + (_el("NextPartNumberMarker", parts[-1].number) if parts else "")
            + _el("MaxParts", max_parts) + _el("IsTruncated", truncated))
    for p in parts:
        body += ("<Part>" + _el("PartNumber", p.number) + _el("LastModified", iso8601(p.mtime))
                 + _el("ETag", f'"{p.etag}"') + _el("Size", p.size) + "</Part>")
    return _doc("ListPartsResult", body)


def list_uploads(bucket: str, uploads: list[tuple[str, str, float]], *, prefix: str,
                 key_marker: str, upload_id_marker: str, max_uploads: int,
                 truncated: bool) -> bytes:
    """ListMultipartUploadsResult for (key, upload id, initiated) triples."""
    body = (_el("Bucket", bucket) + _el("KeyMarker", key_marker)
            + _el("UploadIdMarker", upload_id_marker) + _el("Prefix", prefix)
            + _el("MaxUploads", max_uploads) + _el("IsTruncated", truncated))
    if truncated and uploads:
        body += _el("NextKeyMarker", uploads[-1][0]) + _el("NextUploadIdMarker", uploads[-1][1])
    for key, uid, t in uploads:
        body += ("<Upload>" + _el("Key", key) + _el("UploadId", uid)
                 + owner().replace("Owner", "Initiator") + owner()
                 + _el("StorageClass", "STANDARD") + _el("Initiated", iso8601(t)) + "</Upload>")
    return _doc("ListMultipartUploadsResult", body)


def delete_result(deleted: list[str], errors: list[tuple[str, str, str]], quiet: bool) -> bytes:
    """DeleteResult: <Deleted> per key (unless quiet), <Error> per (key, code, message)."""
    body = "" if quiet else "".join("<Deleted>" + _el("Key", k) + "</Deleted>" for k in deleted)
    body += "".join("<Error>" + _el("Key", k) + _el("Code", c) + _el("Message", m) + "</Error>"
                    for k, c, m in errors)
    return _doc("DeleteResult", body)


def location(region: str) -> bytes:
    return f'{HEAD}<LocationConstraint xmlns="{NS}">{escape(region)}</LocationConstraint>'.encode()


def _parse(body: bytes, root: str) -> ET.Element:
    if len(body) > MAX_XML_BODY:
        raise XMLError(f"the {root} document is larger than {MAX_XML_BODY} bytes")
    if b"<!DOCTYPE" in body or b"<!ENTITY" in body:
        raise XMLError("document type declarations are not accepted")
    try:
        el = ET.fromstring(body)
    except ET.ParseError as e:
        raise XMLError(f"the {root} document is not well-formed XML: {e}") from None
    if _local(el.tag) != root:
        raise XMLError(f"expected a <{root}> document, got <{_local(el.tag)}>")
    return el


def _local(tag: str) -> str:
    return tag.rsplit("}", 1)[-1]


def _children(el: ET.Element, name: str) -> list[ET.Element]:
    return [c for c in el if _local(c.tag) == name]


def _text(el: ET.Element, name: str) -> str | None:
    found = _children(el, name)
    return (found[0].text or "") if found else None


def parse_delete(body: bytes) -> tuple[list[str], bool]:
    """(keys, quiet) of a DeleteObjects request (at most 1000 keys)."""
    el = _parse(body, "Delete")
    keys = []
    for obj in _children(el, "Object"):
        key = _text(obj, "Key")
        if key is None:
            raise XMLError("an <Object> without a <Key>")
        keys.append(key)
    if not keys or len(keys) > 1000:
        raise XMLError("a Delete request names 1 to 1000 objects")
    return keys, (_text(el, "Quiet") or "").strip().lower() == "true"


def parse_complete(body: bytes) -> list[tuple[int, str]]:
    """[(part number, etag without quotes)] of a CompleteMultipartUpload request."""
    el = _parse(body, "CompleteMultipartUpload")
    parts = []
    for p in _children(el, "Part"):
        num, etag = _text(p, "PartNumber"), _text(p, "ETag")
        if num is None or etag is None:
            raise XMLError("a <Part> needs <PartNumber> and <ETag>")
        try:
            n = int(num)
        except ValueError:
            raise XMLError(f"part number '{num}' is not a number") from None
        parts.append((n, etag.strip().strip('"')))
    if not parts:
        raise XMLError("a CompleteMultipartUpload names at least one part")
    return parts
