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

SQLite (sqlite:///path, WAL) or PostgreSQL (postgresql://..., psycopg 3). Records are
immutable (a key's bytes never change), so each worker keeps an LRU cache of them.
"""
from __future__ import annotations

import os
import sqlite3
import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

__all__ = ["BlobRecord", "RecordStore", "RecordError", "open_records", "sqlite_path"]

CACHE_SIZE = 10000
SCHEMA = ("CREATE TABLE IF NOT EXISTS gateway_blob (key TEXT PRIMARY KEY, "
          "content_type TEXT NOT NULL, size BIGINT NOT NULL, etag TEXT NOT NULL, "
          "mtime BIGINT NOT NULL)")
UPSERT = ("INSERT INTO gateway_blob (key, content_type, size, etag, mtime) "
          "VALUES (?, ?, ?, ?, ?) ON CONFLICT (key) DO UPDATE SET "
          "content_type = excluded.content_type, size = excluded.size, "
          "etag = excluded.etag, mtime = excluded.mtime")
SELECT = "SELECT key, content_type, size, etag, mtime FROM gateway_blob WHERE key = ?"
DELETE = "DELETE FROM gateway_blob WHERE key = ?"


class RecordError(Exception):
    """The record database failed; the message is one line."""


@dataclass(frozen=True)
class BlobRecord:
    """What HTTP needs to know about one uploaded key."""

    key: str
    content_type: str
    size: int
    etag: str
    mtime: int


def sqlite_path(url: str) -> str | None:
    """The file of a sqlite:///path URL (sqlite:////abs or sqlite:///rel), else None."""
    if url.startswith("sqlite:///"):
        return url[len("sqlite:///"):] or None
    return None


class RecordStore:
    """get/put/delete of BlobRecords in one database connection (per worker)."""

    def __init__(self, url: str):
        self.url = url
        self._lock = threading.Lock()
        self._cache: OrderedDict[str, BlobRecord] = OrderedDict()
        self._conn: Any = None
        self._pg = url.startswith(("postgresql://", "postgres://"))
        if not self._pg and sqlite_path(url) is None:
            raise RecordError(f"unsupported --metadb URL {url!r} "
                              "(sqlite:///path or postgresql://...)")

    def connect(self) -> None:
        """Open the connection (after fork) and create the table if needed."""
        try:
            if self._pg:
                import psycopg
                self._conn = psycopg.connect(self.url, autocommit=True, connect_timeout=5)
            else:
                path = sqlite_path(self.url)
                parent = os.path.dirname(os.path.abspath(path))
                if not os.path.isdir(parent):
                    raise RecordError(f"--metadb: directory {parent} does not exist")
                self._conn = sqlite3.connect(path, timeout=5.0, isolation_level=None,
                                             check_same_thread=False)
                self._conn.execute("PRAGMA journal_mode=WAL")
                self._conn.execute("PRAGMA synchronous=NORMAL")
            self._run(SCHEMA, ())
        except RecordError:
            raise
        except Exception as e:  # noqa: BLE001 (sqlite3/psycopg errors: one line)
            raise RecordError(f"cannot open --metadb {redact(self.url)}: "
                              f"{str(e).strip().splitlines()[0] if str(e) else e!r}") from None

    def close(self) -> None:
        """Close the connection."""
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def _run(self, sql: str, args: tuple) -> list[tuple]:
        if self._conn is None:
            self.connect()
        if self._pg:
            sql = sql.replace("?", "%s")
        with self._lock:
            try:
                cur = self._conn.execute(sql, args)
                return list(cur.fetchall()) if cur.description else []
            except Exception as e:  # noqa: BLE001
                raise RecordError(f"record database: {str(e).strip()[:200]}") from None

    def get(self, key: str) -> BlobRecord | None:
        """The record of key, or None when it was not uploaded through a gateway."""
        rec = self._cache.get(key)
        if rec is not None:
            self._cache.move_to_end(key)
            return rec
        rows = self._run(SELECT, (key,))
        if not rows:
            return None
        rec = BlobRecord(rows[0][0], rows[0][1], int(rows[0][2]), rows[0][3], int(rows[0][4]))
        self._remember(rec)
        return rec

    def put(self, rec: BlobRecord) -> None:
        """Store rec (replacing an older record of the same key)."""
        self._run(UPSERT, (rec.key, rec.content_type, rec.size, rec.etag, rec.mtime))
        self._remember(rec)

    def delete(self, key: str) -> None:
        """Forget key's record."""
        self._cache.pop(key, None)
        self._run(DELETE, (key,))

    def _remember(self, rec: BlobRecord) -> None:
        self._cache[rec.key] = rec
        self._cache.move_to_end(rec.key)
        while len(self._cache) > CACHE_SIZE:
            self._cache.popitem(last=False)


def redact(url: str) -> str:
    """url without its password."""
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        cred, host = rest.rsplit("@", 1)
        return f"{scheme}://{cred.split(':', 1)[0]}:***@{host}"
    return url


def open_records(url: str) -> RecordStore:
    """A RecordStore for --metadb url (connected lazily, after fork)."""
    return RecordStore(url)
