"""Fuzz of the gateway's HTTP face (hypothesis): odd and malformed requests to a real one.

Requests are drawn from the routes (blob keys, the original front end's /v1 paths, the
console, S3 buckets and objects, some SigV4-signed), odd header values (ranges, lengths,
chunked bodies, conditions, the path headers), odd bodies and mutations (cut short, sent
twice, bare LF, a header without a colon, a bad method or version), one to three of them
on a fresh connection, closed for writing after them. Every answer must be a well-formed
HTTP status line below 500 (or 501/505 for what is not supported), the gateway must close
the connection (no hang), and afterwards it must still serve with the same workers, no
traceback in its log, no more file descriptors than a few pooled connections, and every
line of its access log well-formed. The gateway keeps its metadata on SQLite, then on
PostgreSQL.

The default run is short; a measured run:
    SPEEDY_FUZZ_EXAMPLES=50000 python -m pytest -m slow -s tests/gateway/test_fuzz_http.py
"""
from __future__ import annotations

import os
import re
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from speedy.gateway.worker import ACCESS_FLUSH
from tests.support.cluster import cluster_fixture
from tests.support.daemon import session_pids
from tests.support.gateway import Gateway, access_lines

CI_EXAMPLES = 1000
LONG_EXAMPLES = int(os.environ.get("SPEEDY_FUZZ_EXAMPLES", "50000"))
ACCESS, SECRET = "AKIAFUZZ", "fuzz-secret"
STATUS_LINE = re.compile(rb"HTTP/1\.[01] (\d{3}) [^\r\n]*\r\n")
NOT_SUPPORTED = {501, 505}   # a transfer coding, S3 sub-resource or HTTP version (RFC 9110)

cluster = cluster_fixture(groups=1, per_group=2, chunks=2, chunk_size=16 << 20, mem_blocks=16)


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def gateway(request, cluster, tmp_path_factory):
    """The gateway under test, its metadata on SQLite and then on PostgreSQL."""
    metadb = request.getfixturevalue("postgres").new_database() \
        if request.param == "postgresql" else None
    root = tmp_path_factory.mktemp("gateway")
    with Gateway(cluster, root, metadb=metadb,
                 extra=[f"--s3_access_key={ACCESS}", f"--s3_secret_key={SECRET}",
                        "--timeout=3", "--idle_timeout=5",
                        f"--access_log={root / 'access.log'}"]) as gw:
        gw.access_log = str(root / "access.log")
        yield gw


