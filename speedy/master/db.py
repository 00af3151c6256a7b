"""The chunkmaster's state in SQLite: registry, reports, statuses, fid reservation.

Usable without the HTTP app (the admin CLI calls these functions directly). The schema
is a documented interface (see SCHEMA); PRAGMA user_version carries its version.
All times are Unix seconds stored as REAL.
"""
from __future__ import annotations

import enum
import fcntl
import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import Iterable, Iterator

import sqlite_utils

log = logging.getLogger("speedy.master.db")

SCHEMA_VERSION = 2
FID_RANGE = 100          # fids per GET /v1/chunkmaster/fid
FID_BLOCK = 10000        # fids reserved durably per database write
FID_FIRST = 1
FID_LIMIT = 2 ** 63 - 1  # SQLite INTEGER; the wire fid is u64
GLOBAL_NORMAL = 0
GLOBAL_TRANSFERRING = 8
START_BUSY_TIMEOUT = 3.0  # seconds to wait for a lock while opening
BUSY_TIMEOUT = 2.0        # seconds a request waits for an operator's write lock


class Status(enum.IntEnum):
    """A chunkserver's status as the master keeps it (MASTER-API.md)."""

    INIT = 0
    RW = 1
    RO = 2
    ERR = 3


class MasterDBError(Exception):
    """The database cannot be used: corrupt, locked, foreign or too new."""


SCHEMA_V1 = """
CREATE TABLE chunkserver (
    id               INTEGER PRIMARY KEY,
    group_id         INTEGER NOT NULL CHECK (group_id BETWEEN 1 AND 65535),
    ip               TEXT    NOT NULL CHECK (length(ip) BETWEEN 1 AND 253),
    port             INTEGER NOT NULL CHECK (port BETWEEN 1 AND 65535),
    status           INTEGER NOT NULL DEFAULT 0 CHECK (status IN (0, 1, 2, 3)),
    global_status    INTEGER NOT NULL DEFAULT 0,
    total_free_space INTEGER NOT NULL DEFAULT 0,
    max_free_space   INTEGER NOT NULL DEFAULT 0,
    pending_writes   INTEGER NOT NULL DEFAULT 0,
    writing_count    INTEGER NOT NULL DEFAULT 0,
    reading_count    INTEGER NOT NULL DEFAULT 0,
    total_chunks     INTEGER NOT NULL DEFAULT 0,
    conn_count       INTEGER NOT NULL DEFAULT 0,
    data_dir         TEXT    NOT NULL DEFAULT '',
    create_time      REAL    NOT NULL,
    update_time      REAL    NOT NULL,
    status_time      REAL    NOT NULL,
    report_count     INTEGER NOT NULL DEFAULT 0,
    UNIQUE (group_id, ip, port)
);
CREATE INDEX chunkserver_ip_port ON chunkserver (ip, port);
CREATE TABLE fid_state (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    high_water  INTEGER NOT NULL CHECK (high_water >= 1),
    update_time REAL    NOT NULL
);
"""
SCHEMA = SCHEMA_V1
MIGRATIONS: dict[int, str] = {  # version -> SQL that brings version-1 to it
    1: SCHEMA_V1,
    2: "ALTER TABLE chunkserver ADD COLUMN garbage_bytes INTEGER NOT NULL DEFAULT 0"}
OUR_TABLES = {"chunkserver", "fid_state"}


@dataclass
class Chunkserver:
    """One row of the chunkserver table."""

    group_id: int
    ip: str
    port: int
    status: int = Status.INIT
    global_status: int = GLOBAL_NORMAL
    total_free_space: int = 0
    max_free_space: int = 0
    pending_writes: int = 0
    writing_count: int = 0
    reading_count: int = 0
    total_chunks: int = 0
    conn_count: int = 0
    data_dir: str = ""
    create_time: float = 0.0
    update_time: float = 0.0
    status_time: float = 0.0
    report_count: int = 0
    garbage_bytes: int = 0  # schema 2: bytes of deleted records, as last reported

    @property
    def key(self) -> str:
        """group:ip:port, for log lines."""
        return f"{self.group_id}:{self.ip}:{self.port}"

    def to_json(self) -> dict:
        """The MASTER-API.md chunkserver object (every field, zeros included)."""
        return {"GroupId": self.group_id, "Ip": self.ip, "Port": self.port,
                "Status": int(self.status), "GlobalStatus": self.global_status,
                "TotalFreeSpace": self.total_free_space, "MaxFreeSpace": self.max_free_space,
                "PendingWrites": self.pending_writes, "WritingCount": self.writing_count,
                "ReadingCount": self.reading_count, "TotalChunks": self.total_chunks,
                "ConnectionsCount": self.conn_count, "DataDir": self.data_dir,
                "GarbageBytes": self.garbage_bytes}


