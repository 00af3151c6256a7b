"""The path metadata schema, written once for SQLite and PostgreSQL, and its migrations.

The schema is a documented interface (README "Path API"); table gateway_schema holds
its version (one row). Types differ per database only where they must: PostgreSQL gets
BIGINT, DOUBLE PRECISION and the byte-order "C" collation for paths, so that prefix
ranges and ORDER BY compare code points on both databases.
"""
from __future__ import annotations

SCHEMA_VERSION = 3
TABLES_BY_VERSION = {   # the tables each migration adds
    1: {"gateway_schema", "gateway_fragment", "gateway_directory", "gateway_garbage"},
    2: {"gateway_s3_bucket", "gateway_s3_object", "gateway_s3_upload", "gateway_s3_part"},
    3: {"gateway_blob"},
}
OUR_TABLES = set().union(*TABLES_BY_VERSION.values())


def tables_up_to(version: int) -> set[str]:
    """The tables a database at this schema version has."""
    return set().union(*(t for v, t in TABLES_BY_VERSION.items() if v <= version))

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


# version 2: the S3 API (speedy.gateway.s3.objects)
SCHEMA_V2_S3 = """
CREATE TABLE gateway_s3_bucket (
    name        {path}   PRIMARY KEY,
    created     {real}   NOT NULL,
    public_read SMALLINT NOT NULL DEFAULT 0 CHECK (public_read IN (0, 1))
);
CREATE TABLE gateway_s3_object (
    bucket       {path}   NOT NULL,
    key          {path}   NOT NULL,
    size         {bigint} NOT NULL CHECK (size >= 0),
    etag         TEXT     NOT NULL,
    content_type TEXT     NOT NULL,
    meta         TEXT     NOT NULL DEFAULT '{{}}',
    mtime        {real}   NOT NULL,
    blobs        TEXT     NOT NULL DEFAULT '[]',
    PRIMARY KEY (bucket, key)
);
CREATE TABLE gateway_s3_upload (
    upload_id    TEXT     PRIMARY KEY,
    bucket       {path}   NOT NULL,
    key          {path}   NOT NULL,
    content_type TEXT     NOT NULL,
    meta         TEXT     NOT NULL DEFAULT '{{}}',
    created      {real}   NOT NULL
);
CREATE INDEX gateway_s3_upload_key ON gateway_s3_upload (bucket, key, upload_id);
CREATE INDEX gateway_s3_upload_created ON gateway_s3_upload (created);
CREATE TABLE gateway_s3_part (
    upload_id    TEXT     NOT NULL,
    number       INTEGER  NOT NULL CHECK (number BETWEEN 1 AND 10000),
    size         {bigint} NOT NULL CHECK (size >= 0),
    etag         TEXT     NOT NULL,
    blob         TEXT     NOT NULL,
    mtime        {real}   NOT NULL,
    PRIMARY KEY (upload_id, number)
)
"""


# version 3: the blob routes' records (speedy.gateway.records)
SCHEMA_V3_BLOB = """
CREATE TABLE gateway_blob (
    key          TEXT     PRIMARY KEY,
    content_type TEXT     NOT NULL,
    size         {bigint} NOT NULL,
    etag         TEXT     NOT NULL,
    mtime        {bigint} NOT NULL
)
"""

TYPES = {
    "sqlite": {"path": "TEXT", "bigint": "INTEGER", "real": "REAL"},
    "postgresql": {"path": 'TEXT COLLATE "C"', "bigint": "BIGINT", "real": "DOUBLE PRECISION"},
}

MIGRATIONS: dict[int, str] = {1: SCHEMA_V1, 2: SCHEMA_V2_S3, 3: SCHEMA_V3_BLOB}  # version -> SQL that brings version-1 to it


def statements(version: int, dialect: str) -> list[str]:
    """The statements of migration `version` for one database."""
    sql = MIGRATIONS[version].format(**TYPES[dialect])
    return [s.strip() for s in sql.split(";") if s.strip()]
