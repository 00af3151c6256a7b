"""The path metadata layer on real databases: SQLite (a file) and PostgreSQL (a private server)."""
from __future__ import annotations

import sqlite3
import threading

import pytest

from speedy.gateway.meta import Fragment, Key, MetaError, open_meta
from speedy.wire.manifest import parse_key
from speedy.gateway.meta import schema
from speedy.gateway.meta.store import directory_entry, prefix_bound


@pytest.fixture
def meta(meta_url):
    m = open_meta(meta_url)
    yield m
    m.close()


def frag(path: str, index: int = 0, start: int = 0, end: int = 10, fid: int = 1,
         last: bool = True, multipart: bool = False, mtime: float = 0.0) -> Fragment:
    return Fragment(path, index, start, end, Key(3, fid, multipart) if end > start else None,
                    last, mtime)


def test_schema_is_created_once_and_reopened(meta_url):
    m = open_meta(meta_url)
    assert m.version() == schema.SCHEMA_VERSION
    m.put_fragment(frag("/a/b"))
    m.close()
    m = open_meta(meta_url)
    assert m.version() == schema.SCHEMA_VERSION and [f.blob for f in m.fragments("/a/b")] == [Key(3, 1)]
    m.close()


def test_put_get_and_fileinfo_order(meta):
    assert meta.get_fragment("/f", 0) is None and meta.fragments("/f") == []
    meta.put_fragment(frag("/f", 0, 0, 10, fid=1, last=False, mtime=100.0))
    meta.put_fragment(frag("/f", 1, 10, 20, fid=2, last=False, mtime=101.0))
    meta.put_fragment(frag("/f", 2, 20, 25, fid=3, last=True, multipart=True, mtime=102.0))
    got = meta.get_fragment("/f", 2)
    assert (got.start, got.end, got.is_last, got.blob) == (20, 25, True, Key(3, 3, True))
    assert str(got.blob) == "3,3m" and parse_key("3,3m") == got.blob
    assert [f.index for f in meta.fragments("/f")] == [2, 1, 0]   # newest first
    assert meta.fragments("/f")[0].mtime == 102.0


def test_empty_fragment_has_no_blob(meta):
    meta.put_fragment(frag("/zero", 0, 0, 0))
    f = meta.get_fragment("/zero", 0)
    assert f.blob is None and f.size == 0 and f.is_last
    assert meta.delete_path("/zero") == [] and meta.garbage() == []


def test_fragment_zero_last_replaces_the_path_and_frees_its_blobs(meta):
    meta.put_fragment(frag("/r", 0, 0, 10, fid=1, last=False))
    meta.put_fragment(frag("/r", 1, 10, 20, fid=2, last=True))
    freed = meta.put_fragment(frag("/r", 0, 0, 5, fid=3, last=True))
    assert sorted(freed, key=lambda b: b.fid) == [Key(3, 1), Key(3, 2)]
    assert [(f.index, f.blob.fid) for f in meta.fragments("/r")] == [(0, 3)]
    assert sorted(b.fid for b in meta.garbage()) == [1, 2]
    assert not meta.is_referenced(Key(3, 1)) and meta.is_referenced(Key(3, 3))


def test_other_fragment_replaces_only_its_index(meta):
    meta.put_fragment(frag("/p", 0, 0, 10, fid=1, last=False))
    meta.put_fragment(frag("/p", 1, 10, 20, fid=2, last=True))
    assert meta.put_fragment(frag("/p", 1, 10, 20, fid=4, last=True)) == [Key(3, 2)]
    assert meta.put_fragment(frag("/p", 0, 0, 10, fid=5, last=False)) == [Key(3, 1)]
    assert sorted(f.blob.fid for f in meta.fragments("/p")) == [4, 5]


def test_delete_frees_and_the_garbage_queue(meta):
    meta.put_fragment(frag("/d", 0, 0, 10, fid=7, last=False))
    meta.put_fragment(frag("/d", 1, 10, 20, fid=8, multipart=True))
    freed = meta.delete_path("/d")
    assert sorted(freed, key=lambda b: b.fid) == [Key(3, 7), Key(3, 8, True)]
    assert meta.fragments("/d") == [] and meta.delete_path("/d") == []
    assert meta.garbage(older_than=3600) == []         # queued just now
    meta.retry_garbage_later(Key(3, 7))
    meta.forget_garbage(Key(3, 8))
    assert meta.garbage() == [Key(3, 7)]
    meta.queue_garbage(Key(4, 9, True))
    assert set(meta.garbage()) == {Key(3, 7), Key(4, 9, True)}


def test_move(meta):
    meta.put_fragment(frag("/src", 0, 0, 10, fid=1))
    meta.put_fragment(frag("/dst", 0, 0, 10, fid=2))
    assert meta.move("/nothing", "/x") is None
    assert meta.move("/src", "/src") == []
    assert meta.move("/src", "/dst") == [Key(3, 2)]   # dst's old bytes are freed
    assert meta.fragments("/src") == []
    assert [f.blob.fid for f in meta.fragments("/dst")] == [1]
    assert meta.move("/src", "/dst") is None


