"""The chunkmaster's state in SQLite: registry, reports, statuses, fids, pending deletes.

Usable without the HTTP app (the admin CLI calls these functions directly). The schema
is a documented interface (README "The database schema"); PRAGMA user_version carries
its version and MIGRATIONS bring an older database up to it, one version at a time.
All times are Unix seconds stored as REAL.
"""
from __future__ import annotations

import fcntl
import logging
import os
import sqlite3
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Callable, Iterable, Iterator

import sqlite_utils

from speedy.wire.master import (SERVER_COLUMNS, PendingDelete, Report,
                                ServerStatus, Status)

log = logging.getLogger("speedy.master.db")

SCHEMA_VERSION = 3
FID_RANGE = 100          # fids per GET /v1/chunkmaster/fid
FID_BLOCK = 10000        # fids reserved durably per database write
FID_FIRST = 1
FID_LIMIT = 2 ** 63 - 1  # SQLite INTEGER; the wire fid is u64
START_BUSY_TIMEOUT = 3.0  # seconds to wait for a lock while opening
BUSY_TIMEOUT = 2.0        # seconds a request waits for an operator's write lock


class MasterDBError(Exception):
    """The database cannot be used: corrupt, locked, foreign or too new."""


# Version 1: the registry and the fid high-water mark. Kept as SQL text: its CHECK
# constraints are part of the documented schema and sqlite-utils' create() cannot say them.
CHUNKSERVER_V1 = """
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
)"""
FID_STATE_V1 = """
CREATE TABLE fid_state (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    high_water  INTEGER NOT NULL CHECK (high_water >= 1),
    update_time REAL    NOT NULL
)"""
OUR_TABLES = {1: {"chunkserver", "fid_state"}, 2: {"chunkserver", "fid_state", "pending_delete"},
              3: {"chunkserver", "fid_state", "pending_delete"}}


def _create_v1(db: sqlite_utils.Database) -> None:
    """Version 1: chunkserver and fid_state (with its one row)."""
    db.execute(CHUNKSERVER_V1)
    db["chunkserver"].create_index(["ip", "port"], index_name="chunkserver_ip_port")
    db.execute(FID_STATE_V1)
    db["fid_state"].insert({"id": 1, "high_water": FID_FIRST, "update_time": time.time()})


def _create_v2(db: sqlite_utils.Database) -> None:
    """Version 2: pending_delete, deletes the master finishes when a server reports."""
    db["pending_delete"].create(
        {"group_id": int, "ip": str, "port": int, "fid": int, "create_time": float,
         "attempts": int, "last_error": str},
        pk=("group_id", "ip", "port", "fid"),
        not_null={"group_id", "ip", "port", "fid", "create_time", "attempts", "last_error"},
        defaults={"attempts": 0, "last_error": ""})


def _create_v3(db: sqlite_utils.Database) -> None:
    """Version 3: chunkserver.garbage_bytes, as last reported (issue 13)."""
    db.execute("ALTER TABLE chunkserver ADD COLUMN garbage_bytes INTEGER NOT NULL DEFAULT 0")


MIGRATIONS: dict[int, Callable[[sqlite_utils.Database], None]] = {1: _create_v1,
                                                                  2: _create_v2,
                                                                  3: _create_v3}


@dataclass
class Chunkserver(ServerStatus):
    """One row of the chunkserver table (with its count of pending deletes)."""

    create_time: float = 0.0
    update_time: float = 0.0
    status_time: float = 0.0
    report_count: int = 0

    @property
    def key(self) -> str:
        """group:ip:port, for log lines."""
        return f"{self.group_id}:{self.ip}:{self.port}"


COLUMNS = [f.name for f in fields(Chunkserver) if f.name != "pending_deletes"]
_PENDING = ("(SELECT count(*) FROM pending_delete p WHERE p.group_id = c.group_id "
            "AND p.ip = c.ip AND p.port = c.port) AS pending_deletes")
