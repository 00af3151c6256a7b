"""The gateway's HTTP/1.1 server over raw sockets: framing, keep-alive, malformed input.

A gateway without a master is enough: /metrics answers 200, the blob routes 503.
"""
from __future__ import annotations

import re
import socket
import time

import pytest

from speedy.gateway import server
from speedy.gateway.server import BadRequest, parse_head
from tests.support.gateway import Gateway


@pytest.fixture(scope="module")
def gw(tmp_path_factory):
    with Gateway(None, tmp_path_factory.mktemp("server"), master="127.0.0.1:1") as g:
        yield g


def statuses(answer: bytes) -> list[int]:
    """The status of each answer in a stream of answers with Content-Length bodies."""
    out = []
    while answer:
        head, _, rest = answer.partition(b"\r\n\r\n")
        out.append(int(head[9:12]))
        length = re.search(rb"\r\nContent-Length: (\d+)", head)
        answer = rest[int(length.group(1)) if length else 0:]
    return out


def test_keep_alive_and_pipelining(gw):
    one = b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n"
    answer = gw.exchange(one * 3 + b"GET /nowhere HTTP/1.1\r\nHost: x\r\n"
                      b"Connection: close\r\n\r\n", half_close=False)
    assert statuses(answer) == [200, 200, 200, 404]
    assert answer.count(b"Connection: close") == 1


def test_http_1_0_closes_unless_asked(gw):
    answer = gw.exchange(b"GET /metrics HTTP/1.0\r\n\r\n", half_close=False)
    assert statuses(answer) == [200] and b"Connection: close" in answer
    answer = gw.exchange(b"GET /metrics HTTP/1.0\r\nConnection: keep-alive\r\n\r\n"
                      b"GET /nowhere HTTP/1.0\r\n\r\n", half_close=False)
    assert statuses(answer) == [200, 404]


def test_head_has_no_body(gw):
    answer = gw.exchange(b"HEAD /nowhere HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, body = answer.partition(b"\r\n\r\n")
    assert statuses(answer) == [404] and body == b"" and b"Content-Length: " in head


@pytest.mark.parametrize("request_bytes,status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /metrics HTTP/2.0\r\n\r\n", 505),
    (b"GET /metrics FTP/1.0\r\n\r\n", 400),
    (b"get /metrics HTTP/1.1\r\n\r\n", 400),
    (b"GET metrics HTTP/1.1\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nno colon here\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nBad Name: x\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nX: a\x01b\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nX: " + b"a" * (70 << 10) + b"\r\n\r\n", 431),
    (b"POST /blobs HTTP/1.1\r\nContent-Length: -1\r\n\r\n", 400),
    (b"POST /blobs HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxx", 400),
    (b"POST /blobs HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 501),
    (b"POST /blobs HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nHost: x", 400),
])
def test_malformed_requests_get_one_line_4xx(gw, request_bytes, status):
    answer = gw.exchange(request_bytes)
    assert statuses(answer) == [status], answer[:200]
    head, _, body = answer.partition(b"\r\n\r\n")
    assert b"Content-Type: text/plain" in head and body.count(b"\n") == 1 and body.strip()


@pytest.mark.parametrize("body", [
    b"zz\r\nhello\r\n0\r\n\r\n",    # a bad chunk size
    b"0x5\r\nhello\r\n0\r\n\r\n",   # what int(s, 16) would take but the grammar does not
    b"+5\r\nhello\r\n0\r\n\r\n",
    b"5\r\nhello",                     # cut after a chunk's data, before its CRLF
    b"5\r\nhello\r",                   # cut inside that CRLF
    b"5\r\nhello" + b"x" * 5000,       # no CRLF after the chunk, a long line instead
    b"5\r\nhello\r\n0\r\nX-T: 1\r\n",  # cut in the trailers
    b"5",                              # cut in a chunk size line
])
def test_malformed_or_cut_chunked_body_is_a_400(gw, body):
    answer = gw.exchange(b"POST /blobs HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
                      b"\r\n" + body)
    # the body is read (and its framing refused) before the master is asked
    assert statuses(answer)[0] == 400, answer[:200]
    assert b"malformed chunked body" in answer, answer[:200]


def test_expect_100_continue(gw):
    with socket.create_connection(("127.0.0.1", gw.port), timeout=20) as s:
        s.sendall(b"POST /blobs HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
                  b"Expect: 100-continue\r\nConnection: close\r\n\r\n")
        first = s.recv(65536)
        if first.startswith(b"HTTP/1.1 100"):
            s.sendall(b"hello")
            first = first.split(b"\r\n\r\n", 1)[1] or s.recv(65536)
        assert first.startswith(b"HTTP/1.1 503"), first  # no master: 503, one line


