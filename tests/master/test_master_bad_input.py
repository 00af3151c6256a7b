"""Bad input to the real spy_master.py: 4xx with a plain-text reason, never a 500 or crash."""
from __future__ import annotations

import json
import socket
import time

import pytest

from tests.support.master import MasterProc, http

OK = {"GroupId": 1, "Ip": "10.0.0.1", "Port": 8000}
INIT = "/v1/chunkserver/initserver"
REPORT = "/v1/chunkserver/reportinfo"
BATCH = "/v1/chunkserver/batchinitserver"
SETSTATUS = "/v1/chunkserver/setstatus"


@pytest.fixture(scope="module")
def master(tmp_path_factory):
    m = MasterProc(tmp_path_factory.mktemp("bad"), heartbeat_timeout=30)
    m.start()
    m.register(1, "10.0.0.1", 8000)
    yield m
    m.cleanup()


def with_(**kw):
    d = dict(OK)
    for k, v in kw.items():
        if v is ...:
            d.pop(k)
        else:
            d[k] = v
    return d


CASES = [
    # (method, path, body, status, words in the reason)
    ("POST", INIT, b"{not json", 400, "malformed JSON"),
    ("POST", INIT, b"", 400, "empty body"),
    ("POST", INIT, b"\xff\xfe{}", 400, "UTF-8"),
    ("POST", INIT, b"[" * 100000 + b"]" * 100000, 400, "JSON"),
    ("POST", INIT, b'{"GroupId": NaN, "Ip": "1.2.3.4", "Port": 1}', 400, "NaN"),
    ("POST", INIT, b"[1, 2]", 400, "JSON object"),
    ("POST", INIT, b'"text"', 400, "JSON object"),
    ("POST", INIT, with_(GroupId=...), 400, "missing field GroupId"),
    ("POST", INIT, with_(Ip=...), 400, "missing field Ip"),
    ("POST", INIT, with_(Port=...), 400, "missing field Port"),
    ("POST", INIT, with_(GroupId=0), 400, "GroupId = 0 is out of range"),
    ("POST", INIT, with_(GroupId=65536), 400, "GroupId = 65536 is out of range"),
    ("POST", INIT, with_(GroupId=-1), 400, "out of range"),
    ("POST", INIT, with_(GroupId=True), 400, "GroupId must be an integer"),
    ("POST", INIT, with_(GroupId="1"), 400, "GroupId must be an integer"),
    ("POST", INIT, with_(GroupId=1.0), 400, "GroupId must be an integer"),
    ("POST", INIT, with_(GroupId=10 ** 30), 400, "out of range"),
    ("POST", INIT, with_(Port=0), 400, "Port = 0 is out of range"),
    ("POST", INIT, with_(Port=65536), 400, "Port = 65536 is out of range"),
    ("POST", INIT, with_(Port=False), 400, "Port must be an integer"),
    ("POST", INIT, with_(Port=None), 400, "missing field Port"),
    ("POST", INIT, with_(Ip=5), 400, "Ip must be a string"),
    ("POST", INIT, with_(Ip=""), 400, "not an address"),
    ("POST", INIT, with_(Ip="1.2.3.999"), 400, "not an address"),
    ("POST", INIT, with_(Ip="a b"), 400, "not an address"),
    ("POST", INIT, with_(Ip="x" * 300), 400, "not an address"),
    ("POST", BATCH, OK, 400, "JSON array"),
    ("POST", BATCH, [OK, 5], 400, "element 1"),
    ("POST", BATCH, [with_(Port=70000)], 400, "element 0: field Port"),
    ("POST", REPORT, with_(Ip="10.9.9.9"), 400, "not registered"),
    ("POST", REPORT, with_(TotalFreeSpace=-5), 400, "TotalFreeSpace = -5"),
    ("POST", REPORT, with_(TotalFreeSpace="5"), 400, "TotalFreeSpace must be an integer"),
    ("POST", REPORT, with_(MaxFreeSpace=True), 400, "MaxFreeSpace must be an integer"),
    ("POST", REPORT, with_(PendingWrites=2 ** 63), 400, "out of range"),
    ("POST", REPORT, with_(Status=2), 400, "Status = 2"),
    ("POST", REPORT, with_(DataDir=7), 400, "DataDir"),
    ("POST", REPORT, with_(DataDir="d" * 5000), 400, "DataDir"),
    ("POST", SETSTATUS, {"Ip": "10.0.0.1", "Port": 8000, "Status": 4}, 400, "Status = 4"),
    ("POST", SETSTATUS, {"Ip": "10.0.0.1", "Port": 8000}, 400, "missing field Status"),
    ("POST", SETSTATUS, {"Ip": "10.0.0.1", "Port": 8000, "Status": 1, "GroupId": 0}, 400,
     "GroupId"),
    ("POST", SETSTATUS, {"Ip": "10.0.0.9", "Port": 8000, "Status": 1}, 404, "no chunkserver"),
    ("GET", "/v1/chunkserver/0/groupinfo", None, 400, "1..65535"),
    ("GET", "/v1/chunkserver/65536/groupinfo", None, 400, "1..65535"),
    ("GET", "/v1/chunkserver/abc/groupinfo", None, 400, "not an integer"),
    ("GET", "/v1/chunkserver/-1/groupinfo", None, 400, "not an integer"),
    ("GET", "/v1/chunkserver//groupinfo", None, 400, "not an integer"),
    ("GET", "/v1/chunkserver/99999999999999999999/groupinfo", None, 400, "1..65535"),
    ("GET", "/nothing", None, 404, "no such route"),  # GET / is the web console
    ("GET", "/v1/chunkmaster/nothing", None, 404, "no such route"),
    ("GET", "/v1/chunkserver/1/groupinfo/x", None, 404, "no such route"),
    ("POST", "/v1/chunkmaster/route", b"{}", 405, "not allowed"),
    ("GET", INIT, None, 405, "not allowed"),
    ("PUT", REPORT, OK, 405, "not allowed"),
    ("DELETE", "/v1/chunkmaster/fid", None, 405, "not allowed"),
    ("POST", "/metrics", b"", 405, "not allowed"),
]


