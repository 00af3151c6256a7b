"""S3's buckets, objects and multipart uploads in the gateway's metadata database.

An object is a list of cluster blobs (one per single-part upload, one per part of a
multipart upload; none for an empty object), read back to back. Each blob belongs to one
object or one part row; a blob that loses its row is queued in table garbage in the same
transaction, and the caller frees its bytes on the chunkservers (speedy.gateway.meta).
The tables (schema version 3, README "S3"):

    gateway_s3_bucket (name PK, created, public_read)
    gateway_s3_object (bucket, key, size, etag, content_type, meta JSON, mtime, blobs JSON) PK (bucket, key)
    gateway_s3_upload (upload_id PK, bucket, key, content_type, meta JSON, created)
    gateway_s3_part   (upload_id, number, size, etag, blob, mtime) PK (upload_id, number)
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass, field

from speedy.gateway.meta.store import MetaStore, prefix_bound
from speedy.wire.manifest import Key, parse_key

MAX_PARTS = 10000


class S3Error(Exception):
    """An S3 error answer: code, message, HTTP status."""

    def __init__(self, code: str, message: str, status: int) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


def no_such_bucket(name: str) -> S3Error:
    return S3Error("NoSuchBucket", "The specified bucket does not exist", 404)


@dataclass
class ObjectInfo:
    """One stored object."""

    bucket: str
    key: str
    size: int
    etag: str                          # hex md5, or md5-of-md5s-N for a multipart object
    content_type: str
    meta: dict[str, str] = field(default_factory=dict)   # x-amz-meta-* without the prefix
    mtime: float = 0.0
    blobs: list[tuple[str, int]] = field(default_factory=list)   # (cluster key, size)


@dataclass
class Upload:
    """One multipart upload in progress."""

    upload_id: str
    bucket: str
    key: str
    content_type: str
    meta: dict[str, str]
    created: float


@dataclass
class Part:
    """One uploaded part."""

    number: int
    size: int
    etag: str
    blob: str      # cluster key ("" for an empty part)
    mtime: float


OBJECT_COLUMNS = "bucket, key, size, etag, content_type, meta, mtime, blobs"


def _object(row: tuple) -> ObjectInfo:
    b, k, size, etag, ctype, meta, mtime, blobs = row
    return ObjectInfo(b, k, int(size), etag, ctype, json.loads(meta), float(mtime),
                      [(str(key), int(n)) for key, n in json.loads(blobs)])


def _queue(meta: MetaStore, c, keys: list[str], now: float) -> list[Key]:
    """Queue blobs for freeing in the garbage table; the keys queued."""
    out = []
    for key in keys:
        if not key:
            continue
        blob = parse_key(key)
        c.run("INSERT INTO gateway_garbage (group_id, fid, multipart, since, attempts) "
              "VALUES (?, ?, ?, ?, 0) ON CONFLICT (group_id, fid) DO NOTHING",
              (blob.group_id, blob.fid, int(blob.multipart), now))
        out.append(blob)
    return out


class S3Objects:
    """The S3 operations over a MetaStore's transactions."""

    def __init__(self, meta: MetaStore) -> None:
        self.meta = meta

    # -- buckets -------------------------------------------------------------------------

    def create_bucket(self, name: str, public_read: bool = False) -> bool:
        """Create a bucket; False when it exists already."""
        with self.meta.txn(write=True) as c:
            if c.one("SELECT 1 FROM gateway_s3_bucket WHERE name = ?", (name,)):
                return False
            c.run("INSERT INTO gateway_s3_bucket (name, created, public_read) VALUES (?, ?, ?)",
                  (name, time.time(), int(public_read)))
            return True

    def bucket(self, name: str) -> tuple[str, float, bool] | None:
        """(name, created, public_read) of a bucket, or None."""
        with self.meta.txn() as c:
            row = c.one("SELECT name, created, public_read FROM gateway_s3_bucket WHERE name = ?", (name,))
        return (row[0], float(row[1]), bool(row[2])) if row else None

    def buckets(self) -> list[tuple[str, float]]:
        with self.meta.txn() as c:
            return [(r[0], float(r[1])) for r in
                    c.all("SELECT name, created FROM gateway_s3_bucket ORDER BY name")]

    def set_public_read(self, name: str, public: bool) -> None:
        with self.meta.txn(write=True) as c:
            c.run("UPDATE gateway_s3_bucket SET public_read = ? WHERE name = ?", (int(public), name))

    def delete_bucket(self, name: str) -> list[Key]:
        """Drop an empty bucket (its unfinished uploads aborted); the blobs to free."""
        with self.meta.txn(write=True, locks=(name,)) as c:
            if not c.one("SELECT 1 FROM gateway_s3_bucket WHERE name = ?", (name,)):
                raise no_such_bucket(name)
            if c.one("SELECT 1 FROM gateway_s3_object WHERE bucket = ? LIMIT 1", (name,)):
                raise S3Error("BucketNotEmpty", "The bucket you tried to delete is not empty", 409)
            keys = [r[0] for r in c.all(
                "SELECT p.blob FROM gateway_s3_part p JOIN gateway_s3_upload u ON p.upload_id = u.upload_id "
                "WHERE u.bucket = ?", (name,))]
            c.run("DELETE FROM gateway_s3_part WHERE upload_id IN "
                  "(SELECT upload_id FROM gateway_s3_upload WHERE bucket = ?)", (name,))
            c.run("DELETE FROM gateway_s3_upload WHERE bucket = ?", (name,))
            c.run("DELETE FROM gateway_s3_bucket WHERE name = ?", (name,))
            return _queue(self.meta, c, keys, time.time())

    # -- objects -------------------------------------------------------------------------

    def put_object(self, obj: ObjectInfo) -> list[Key]:
        """Store (or replace) an object; the replaced object's blobs, queued for freeing."""
        with self.meta.txn(write=True, locks=(obj.bucket,)) as c:
            if not c.one("SELECT 1 FROM gateway_s3_bucket WHERE name = ?", (obj.bucket,)):
                raise no_such_bucket(obj.bucket)
            old = self._drop(c, obj.bucket, obj.key)
            c.run(f"INSERT INTO gateway_s3_object ({OBJECT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                  (obj.bucket, obj.key, obj.size, obj.etag, obj.content_type,
                   json.dumps(obj.meta), obj.mtime or time.time(),
                   json.dumps([list(b) for b in obj.blobs])))
            return _queue(self.meta, c, old, time.time())

    def _drop(self, c, bucket: str, key: str) -> list[str]:
        row = c.one("SELECT blobs FROM gateway_s3_object WHERE bucket = ? AND key = ?", (bucket, key))
        if row is None:
            return []
        c.run("DELETE FROM gateway_s3_object WHERE bucket = ? AND key = ?", (bucket, key))
        return [k for k, _ in json.loads(row[0])]

    def get_object(self, bucket: str, key: str) -> ObjectInfo | None:
        with self.meta.txn() as c:
            row = c.one(f"SELECT {OBJECT_COLUMNS} FROM gateway_s3_object WHERE bucket = ? AND key = ?",
                        (bucket, key))
        return _object(row) if row else None

    def delete_object(self, bucket: str, key: str) -> list[Key]:
        """Remove an object (absent is fine, as in S3); its blobs, queued for freeing."""
        with self.meta.txn(write=True, locks=(bucket,)) as c:
            return _queue(self.meta, c, self._drop(c, bucket, key), time.time())

    def list_objects(self, bucket: str, prefix: str, delimiter: str, after: str,
                     max_keys: int) -> tuple[list[ObjectInfo], list[str], bool, str]:
        """(objects, common prefixes, truncated, last key or prefix returned) after `after`."""
        entries: list[ObjectInfo] = []
        prefixes: list[str] = []
        last = after
        start = max(after, prefix) if prefix else after
        inclusive = bool(prefix) and prefix > after
        bound = prefix_bound(prefix) if prefix else None
        while len(entries) + len(prefixes) < max_keys:
            q = f"SELECT {OBJECT_COLUMNS} FROM gateway_s3_object WHERE bucket = ? AND key {'>=' if inclusive else '>'} ?"
            args: list = [bucket, start]
            if bound is not None:
                q += " AND key < ?"
                args.append(bound)
            q += " ORDER BY key LIMIT ?"
            args.append(max_keys + 1)
            with self.meta.txn() as c:
                rows = c.all(q, tuple(args))
            if not rows:
                return entries, prefixes, False, last
            jumped = False
            for row in rows:
                obj = _object(row)
                if len(entries) + len(prefixes) >= max_keys:
                    return entries, prefixes, True, last
                cut = obj.key.find(delimiter, len(prefix)) if delimiter else -1
                if cut >= 0:
                    cp = obj.key[:cut + len(delimiter)]
                    prefixes.append(cp)
                    last = cp
                    nxt = prefix_bound(cp)
                    if nxt is None:
                        return entries, prefixes, False, last
                    start, inclusive, jumped = nxt, True, True
                    break
                entries.append(obj)
                last = obj.key
                start, inclusive = obj.key, False
            if not jumped and len(rows) <= max_keys:
                return entries, prefixes, False, last
        more = self._any_after(bucket, prefix, bound, start, inclusive)
        return entries, prefixes, more, last

    def _any_after(self, bucket: str, prefix: str, bound: str | None, start: str,
                   inclusive: bool) -> bool:
        q = f"SELECT 1 FROM gateway_s3_object WHERE bucket = ? AND key {'>=' if inclusive else '>'} ?"
        args: list = [bucket, start]
        if bound is not None:
            q += " AND key < ?"
            args.append(bound)
        with self.meta.txn() as c:
            return c.one(q + " LIMIT 1", tuple(args)) is not None

    # -- multipart uploads ---------------------------------------------------------------

    def create_upload(self, bucket: str, key: str, content_type: str,
                      meta: dict[str, str]) -> str:
        upload_id = hashlib.sha256(os.urandom(32)).hexdigest()[:40]
        with self.meta.txn(write=True) as c:
            if not c.one("SELECT 1 FROM gateway_s3_bucket WHERE name = ?", (bucket,)):
                raise no_such_bucket(bucket)
            c.run("INSERT INTO gateway_s3_upload (upload_id, bucket, key, content_type, meta, created) "
                  "VALUES (?, ?, ?, ?, ?, ?)",
                  (upload_id, bucket, key, content_type, json.dumps(meta), time.time()))
        return upload_id

    def upload(self, bucket: str, key: str, upload_id: str) -> Upload:
        """The upload, or NoSuchUpload."""
        with self.meta.txn() as c:
            row = c.one("SELECT upload_id, bucket, key, content_type, meta, created FROM gateway_s3_upload "
                        "WHERE upload_id = ?", (upload_id,))
        if row is None or row[1] != bucket or row[2] != key:
            raise S3Error("NoSuchUpload", "The specified upload does not exist. The upload ID "
                          "may be invalid, or the upload may have been aborted or completed.", 404)
        return Upload(row[0], row[1], row[2], row[3], json.loads(row[4]), float(row[5]))

    def put_part(self, upload_id: str, part: Part) -> list[Key]:
        """Store a part (replacing the same number); blobs to free. NoSuchUpload if gone."""
        with self.meta.txn(write=True, locks=(upload_id,)) as c:
            if not c.one("SELECT 1 FROM gateway_s3_upload WHERE upload_id = ?", (upload_id,)):
                raise S3Error("NoSuchUpload", "The specified upload does not exist.", 404)
            old = c.one("SELECT blob FROM gateway_s3_part WHERE upload_id = ? AND number = ?",
                        (upload_id, part.number))
            c.run("DELETE FROM gateway_s3_part WHERE upload_id = ? AND number = ?", (upload_id, part.number))
            c.run("INSERT INTO gateway_s3_part (upload_id, number, size, etag, blob, mtime) "
                  "VALUES (?, ?, ?, ?, ?, ?)",
                  (upload_id, part.number, part.size, part.etag, part.blob, part.mtime))
            return _queue(self.meta, c, [old[0]] if old else [], time.time())

    def parts(self, upload_id: str, after: int = 0, limit: int = MAX_PARTS) -> list[Part]:
        with self.meta.txn() as c:
            rows = c.all("SELECT number, size, etag, blob, mtime FROM gateway_s3_part WHERE upload_id = ? "
                         "AND number > ? ORDER BY number LIMIT ?", (upload_id, after, limit))
        return [Part(int(n), int(s), e, b, float(t)) for n, s, e, b, t in rows]

    def uploads(self, bucket: str, prefix: str, key_marker: str, id_marker: str,
                limit: int) -> list[tuple[str, str, float]]:
        """(key, upload id, created) of uploads in progress, by key then id."""
        bound = prefix_bound(prefix) if prefix else None
        q = ("SELECT key, upload_id, created FROM gateway_s3_upload WHERE bucket = ? AND "
             "(key > ? OR (key = ? AND upload_id > ?)) AND key >= ?")
        args: list = [bucket, key_marker, key_marker, id_marker, prefix]
        if bound is not None:
            q += " AND key < ?"
            args.append(bound)
        with self.meta.txn() as c:
            rows = c.all(q + " ORDER BY key, upload_id LIMIT ?", (*args, limit))
        return [(k, u, float(t)) for k, u, t in rows]

    def complete_upload(self, upload: Upload, chosen: list[tuple[int, str]],
                        min_part: int) -> tuple[ObjectInfo, list[Key]]:
        """Turn the chosen parts into the object; (object, blobs to free)."""
        with self.meta.txn(write=True, locks=(upload.bucket,)) as c:
            if not c.one("SELECT 1 FROM gateway_s3_upload WHERE upload_id = ?", (upload.upload_id,)):
                raise S3Error("NoSuchUpload", "The specified upload does not exist.", 404)
            stored = {int(n): Part(int(n), int(s), e, b, float(t)) for n, s, e, b, t in c.all(
                "SELECT number, size, etag, blob, mtime FROM gateway_s3_part WHERE upload_id = ?",
                (upload.upload_id,))}
            numbers = [n for n, _ in chosen]
            if numbers != sorted(set(numbers)):
                raise S3Error("InvalidPartOrder", "The list of parts was not in ascending order. "
                              "The parts list must be specified in order by part number.", 400)
            parts = []
            for i, (n, etag) in enumerate(chosen):
                p = stored.get(n)
                if p is None or p.etag != etag:
                    raise S3Error("InvalidPart", f"Part {n} was not uploaded or its ETag does "
                                  "not match.", 400)
                if i < len(chosen) - 1 and p.size < min_part:
                    raise S3Error("EntityTooSmall", f"Part {n} is {p.size} bytes; every part "
                                  f"but the last must be at least {min_part} bytes.", 400)
                parts.append(p)
            digest = hashlib.md5(b"".join(bytes.fromhex(p.etag) for p in parts)).hexdigest()
            obj = ObjectInfo(upload.bucket, upload.key, sum(p.size for p in parts),
                             f"{digest}-{len(parts)}", upload.content_type, upload.meta,
                             time.time(), [(p.blob, p.size) for p in parts if p.blob])
            used = {p.blob for p in parts}
            unused = [p.blob for p in stored.values() if p.blob not in used]
            old = self._drop(c, upload.bucket, upload.key)
            c.run(f"INSERT INTO gateway_s3_object ({OBJECT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                  (obj.bucket, obj.key, obj.size, obj.etag, obj.content_type, json.dumps(obj.meta),
                   obj.mtime, json.dumps([list(b) for b in obj.blobs])))
            c.run("DELETE FROM gateway_s3_part WHERE upload_id = ?", (upload.upload_id,))
            c.run("DELETE FROM gateway_s3_upload WHERE upload_id = ?", (upload.upload_id,))
            return obj, _queue(self.meta, c, unused + old, time.time())

    def abort_upload(self, upload_id: str) -> list[Key]:
        """Drop an upload and its parts; the blobs to free."""
        with self.meta.txn(write=True, locks=(upload_id,)) as c:
            if not c.one("SELECT 1 FROM gateway_s3_upload WHERE upload_id = ?", (upload_id,)):
                raise S3Error("NoSuchUpload", "The specified upload does not exist.", 404)
            keys = [r[0] for r in c.all("SELECT blob FROM gateway_s3_part WHERE upload_id = ?", (upload_id,))]
            c.run("DELETE FROM gateway_s3_part WHERE upload_id = ?", (upload_id,))
            c.run("DELETE FROM gateway_s3_upload WHERE upload_id = ?", (upload_id,))
            return _queue(self.meta, c, keys, time.time())

    def stale_uploads(self, older_than: float, limit: int = 100) -> list[str]:
        """Ids of uploads started before older_than (Unix seconds)."""
        with self.meta.txn() as c:
            return [r[0] for r in c.all("SELECT upload_id FROM gateway_s3_upload WHERE created < ? "
                                        "ORDER BY created LIMIT ?", (older_than, limit))]