COLUMNS = [f.name for f in fields(Chunkserver)]


@dataclass
class Report:
    """A chunkserver's heartbeat (PROTOCOL.md "Reporting to the master")."""

    group_id: int
    ip: str
    port: int
    read_only: bool = False
    total_free_space: int = 0
    max_free_space: int = 0
    pending_writes: int = 0
    writing_count: int = 0
    reading_count: int = 0
    total_chunks: int = 0
    conn_count: int = 0
    data_dir: str = ""
    garbage_bytes: int = 0


def _row(d: dict) -> Chunkserver:
    """A query row as a Chunkserver."""
    return Chunkserver(**{k: d[k] for k in COLUMNS})


# -- opening -------------------------------------------------------------------------


def connect(path: str, create: bool = True, busy_timeout: float = START_BUSY_TIMEOUT,
            check: bool = True) -> sqlite_utils.Database:
    """Open (and create or migrate) the master database; MasterDBError when unusable."""
    if not create and not os.path.exists(path):
        raise MasterDBError(f"database {path} does not exist")
    if os.path.isdir(path):
        raise MasterDBError(f"database {path} is a directory")
    try:
        conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None,
                               check_same_thread=False)
    except sqlite3.Error as e:
        raise MasterDBError(f"cannot open database {path}: {e}") from None
    try:
        db = sqlite_utils.Database(conn, recursive_triggers=False, execute_plugins=False)
        _prepare(db, path, check)
        db.conn.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
    except MasterDBError:
        conn.close()
        raise
    except sqlite3.Error as e:
        conn.close()
        raise MasterDBError(_explain(path, e)) from None
    return db


def _explain(path: str, e: sqlite3.Error) -> str:
    """A one-line reason for an sqlite3 error while opening."""
    text = str(e)
    if "locked" in text or "busy" in text:
        return f"database {path} is locked by another process ({text})"
    if "not a database" in text or "malformed" in text or "corrupt" in text:
        return f"database {path} is corrupt ({text}); refusing to start, restore a backup"
    return f"database {path} cannot be used: {text}"


def _prepare(db: sqlite_utils.Database, path: str, check: bool) -> None:
    """Check integrity, switch to WAL + synchronous=FULL, create or migrate the schema."""
    c = db.conn
    if check:
        result = [r[0] for r in c.execute("PRAGMA quick_check").fetchall()]
        if result != ["ok"]:
            detail = " ".join("; ".join(map(str, result[:3])).split())[:200]
            raise MasterDBError(f"database {path} is corrupt (quick_check: {detail}); "
                                "refusing to start, restore a backup")
    mode = c.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise MasterDBError(f"database {path}: cannot switch to WAL mode (got {mode})")
    c.execute("PRAGMA synchronous = FULL")
    c.execute("PRAGMA foreign_keys = ON")
    migrate(db, path)


def migrate(db: sqlite_utils.Database, path: str = "") -> int:
    """Bring the schema to SCHEMA_VERSION; returns the version found before."""
    with write_txn(db):
        version = db.conn.execute("PRAGMA user_version").fetchone()[0]
        tables = set(db.table_names())
        if version > SCHEMA_VERSION:
            raise MasterDBError(f"database {path} has schema version {version}, newer than "
                                f"this master supports ({SCHEMA_VERSION})")
        if version == 0 and tables - {"sqlite_sequence"}:
            raise MasterDBError(f"database {path} is not a speedy master database "
                                f"(user_version 0, tables: {', '.join(sorted(tables))})")
        if version >= 1 and not OUR_TABLES <= tables:
            raise MasterDBError(f"database {path} lacks tables "
                                f"{', '.join(sorted(OUR_TABLES - tables))}")
        for v in range(version + 1, SCHEMA_VERSION + 1):
            for stmt in MIGRATIONS[v].split(";"):
                if stmt.strip():
                    db.conn.execute(stmt)
            if v == 1:
                db.conn.execute("INSERT INTO fid_state (id, high_water, update_time) "
                                "VALUES (1, ?, ?)", (FID_FIRST, time.time()))
            db.conn.execute(f"PRAGMA user_version = {v}")
            log.info("database %s: schema migrated to version %d", path, v)
    return version


@contextmanager
def write_txn(db: sqlite_utils.Database) -> Iterator[sqlite3.Connection]:
    """BEGIN IMMEDIATE ... COMMIT (ROLLBACK on error): takes the write lock up front."""
    c = db.conn
    c.execute("BEGIN IMMEDIATE")
    try:
        yield c
    except BaseException:
        if c.in_transaction:
            c.execute("ROLLBACK")
        raise
    c.execute("COMMIT")