PATHS = [
    "/", "/blobs", "/blobs/", "/{key}", "/{key}?expires=1&sig=x", "/1,", "/,", "/1,zz",
    "/99999999999999999999,1", "/{key}m", "/0,0", "/-1,5", "/1,ffffffffffffffffffff",
    "/v1/file", "/v1/upload", "/v1/delete", "/v1/move", "/v1/fileinfo", "/v1/list_directory",
    "/v1/list_descendant", "/metrics", "/healthz", "/ui/", "/ui/files", "/ui/files?prefix=%ff",
    "/ui/upload", "/ui/delete", "/ui/x/../../etc/passwd", "/fuzz", "/fuzz/key", "/fuzz/a/b",
    "/fuzz?list-type=2&max-keys=-1", "/fuzz?list-type=2&continuation-token=!!!", "/fuzz?delete",
    "/fuzz/key?uploads", "/fuzz/key?uploadId=zzz&partNumber=0", "/fuzz/key?uploadId=zzz",
    "/fuzz?acl", "/fuzz?uploads&max-uploads=99999999999999999999", "/Bad_Bucket/x", "/%00/%00",
    "/fuzz/" + "k" * 2000, "/%zz", "/?" + "&" * 100, "*", "http://x/blobs", "/fuzz?location",
    "/fuzz?versioning", "/fuzz/key?partNumber=1&uploadId=" + "u" * 500,
]
HEADERS = {
    "Range": ["bytes=0-0", "bytes=-1", "bytes=5-", "bytes=9-3", "bytes=-0", "bytes=0-1,2-3",
              "bytes=abc", "items=0-1", "bytes=99999999999999999999999-", "bytes= 1 - 2", ""],
    "Content-Length": ["0", "5", "-1", "abc", "99999999999999999999", "10, 10", "1e3", "+5"],
    "Transfer-Encoding": ["chunked", "gzip", "chunked, gzip", "identity", "CHUNKED", ""],
    "Content-Type": ["image/png", "multipart/form-data; boundary=xyz", "multipart/form-data",
                     "text/html", "\x01\x02", "a" * 5000, "application/x-www-form-urlencoded"],
    "If-None-Match": ["*", '"x"', 'W/"x"', ",,,", '"' * 10],
    "If-Modified-Since": ["Thu, 01 Jan 1970 00:00:00 GMT", "garbage",
                          "Mon, 32 Foo 99999 99:99:99 GMT"],
    "If-Range": ['"x"', "Thu, 01 Jan 1970 00:00:00 GMT", "bad"],
    "Expect": ["100-continue", "200-ok"],
    "Connection": ["close", "keep-alive", "upgrade"],
    "Host": ["", "x" * 1000, "a:b:c"],
    "Path": ["/a/b", "", "/", "relative", "/" + "x" * 5000, "/a/../b", "/a\x00b", "/%ff"],
    "Index": ["0", "-1", "abc", "99999999999999999999", "1"],
    "Start": ["0", "-5", "x", "10"],
    "End": ["0", "5", "x", "99999999999999999999"],
    "Tag": ["v1", "", "x" * 300],
    "Src-Path": ["/a/b", "", "/nope"],
    "Dst-Path": ["/c/d", ""],
    "Authorization": ["AWS4-HMAC-SHA256 garbage", "Basic abc", "",
                      "AWS4-HMAC-SHA256 Credential=a/b/c/d/e, SignedHeaders=host, Signature=00"],
    "x-amz-content-sha256": ["UNSIGNED-PAYLOAD", "STREAMING-AWS4-HMAC-SHA256-PAYLOAD", "zz"],
    "x-amz-copy-source": ["/fuzz/key", "fuzz/nokey", "%", "/x"],
    "x-amz-copy-source-range": ["bytes=0-1", "bytes=5-1", "x"],
    "Content-MD5": ["xx", "1B2M2Y8AsgTpgAmY7PhCfg=="],
    "x-amz-decoded-content-length": ["5", "-1", "x"],
    "Content-Encoding": ["aws-chunked", "gzip"],
    "Cookie": ["a=b", "x" * 9000],
}
CHUNKED = [b"5\r\nhello\r\n0\r\n\r\n", b"zz\r\nhello\r\n0\r\n\r\n", b"5\r\nhel",
           b"5;ext=1\r\nhello\r\n0\r\nX-T: 1\r\n\r\n", b"ffffffffffffffffffff\r\n",
           b"0\r\n\r\n", b"-1\r\n\r\n", b"5\r\nhelloXX0\r\n\r\n"]
FORM = (b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="a.png"\r\n\r\n'
        b"DATA\r\n--xyz--\r\n")
XML = [b"<Delete><Object><Key>key</Key></Object></Delete>",
       b"<?xml version='1.0'?><!DOCTYPE x [<!ENTITY a 'b'>]><x>&a;</x>"]
METHODS = ["GET", "HEAD", "POST", "PUT", "DELETE"]
ODD_METHODS = ["OPTIONS", "PATCH", "TRACE", "CONNECT", "get", "G ET", "", "GET\x00", "X" * 300]
VERSIONS = ["HTTP/1.1"] * 12 + ["HTTP/1.0", "HTTP/2.0", "HTTP/1.1 x", ""]


def requests(key: str, port: int) -> st.SearchStrategy[bytes]:
    """One to three requests on one connection (kept alive between them)."""
    return st.lists(request(key, port), min_size=1, max_size=3).map(b"".join)


@st.composite
def request(draw, key: str, port: int) -> bytes:
    """One request's bytes, sometimes signed for the S3 API, sometimes mangled."""
    method = draw(st.sampled_from(ODD_METHODS) if draw(st.integers(0, 9)) == 0
                  else st.sampled_from(METHODS))
    path = draw(st.sampled_from(PATHS)).format(key=key)
    headers = [("Host", "127.0.0.1")]
    for name in draw(st.lists(st.sampled_from(sorted(HEADERS)), max_size=4)):
        headers.append((name, draw(st.sampled_from(HEADERS[name]))))
    if any(k == "Transfer-Encoding" and "chunked" in v.lower() for k, v in headers):
        body = draw(st.sampled_from(CHUNKED))
    else:
        body = draw(st.one_of(st.just(b""), st.binary(min_size=1, max_size=200),
                              st.just(FORM), st.sampled_from(XML)))
        if body and draw(st.booleans()) and \
                not any(k == "Content-Length" for k, _ in headers):
            headers.append(("Content-Length", str(len(body))))
    if path.startswith("/fuzz") and method in METHODS and draw(st.booleans()):
        headers = sign(method, path, headers, body, port)
    head = f"{method} {path} {draw(st.sampled_from(VERSIONS))}\r\n".encode("latin-1")
    head += b"".join(f"{k}: {v}\r\n".encode() for k, v in headers)
    mangle = draw(st.sampled_from(["", "", "", "", "cut", "twice", "lf", "nocolon", "fold"]))
    if mangle == "nocolon":
        head += b"NoColonHeader\r\n"
    elif mangle == "fold":
        head += b" folded continuation\r\n"
    elif mangle == "lf":
        head = head.replace(b"\r\n", b"\n")
    raw = head + b"\r\n" + body
    if mangle == "cut":
        raw = raw[:draw(st.integers(0, len(raw)))]
    elif mangle == "twice":
        raw += raw
    return raw


