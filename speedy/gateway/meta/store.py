"""The path metadata operations, written once over a DB-API connection (SQLite or PostgreSQL).

A file is a path with fragments; each non-empty fragment is one blob of the cluster (its
key "g,fid" or "g,fidm"). A blob belongs to exactly one fragment row; when a row goes
(DELETE, a replacing upload, a move onto an existing path) and no row refers to its blob
any more, the blob is queued in table gateway_garbage in the same transaction, so that the caller
frees its bytes on the chunkservers and nothing is lost if that fails or the process dies.
"""
from __future__ import annotations

import logging
import os
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Callable, Iterator

from speedy.gateway.meta import schema
from speedy.wire.manifest import Key

log = logging.getLogger("speedy.gateway.meta")

TAG = "tag_"               # a v1 registry tag: the last path component starts with it
MAX_PATH_BYTES = 255       # the Path header's limit (IMAGESERVER-API.md)
MAX_INT = 2 ** 63 - 1      # BIGINT / SQLite INTEGER


_INHERITED: list[Any] = []   # connections a forked child inherited: kept open, never used


class MetaError(Exception):
    """The metadata database cannot be used or an operation on it failed."""


@dataclass
class Fragment:
    """One row of table gateway_fragment: bytes [start, end) of the file at path."""

    path: str
    index: int
    start: int
    end: int
    blob: Key | None           # the blob's key; None for an empty fragment (no bytes stored)
    is_last: bool
    mtime: float = 0.0

    @property
    def size(self) -> int:
        return self.end - self.start


def directory_entry(path: str) -> tuple[str, str] | None:
    """(dir, "tag_...") when path's last component starts with tag_ (v1 registry), else None."""
    cut = path.rfind("/")
    if cut < 0 or not path.startswith(TAG, cut + 1):
        return None
    return path[:cut], path[cut + 1:]


def prefix_bound(prefix: str) -> str | None:
    """The smallest string greater than every string that starts with prefix (None: none)."""
    chars = list(prefix)
    while chars:
        c = ord(chars.pop()) + 1
        if 0xD800 <= c <= 0xDFFF:
            c = 0xE000
        if c <= 0x10FFFF:
            return "".join(chars) + chr(c)
    return None


FRAGMENT_COLUMNS = "path, frag_index, start_byte, end_byte, group_id, fid, multipart, is_last, mtime"


def _fragment(row: tuple) -> Fragment:
    path, index, start, end, g, fid, multi, last, mtime = row
    blob = Key(int(g), int(fid), bool(multi)) if g else None
    return Fragment(path, int(index), int(start), int(end), blob, bool(last), float(mtime))