def lock_single_master(path: str) -> int:
    """flock the database file so that a second master on it refuses to start; the fd."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise MasterDBError(f"cannot open database {path}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise MasterDBError(f"database {path} is in use by another spy_master") from None
    # Keep fd open for the life of the process: closing any descriptor of the file
    # would drop SQLite's POSIX locks.
    return fd


def close(db: sqlite_utils.Database) -> None:
    """Checkpoint and close."""
    try:
        db.conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    except sqlite3.Error as e:
        log.warning("checkpoint at close failed: %s", e)
    db.conn.close()


# -- registry ------------------------------------------------------------------------


def add_server(db: sqlite_utils.Database, group_id: int, ip: str, port: int,
               now: float | None = None) -> bool:
    """Register a chunkserver with status INIT; True if new (registering again is a no-op)."""
    return add_servers(db, [(group_id, ip, port)], now) == 1


def add_servers(db: sqlite_utils.Database, keys: Iterable[tuple[int, str, int]],
                now: float | None = None) -> int:
    """Register several chunkservers in one transaction; the number of new rows."""
    now = time.time() if now is None else now
    added = 0
    with write_txn(db) as c:
        for group_id, ip, port in keys:
            cur = c.execute(
                "INSERT INTO chunkserver (group_id, ip, port, status, create_time, "
                "update_time, status_time) VALUES (?, ?, ?, 0, ?, ?, ?) "
                "ON CONFLICT (group_id, ip, port) DO NOTHING",
                (group_id, ip, port, now, now, now))
            added += cur.rowcount
    return added


def remove_server(db: sqlite_utils.Database, group_id: int, ip: str, port: int) -> bool:
    """Delete a chunkserver's row; True if it existed."""
    with write_txn(db) as c:
        cur = c.execute("DELETE FROM chunkserver WHERE group_id = ? AND ip = ? AND port = ?",
                        (group_id, ip, port))
    return cur.rowcount > 0


def set_status(db: sqlite_utils.Database, ip: str, port: int, status: int,
               group_id: int | None = None, now: float | None = None) -> list[Chunkserver]:
    """Set the status of ip:port (in every group, or only group_id); the rows changed."""
    status = Status(status)
    now = time.time() if now is None else now
    where, args = "ip = ? AND port = ?", [ip, port]
    if group_id is not None:
        where, args = where + " AND group_id = ?", args + [group_id]
    with write_txn(db) as c:
        rows = _select(c, where, args)
        c.execute(f"UPDATE chunkserver SET status = ?, status_time = ? WHERE {where} "
                  "AND status != ?", [int(status), now] + args + [int(status)])
    for r in rows:
        if r.status != status:
            log.warning("chunkserver %s: %s -> %s (set by operator)", r.key,
                        Status(r.status).name, status.name)
        r.status = status
    return rows


def _select(c: sqlite3.Connection, where: str = "1", args: list | tuple = ()) -> \
        list[Chunkserver]:
    """Rows of chunkserver matching where, ordered by group, ip, port."""
    cur = c.execute(f"SELECT {', '.join(COLUMNS)} FROM chunkserver WHERE {where} "
                    "ORDER BY group_id, ip, port", args)
    return [_row(dict(zip(COLUMNS, r))) for r in cur.fetchall()]


def list_servers(db: sqlite_utils.Database, group_id: int | None = None,
                 include_err: bool = True) -> list[Chunkserver]:
    """Every chunkserver (of one group), ordered by group, ip, port."""
    where, args = ["1"], []
    if group_id is not None:
        where.append("group_id = ?")
        args.append(group_id)
    if not include_err:
        where.append(f"status != {int(Status.ERR)}")
    return _select(db.conn, " AND ".join(where), args)


def get_server(db: sqlite_utils.Database, group_id: int, ip: str, port: int) -> \
        Chunkserver | None:
    """One chunkserver, or None."""
    rows = _select(db.conn, "group_id = ? AND ip = ? AND port = ?", (group_id, ip, port))
    return rows[0] if rows else None


def route(db: sqlite_utils.Database) -> dict[int, list[Chunkserver]]:
    """group_id -> its chunkservers, ERR servers left out."""
    groups: dict[int, list[Chunkserver]] = {}
    for cs in list_servers(db, include_err=False):
        groups.setdefault(cs.group_id, []).append(cs)
    return groups


def any_error(db: sqlite_utils.Database) -> bool:
    """True if some chunkserver is ERR."""
    return db.conn.execute("SELECT EXISTS (SELECT 1 FROM chunkserver WHERE status = ?)",
                           (int(Status.ERR),)).fetchone()[0] == 1