@pytest.mark.parametrize("path,status,reason", [
    (b"/3,10452", 503, b"master"),                   # a key: the blob route (no master here)
    (b"/70000,5", 400, b"malformed key"),            # the key grammar, out of range
    (b"/123456,5", 404, b"malformed key '123456,5'"),  # not the key grammar (5 digits)
    (b"/\xd9\xa3,5", 404, b"malformed key"),         # digits are ASCII digits only
])
def test_the_key_route_takes_the_wire_key_grammar(gw, path, status, reason):
    answer = gw.exchange(b"GET " + path + b" HTTP/1.1\r\nHost: x\r\n\r\n")
    assert statuses(answer) == [status], answer[:300]
    assert reason in answer.partition(b"\r\n\r\n")[2], answer[:300]


def test_header_names_map_to_environ_keys_whatever_their_case():
    for name in (b"X-Trace-Id", b"x-trace-id", b"X-TRACE-ID"):
        env: dict = {}
        assert parse_head(b"GET /a HTTP/1.1\r\n" + name + b": 7\r\nContent-type: t/p", env) \
            == ("HTTP/1.1", True)
        assert env["HTTP_X_TRACE_ID"] == "7" and env["CONTENT_TYPE"] == "t/p"
    env = {}
    parse_head(b"GET /a HTTP/1.1\r\nX-A: 1\r\nx-a: 2\r\nContent-Length: 3\r\n"
               b"content-length: 3", env)
    assert env["HTTP_X_A"] == "1,2" and env["CONTENT_LENGTH"] == "3"
    env = {}
    parse_head(b"GET /a HTTP/1.1\r\nX-\xe9\xa0: v\xe9", env)   # latin-1, as WSGI has it
    assert env["HTTP_X-\xc9\xa0".replace("-", "_")] == "v\xe9"
    for bad in (b"X-A : 1", b" X-A: 1", b"X A: 1", b": 1"):
        with pytest.raises(BadRequest, match="malformed header field"):
            parse_head(b"GET /a HTTP/1.1\r\n" + bad, {})


def test_remembered_header_names_are_bounded():
    for i in range(server.HEADER_KEYS_MAX + 50):
        env: dict = {}
        parse_head(b"GET /a HTTP/1.1\r\nX-Name-%d: v" % i, env)
        assert env[f"HTTP_X_NAME_{i}"] == "v"
    assert server.header_key.cache_info().currsize <= server.HEADER_KEYS_MAX


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    """A gateway whose connections may wait 1 s."""
    with Gateway(None, tmp_path_factory.mktemp("quick"), master="127.0.0.1:1",
                 extra=["--idle_timeout=1"]) as g:
        yield g


def answer_within(sock: socket.socket, seconds: float) -> bytes:
    """Everything received until the gateway closes (fails if it keeps it open)."""
    sock.settimeout(seconds)
    out = b""
    while chunk := sock.recv(65536):
        out += chunk
    return out


def test_idle_and_slow_heads_are_cut_at_the_timeout(quick):
    with socket.create_connection(("127.0.0.1", quick.port)) as idle, \
            socket.create_connection(("127.0.0.1", quick.port)) as slow:
        slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")   # the head never ends
        assert answer_within(idle, 5) == b""                    # closed without a word
        answer = answer_within(slow, 5)
    assert statuses(answer) == [408]
    assert answer.endswith(b"request head not received within 1 s\n")


def test_the_timeout_is_per_wait_not_per_connection(quick):
    with socket.create_connection(("127.0.0.1", quick.port), timeout=5) as s:
        for _ in range(6):   # 3 s of requests 0.5 s apart on one connection
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
            head = s.recv(65536)
            assert head.startswith(b"HTTP/1.1 200 ")
            length = int(re.search(rb"\r\nContent-Length: (\d+)", head).group(1))
            body = head.partition(b"\r\n\r\n")[2]
            while len(body) < length:
                body += s.recv(65536)
            time.sleep(0.5)


def test_a_stalled_upload_body_is_cut(quick):
    with socket.create_connection(("127.0.0.1", quick.port)) as s:
        s.sendall(b"POST /blobs HTTP/1.1\r\nHost: x\r\nContent-Length: 100\r\n\r\n12345")
        answer = answer_within(s, 5)
    assert answer == b"" or statuses(answer)[0] >= 400
