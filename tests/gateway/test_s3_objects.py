"""S3's metadata operations on SQLite and on PostgreSQL: listings, multipart, garbage, migration."""
from __future__ import annotations

import hashlib
import sqlite3

import pytest

from speedy.gateway.meta import open_meta, schema
from speedy.gateway.s3.objects import ObjectInfo, Part, S3Error, S3Objects
from speedy.wire.manifest import Key


@pytest.fixture
def s3(meta_url):
    meta = open_meta(meta_url)
    yield S3Objects(meta)
    meta.close()


def put(s3: S3Objects, bucket: str, key: str, blob: str = "") -> list[Key]:
    return s3.put_object(ObjectInfo(bucket, key, 1, "e", "t", {}, 0, [(blob, 1)] if blob else []))


def test_listing_with_delimiter_markers_and_pages(s3):
    s3.create_bucket("b")
    keys = ["a/1", "a/2", "a/b/3", "b/4", "c", "d/5", "d/6", "é/7", "z"]
    for k in keys:
        put(s3, "b", k)
    objs, prefixes, truncated, _ = s3.list_objects("b", "", "/", "", 1000)
    assert [o.key for o in objs] == ["c", "z"] and prefixes == ["a/", "b/", "d/", "é/"]
    assert not truncated
    objs, prefixes, truncated, last = s3.list_objects("b", "", "/", "", 3)
    assert ([o.key for o in objs], prefixes, truncated, last) == (["c"], ["a/", "b/"], True, "c")
    objs, prefixes, truncated, last = s3.list_objects("b", "", "/", "c", 3)
    assert ([o.key for o in objs], prefixes, truncated) == (["z"], ["d/", "é/"], False)
    objs, prefixes, _, _ = s3.list_objects("b", "a/", "/", "", 1000)
    assert [o.key for o in objs] == ["a/1", "a/2"] and prefixes == ["a/b/"]
    seen, after = [], ""
    while True:
        objs, _, truncated, after = s3.list_objects("b", "", "", after, 2)
        seen += [o.key for o in objs]
        if not truncated:
            break
    assert seen == sorted(keys, key=str.encode)


def test_replacing_and_deleting_queue_the_old_blobs(s3):
    s3.create_bucket("b")
    assert put(s3, "b", "k", "3,100") == []
    assert put(s3, "b", "k", "3,101") == [Key(3, 100)]
    assert s3.delete_object("b", "k") == [Key(3, 101)]
    assert Key(3, 100) in s3.meta.garbage() and Key(3, 101) in s3.meta.garbage()
    with pytest.raises(S3Error) as e:
        put(s3, "missing", "k")
    assert e.value.code == "NoSuchBucket"
    put(s3, "b", "x", "3,102")
    with pytest.raises(S3Error) as e:
        s3.delete_bucket("b")
    assert e.value.code == "BucketNotEmpty"


def test_multipart_complete_etag_and_unused_parts(s3):
    s3.create_bucket("b")
    uid = s3.create_upload("b", "big", "video/mp4", {"a": "1"})
    md5s = [hashlib.md5(bytes([i])).hexdigest() for i in range(3)]
    for n in (1, 2, 3):
        s3.put_part(uid, Part(n, 10 if n < 3 else 5, md5s[n - 1], f"3,{200 + n}", 0))
    assert s3.put_part(uid, Part(2, 10, md5s[1], "3,299", 0)) == [Key(3, 202)]
    with pytest.raises(S3Error) as e:
        s3.complete_upload(s3.upload("b", "big", uid), [(2, md5s[1]), (1, md5s[0])], 1)
    assert e.value.code == "InvalidPartOrder"
    with pytest.raises(S3Error) as e:
        s3.complete_upload(s3.upload("b", "big", uid), [(1, md5s[0]), (2, md5s[1])], 11)
    assert e.value.code == "EntityTooSmall"
    obj, garbage = s3.complete_upload(s3.upload("b", "big", uid), [(1, md5s[0]), (2, md5s[1])], 1)
    want = hashlib.md5(bytes.fromhex(md5s[0]) + bytes.fromhex(md5s[1])).hexdigest() + "-2"
    assert obj.etag == want and obj.size == 20 and obj.blobs == [("3,201", 10), ("3,299", 10)]
    assert garbage == [Key(3, 203)]
    assert s3.get_object("b", "big").meta == {"a": "1"}
    with pytest.raises(S3Error) as e:
        s3.upload("b", "big", uid)
    assert e.value.code == "NoSuchUpload"


def test_a_version_1_database_migrates_to_s3(tmp_path):
    path = tmp_path / "old.db"
    with sqlite3.connect(path) as db:
        for stmt in schema.statements(1, "sqlite"):
            db.execute(stmt)
        db.execute("INSERT INTO gateway_schema (version) VALUES (1)")
    meta = open_meta(f"sqlite:///{path}")
    try:
        assert meta.version() == schema.SCHEMA_VERSION
        S3Objects(meta).create_bucket("b")
    finally:
        meta.close()