class MetaStore:
    """The operations of the path routes; subclasses supply the connection and transactions."""

    dialect = ""
    url = ""

    def __init__(self) -> None:
        self._lock = threading.RLock()
        self._conn: Any = None
        self._pid = 0

    # -- plumbing (per backend) ----------------------------------------------------------

    def _connect(self) -> Any:
        """A new DB-API connection (schema migrated)."""
        raise NotImplementedError

    def _begin(self, conn: Any, write: bool, locks: tuple[str, ...]) -> None:
        raise NotImplementedError

    def _sql(self, q: str) -> str:
        """q with this database's placeholders (q is written with ?)."""
        return q

    def _errors(self) -> tuple[type[BaseException], ...]:
        """The driver's exception classes."""
        raise NotImplementedError

    def _connection(self) -> Any:
        """This process's connection (a forked child opens its own).

        A connection inherited over fork() is kept, never used nor closed: closing it would
        end the parent's PostgreSQL session (or touch SQLite's locks) from the child."""
        if self._conn is not None and self._pid != os.getpid():
            _INHERITED.append(self._conn)
            self._conn = None
        if self._conn is None:
            self._conn = self._connect()
            self._pid = os.getpid()
        return self._conn

    @contextmanager
    def _txn(self, write: bool = False, locks: tuple[str, ...] = ()) -> Iterator["_Cursor"]:
        """One transaction; MetaError (with the driver's reason) on any database error."""
        with self._lock:
            try:
                conn = self._connection()
                self._begin(conn, write, locks)
                try:
                    yield _Cursor(conn, self._sql)
                except BaseException:
                    conn.rollback()
                    raise
                conn.commit()
            except self._errors() as e:
                self._drop_broken()
                raise MetaError(f"metadata database error: {' '.join(str(e).split())}") \
                    from None

    def txn(self, write: bool = False, locks: tuple[str, ...] = ()):
        """One transaction for callers that keep their own tables here (speedy.gateway.s3)."""
        return self._txn(write, locks)

    def _drop_broken(self) -> None:
        """Forget a connection that failed, so that the next call reconnects."""
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 (already broken)
                pass

    def close(self) -> None:
        """Close this process's connection."""
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                self._conn.close()
            self._conn = None

    def __enter__(self) -> "MetaStore":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def version(self) -> int:
        """The schema version of the database."""
        with self._txn() as c:
            return int(c.one("SELECT version FROM gateway_schema")[0])

    # -- writes --------------------------------------------------------------------------

    def put_fragment(self, frag: Fragment, register_tag: bool = False) -> list[Key]:
        """Store a fragment; the blobs no longer referenced (queued in garbage).

        Fragment 0 with is_last replaces every fragment of the path (and its directory
        entry); otherwise it replaces only the same (path, index). register_tag stores the
        v1 directory entry when the path's last component starts with tag_.
        """
        now = frag.mtime or time.time()
        with self._txn(write=True, locks=(frag.path,)) as c:
            if frag.index == 0 and frag.is_last:
                old = self._remove_path(c, frag.path)
            else:
                old = [_fragment(r).blob for r in c.all(
                    f"SELECT {FRAGMENT_COLUMNS} FROM gateway_fragment WHERE path = ? AND frag_index = ?",
                    (frag.path, frag.index))]
                c.run("DELETE FROM gateway_fragment WHERE path = ? AND frag_index = ?",
                      (frag.path, frag.index))
            b = frag.blob
            c.run(f"INSERT INTO gateway_fragment ({FRAGMENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                  (frag.path, frag.index, frag.start, frag.end, b.group_id if b else 0,
                   b.fid if b else 0, int(bool(b and b.multipart)), int(frag.is_last), now))
            entry = directory_entry(frag.path) if register_tag else None
            if entry:
                c.run("INSERT INTO gateway_directory (dir, name, mtime) VALUES (?, ?, ?) "
                      "ON CONFLICT (dir, name) DO UPDATE SET mtime = excluded.mtime",
                      entry + (now,))
            return self._collect(c, old, now)

    def delete_path(self, path: str) -> list[Key]:
        """Remove a path's fragments and directory entry; the blobs freed (queued in garbage)."""
        now = time.time()
        with self._txn(write=True, locks=(path,)) as c:
            return self._collect(c, self._remove_path(c, path), now)

    def move(self, src: str, dst: str) -> list[Key] | None:
        """Rename src to dst (replacing dst); the blobs freed, or None when src is unknown."""
        now = time.time()
        with self._txn(write=True, locks=tuple(sorted({src, dst}))) as c:
            if c.one("SELECT count(*) FROM gateway_fragment WHERE path = ?", (src,))[0] == 0:
                return None
            if src == dst:
                return []
            old = self._remove_path(c, dst)
            c.run("UPDATE gateway_fragment SET path = ? WHERE path = ?", (dst, src))
            entry = directory_entry(src)
            if entry:
                c.run("DELETE FROM gateway_directory WHERE dir = ? AND name = ?", entry)
            entry = directory_entry(dst)
            if entry:
                c.run("INSERT INTO gateway_directory (dir, name, mtime) VALUES (?, ?, ?) "
                      "ON CONFLICT (dir, name) DO UPDATE SET mtime = excluded.mtime",
                      entry + (now,))
            return self._collect(c, old, now)

    def _remove_path(self, c: "_Cursor", path: str) -> list[Key | None]:
        """Delete a path's rows and directory entry; the blobs they referred to."""
        blobs = [_fragment(r).blob for r in c.all(
            f"SELECT {FRAGMENT_COLUMNS} FROM gateway_fragment WHERE path = ?", (path,))]
        c.run("DELETE FROM gateway_fragment WHERE path = ?", (path,))
        entry = directory_entry(path)
        if entry:
            c.run("DELETE FROM gateway_directory WHERE dir = ? AND name = ?", entry)
        return blobs

    def _collect(self, c: "_Cursor", blobs: list[Key | None], now: float) -> list[Key]:
        """Queue in garbage each blob that no fragment refers to any more; those blobs."""
        freed = []
        for b in dict.fromkeys(x for x in blobs if x is not None):
            if c.one("SELECT count(*) FROM gateway_fragment WHERE group_id = ? AND fid = ?",
                     (b.group_id, b.fid))[0]:
                continue
            c.run("INSERT INTO gateway_garbage (group_id, fid, multipart, since) VALUES (?, ?, ?, ?) "
                  "ON CONFLICT (group_id, fid) DO NOTHING",
                  (b.group_id, b.fid, int(b.multipart), now))
            freed.append(b)
        return freed

    # -- garbage -------------------------------------------------------------------------

    def queue_garbage(self, blob: Key) -> None:
        """Queue a blob that no fragment refers to (an upload whose metadata failed)."""
        with self._txn(write=True) as c:
            c.run("INSERT INTO gateway_garbage (group_id, fid, multipart, since) VALUES (?, ?, ?, ?) "
                  "ON CONFLICT (group_id, fid) DO NOTHING",
                  (blob.group_id, blob.fid, int(blob.multipart), time.time()))

    def garbage(self, older_than: float = 0.0, limit: int = 100) -> list[Key]:
        """Queued blobs waiting at least older_than seconds, oldest first."""
        with self._txn() as c:
            rows = c.all("SELECT group_id, fid, multipart FROM gateway_garbage WHERE since <= ? "
                         "ORDER BY since, group_id, fid LIMIT ?",
                         (time.time() - older_than, limit))
        return [Key(int(g), int(f), bool(m)) for g, f, m in rows]

    def forget_garbage(self, blob: Key) -> None:
        """The blob's bytes are gone from every replica: drop it from the queue."""
        with self._txn(write=True) as c:
            c.run("DELETE FROM gateway_garbage WHERE group_id = ? AND fid = ?", (blob.group_id, blob.fid))

    def retry_garbage_later(self, blob: Key) -> None:
        """A free failed: count the attempt and move the blob to the back of the queue."""
        with self._txn(write=True) as c:
            c.run("UPDATE gateway_garbage SET attempts = attempts + 1, since = ? "
                  "WHERE group_id = ? AND fid = ?", (time.time(), blob.group_id, blob.fid))

    # -- reads ---------------------------------------------------------------------------

    def get_fragment(self, path: str, index: int) -> Fragment | None:
        """The fragment (path, index), or None."""
        with self._txn() as c:
            row = c.one(f"SELECT {FRAGMENT_COLUMNS} FROM gateway_fragment WHERE path = ? AND "
                        "frag_index = ?", (path, index))
        return _fragment(row) if row else None

    def fragments(self, path: str) -> list[Fragment]:
        """Every fragment of path, newest first."""
        with self._txn() as c:
            rows = c.all(f"SELECT {FRAGMENT_COLUMNS} FROM gateway_fragment WHERE path = ? "
                         "ORDER BY mtime DESC, frag_index DESC", (path,))
        return [_fragment(r) for r in rows]

    def list_directory(self, dir: str) -> list[str]:
        """The v1 directory entries (tag_... names) of dir, newest first."""
        with self._txn() as c:
            rows = c.all("SELECT name FROM gateway_directory WHERE dir = ? "
                         "ORDER BY mtime DESC, name", (dir,))
        return [r[0] for r in rows]

    def list_descendants(self, prefix: str) -> list[str]:
        """Every stored path that starts with prefix, once per fragment, in path order."""
        q = "SELECT path FROM gateway_fragment WHERE path >= ?"
        args: tuple = (prefix,)
        bound = prefix_bound(prefix)
        if bound is not None:
            q, args = q + " AND path < ?", args + (bound,)
        with self._txn() as c:
            rows = c.all(q + " ORDER BY path, frag_index", args)
        return [r[0] for r in rows]

    def is_referenced(self, blob: Key) -> bool:
        """True when some fragment refers to blob."""
        with self._txn() as c:
            return c.one("SELECT count(*) FROM gateway_fragment WHERE group_id = ? AND fid = ?",
                         (blob.group_id, blob.fid))[0] > 0