@pytest.mark.parametrize("method,path,body,status,reason", CASES,
                         ids=[f"{c[0]}-{c[1].rsplit('/', 1)[-1] or 'root'}-{i}"
                              for i, c in enumerate(CASES)])
def test_bad_input_gets_a_4xx_with_a_reason(master, method, path, body, status, reason):
    r = http(master.port, method, path, body)
    assert r.status == status, (r.status, r.text)
    assert r.headers["content-type"].startswith("text/plain")
    assert reason in r.text, r.text
    assert len(r.text) < 400 and "Traceback" not in r.text
    if status == 405:
        assert r.headers.get("allow")


def test_oversized_body_is_413_with_a_reason(master):
    r = http(master.port, "POST", INIT, b"{" + b" " * (2 << 20) + b"}")
    assert r.status == 413 and "larger than the limit" in r.text
    # Announced but never sent: answered at once, connection closed, no waiting.
    with socket.create_connection(("127.0.0.1", master.port), timeout=10) as s:
        s.sendall(b"POST /v1/chunkserver/initserver HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Length: 1073741824\r\n\r\n{")
        t0 = time.monotonic()
        data = b""
        while True:
            chunk = s.recv(65536)
            if not chunk:
                break
            data += chunk
        assert data.startswith(b"HTTP/1.1 413") and b"larger than the limit" in data
        assert time.monotonic() - t0 < 5
    # Chunked and too large.
    with socket.create_connection(("127.0.0.1", master.port), timeout=10) as s:
        s.sendall(b"POST /v1/chunkserver/initserver HTTP/1.1\r\nHost: x\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        piece = b"a" * 65536
        try:
            for _ in range(20):
                s.sendall(b"%x\r\n%s\r\n" % (len(piece), piece))
        except OSError:
            pass  # the master answered and closed while we were still sending
        data = s.recv(4096)
        assert data.startswith(b"HTTP/1.1 413"), data[:100]


def test_malformed_http_and_vanishing_clients(master):
    for raw in (b"GARBAGE\r\n\r\n", b"GET / HTTP/1.1\r\nContent-Length: x\r\n\r\n",
                b"\x00\x01\x02\r\n\r\n"):
        with socket.create_connection(("127.0.0.1", master.port), timeout=10) as s:
            s.sendall(raw)
            assert s.recv(4096).split(b" ")[1][:1] == b"4"
    for _ in range(20):  # send half a request and vanish
        with socket.create_connection(("127.0.0.1", master.port), timeout=10) as s:
            s.sendall(b"POST /v1/chunkserver/initserver HTTP/1.1\r\nContent-Length: 100\r\n\r\n{")
    assert master.get("/v1/chunkmaster/route").status == 200


def test_token_with_an_oversized_body(tmp_path):
    m = MasterProc(tmp_path, token="t")
    try:
        m.start()
        r = http(m.port, "POST", INIT, b"x" * (3 << 20))
        assert r.status == 403
    finally:
        m.cleanup()


def test_master_is_still_up_and_never_answered_500(master):
    # Runs after the cases above (pytest keeps file order).
    assert master.alive()
    r = master.post(REPORT, OK)
    assert r.status == 200
    text = master.get("/metrics").text
    codes = [line for line in text.splitlines()
             if line.startswith("speedy_master_http_requests_total{")]
    assert codes and not [c for c in codes if 'code="500"' in c], codes
    assert sum(float(c.rsplit(" ", 1)[1]) for c in codes if 'code="4' in c) >= len(CASES)
    assert "Traceback" not in master.log_text() and "internal error" not in master.log_text()
    json.loads(master.get("/v1/chunkmaster/route").body)