def sign(method: str, path: str, headers: list, body: bytes, port: int) -> list:
    """headers with a SigV4 signature of the request, as an S3 client sends it."""
    from botocore.auth import S3SigV4Auth
    from botocore.awsrequest import AWSRequest
    from botocore.credentials import Credentials
    url = f"http://127.0.0.1:{port}{path}"
    req = AWSRequest(method=method, url=url, data=body,
                     headers={k: v for k, v in headers if k not in ("Host", "Authorization")})
    S3SigV4Auth(Credentials(ACCESS, SECRET), "s3", "us-east-1").add_auth(req)
    return [("Host", f"127.0.0.1:{port}")] + [(k, v) for k, v in req.headers.items()
                                               if k.lower() != "host"]


@pytest.fixture(scope="module")
def target(gateway):
    """(port, the key of a blob the requests use, the key of one they never name, the
    gateway's processes), with a bucket and an object."""
    port = gateway.port
    key, kept = (re.search(rb'"key":"([^"]+)"', gateway.exchange(
        b"POST /blobs HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")).group(1)
        .decode() for _ in range(2))
    for path, body in (("/fuzz", b""), ("/fuzz/key", b"hello")):
        headers = sign("PUT", path, [("Content-Length", str(len(body)))], body, port)
        head = f"PUT {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers)
        assert gateway.exchange(head.encode() + b"\r\n" + body).startswith(b"HTTP/1.1 200")
    pids = sorted(session_pids(gateway.proc.pid))
    return port, key, kept, pids


def check(gateway, raw: bytes) -> None:
    out = gateway.exchange(raw)
    for m in STATUS_LINE.finditer(out):
        assert int(m.group(1)) < 500 or int(m.group(1)) in NOT_SUPPORTED, \
            f"{raw[:400]!r} -> {out[:400]!r}"
    assert out == b"" or STATUS_LINE.match(out), f"{raw[:400]!r} -> {out[:400]!r}"


def open_fds(pids: list[int]) -> int:
    """File descriptors the processes hold."""
    return sum(len(os.listdir(f"/proc/{pid}/fd")) for pid in pids)


def check_still_serving(gateway, key: str, pids: list[int], fds: int) -> None:
    out = gateway.exchange(f"GET /{key} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert out.startswith(b"HTTP/1.1 200 OK") and out.endswith(b"\r\n\r\nhello")
    assert sorted(session_pids(gateway.proc.pid)) == pids   # no worker died
    assert open_fds(pids) <= fds + 32   # no connection left open (chunkserver pools aside)
    log = open(gateway.log, encoding="utf-8", errors="replace").read()
    assert "Traceback" not in log and "internal error" not in log, log[-3000:]
    time.sleep(ACCESS_FLUSH + 0.5)
    assert access_lines(gateway.access_log)   # every line well-formed, whatever was sent


def fuzz(gateway, target, examples: int, derandomize: bool) -> None:
    """Send `examples` drawn requests, then check the gateway is as it was."""
    port, key, kept, pids = target
    fds = open_fds(pids)

    @settings(max_examples=examples, deadline=None, derandomize=derandomize,
              suppress_health_check=list(HealthCheck))
    @given(requests(key, port))
    def run(raw):
        check(gateway, raw)
    run()
    check_still_serving(gateway, kept, pids, fds)


def test_odd_requests_get_a_4xx_or_an_answer(gateway, target):
    fuzz(gateway, target, CI_EXAMPLES, derandomize=True)


@pytest.mark.slow
def test_odd_requests_long_run(gateway, target):
    fuzz(gateway, target, LONG_EXAMPLES, derandomize=False)
