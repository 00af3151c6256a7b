"""The path metadata in PostgreSQL (psycopg 3): one namespace shared by several gateways.

Writes to a path take a transaction-scoped advisory lock on it (two paths for a move, in
order), so that concurrent gateways replacing the same path never lose track of a blob.
The schema is created or migrated under a global advisory lock at start.
"""
from __future__ import annotations

from typing import Any

from speedy.gateway.meta.store import MetaError, MetaStore, _Cursor, migrate, prepare_or_close

CONNECT_TIMEOUT = 5          # seconds
STATEMENT_TIMEOUT_MS = 10000
MIGRATE_LOCK = 0x5350_4459   # "SPDY": the advisory lock held while migrating


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        raise MetaError("postgresql:// needs psycopg 3 (pip install 'psycopg[binary]')") \
            from None
    return psycopg


class PostgresMeta(MetaStore):
    """MetaStore on a PostgreSQL database."""

    dialect = "postgresql"

    def __init__(self, url: str) -> None:
        super().__init__()
        self.url = url
        self._psycopg = _psycopg()
        self._connection()

    def _errors(self) -> tuple[type[BaseException], ...]:
        return (self._psycopg.Error,)

    def _sql(self, q: str) -> str:
        return q.replace("?", "%s")

    def _connect(self) -> Any:
        pg = self._psycopg
        where = "database " + redact(self.url)
        try:
            conn = pg.connect(self.url, connect_timeout=CONNECT_TIMEOUT,
                              options=f"-c statement_timeout={STATEMENT_TIMEOUT_MS}")
        except pg.Error as e:
            raise MetaError(f"cannot connect to {where}: {' '.join(str(e).split())}") from None
        def prepare() -> None:
            with conn.transaction():
                conn.execute("SELECT pg_advisory_xact_lock(%s)", (MIGRATE_LOCK,))
                tables = {r[0] for r in conn.execute(
                    "SELECT table_name FROM information_schema.tables "
                    "WHERE table_schema = current_schema()")}
                migrate(_Cursor(conn, self._sql), self.dialect, tables, where)
            conn.commit()
        return prepare_or_close(conn, prepare, where, (pg.Error,))

    def _begin(self, conn: Any, write: bool, locks: tuple[str, ...]) -> None:
        # psycopg opens a transaction with the first statement (autocommit is off)
        for path in locks:
            conn.execute("SELECT pg_advisory_xact_lock(hashtextextended(%s, 0))", (path,))
        if not locks:
            conn.execute("SELECT 1")


def redact(url: str) -> str:
    """url without its password."""
    scheme, sep, rest = url.partition("://")
    creds, at, host = rest.rpartition("@")
    if not at:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}{sep}{user}@{host}"
