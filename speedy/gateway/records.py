"""Blob records: the Content-Type, size, ETag and upload time of keys uploaded over HTTP.

The stored bytes of a key stay exactly what was uploaded (`speedy get KEY` returns them);
what HTTP needs besides lives in one table of the gateway's --metadb database, next to
the path metadata:

    CREATE TABLE gateway_blob (
        key          TEXT PRIMARY KEY,   -- "3,10452" or "3,10460m"
        content_type TEXT NOT NULL,      -- as uploaded, or sniffed at upload
        size         BIGINT NOT NULL,    -- bytes
        etag         TEXT NOT NULL,      -- first 32 hex digits of the body's sha256
        mtime        BIGINT NOT NULL     -- upload time, unix seconds (Last-Modified)
    );

The table is schema version 3 of the gateway database (speedy.gateway.meta: SQLite or
PostgreSQL, one connection per worker). Records are immutable (a key's bytes never
change), so each worker keeps a cache of them: read without a lock, the oldest entries
dropped first when it is full (CACHE_SIZE: a miss costs a database query).
"""
from __future__ import annotations

import threading
from dataclasses import dataclass

from speedy.gateway.meta.store import MetaError, MetaStore

__all__ = ["BlobRecord", "RecordStore", "RecordError"]

CACHE_SIZE = 100_000     # records per worker (about 300 bytes each)
UPSERT = ("INSERT INTO gateway_blob (key, content_type, size, etag, mtime) "
          "VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET "
          "content_type = excluded.content_type, size = excluded.size, "
          "etag = excluded.etag, mtime = excluded.mtime")
SELECT = "SELECT key, content_type, size, etag, mtime FROM gateway_blob WHERE key = ?"
DELETE = "DELETE FROM gateway_blob WHERE key = ?"

RecordError = MetaError   # one error class for the one metadata database


@dataclass(frozen=True, slots=True)
class BlobRecord:
    """What HTTP needs to know about one uploaded key."""

    key: str
    content_type: str
    size: int
    etag: str
    mtime: int


class RecordStore:
    """get/put/delete of BlobRecords in the metadata database, with a cache."""

    def __init__(self, meta: MetaStore):
        self.meta = meta
        self._lock = threading.Lock()
        self._cache: dict[str, BlobRecord] = {}   # oldest first

    def get(self, key: str) -> BlobRecord | None:
        """The record of key, or None when it was not uploaded through a gateway."""
        rec = self._cache.get(key)   # one dict lookup: atomic, no lock on the hot path
        if rec is not None:
            return rec
        with self.meta.txn() as c:
            row = c.one(SELECT, (key,))
        if row is None:
            return None
        rec = BlobRecord(row[0], row[1], int(row[2]), row[3], int(row[4]))
        self._remember(rec)
        return rec

    def put(self, rec: BlobRecord) -> None:
        """Store rec (replacing an older record of the same key)."""
        with self.meta.txn(write=True) as c:
            c.run(UPSERT, (rec.key, rec.content_type, rec.size, rec.etag, rec.mtime))
        self._remember(rec)

    def delete(self, key: str) -> None:
        """Forget key's record."""
        with self._lock:
            self._cache.pop(key, None)
        with self.meta.txn(write=True) as c:
            c.run(DELETE, (key,))

    def _remember(self, rec: BlobRecord) -> None:
        with self._lock:
            self._cache.pop(rec.key, None)   # a replaced record goes to the young end
            self._cache[rec.key] = rec
            while len(self._cache) > CACHE_SIZE:
                del self._cache[next(iter(self._cache))]
