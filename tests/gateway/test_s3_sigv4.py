"""SigV4 verification against AWS's documented examples and botocore's own signer."""
from __future__ import annotations

import calendar
import hashlib
import io
import time
from urllib.parse import parse_qsl, unquote, urlsplit

import pytest
from botocore.auth import S3SigV4Auth, S3SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

from speedy.gateway.s3 import sigv4
from speedy.gateway.s3.chunked import AwsChunkedReader, BodyError
from speedy.gateway.s3.sigv4 import AuthError

AKID, SECRET = "AKIAIOSFODNN7EXAMPLE", "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
DOC_NOW = calendar.timegm((2013, 5, 24, 0, 0, 0))
secrets = {AKID: SECRET}.get


def test_the_documented_get_object_example():
    """AWS's 'GET Object' example: the signature it documents must verify."""
    headers = {"host": "examplebucket.s3.amazonaws.com", "range": "bytes=0-9",
               "x-amz-content-sha256": sigv4.EMPTY_SHA256, "x-amz-date": "20130524T000000Z",
               "authorization": "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/"
                                "aws4_request,SignedHeaders=host;range;x-amz-content-sha256;x-amz-date,"
                                "Signature=f0e8bdb87c964420e857bd35b5d6ed310bd44f0170aba48dd91039c6036bdb41"}
    v = sigv4.verify_header("GET", "/test.txt", "", headers, secrets, now=DOC_NOW)
    assert v.access_key == AKID
    headers["range"] = "bytes=0-10"
    with pytest.raises(AuthError) as e:
        sigv4.verify_header("GET", "/test.txt", "", headers, secrets, now=DOC_NOW)
    assert e.value.code == "SignatureDoesNotMatch"


def test_the_documented_chunked_upload_example():
    """AWS's streaming example: seed signature, two data chunks and the final chunk."""
    headers = {"host": "s3.amazonaws.com", "x-amz-date": "20130524T000000Z",
               "x-amz-storage-class": "REDUCED_REDUNDANCY", "content-encoding": "aws-chunked",
               "x-amz-decoded-content-length": "66560", "content-length": "66824",
               "x-amz-content-sha256": sigv4.STREAMING_SIGNED,
               "authorization": "AWS4-HMAC-SHA256 Credential=AKIAIOSFODNN7EXAMPLE/20130524/us-east-1/s3/"
                                "aws4_request,SignedHeaders=content-encoding;content-length;host;"
                                "x-amz-content-sha256;x-amz-date;x-amz-decoded-content-length;"
                                "x-amz-storage-class,Signature=4f232c4386841ef735655705268965c44a0e4690"
                                "baa4adea153f7db9fa80a0a9"}
    v = sigv4.verify_header("PUT", "/examplebucket/chunkObject.txt", "", headers, secrets, now=DOC_NOW)
    body = (b"10000;chunk-signature=ad80c730a21e5b8d04586a2213dd63b9a0e99e0e2307b0ade35a65485a288648\r\n"
            + b"a" * 65536 + b"\r\n"
            + b"400;chunk-signature=0055627c9e194cb4542bae2aa5492e3c1575bbb81b612b7d234b86a503ef5497\r\n"
            + b"a" * 1024 + b"\r\n"
            + b"0;chunk-signature=b6c6ea8a5354eaf15b3cb7646744f4275b71ea724fed81ceb9323e279d449df9\r\n\r\n")
    assert len(body) == 66824
    reader = AwsChunkedReader(io.BytesIO(body).read, v.payload_hash, v, decoded_length=66560)
    assert reader.read(70000) == b"a" * 66560 and reader.read(10) == b"" and reader.done
    bad = body.replace(b"a" * 1024, b"a" * 1023 + b"b")
    with pytest.raises(AuthError):
        AwsChunkedReader(io.BytesIO(bad).read, v.payload_hash, v).read()
    with pytest.raises(BodyError):
        AwsChunkedReader(io.BytesIO(body[:-40]).read, v.payload_hash, v).read()


def botocore_signed(method: str, url: str, body: bytes = b"",
                    headers: dict | None = None) -> tuple[str, str, str, dict]:
    """Sign a request with botocore's S3 signer; (method, raw path, raw query, headers)."""
    req = AWSRequest(method=method, url=url, data=body, headers=headers or {})
    S3SigV4Auth(Credentials(AKID, SECRET), "s3", "us-east-1").add_auth(req)
    prepared = req.prepare()
    parts = urlsplit(prepared.url)
    hdrs = {k.lower(): v for k, v in prepared.headers.items()}
    hdrs.setdefault("host", parts.netloc)
    return method, unquote(parts.path), parts.query, hdrs


@pytest.mark.parametrize("path,query", [("/bucket/photo.jpg", ""),
                                        ("/bucket/dir/a%20b%2Bc%3D%C3%A9.jpg", ""),
                                        ("/bucket", "list-type=2&prefix=a%2Fb&delimiter=%2F"),
                                        ("/bucket/k", "uploads="), ("/bucket/k", "partNumber=3&uploadId=x~y")])