assert set(SERVER_COLUMNS) - set(COLUMNS) == {"pending_deletes"}


# -- opening -------------------------------------------------------------------------


def connect(path: str, create: bool = True, busy_timeout: float = START_BUSY_TIMEOUT,
            check: bool = True, init: bool = False) -> sqlite_utils.Database:
    """Open (and create or migrate) the master database; MasterDBError when unusable.

    A missing file is created when create is set; an existing empty (0-byte) file is
    refused like any foreign file unless init is set.
    """
    if not os.path.exists(path):
        if not create:
            raise MasterDBError(f"database {path} does not exist")
    elif os.path.isdir(path):
        raise MasterDBError(f"database {path} is a directory")
    elif not init and os.path.getsize(path) == 0:
        raise MasterDBError(f"database {path} is an empty file, not a speedy master "
                            "database; start with --init_db to initialize it")
    try:
        conn = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None,
                               check_same_thread=False)
    except sqlite3.Error as e:
        raise MasterDBError(f"cannot open database {path}: {e}") from None
    try:
        db = sqlite_utils.Database(conn, recursive_triggers=False, execute_plugins=False)
        _prepare(db, path, check)
        db.execute(f"PRAGMA busy_timeout = {int(BUSY_TIMEOUT * 1000)}")
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
    if check:
        result = [r[0] for r in db.execute("PRAGMA quick_check").fetchall()]
        if result != ["ok"]:
            detail = " ".join("; ".join(map(str, result[:3])).split())[:200]
            raise MasterDBError(f"database {path} is corrupt (quick_check: {detail}); "
                                "refusing to start, restore a backup")
    mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
    if str(mode).lower() != "wal":
        raise MasterDBError(f"database {path}: cannot switch to WAL mode (got {mode})")
    db.execute("PRAGMA synchronous = FULL")
    db.execute("PRAGMA foreign_keys = ON")
    migrate(db, path)


def schema_version(db: sqlite_utils.Database) -> int:
    """PRAGMA user_version."""
    return db.execute("PRAGMA user_version").fetchone()[0]


