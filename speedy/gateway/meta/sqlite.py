"""The path metadata in SQLite: WAL mode, one writer at a time (BEGIN IMMEDIATE), like the master.

Several gateway workers (processes) may share one file on one machine; each opens its
own connection after the fork. Readers never block the writer, so operators can query
the file with sqlite3 while the gateway runs.
"""
from __future__ import annotations

import os
import sqlite3

from speedy.gateway.meta.store import MetaError, MetaStore, _Cursor, migrate, prepare_or_close

BUSY_TIMEOUT = 5.0   # seconds a request waits for another writer's lock


class SQLiteMeta(MetaStore):
    """MetaStore on a SQLite file."""

    dialect = "sqlite"

    def __init__(self, path: str, busy_timeout: float = BUSY_TIMEOUT) -> None:
        super().__init__()
        self.path = path
        self.url = f"sqlite:///{path}"
        self.busy_timeout = busy_timeout
        self._connection()  # open (create, migrate) now: a bad file is a start error

    def _errors(self) -> tuple[type[BaseException], ...]:
        return (sqlite3.Error,)

    def _connect(self) -> sqlite3.Connection:
        path = self.path
        if os.path.isdir(path):
            raise MetaError(f"database {path} is a directory")
        parent = os.path.dirname(os.path.abspath(path))
        if not os.path.isdir(parent):
            raise MetaError(f"database {path}: directory {parent} does not exist")
        try:
            conn = sqlite3.connect(path, timeout=self.busy_timeout, isolation_level=None,
                                   check_same_thread=False)
        except sqlite3.Error as e:
            raise MetaError(f"cannot open database {path}: {e}") from None

        def prepare() -> None:
            if conn.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise MetaError(f"database {path} is corrupt (quick_check failed)")
            mode = conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
            if str(mode).lower() != "wal":
                raise MetaError(f"database {path}: cannot switch to WAL mode (got {mode})")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute(f"PRAGMA busy_timeout = {int(self.busy_timeout * 1000)}")
            conn.execute("BEGIN IMMEDIATE")
            try:
                tables = {r[0] for r in conn.execute(
                    "SELECT name FROM sqlite_master WHERE type = 'table' "
                    "AND name NOT LIKE 'sqlite_%'")}
                migrate(_Cursor(conn, str), self.dialect, tables, f"database {path}")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")
        return prepare_or_close(conn, prepare, f"database {path}", (sqlite3.Error,))

    def _begin(self, conn: sqlite3.Connection, write: bool, locks: tuple[str, ...]) -> None:
        conn.execute("BEGIN IMMEDIATE" if write else "BEGIN")

    def close(self) -> None:
        """Checkpoint the WAL and close."""
        with self._lock:
            if self._conn is not None and self._pid == os.getpid():
                try:
                    self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                except sqlite3.Error:
                    pass
            super().close()
