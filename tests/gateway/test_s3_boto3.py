"""The S3 API proven with boto3 (a client nobody here wrote) against real daemons."""
from __future__ import annotations

import base64
import hashlib
import os
import sqlite3
import time
import urllib.error
import urllib.request

import boto3
import pytest
from boto3.s3.transfer import TransferConfig
from botocore.client import Config
from botocore.exceptions import ClientError

from speedy.client import Client, NotFoundError
from tests.support.cluster import blob, cluster_fixture
from tests.support.gateway import gateway_fixture

AKID, SECRET = "AKIASPEEDYTEST000001", "speedy-test-secret-key-0000000000000000001"
cluster = cluster_fixture(groups=1, per_group=2, chunks=4, chunk_size=64 << 20, mem_blocks=64)
gateway = gateway_fixture(workers=2, extra=[f"--s3_access_key={AKID}", f"--s3_secret_key={SECRET}",
                                            "--s3_upload_ttl=3", "--maintenance_interval=1"])
MiB = 1 << 20


def s3_client(gw, key: str = AKID, secret: str = SECRET):
    return boto3.client("s3", endpoint_url=f"http://{gw.addr}", aws_access_key_id=key,
                        aws_secret_access_key=secret, region_name="us-east-1",
                        config=Config(signature_version="s3v4", s3={"addressing_style": "path"},
                                      retries={"max_attempts": 1}))


@pytest.fixture(scope="module")
def s3(gateway):
    return s3_client(gateway)


def code_of(e: ClientError) -> str:
    return e.response["Error"]["Code"]


def blob_keys(gw, bucket: str, key: str) -> list[str]:
    """The cluster keys holding an object's bytes, from the gateway's SQLite database."""
    import json
    path = gw.metadb[len("sqlite:///"):]
    with sqlite3.connect(path) as db:
        row = db.execute("SELECT blobs FROM gateway_s3_object WHERE bucket = ? AND key = ?",
                         (bucket, key)).fetchone()
    return [k for k, _ in json.loads(row[0])] if row else []


def test_buckets(s3):
    s3.create_bucket(Bucket="photos")
    s3.head_bucket(Bucket="photos")
    assert "photos" in [b["Name"] for b in s3.list_buckets()["Buckets"]]
    with pytest.raises(ClientError) as e:
        s3.create_bucket(Bucket="photos")
    assert code_of(e.value) == "BucketAlreadyOwnedByYou"
    with pytest.raises(ClientError) as e:
        s3.head_bucket(Bucket="missing-bucket")
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    with pytest.raises(ClientError) as e:
        s3.create_bucket(Bucket="Bad_Name")
    assert code_of(e.value) == "InvalidBucketName"
    s3.put_object(Bucket="photos", Key="a.txt", Body=b"x")
    with pytest.raises(ClientError) as e:
        s3.delete_bucket(Bucket="photos")
    assert code_of(e.value) == "BucketNotEmpty"
    s3.delete_object(Bucket="photos", Key="a.txt")
    s3.delete_bucket(Bucket="photos")
    assert "photos" not in [b["Name"] for b in s3.list_buckets()["Buckets"]]


def test_objects_round_trip_with_metadata_and_etag(s3, gateway):
    s3.create_bucket(Bucket="objs")
    data = blob(300_000, seed=3)
    r = s3.put_object(Bucket="objs", Key="dir/photo.jpg", Body=data, ContentType="image/jpeg",
                      Metadata={"owner": "ann"})
    assert r["ETag"] == f'"{hashlib.md5(data).hexdigest()}"'
    got = s3.get_object(Bucket="objs", Key="dir/photo.jpg")
    assert got["Body"].read() == data
    assert got["ContentType"] == "image/jpeg" and got["Metadata"] == {"owner": "ann"}
    assert got["ContentLength"] == len(data) and got["ETag"] == r["ETag"]
    head = s3.head_object(Bucket="objs", Key="dir/photo.jpg")
    assert head["ContentLength"] == len(data)
    part = s3.get_object(Bucket="objs", Key="dir/photo.jpg", Range="bytes=100-199")
    assert part["Body"].read() == data[100:200] and part["ContentRange"] == f"bytes 100-199/{len(data)}"
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket="objs", Key="dir/photo.jpg", Range=f"bytes={len(data)}-")
    assert code_of(e.value) == "InvalidRange"
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket="objs", Key="dir/photo.jpg", IfNoneMatch=r["ETag"])
    assert e.value.response["ResponseMetadata"]["HTTPStatusCode"] == 304
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket="objs", Key="dir/photo.jpg", IfMatch='"0000"')
    assert code_of(e.value) == "PreconditionFailed"
    assert s3.get_object(Bucket="objs", Key="dir/photo.jpg", IfMatch=r["ETag"])["Body"].read() == data
    s3.put_object(Bucket="objs", Key="empty", Body=b"")
    assert s3.get_object(Bucket="objs", Key="empty")["Body"].read() == b""
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket="objs", Key="nope")
    assert code_of(e.value) == "NoSuchKey"
    with pytest.raises(ClientError) as e:
        s3.get_object(Bucket="no-such-bucket", Key="nope")
    assert code_of(e.value) == "NoSuchBucket"


