"""Reports to the master: a real HTTP server on loopback stands in for spy_master.py."""
from __future__ import annotations

import http.client
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from tests.support import free_port
from tests.support import wait_for
from speedy.wire.protocol import Err, Op

KEYS = ["GroupId", "Ip", "Port", "Status", "TotalFreeSpace", "MaxFreeSpace", "PendingWrites",
        "WritingCount", "ReadingCount", "DataDir", "TotalChunks", "ConnectionsCount"]


class FakeMaster:
    """Records every POST; answers 200 (or `status`)."""

    def __init__(self, port: int = 0, status: int = 200) -> None:
        self.reports: list[tuple[str, dict, dict]] = []
        fake = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802
                body = self.rfile.read(int(self.headers["Content-Length"]))
                fake.reports.append((self.path, dict(self.headers), json.loads(body)))
                self.send_response(fake.status)
                self.send_header("Content-Length", "2")
                self.end_headers()
                self.wfile.write(b"{}")

            def log_message(self, *args):
                pass

        self.status = status
        self.httpd = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.port = self.httpd.server_address[1]
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def master():
    m = FakeMaster()
    yield m
    m.close()


def test_reports_arrive_with_the_protocol_fields(servers, master):
    srv = servers("rep", master_port=master.port, report_interval=0.3, token="s3cret",
                  chunks=3, group_id=7)
    wait_for(lambda: len(master.reports) >= 2, timeout=20)
    path, headers, body = master.reports[-1]
    assert path == "/v1/chunkserver/reportinfo"
    assert headers.get("X-Speedy-Token") == "s3cret"
    assert headers.get("Content-Type") == "application/json"
    assert list(body) == KEYS
    chunk_free = (4 << 20) - 55
    assert body == {"GroupId": 7, "Ip": "127.0.0.1", "Port": srv.port, "Status": 0,
                    "TotalFreeSpace": 3 * chunk_free, "MaxFreeSpace": chunk_free,
                    "PendingWrites": 0, "WritingCount": 0, "ReadingCount": 0,
                    "DataDir": srv.data_dir, "TotalChunks": 3,
                    "ConnectionsCount": body["ConnectionsCount"]}
    with srv.client() as c:  # the figures follow the server
        assert c.write(1, b"x" * 1000, group=7) == Err.SUCCESS
        assert c.call(Op.SET_STATUS, b"\x01") == (Err.SUCCESS, b"")
        n = len(master.reports)
        wait_for(lambda: len(master.reports) > n + 1, timeout=20)
        body = master.reports[-1][2]
        assert body["Status"] == 1 and body["ConnectionsCount"] >= 1
        assert body["TotalFreeSpace"] == 3 * chunk_free - 1030


def test_master_down_never_stops_the_server(servers):
    port = free_port()
    srv = servers("down", master_port=port, report_interval=0.2)
    with srv.client() as c:
        for i in range(10):  # several report intervals while the master is down
            assert c.write(100 + i, b"data") == Err.SUCCESS
            assert c.read(100 + i) == (Err.SUCCESS, b"data")
            time.sleep(0.1)
    assert srv.log().count("cannot report to master") == 1  # logged once, not every time
    m = FakeMaster(port)
    try:
        wait_for(lambda: m.reports, timeout=20)
        wait_for(lambda: f"reporting to master 127.0.0.1:{port}" in srv.log(), timeout=10)
        m.status = 500
        n = len(m.reports)
        wait_for(lambda: len(m.reports) > n + 2, timeout=20)
        assert srv.log().count("HTTP 500") == 1
    finally:
        m.close()
    with srv.client() as c:
        assert c.ping() == Err.SUCCESS


def test_metrics_endpoint_sums_every_worker(servers):
    port = free_port()
    srv = servers("metrics", metrics_port=port, workers=2)
    clients = [srv.client() for _ in range(4)]
    try:
        for i, c in enumerate(clients):
            assert c.write(10 + i, b"m" * 100) == Err.SUCCESS
            assert c.read(10 + i) == (Err.SUCCESS, b"m" * 100)
        assert clients[0].read(99)[0] == Err.FILE_NOT_FOUND
    finally:
        for c in clients:
            c.close()
    # a worker counts a request just after its answer is sent: scrape until the last is in
    deadline = time.monotonic() + 10
    while True:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        conn.request("GET", "/metrics")
        resp = conn.getresponse()
        text = resp.read().decode()
        conn.close()
        got = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
               for line in text.splitlines() if line and not line.startswith("#")}
        if got.get('speedy_requests_total{op="read"}') == 5 or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert resp.status == 200
    assert resp.getheader("Content-Type") == "text/plain; version=0.0.4; charset=utf-8"
    assert got['speedy_requests_total{op="write"}'] == 4
    assert got['speedy_requests_total{op="read"}'] == 5
    assert got['speedy_request_errors_total{code="file_not_found",op="read"}'] == 1  # sorted
    assert got["speedy_files"] == 4 and got["speedy_write_bytes_total"] == 400
    assert got["speedy_pool_blocks"] == 8 and got["speedy_workers"] == 2
    assert got['speedy_request_duration_seconds_count{op="write"}'] == 4
    assert got["process_resident_memory_bytes"] > 0  # the supervisor's own, from the library