def status_counts(db: sqlite_utils.Database) -> dict[Status, int]:
    """How many chunkservers have each status (every status present, zeros included)."""
    counts = {s: 0 for s in Status}
    for status, n in db.conn.execute("SELECT status, count(*) FROM chunkserver "
                                     "GROUP BY status").fetchall():
        if status in counts.keys():
            counts[Status(status)] = n
    return counts


# -- heartbeats and health -----------------------------------------------------------


def record_report(db: sqlite_utils.Database, r: Report, now: float | None = None) -> \
        tuple[Status, Status] | None:
    """Store a heartbeat; (old, new) status, or None if that server is not registered.

    INIT/RW/RO become RW (RO if the chunkserver says it is read-only); ERR stays ERR.
    """
    now = time.time() if now is None else now
    key = (r.group_id, r.ip, r.port)
    with write_txn(db) as c:
        row = c.execute("SELECT status FROM chunkserver WHERE group_id = ? AND ip = ? "
                        "AND port = ?", key).fetchone()
        if row is None:
            return None
        old = Status(row[0])
        new = old if old == Status.ERR else (Status.RO if r.read_only else Status.RW)
        c.execute(
            "UPDATE chunkserver SET total_free_space = ?, max_free_space = ?, "
            "pending_writes = ?, writing_count = ?, reading_count = ?, total_chunks = ?, "
            "conn_count = ?, data_dir = ?, garbage_bytes = ?, update_time = ?, "
            "report_count = report_count + 1,"
            " status = ?, status_time = CASE WHEN status != ? THEN ? ELSE status_time END "
            "WHERE group_id = ? AND ip = ? AND port = ?",
            (r.total_free_space, r.max_free_space, r.pending_writes, r.writing_count,
             r.reading_count, r.total_chunks, r.conn_count, r.data_dir, r.garbage_bytes, now,
             int(new),
             int(new), now) + key)
    return old, new


def mark_silent(db: sqlite_utils.Database, timeout: float, started: float,
                now: float | None = None) -> list[Chunkserver]:
    """Turn RO every RW server silent for more than timeout (counting from started at
    the earliest: a fresh grace period after a restart); the servers changed."""
    now = time.time() if now is None else now
    where = f"status = {int(Status.RW)} AND max(update_time, ?) < ?"
    args = (started, now - timeout)
    if not db.conn.execute(f"SELECT EXISTS (SELECT 1 FROM chunkserver WHERE {where})",
                           args).fetchone()[0]:
        return []  # the common case: no write lock taken
    with write_txn(db) as c:
        rows = _select(c, where, args)
        if rows:
            c.execute(f"UPDATE chunkserver SET status = {int(Status.RO)}, status_time = ? "
                      f"WHERE {where}", (now,) + args)
    for r in rows:
        r.status = Status.RO
        r.status_time = now
    return rows


# -- fids ----------------------------------------------------------------------------


def fid_high_water(db: sqlite_utils.Database) -> int:
    """The first fid never reserved: every fid handed out so far is below it."""
    return db.conn.execute("SELECT high_water FROM fid_state WHERE id = 1").fetchone()[0]


def reserve_fid_block(db: sqlite_utils.Database, size: int = FID_BLOCK) -> tuple[int, int]:
    """Reserve [begin, end) durably (committed with synchronous=FULL) and return it."""
    with write_txn(db) as c:
        begin = c.execute("SELECT high_water FROM fid_state WHERE id = 1").fetchone()[0]
        end = begin + size
        if end > FID_LIMIT:
            raise MasterDBError("fid space exhausted")
        c.execute("UPDATE fid_state SET high_water = ?, update_time = ? WHERE id = 1",
                  (end, time.time()))
    return begin, end


class FidAllocator:
    """Hands out ranges of range_size fids from blocks reserved in the database."""

    def __init__(self, db: sqlite_utils.Database, block: int = FID_BLOCK,
                 range_size: int = FID_RANGE) -> None:
        if block % range_size:
            raise ValueError("block must be a multiple of range_size")
        self.db, self.block, self.range_size = db, block, range_size
        self.next = self.end = 0
        self.handed_out = 0  # fids handed out by this process
        self._lock = threading.Lock()

    def next_range(self) -> tuple[int, int]:
        """A fresh [begin, end) range; never overlaps any range handed out before."""
        with self._lock:
            if self.next + self.range_size > self.end:
                self.next, self.end = reserve_fid_block(self.db, self.block)
                log.info("fid block [%d, %d) reserved", self.next, self.end)
            begin = self.next
            self.next += self.range_size
            self.handed_out += self.range_size
            return begin, begin + self.range_size


def as_dict(cs: Chunkserver) -> dict:
    """The row as a plain dict (column names)."""
    return asdict(cs)
