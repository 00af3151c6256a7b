"""Connection floods never lock out the master (issue 11, item 7), against the real daemon:
idle sockets opened from this test, partial bodies, silent connections."""
from __future__ import annotations

import resource
import socket
import statistics
import time

import pytest

from tests.support import wait_for


def raise_nofile(need: int) -> None:
    """Raise this process's open-files limit to need (the master inherits it); skip if the
    hard limit is lower."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < need:
        pytest.skip(f"open-files hard limit {hard} < {need}")
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (need, hard))


def open_idle(port: int, n: int, source: str = "127.0.0.1") -> list[socket.socket]:
    """n connected sockets from source (a loopback address) that send nothing."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10, source_address=(source, 0))
        socks.append(s)
    return socks


def closed_by_peer(socks: list[socket.socket]) -> int:
    """How many of socks the master has closed (EOF or reset)."""
    n = 0
    for s in socks:
        s.setblocking(False)
        try:
            if s.recv(1) == b"":
                n += 1
        except BlockingIOError:
            pass
        except OSError:
            n += 1
    return n


def timed(fn) -> float:
    t0 = time.monotonic()
    fn()
    return time.monotonic() - t0


def beat(m, port: int = 8000) -> None:
    """One report and one route, each on a new connection; both must succeed."""
    r = m.report(1, "10.0.0.1", port)
    assert r.status == 200, r.text
    assert m.get("/v1/chunkmaster/route").status == 200


def test_reports_get_through_a_flood_of_idle_connections(masters, tmp_path):
    raise_nofile(4096)
    m = masters(tmp_path, "--max_connections=300", "--max_source_connections=200",
                "--read_timeout=30", "--idle_timeout=30", heartbeat_timeout=30)
    m.register(1, "10.0.0.1", 8000)
    socks = open_idle(m.port, 800)
    try:
        took = [timed(lambda: beat(m)) for _ in range(5)]
        assert m.route()["1"][0]["Status"] == 1
        wait_for(lambda: closed_by_peer(socks) >= 600, timeout=10,
                 what="the master to evict idle connections")
        gone = closed_by_peer(socks)
        print(f"\n800 idle connections, limits 300/200 per source: report+route "
              f"max {max(took) * 1000:.1f} ms; idle connections evicted: {gone}")
    finally:
        for s in socks:
            s.close()


def test_a_partial_body_gets_408_in_bounded_time(masters, tmp_path):
    m = masters(tmp_path, "--read_timeout=1", heartbeat_timeout=30)
    with socket.create_connection(("127.0.0.1", m.port), timeout=10) as s:
        t0 = time.monotonic()
        s.sendall(b"POST /v1/chunkserver/initserver HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Length: 1000\r\n\r\n{\"")
        answer = s.recv(4096)
        took = time.monotonic() - t0
    assert answer.startswith(b"HTTP/1.1 408 "), answer
    assert b"Connection: close" in answer
    print(f"\n408 after {took:.2f} s (read_timeout 1 s)")


def test_silent_and_idle_connections_are_closed(masters, tmp_path):
    m = masters(tmp_path, "--read_timeout=1", "--idle_timeout=2", heartbeat_timeout=30)
    silent = socket.create_connection(("127.0.0.1", m.port), timeout=10)
    headers_only = socket.create_connection(("127.0.0.1", m.port), timeout=10)
    headers_only.sendall(b"GET /v1/chunkmaster/route HTTP/1.1\r\nHost: x\r\n")  # no end
    kept = socket.create_connection(("127.0.0.1", m.port), timeout=10)
    kept.sendall(b"GET /v1/chunkserver/checkerror HTTP/1.1\r\nHost: x\r\n\r\n")
    answer = b""
    while not answer.endswith(b"\r\n\r\n0"):  # the whole answer: headers and body "0"
        answer += kept.recv(4096)
    assert answer.startswith(b"HTTP/1.1 200 ")
    try:
        t0 = time.monotonic()
        assert silent.recv(1) == b""        # no request line within read_timeout
        assert headers_only.recv(1) == b""  # headers not finished within read_timeout
        assert time.monotonic() - t0 < 9
        assert kept.recv(1) == b""          # keep-alive idle for idle_timeout
    finally:
        for s in (silent, headers_only, kept):
            s.close()


def test_busy_connections_are_not_evicted_and_the_newcomer_is_refused(masters, tmp_path):
    m = masters(tmp_path, "--max_source_connections=2", "--read_timeout=5",
                heartbeat_timeout=30)
    busy = []
    for _ in range(2):  # two requests in progress: their headers are not finished
        s = socket.create_connection(("127.0.0.1", m.port), timeout=10)
        s.sendall(b"GET /v1/chunkmaster/route HTTP/1.1\r\n")
        busy.append(s)
    time.sleep(0.3)
    try:
        late = socket.create_connection(("127.0.0.1", m.port), timeout=10)
        t0 = time.monotonic()
        assert late.recv(1) == b"" and time.monotonic() - t0 < 3  # refused at once
        late.close()
        busy[0].sendall(b"Host: x\r\n\r\n")  # the busy ones were kept and get answers
        assert busy[0].recv(4096).startswith(b"HTTP/1.1 200 ")
    finally:
        for s in busy:
            s.close()
    assert "speedy_master_rejected_connections_total 1.0" in m.get("/metrics").text


@pytest.mark.slow
def test_ten_thousand_idle_connections_with_the_defaults(masters, tmp_path):
    n = 10000
    raise_nofile(n + 1000)
    m = masters(tmp_path, heartbeat_timeout=30)
    for port in range(8000, 8010):
        m.register(1, "10.0.0.1", port)
    t0 = time.monotonic()
    socks = []
    took: list[float] = []
    try:
        while len(socks) < n:  # 20 sources; reports keep going while the flood builds up
            socks += open_idle(m.port, 500, f"127.0.1.{len(socks) // 500 + 1}")
            took += [timed(lambda p=p: beat(m, p)) for p in range(8000, 8010)]
        opened = time.monotonic() - t0
        for _ in range(10):
            took += [timed(lambda p=p: beat(m, p)) for p in range(8000, 8010)]
        statuses = set(m.statuses().values())
        metrics = m.get("/metrics").text
        rss = _rss_mb(m.proc.pid)
        gone = closed_by_peer(socks)
    finally:
        for s in socks:
            s.close()
    took.sort()
    print(f"\n{n} idle connections from 20 addresses opened in {opened:.1f} s; {len(took)} report+route pairs: "
          f"p50 {statistics.median(took) * 1000:.1f} ms, p99 "
          f"{took[int(len(took) * 0.99)] * 1000:.1f} ms, max {took[-1] * 1000:.1f} ms; "
          f"evicted {gone}; master RSS {rss:.0f} MB")
    assert statuses == {1}
    assert "speedy_master_rejected_connections_total" in metrics


def _rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")