def migrate(db: sqlite_utils.Database, path: str = "",
            target: int = SCHEMA_VERSION) -> int:
    """Bring the schema to target (SCHEMA_VERSION) in one transaction; the version before."""
    with write_txn(db):
        version = schema_version(db)
        tables = set(db.table_names())
        if version > SCHEMA_VERSION:
            raise MasterDBError(f"database {path} has schema version {version}, newer than "
                                f"this master supports ({SCHEMA_VERSION})")
        if version == 0 and tables - {"sqlite_sequence"}:
            raise MasterDBError(f"database {path} is not a speedy master database "
                                f"(user_version 0, tables: {', '.join(sorted(tables))})")
        if version >= 1 and not OUR_TABLES[version] <= tables:
            raise MasterDBError(f"database {path} lacks tables "
                                f"{', '.join(sorted(OUR_TABLES[version] - tables))}")
        if version >= 1 and not db["fid_state"].count_where("id = 1"):
            raise MasterDBError(f"database {path} has no fid_state row (the fid high-water "
                                "mark is lost); refusing to start, restore a backup")
        for v in range(version + 1, target + 1):
            MIGRATIONS[v](db)
            db.execute(f"PRAGMA user_version = {v}")
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
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
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
    """Delete a chunkserver's row and its pending deletes; True if it existed."""
    with write_txn(db) as c:
        cur = c.execute("DELETE FROM chunkserver WHERE group_id = ? AND ip = ? AND port = ?",
                        (group_id, ip, port))
        c.execute("DELETE FROM pending_delete WHERE group_id = ? AND ip = ? AND port = ?",
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


def _select(c: sqlite3.Connection | sqlite_utils.Database, where: str = "1",
            args: list | tuple = ()) -> list[Chunkserver]:
    """Rows of chunkserver matching where, ordered by group, ip, port."""
    names = COLUMNS + ["pending_deletes"]
    cur = c.execute(f"SELECT {', '.join('c.' + n for n in COLUMNS)}, {_PENDING} "
                    f"FROM chunkserver c WHERE {where} ORDER BY group_id, ip, port", args)
    return [Chunkserver(**dict(zip(names, r))) for r in cur.fetchall()]


def list_servers(db: sqlite_utils.Database, group_id: int | None = None,
                 include_err: bool = True) -> list[Chunkserver]:
    """Every chunkserver (of one group), ordered by group, ip, port."""
    where, args = ["1"], []
    if group_id is not None:
        where.append("group_id = ?")
        args.append(group_id)
    if not include_err:
        where.append(f"status != {int(Status.ERR)}")
    return _select(db, " AND ".join(where), args)


def get_server(db: sqlite_utils.Database, group_id: int, ip: str, port: int) -> \
        Chunkserver | None:
    """One chunkserver, or None."""
    rows = _select(db, "group_id = ? AND ip = ? AND port = ?", (group_id, ip, port))
    return rows[0] if rows else None


def route(db: sqlite_utils.Database) -> dict[int, list[Chunkserver]]:
    """group_id -> its chunkservers, ERR servers left out."""
    groups: dict[int, list[Chunkserver]] = {}
    for cs in list_servers(db, include_err=False):
        groups.setdefault(cs.group_id, []).append(cs)
    return groups


def any_error(db: sqlite_utils.Database) -> bool:
    """True if some chunkserver is ERR."""
    return db["chunkserver"].count_where("status = ?", [int(Status.ERR)]) > 0


def status_counts(db: sqlite_utils.Database) -> dict[Status, int]:
    """How many chunkservers have each status (every status present, zeros included)."""
    counts = {s: 0 for s in Status}
    for status, n in db.execute("SELECT status, count(*) FROM chunkserver "
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
    if not db["chunkserver"].count_where(where, args):
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
    return db["fid_state"].get(1)["high_water"]


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


class FidReserver:
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


# -- pending deletes ------------------------------------------------------------------


def add_pending_deletes(db: sqlite_utils.Database, items: Iterable[PendingDelete],
                        now: float | None = None) -> int:
    """Record deletes a client could not finish on one server; how many were new."""
    now = time.time() if now is None else now
    table = db["pending_delete"]
    with write_txn(db):
        before = db.conn.total_changes
        table.insert_all(({"group_id": p.group_id, "ip": p.ip, "port": p.port,
                           "fid": p.fid, "create_time": now} for p in items), ignore=True)
        return db.conn.total_changes - before


def pending_deletes(db: sqlite_utils.Database, group_id: int, ip: str, port: int,
                    limit: int = 1000) -> list[int]:
    """The fids still to delete on one server, oldest first."""
    return [r["fid"] for r in db["pending_delete"].rows_where(
        "group_id = ? AND ip = ? AND port = ?", [group_id, ip, port],
        order_by="create_time, fid" if limit > 1 else None, select="fid", limit=limit)]


def finish_pending_deletes(db: sqlite_utils.Database, group_id: int, ip: str, port: int,
                           done: Iterable[int], failed: dict[int, str] | None = None) -> None:
    """Drop the fids deleted on that server; count an attempt on the ones that failed."""
    key = [group_id, ip, port]
    with write_txn(db) as c:
        for fid in done:
            c.execute("DELETE FROM pending_delete WHERE group_id = ? AND ip = ? AND port = ? "
                      "AND fid = ?", key + [fid])
        for fid, why in (failed or {}).items():
            c.execute("UPDATE pending_delete SET attempts = attempts + 1, last_error = ? "
                      "WHERE group_id = ? AND ip = ? AND port = ? AND fid = ?",
                      [why[:200]] + key + [fid])


def count_pending_deletes(db: sqlite_utils.Database) -> int:
    """Deletes still to finish, on every server."""
    return db["pending_delete"].count
