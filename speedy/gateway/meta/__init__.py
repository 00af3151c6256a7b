"""The gateway's path metadata: fragments, v1 directory entries and blobs to free.

    meta = open_meta("sqlite:///./speedy_gateway.db")        # or postgresql://user@host/db
    meta.put_fragment(Fragment("/a/b", 0, 0, 5, Key(3, 10452), is_last=True))
    meta.get_fragment("/a/b", 0)
"""
from __future__ import annotations

from speedy.gateway.meta.store import (MAX_PATH_BYTES, Fragment, MetaError, MetaStore,
                                       directory_entry)
from speedy.wire.manifest import Key

__all__ = ["open_meta", "Key", "Fragment", "MetaError", "MetaStore", "directory_entry",
           "MAX_PATH_BYTES"]


def open_meta(url: str) -> MetaStore:
    """Open (create, migrate) the metadata database at url; MetaError when unusable.

    sqlite:///relative/path, sqlite:////absolute/path, a bare file path, or
    postgresql://[user[:password]@]host[:port]/dbname (also postgres://).
    """
    url = (url or "").strip()
    if url.startswith(("postgresql://", "postgres://")):
        from speedy.gateway.meta.postgres import PostgresMeta
        return PostgresMeta(url)
    if url.startswith("sqlite://"):
        path = url[len("sqlite://"):]
        if not path.startswith("/"):
            raise MetaError(f"bad database URL {url!r}: use sqlite:///path")
        path = path[1:]
    elif "://" in url:
        raise MetaError(f"unsupported database URL {url!r}: use sqlite:///path or "
                        "postgresql://...")
    else:
        path = url
    if not path:
        raise MetaError("empty database path")
    from speedy.gateway.meta.sqlite import SQLiteMeta
    return SQLiteMeta(path)