def test_content_md5_is_checked_and_a_bad_body_leaves_nothing(s3, gateway):
    s3.create_bucket(Bucket="md5")
    good = base64.b64encode(hashlib.md5(b"hello").digest()).decode()
    s3.put_object(Bucket="md5", Key="ok", Body=b"hello", ContentMD5=good)
    with pytest.raises(ClientError) as e:
        s3.put_object(Bucket="md5", Key="bad", Body=b"hellO", ContentMD5=good)
    assert code_of(e.value) == "BadDigest"
    with pytest.raises(ClientError):
        s3.head_object(Bucket="md5", Key="bad")


def test_delete_frees_the_bytes_on_the_chunkservers(s3, gateway, cluster):
    s3.create_bucket(Bucket="free")
    s3.put_object(Bucket="free", Key="k", Body=blob(100_000, seed=9))
    keys = blob_keys(gateway, "free", "k")
    assert len(keys) == 1
    with Client(cluster.master_addr, token=cluster.token) as c:
        assert len(c.get(keys[0])) == 100_000
        s3.delete_object(Bucket="free", Key="k")
        with pytest.raises(NotFoundError):
            c.get(keys[0])
        s3.put_object(Bucket="free", Key="k2", Body=b"one")
        first = blob_keys(gateway, "free", "k2")
        s3.put_object(Bucket="free", Key="k2", Body=b"two")   # a replaced object's bytes go too
        with pytest.raises(NotFoundError):
            c.get(first[0])
    assert s3.get_object(Bucket="free", Key="k2")["Body"].read() == b"two"


def test_delete_objects_and_copy(s3):
    s3.create_bucket(Bucket="batch")
    for i in range(5):
        s3.put_object(Bucket="batch", Key=f"k{i}", Body=f"v{i}".encode())
    r = s3.delete_objects(Bucket="batch", Delete={"Objects": [{"Key": "k0"}, {"Key": "k1"},
                                                             {"Key": "absent"}]})
    assert sorted(d["Key"] for d in r["Deleted"]) == ["absent", "k0", "k1"]
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket="batch")["Contents"]]
    assert keys == ["k2", "k3", "k4"]
    r = s3.copy_object(Bucket="batch", Key="copy", CopySource={"Bucket": "batch", "Key": "k2"})
    assert r["CopyObjectResult"]["ETag"] == f'"{hashlib.md5(b"v2").hexdigest()}"'
    assert s3.get_object(Bucket="batch", Key="copy")["Body"].read() == b"v2"
    s3.copy_object(Bucket="batch", Key="copy2", CopySource="batch/k3",
                   MetadataDirective="REPLACE", ContentType="text/plain", Metadata={"a": "b"})
    h = s3.head_object(Bucket="batch", Key="copy2")
    assert h["ContentType"] == "text/plain" and h["Metadata"] == {"a": "b"}


