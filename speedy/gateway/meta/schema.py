"""The path metadata schema, written once for SQLite and PostgreSQL, and its migrations.

The schema is a documented interface (README "Path API"); table gateway_schema holds
its version (one row). Types differ per database only where they must: PostgreSQL gets
BIGINT, DOUBLE PRECISION and the byte-order "C" collation for paths, so that prefix
ranges and ORDER BY compare code points on both databases.
"""
from __future__ import annotations

SCHEMA_VERSION = 1
# Other tables of the gateway that may share the file (the blob routes' records): a
# SQLite file holding any other table is refused as someone else's database.
SIBLING_TABLES = {"gateway_blob"}
OUR_TABLES = {"gateway_schema", "gateway_fragment", "gateway_directory", "gateway_garbage"}

SCHEMA_V1 = """
CREATE TABLE gateway_schema (
    version     INTEGER NOT NULL
);
CREATE TABLE gateway_fragment (
    path        {path}   NOT NULL CHECK (length(path) BETWEEN 1 AND 255),
    frag_index  {bigint} NOT NULL CHECK (frag_index >= 0),
    start_byte  {bigint} NOT NULL CHECK (start_byte >= 0),
    end_byte    {bigint} NOT NULL CHECK (end_byte >= start_byte),
    group_id    INTEGER  NOT NULL CHECK (group_id BETWEEN 0 AND 65535),
    fid         {bigint} NOT NULL CHECK (fid >= 0),
    multipart   SMALLINT NOT NULL DEFAULT 0 CHECK (multipart IN (0, 1)),
    is_last     SMALLINT NOT NULL DEFAULT 0 CHECK (is_last IN (0, 1)),
    mtime       {real}   NOT NULL,
    PRIMARY KEY (path, frag_index)
);
CREATE INDEX gateway_fragment_blob ON gateway_fragment (group_id, fid);
CREATE TABLE gateway_directory (
    dir         {path}   NOT NULL,
    name        {path}   NOT NULL,
    mtime       {real}   NOT NULL,
    PRIMARY KEY (dir, name)
);
CREATE TABLE gateway_garbage (
    group_id    INTEGER  NOT NULL,
    fid         {bigint} NOT NULL,
    multipart   SMALLINT NOT NULL DEFAULT 0,
    since       {real}   NOT NULL,
    attempts    INTEGER  NOT NULL DEFAULT 0,
    PRIMARY KEY (group_id, fid)
)
"""

TYPES = {
    "sqlite": {"path": "TEXT", "bigint": "INTEGER", "real": "REAL"},
    "postgresql": {"path": 'TEXT COLLATE "C"', "bigint": "BIGINT", "real": "DOUBLE PRECISION"},
}

MIGRATIONS: dict[int, str] = {1: SCHEMA_V1}  # version -> SQL that brings version-1 to it


def statements(version: int, dialect: str) -> list[str]:
    """The statements of migration `version` for one database."""
    sql = MIGRATIONS[version].format(**TYPES[dialect])
    return [s.strip() for s in sql.split(";") if s.strip()]