def test_directory_entries(meta):
    meta.put_fragment(frag("/repositories/u/ubuntu/tag_latest", fid=1), register_tag=True)
    meta.put_fragment(frag("/repositories/u/ubuntu/tag_v2", fid=2, mtime=1e9 + 5),
                      register_tag=True)
    meta.put_fragment(frag("/repositories/u/ubuntu/json", fid=3), register_tag=True)
    meta.put_fragment(frag("/repositories/u/ubuntu/tag_old", fid=4), register_tag=False)
    assert meta.list_directory("/repositories/u/ubuntu") == ["tag_latest", "tag_v2"]
    meta.put_fragment(frag("/repositories/u/ubuntu/tag_latest", fid=5), register_tag=True)
    assert meta.list_directory("/repositories/u/ubuntu") == ["tag_latest", "tag_v2"]
    meta.delete_path("/repositories/u/ubuntu/tag_latest")
    assert meta.list_directory("/repositories/u/ubuntu") == ["tag_v2"]
    meta.move("/repositories/u/ubuntu/tag_v2", "/repositories/u/debian/tag_v2")
    assert meta.list_directory("/repositories/u/ubuntu") == []
    assert meta.list_directory("/repositories/u/debian") == ["tag_v2"]


def test_list_descendants_is_an_exact_prefix_match(meta):
    paths = ["/a/x", "/a/y_z", "/a%b", "/ab", "/a\u00e9", "/a\U0001f600/q", "/b"]
    for i, p in enumerate(paths):
        meta.put_fragment(frag(p, fid=i + 1))
    meta.put_fragment(frag("/a/x", 1, 10, 20, fid=99, last=True))  # second fragment row
    assert meta.list_descendants("/a/") == ["/a/x", "/a/x", "/a/y_z"]
    assert meta.list_descendants("/a/y_") == ["/a/y_z"]
    assert meta.list_descendants("/a%") == ["/a%b"]
    assert meta.list_descendants("/a_") == []
    assert meta.list_descendants("/a\U0001f600") == ["/a\U0001f600/q"]
    assert len(meta.list_descendants("")) == len(paths) + 1
    assert meta.list_descendants("/zzz") == []


def test_prefix_bound_and_directory_entry():
    assert prefix_bound("") is None and prefix_bound("ab") == "ac"
    assert prefix_bound("a\U0010ffff") == "b" and prefix_bound("\ud7ff") == "\ue000"
    assert directory_entry("/r/u/i/tag_1") == ("/r/u/i", "tag_1")
    assert directory_entry("tag_1") is None and directory_entry("/r/tags_1") is None


def test_concurrent_writers_to_one_path_free_every_replaced_blob(meta_url):
    """Two connections replace the same path 40 times: every blob but the survivor is freed."""
    stores = [open_meta(meta_url) for _ in range(2)]
    freed: list[Key] = []
    lock = threading.Lock()

    def writer(n: int) -> None:
        for i in range(20):
            out = stores[n].put_fragment(frag("/hot", fid=1000 * (n + 1) + i))
            with lock:
                freed.extend(out)
    threads = [threading.Thread(target=writer, args=(n,)) for n in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    survivor = stores[0].fragments("/hot")[0].blob
    assert len(freed) == 39 and len(set(freed)) == 39 and survivor not in freed
    for s in stores:
        s.close()


def test_sqlite_refuses_foreign_and_newer_databases(tmp_path):
    foreign = tmp_path / "foreign.db"
    with sqlite3.connect(foreign) as c:
        c.execute("CREATE TABLE users (id INTEGER)")
    with pytest.raises(MetaError, match="not a speedy gateway database"):
        open_meta(f"sqlite:///{foreign}")
    newer = tmp_path / "newer.db"
    open_meta(f"sqlite:///{newer}").close()
    with sqlite3.connect(newer) as c:
        c.execute("UPDATE gateway_schema SET version = 99")
    with pytest.raises(MetaError, match="newer than this gateway"):
        open_meta(f"sqlite:///{newer}")
    master = tmp_path / "master.db"          # --metadb pointed at the master's database
    from speedy.master import db as master_db
    master_db.close(master_db.connect(str(master)))
    with pytest.raises(MetaError, match="not a speedy gateway database"):
        open_meta(f"sqlite:///{master}")
    stray = tmp_path / "stray.db"            # our table names without our schema table
    with sqlite3.connect(stray) as c:
        c.execute("CREATE TABLE gateway_blob (key TEXT PRIMARY KEY)")
    with pytest.raises(MetaError, match="without gateway_schema"):
        open_meta(f"sqlite:///{stray}")
    with pytest.raises(MetaError, match="is a directory"):
        open_meta(f"sqlite:///{tmp_path}")
    with pytest.raises(MetaError, match="unsupported database URL"):
        open_meta("mysql://x/y")


def test_sqlite_is_wal_and_readable_while_open(tmp_path):
    m = open_meta(f"sqlite:///{tmp_path}/g.db")
    m.put_fragment(frag("/w"))
    with sqlite3.connect(f"file:{tmp_path}/g.db?mode=ro", uri=True) as c:
        assert c.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        assert c.execute("SELECT path, group_id, fid FROM gateway_fragment").fetchall() == [("/w", 3, 1)]
    m.close()


def test_postgres_unreachable_is_a_clear_error(postgres):
    from tests.support import free_port
    with pytest.raises(MetaError, match="cannot connect") as e:
        open_meta(f"postgresql://postgres:secret@127.0.0.1:{free_port()}/x")
    assert "secret" not in str(e.value)


def test_forked_child_opens_its_own_connection(meta_url):
    """A worker forked after open_meta uses its own connection; the parent's keeps working."""
    import os
    m = open_meta(meta_url)
    m.put_fragment(frag("/fork/parent", fid=1))
    parents = m._connection()
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            m.put_fragment(frag("/fork/child", fid=2))
            code = 0 if len(m.list_descendants("/fork/")) == 2 else 2
            code = code or (3 if m._connection() is parents else 0)
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert m.list_descendants("/fork/") == ["/fork/child", "/fork/parent"]
    m.close()