def test_listings_v2_and_v1(s3):
    s3.create_bucket(Bucket="list")
    names = ["a/1", "a/2", "a/b/3", "b/4", "c", "d/5", "é/6"]
    for n in names:
        s3.put_object(Bucket="list", Key=n, Body=b"x")
    r = s3.list_objects_v2(Bucket="list", Delimiter="/")
    assert [o["Key"] for o in r.get("Contents", [])] == ["c"]
    assert [p["Prefix"] for p in r["CommonPrefixes"]] == ["a/", "b/", "d/", "é/"]
    r = s3.list_objects_v2(Bucket="list", Prefix="a/", Delimiter="/")
    assert [o["Key"] for o in r["Contents"]] == ["a/1", "a/2"]
    assert [p["Prefix"] for p in r["CommonPrefixes"]] == ["a/b/"]
    seen, token = [], None
    while True:
        kw = {"ContinuationToken": token} if token else {}
        r = s3.list_objects_v2(Bucket="list", MaxKeys=2, **kw)
        seen += [o["Key"] for o in r.get("Contents", [])]
        if not r["IsTruncated"]:
            break
        token = r["NextContinuationToken"]
    assert seen == sorted(names, key=lambda s: s.encode())
    assert [o["Key"] for o in s3.list_objects_v2(Bucket="list", StartAfter="b/4")["Contents"]] == \
        ["c", "d/5", "é/6"]
    r = s3.list_objects(Bucket="list", Marker="a/b/3", MaxKeys=2)
    assert [o["Key"] for o in r["Contents"]] == ["b/4", "c"] and r["IsTruncated"]
    paginated = [o["Key"] for page in s3.get_paginator("list_objects").paginate(
        Bucket="list", PaginationConfig={"PageSize": 3}) for o in page.get("Contents", [])]
    assert paginated == sorted(names, key=lambda s: s.encode())


def test_multipart_upload_by_hand(s3, gateway):
    s3.create_bucket(Bucket="mpu")
    up = s3.create_multipart_upload(Bucket="mpu", Key="big", ContentType="video/mp4")
    uid = up["UploadId"]
    parts = [blob(5 * MiB, seed=i) for i in range(2)] + [blob(1000, seed=7)]
    etags = []
    for n, data in enumerate(parts, 1):
        etags.append(s3.upload_part(Bucket="mpu", Key="big", UploadId=uid, PartNumber=n,
                                    Body=data)["ETag"])
    listed = s3.list_parts(Bucket="mpu", Key="big", UploadId=uid)["Parts"]
    assert [p["PartNumber"] for p in listed] == [1, 2, 3] and listed[2]["Size"] == 1000
    ups = s3.list_multipart_uploads(Bucket="mpu")["Uploads"]
    assert [(u["Key"], u["UploadId"]) for u in ups] == [("big", uid)]
    with pytest.raises(ClientError) as e:
        s3.complete_multipart_upload(Bucket="mpu", Key="big", UploadId=uid, MultipartUpload={
            "Parts": [{"PartNumber": 1, "ETag": etags[0]}, {"PartNumber": 3, "ETag": '"00"'}]})
    assert code_of(e.value) == "InvalidPart"
    r = s3.complete_multipart_upload(Bucket="mpu", Key="big", UploadId=uid, MultipartUpload={
        "Parts": [{"PartNumber": n, "ETag": t} for n, t in enumerate(etags, 1)]})
    want = hashlib.md5(b"".join(hashlib.md5(p).digest() for p in parts)).hexdigest() + "-3"
    assert r["ETag"] == f'"{want}"'
    whole = b"".join(parts)
    assert s3.get_object(Bucket="mpu", Key="big")["Body"].read() == whole
    cross = s3.get_object(Bucket="mpu", Key="big", Range=f"bytes={5 * MiB - 10}-{5 * MiB + 9}")
    assert cross["Body"].read() == whole[5 * MiB - 10:5 * MiB + 10]
    assert s3.list_multipart_uploads(Bucket="mpu").get("Uploads", []) == []
    up2 = s3.create_multipart_upload(Bucket="mpu", Key="gone")["UploadId"]
    s3.upload_part(Bucket="mpu", Key="gone", UploadId=up2, PartNumber=1, Body=b"abc")
    s3.abort_multipart_upload(Bucket="mpu", Key="gone", UploadId=up2)
    with pytest.raises(ClientError) as e:
        s3.list_parts(Bucket="mpu", Key="gone", UploadId=up2)
    assert code_of(e.value) == "NoSuchUpload"