def test_botocore_signed_requests_verify(path, query):
    url = "http://127.0.0.1:8088" + path + ("?" + query if query else "")
    m, p, q, h = botocore_signed("PUT", url, b"hello", {"Content-Type": "image/jpeg",
                                                       "x-amz-meta-owner": "  a   b "})
    v = sigv4.verify_header(m, p, q, h, secrets)
    assert v.payload_hash == hashlib.sha256(b"hello").hexdigest()
    with pytest.raises(AuthError) as e:
        sigv4.verify_header(m, p, q, {**h, "x-amz-meta-owner": "c"}, secrets)
    assert e.value.code == "SignatureDoesNotMatch"
    with pytest.raises(AuthError) as e:
        sigv4.verify_header(m, p, q, h, {"OTHER": SECRET}.get)
    assert e.value.code == "InvalidAccessKeyId"
    with pytest.raises(AuthError) as e:
        sigv4.verify_header("POST", p, q, h, secrets)
    assert e.value.code == "SignatureDoesNotMatch"


def test_a_skewed_clock_is_refused():
    m, p, q, h = botocore_signed("GET", "http://127.0.0.1:8088/b/k")
    sigv4.verify_header(m, p, q, h, secrets, now=time.time() + 600)
    with pytest.raises(AuthError) as e:
        sigv4.verify_header(m, p, q, h, secrets, now=time.time() + 3600)
    assert e.value.code == "RequestTimeTooSkewed"


def test_presigned_urls_verify_and_expire():
    req = AWSRequest(method="GET", url="http://127.0.0.1:8088/bucket/a%20b.jpg")
    S3SigV4QueryAuth(Credentials(AKID, SECRET), "s3", "us-east-1", expires=60).add_auth(req)
    parts = urlsplit(req.url)
    query = dict(parse_qsl(parts.query))
    headers = {"host": "127.0.0.1:8088"}
    v = sigv4.verify_presigned("GET", unquote(parts.path), parts.query, query, headers, secrets)
    assert v.payload_hash == sigv4.UNSIGNED_PAYLOAD
    with pytest.raises(AuthError) as e:
        sigv4.verify_presigned("GET", unquote(parts.path), parts.query, query, headers, secrets,
                               now=time.time() + 120)
    assert e.value.code == "AccessDenied" and "expired" in e.value.message
    with pytest.raises(AuthError) as e:
        sigv4.verify_presigned("GET", "/bucket/a c.jpg", parts.query, query,
                               headers, secrets)
    assert e.value.code == "SignatureDoesNotMatch"


@pytest.mark.parametrize("value", ["AWS AKID:sig", "AWS4-HMAC-SHA256 Credential=x",
                                   "AWS4-HMAC-SHA256 Credential=A/2013/us/s3/aws4_request, "
                                   "SignedHeaders=host, Signature=0"])
def test_malformed_authorization_is_a_clear_error(value):
    h = {"authorization": value, "host": "h", "x-amz-date": "20130524T000000Z",
         "x-amz-content-sha256": sigv4.EMPTY_SHA256}
    with pytest.raises(AuthError) as e:
        sigv4.verify_header("GET", "/", "", h, secrets, now=DOC_NOW)
    assert e.value.status == 400 and e.value.message


def test_unsigned_trailer_body_checks_its_crc32():
    import base64
    import zlib
    data = b"x" * 10000
    crc = base64.b64encode(zlib.crc32(data).to_bytes(4, "big")).decode()
    body = (b"2000\r\n" + data[:8192] + b"\r\n" + b"710\r\n" + data[8192:] + b"\r\n0\r\n"
            + f"x-amz-checksum-crc32:{crc}\r\n\r\n".encode())
    r = AwsChunkedReader(io.BytesIO(body).read, sigv4.STREAMING_UNSIGNED_TRAILER, None,
                         trailer="x-amz-checksum-crc32", decoded_length=10000)
    assert r.read() == data
    wrong = body.replace(crc.encode(), b"AAAAAA==")
    with pytest.raises(BodyError) as e:
        AwsChunkedReader(io.BytesIO(wrong).read, sigv4.STREAMING_UNSIGNED_TRAILER, None,
                         trailer="x-amz-checksum-crc32").read()
    assert e.value.code == "BadDigest"


@pytest.mark.parametrize("size", [b"0x5", b"+5", b"-5", b"0_5", b"", b" ", b"5 5", b"1" * 17, b"zz"])
def test_aws_chunked_size_lines_are_hex_digits_only(size):
    body = size + b"\r\nhello\r\n0\r\n\r\n"
    with pytest.raises(BodyError) as e:
        AwsChunkedReader(io.BytesIO(body).read, sigv4.STREAMING_UNSIGNED_TRAILER, None).read()
    assert e.value.code == "InvalidChunkSizeError"
    ok = AwsChunkedReader(io.BytesIO(b"5\r\nhello\r\n0\r\n\r\n").read,
                          sigv4.STREAMING_UNSIGNED_TRAILER, None)
    assert ok.read() == b"hello" and ok.done