class _Cursor:
    """execute() helpers over a connection, with the backend's placeholders."""

    def __init__(self, conn: Any, sql) -> None:
        self.conn, self.sql = conn, sql

    def run(self, q: str, args: tuple = ()) -> int:
        """Execute; the row count."""
        cur = self.conn.execute(self.sql(q), args)
        return cur.rowcount

    def one(self, q: str, args: tuple = ()) -> tuple | None:
        return self.conn.execute(self.sql(q), args).fetchone()

    def all(self, q: str, args: tuple = ()) -> list[tuple]:
        return self.conn.execute(self.sql(q), args).fetchall()


def prepare_or_close(conn: Any, prepare: Callable[[], None], where: str,
                     errors: tuple[type[BaseException], ...]) -> Any:
    """Run prepare() on a new connection: the connection, or closed and MetaError."""
    try:
        prepare()
    except MetaError:
        conn.close()
        raise
    except errors as e:
        conn.close()
        raise MetaError(f"{where} cannot be used: {' '.join(str(e).split())}") from None
    return conn


def migrate(c: _Cursor, dialect: str, tables: set[str], where: str) -> int:
    """Create or upgrade the schema in an open write transaction; the version found."""
    ours = schema.OUR_TABLES & tables
    if "gateway_schema" not in tables:
        if ours:
            raise MetaError(f"{where}: tables {', '.join(sorted(ours))} exist without "
                            "gateway_schema: not a speedy gateway database")
        foreign = set(tables)
        if dialect == "sqlite" and foreign:
            raise MetaError(f"{where} is not a speedy gateway database "
                            f"(tables: {', '.join(sorted(foreign))})")
        found = 0
    else:
        row = c.one("SELECT version FROM gateway_schema")
        found = int(row[0]) if row else 0
    if found > schema.SCHEMA_VERSION:
        raise MetaError(f"{where} has schema version {found}, newer than this gateway "
                        f"supports ({schema.SCHEMA_VERSION})")
    if found and not schema.tables_up_to(found) <= tables:
        raise MetaError(f"{where} lacks tables "
                        f"{', '.join(sorted(schema.tables_up_to(found) - tables))}")
    for v in range(found + 1, schema.SCHEMA_VERSION + 1):
        for stmt in schema.statements(v, dialect):
            c.run(stmt)
        c.run("DELETE FROM gateway_schema")
        c.run("INSERT INTO gateway_schema (version) VALUES (?)", (v,))
        log.info("%s: metadata schema migrated to version %d", where, v)
    return found