def test_upload_file_and_download_file_in_parts(s3, tmp_path):
    s3.create_bucket(Bucket="files")
    src = tmp_path / "big.bin"
    src.write_bytes(os.urandom(20 * 1000 * 1000))
    cfg = TransferConfig(multipart_threshold=5 * MiB, multipart_chunksize=5 * MiB, max_concurrency=4)
    s3.upload_file(str(src), "files", "big.bin", Config=cfg)
    head = s3.head_object(Bucket="files", Key="big.bin")
    assert head["ContentLength"] == src.stat().st_size and head["ETag"].endswith('-4"')
    dst = tmp_path / "copy.bin"
    s3.download_file("files", "big.bin", str(dst), Config=cfg)
    assert dst.read_bytes() == src.read_bytes()


def test_presigned_get_and_put_with_a_plain_http_client(s3):
    s3.create_bucket(Bucket="pre")
    url = s3.generate_presigned_url("put_object", Params={"Bucket": "pre", "Key": "up.txt"},
                                    ExpiresIn=60)
    req = urllib.request.Request(url, data=b"presigned body", method="PUT")
    with urllib.request.urlopen(req, timeout=30) as r:
        assert r.status == 200
    url = s3.generate_presigned_url("get_object", Params={"Bucket": "pre", "Key": "up.txt"},
                                    ExpiresIn=60)
    with urllib.request.urlopen(url, timeout=30) as r:
        assert r.read() == b"presigned body"
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url.replace("up.txt", "up2.txt"), timeout=30)
    assert e.value.code == 403 and b"SignatureDoesNotMatch" in e.value.read()
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(url.split("?")[0], timeout=30)
    assert e.value.code == 403 and b"AccessDenied" in e.value.read()


def test_bad_credentials_and_public_read(gateway, s3):
    with pytest.raises(ClientError) as e:
        s3_client(gateway, secret="wrong").list_buckets()
    assert code_of(e.value) == "SignatureDoesNotMatch"
    with pytest.raises(ClientError) as e:
        s3_client(gateway, key="AKIAUNKNOWN").list_buckets()
    assert code_of(e.value) == "InvalidAccessKeyId"
    s3.create_bucket(Bucket="public", ACL="public-read")
    s3.put_object(Bucket="public", Key="logo.png", Body=b"\x89PNG....", ContentType="image/png")
    with urllib.request.urlopen(f"http://{gateway.addr}/public/logo.png", timeout=30) as r:
        assert r.read() == b"\x89PNG...." and r.headers["Content-Type"] == "image/png"
    s3.create_bucket(Bucket="private")
    s3.put_object(Bucket="private", Key="x", Body=b"secret")
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(f"http://{gateway.addr}/private/x", timeout=30)
    assert e.value.code == 403


def test_unsupported_operations_say_not_implemented(s3):
    s3.create_bucket(Bucket="unsup")
    with pytest.raises(ClientError) as e:
        s3.put_bucket_tagging(Bucket="unsup", Tagging={"TagSet": [{"Key": "a", "Value": "b"}]})
    assert code_of(e.value) == "NotImplemented"
    with pytest.raises(ClientError) as e:
        s3.get_bucket_lifecycle_configuration(Bucket="unsup")
    assert code_of(e.value) == "NotImplemented"


def test_abandoned_uploads_are_cleaned_and_their_bytes_freed(s3, gateway, cluster):
    s3.create_bucket(Bucket="stale")
    uid = s3.create_multipart_upload(Bucket="stale", Key="k")["UploadId"]
    s3.upload_part(Bucket="stale", Key="k", UploadId=uid, PartNumber=1, Body=b"x" * 1000)
    path = gateway.metadb[len("sqlite:///"):]
    with sqlite3.connect(path) as db:
        part_blob = db.execute("SELECT blob FROM gateway_s3_part WHERE upload_id = ?",
                               (uid,)).fetchone()[0]
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if not s3.list_multipart_uploads(Bucket="stale").get("Uploads"):
            break
        time.sleep(0.5)
    assert not s3.list_multipart_uploads(Bucket="stale").get("Uploads")
    with Client(cluster.master_addr, token=cluster.token) as c:
        with pytest.raises(NotFoundError):
            c.get(part_blob)
