"""The real spy_master.py over HTTP: registration, heartbeats, health, route, fids, SQL."""
from __future__ import annotations

import json
import re
import socket
import sqlite3
import threading
import time

from prometheus_client.parser import text_string_to_metric_families

from tests.support import wait_for

CS_FIELDS = {"GroupId", "Ip", "Port", "Status", "GlobalStatus", "TotalFreeSpace",
             "MaxFreeSpace", "PendingWrites", "WritingCount", "ReadingCount", "TotalChunks",
             "ConnectionsCount", "DataDir"}
INIT, RW, RO, ERR = 0, 1, 2, 3


def test_registration_single_batch_and_duplicates(masters, tmp_path):
    m = masters(tmp_path)
    m.register(1, "10.0.0.1", 8000)
    m.register(1, "10.0.0.1", 8000)  # again: harmless
    r = m.post("/v1/chunkserver/batchinitserver", [
        {"GroupId": 1, "Ip": "10.0.0.1", "Port": 8000}, {"GroupId": 1, "Ip": "10.0.0.2",
                                                          "Port": 8000},
        {"GroupId": 2, "Ip": "10.0.1.1", "Port": 8001}])
    assert r.status == 200, r.text
    assert m.post("/v1/chunkserver/batchinitserver", []).status == 200
    with m.ro_db() as c:
        rows = c.execute("SELECT group_id, ip, port, status FROM chunkserver "
                         "ORDER BY group_id, ip").fetchall()
    assert rows == [(1, "10.0.0.1", 8000, 0), (1, "10.0.0.2", 8000, 0),
                    (2, "10.0.1.1", 8001, 0)]
    # A batch with one bad element registers nothing.
    r = m.post("/v1/chunkserver/batchinitserver", [
        {"GroupId": 3, "Ip": "10.0.3.1", "Port": 8000}, {"GroupId": 3, "Ip": "10.0.3.2"}])
    assert r.status == 400 and "element 1" in r.text and "Port" in r.text
    assert "3" not in m.route()


def test_route_and_groupinfo_json(masters, tmp_path):
    m = masters(tmp_path, heartbeat_timeout=30)
    m.register(1, "10.0.0.1", 8000)
    m.register(1, "10.0.0.2", 8000)
    m.register(7, "10.0.7.1", 9000)
    assert m.report(1, "10.0.0.1", 8000, TotalFreeSpace=42949672960,
                    MaxFreeSpace=2147483593, PendingWrites=4, WritingCount=1, ReadingCount=2,
                    TotalChunks=20, ConnectionsCount=3, DataDir="/data/speedy").status == 200
    r = m.get("/v1/chunkmaster/route")
    assert r.status == 200 and r.headers["content-type"].startswith("application/json")
    route = r.json()
    assert set(route) == {"1", "7"}
    assert [cs["Ip"] for cs in route["1"]] == ["10.0.0.1", "10.0.0.2"]
    assert all(set(cs) == CS_FIELDS for servers in route.values() for cs in servers)
    assert route["1"][0] == {
        "GroupId": 1, "Ip": "10.0.0.1", "Port": 8000, "Status": RW, "GlobalStatus": 0,
        "TotalFreeSpace": 42949672960, "MaxFreeSpace": 2147483593, "PendingWrites": 4,
        "WritingCount": 1, "ReadingCount": 2, "TotalChunks": 20, "ConnectionsCount": 3,
        "DataDir": "/data/speedy"}
    assert route["1"][1]["Status"] == INIT and route["7"][0]["Port"] == 9000
    g = m.get("/v1/chunkserver/1/groupinfo")
    assert g.status == 200 and g.json() == route["1"]
    assert m.get("/v1/chunkserver/5/groupinfo").json() == []
    # ERR servers: in groupinfo, not in the route; checkerror says 1.
    assert m.get("/v1/chunkserver/checkerror").body == b"0"
    r = m.post("/v1/chunkserver/setstatus", {"Ip": "10.0.0.2", "Port": 8000, "Status": ERR})
    assert r.status == 200 and r.json()[0]["Status"] == ERR
    assert [cs["Ip"] for cs in m.route()["1"]] == ["10.0.0.1"]
    assert [cs["Status"] for cs in m.get("/v1/chunkserver/1/groupinfo").json()] == [RW, ERR]
    assert m.get("/v1/chunkserver/checkerror").body == b"1"
    assert m.post("/v1/chunkserver/setstatus",
                  {"Ip": "10.9.9.9", "Port": 8000, "Status": 3}).status == 404
    # removeserver (speedy extension)
    body = {"GroupId": 7, "Ip": "10.0.7.1", "Port": 9000}
    assert m.post("/v1/chunkserver/removeserver", body).status == 200
    assert m.post("/v1/chunkserver/removeserver", body).status == 404
    assert "7" not in m.route()


def test_heartbeats_silence_and_recovery(masters, tmp_path):
    m = masters(tmp_path, heartbeat_timeout=1.0, monitor_interval=0.2)
    key = (1, "127.0.0.1", 8000)
    r = m.report(*key)
    assert r.status == 400 and "not registered" in r.text
    m.register(*key)
    m.register(1, "127.0.0.1", 8001)  # never reports: stays INIT
    assert m.statuses()[key] == INIT
    assert m.report(*key).status == 200
    assert m.statuses()[key] == RW
    t0 = time.monotonic()
    wait_for(lambda: m.statuses()[key] == RO, timeout=10, what="RO after silence")
    assert time.monotonic() - t0 >= 0.8
    assert m.statuses()[(1, "127.0.0.1", 8001)] == INIT
    assert m.report(*key, TotalFreeSpace=77).status == 200
    assert m.statuses()[key] == RW
    assert m.route()["1"][0]["TotalFreeSpace"] == 77
    # The chunkserver says it is read-only (its own Status 1): the master shows RO.
    m.report(*key, Status=1)
    assert m.statuses()[key] == RO
    m.report(*key, Status=0)
    assert m.statuses()[key] == RW
    # ERR stays ERR whatever the heartbeats say.
    m.post("/v1/chunkserver/setstatus", {"Ip": "127.0.0.1", "Port": 8000, "Status": ERR})
    m.report(*key)
    assert m.get("/v1/chunkserver/1/groupinfo").json()[0]["Status"] == ERR
    assert "RW -> RO (no heartbeat" in m.log_text()


def test_reloadinfo_after_a_manual_sql_update(masters, tmp_path):
    m = masters(tmp_path, heartbeat_timeout=30)
    m.register(4, "10.0.4.1", 8000)
    m.register(4, "10.0.4.2", 8000)
    m.report(4, "10.0.4.1", 8000)
    # What the README tells an operator to do, while the master runs.
    c = sqlite3.connect(m.db, timeout=5)
    c.execute("UPDATE chunkserver SET status = 3 WHERE ip = '10.0.4.1' AND port = 8000")
    c.commit()
    c.close()
    assert m.post("/v1/chunkserver/reloadinfo").status == 200
    assert [cs["Ip"] for cs in m.route()["4"]] == ["10.0.4.2"]
    assert m.get("/v1/chunkserver/checkerror").body == b"1"
    m.report(4, "10.0.4.1", 8000)  # a heartbeat does not undo the operator's ERR
    assert [cs["Ip"] for cs in m.route()["4"]] == ["10.0.4.2"]
    assert "registry reloaded" in m.log_text()


def test_restart_keeps_registry_and_gives_a_grace_period(masters, tmp_path):
    m = masters(tmp_path, heartbeat_timeout=3.0, monitor_interval=0.2)
    for port in (8000, 8001, 8002):
        m.register(2, "127.0.0.1", port)
    m.report(2, "127.0.0.1", 8000)
    m.report(2, "127.0.0.1", 8001)
    m.post("/v1/chunkserver/setstatus", {"Ip": "127.0.0.1", "Port": 8001, "Status": ERR})
    m.kill()  # kill -9
    time.sleep(3.5)  # longer than the timeout: the last heartbeat is now old
    m.start()
    t0 = time.monotonic()
    # Fresh grace period: still RW after several health checks following the restart.
    time.sleep(1.0)
    assert time.monotonic() - t0 < 2.5, "too slow to check the grace period"
    assert [cs["Status"] for cs in m.get("/v1/chunkserver/2/groupinfo").json()] == \
        [RW, ERR, INIT]
    wait_for(lambda: m.statuses()[(2, "127.0.0.1", 8000)] == RO, timeout=10,
             what="RO once the grace period is over")
    assert m.statuses()[(2, "127.0.0.1", 8002)] == INIT


def test_fid_ranges_disjoint_across_kill_9(masters, tmp_path):
    m = masters(tmp_path)
    ranges = [m.fid() for _ in range(30)]
    assert ranges[0] == (1, 101)
    m.restart()  # kill -9, start
    ranges += [m.fid() for _ in range(30)]
    m.restart()
    ranges += [m.fid() for _ in range(5)]
    assert all(e - b == 100 for b, e in ranges)
    assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:])), ranges
    with m.ro_db() as c:
        assert c.execute("SELECT high_water FROM fid_state").fetchone()[0] >= ranges[-1][1]


def test_read_only_sqlite_while_the_master_writes(masters, tmp_path):
    m = masters(tmp_path, heartbeat_timeout=30)
    for port in range(8000, 8010):
        m.register(1, "127.0.0.1", port)
    stop, errors, beats = threading.Event(), [], [0]

    def heartbeats():
        while not stop.is_set():
            for port in range(8000, 8010):
                r = m.report(1, "127.0.0.1", port, TotalFreeSpace=beats[0])
                if r.status != 200:
                    errors.append(r.text)
            m.fid()
            beats[0] += 1

    t = threading.Thread(target=heartbeats)
    t.start()
    try:
        ro = m.ro_db()
        seen = []
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            seen.append(ro.execute("SELECT max(total_free_space), count(*) FROM chunkserver "
                                   "WHERE status = 1").fetchone())
            ro.execute("SELECT group_id, sum(total_free_space) FROM chunkserver "
                       "GROUP BY group_id").fetchall()
            time.sleep(0.01)
        try:
            ro.execute("UPDATE chunkserver SET status = 3")
            raise AssertionError("a read-only connection could write")
        except sqlite3.OperationalError as e:
            assert "readonly" in str(e)
        ro.close()
    finally:
        stop.set()
        t.join(20)
    assert not errors
    assert beats[0] > 5
    frees = [s[0] for s in seen if s[0] is not None]
    assert frees and frees[-1] > frees[0] and seen[-1][1] == 10


def test_token_required_on_write_routes(masters, tmp_path):
    m = masters(tmp_path, token="s3cret")
    body = {"GroupId": 1, "Ip": "10.0.0.1", "Port": 8000}
    for path in ("/v1/chunkserver/initserver", "/v1/chunkserver/reportinfo",
                 "/v1/chunkserver/reloadinfo", "/v1/chunkserver/batchinitserver",
                 "/v1/chunkserver/setstatus"):
        r = m.post(path, body, token=False)
        assert r.status == 403 and "X-Speedy-Token" in r.text, (path, r.status, r.text)
        r = m.post(path, body, token=False, headers={"X-Speedy-Token": "wrong"})
        assert r.status == 403 and "wrong" in r.text
    r = m.get("/v1/chunkmaster/fid", token=False)
    assert r.status == 403
    assert m.post("/v1/chunkserver/initserver", body).status == 200
    assert m.report(1, "10.0.0.1", 8000).status == 200
    assert m.fid() == (1, 101)
    # Read routes stay open.
    assert m.get("/v1/chunkmaster/route", token=False).status == 200
    assert m.get("/v1/chunkserver/1/groupinfo", token=False).status == 200
    assert m.get("/v1/chunkserver/checkerror", token=False).status == 200
    assert m.get("/metrics", token=False).status == 200
    assert "s3cret" not in m.log_text()


def test_without_token_nothing_is_required(masters, tmp_path):
    m = masters(tmp_path)
    r = m.post("/v1/chunkserver/initserver", {"GroupId": 1, "Ip": "10.0.0.1", "Port": 8000},
               headers={"X-Speedy-Token": "anything"})
    assert r.status == 200


def _metric(text: str, sample: str) -> float:
    """The value of sample ('name{label="v",...}', labels in any order), parsed strictly."""
    name, _, labels = sample.partition("{")
    want = dict(re.findall(r'(\w+)="([^"]*)"', labels))
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == name and s.labels == want:
                return s.value
    raise AssertionError(f"{sample} not in metrics")


def test_metrics_move_with_traffic(masters, tmp_path):
    m = masters(tmp_path, heartbeat_timeout=30)
    r = m.get("/metrics")
    assert r.status == 200 and r.headers["content-type"].startswith("text/plain")
    before = r.text
    assert _metric(before, 'speedy_master_servers{status="rw"}') == 0
    assert _metric(before, "speedy_master_fids_issued_total") == 0
    m.register(3, "10.0.0.1", 8000)
    m.register(3, "10.0.0.2", 8000)
    m.report(3, "10.0.0.1", 8000, TotalFreeSpace=555)
    for _ in range(3):
        m.fid()
    m.get("/nope")
    text = m.get("/metrics").text
    for name in ("speedy_master_servers", "speedy_master_heartbeat_age_seconds",
                 "speedy_master_fids_issued_total", "speedy_master_http_requests_total",
                 "speedy_master_http_request_duration_seconds", "speedy_master_groups"):
        assert f"# TYPE {name} " in text
    assert _metric(text, 'speedy_master_servers{status="rw"}') == 1
    assert _metric(text, 'speedy_master_servers{status="init"}') == 1
    assert _metric(text, "speedy_master_fids_issued_total") == 300
    assert _metric(text, "speedy_master_groups") == 1
    assert 0 <= _metric(text, 'speedy_master_heartbeat_age_seconds{group="3",'
                              'server="10.0.0.1:8000"}') < 30
    assert _metric(text, 'speedy_master_server_free_bytes{group="3",'
                         'server="10.0.0.1:8000"}') == 555
    assert _metric(text, 'speedy_master_http_requests_total{route="/v1/chunkmaster/fid",'
                         'code="200"}') == 3
    assert _metric(text, 'speedy_master_http_requests_total{route="other",code="404"}') == 1
    assert "fid=" not in text


README_QUERIES = [
    # which servers are RO (or ERR)
    "SELECT group_id, ip, port, status, datetime(status_time, 'unixepoch') AS since "
    "FROM chunkserver WHERE status IN (2, 3) ORDER BY group_id, ip, port;",
    # free space per group
    "SELECT group_id, count(*) AS servers, sum(status = 1) AS rw, "
    "min(max_free_space) AS min_max_free, sum(total_free_space) AS total_free "
    "FROM chunkserver WHERE status != 3 GROUP BY group_id ORDER BY group_id;",
    # servers silent for more than a minute
    "SELECT group_id, ip, port, status, round(strftime('%s','now') - update_time) AS silent_s "
    "FROM chunkserver WHERE update_time < strftime('%s','now') - 60 ORDER BY silent_s DESC;",
    "SELECT high_water, datetime(update_time, 'unixepoch') FROM fid_state;",
]


def test_readme_queries_with_the_sqlite3_shell(masters, tmp_path):
    import shutil
    import subprocess

    m = masters(tmp_path, heartbeat_timeout=30)
    m.register(1, "10.0.0.1", 8000)
    m.register(1, "10.0.0.2", 8000)
    m.register(2, "10.0.0.3", 8000)
    m.report(1, "10.0.0.1", 8000, TotalFreeSpace=1000, MaxFreeSpace=600)
    m.report(1, "10.0.0.2", 8000, Status=1, TotalFreeSpace=500, MaxFreeSpace=400)
    m.fid()
    with sqlite3.connect(m.db) as c:  # one server silent for 2 minutes
        c.execute("UPDATE chunkserver SET update_time = update_time - 120 "
                  "WHERE ip = '10.0.0.3'")
    shell = shutil.which("sqlite3")
    results = []
    for q in README_QUERIES:
        if shell:
            r = subprocess.run([shell, "-readonly", m.db, q], capture_output=True, text=True,
                               timeout=30)
            assert r.returncode == 0 and not r.stderr, r.stderr
            results.append([tuple(line.split("|")) for line in r.stdout.splitlines()])
        else:
            with m.ro_db() as c:
                results.append([tuple(map(str, row)) for row in c.execute(q).fetchall()])
    ro, per_group, silent, fids = results
    assert [r[:4] for r in ro] == [("1", "10.0.0.2", "8000", "2")]
    assert per_group[0][:5] == ("1", "2", "1", "400", "1500")
    assert [r[:3] for r in silent] == [("2", "10.0.0.3", "8000")]
    assert fids[0][0] == "10001"


def test_servers_extension_lists_err_servers_with_heartbeat_age(masters, tmp_path):
    m = masters(tmp_path, heartbeat_timeout=30)
    m.register(1, "10.0.0.1", 8000)
    m.register(2, "10.0.0.2", 8000)
    assert m.report(1, "10.0.0.1", 8000, TotalFreeSpace=5).status == 200
    assert m.post("/v1/chunkserver/setstatus",
                  {"Ip": "10.0.0.2", "Port": 8000, "Status": ERR}).status == 200
    time.sleep(0.3)
    rows = m.get("/v1/chunkmaster/servers").json()
    assert [(r["GroupId"], r["Ip"], r["Status"]) for r in rows] == \
        [(1, "10.0.0.1", RW), (2, "10.0.0.2", ERR)]
    assert CS_FIELDS <= set(rows[0]) and rows[0]["TotalFreeSpace"] == 5
    assert 0.2 <= rows[0]["HeartbeatAge"] < 10 and rows[1]["HeartbeatAge"] is None
    assert rows[0]["UpdateTime"] > rows[0]["CreateTime"] > 0
    assert "2" not in m.get("/v1/chunkmaster/route").json()  # ERR stays out of the route


def _raw(port: int, request: bytes) -> bytes:
    """Send request bytes as they are; the whole answer (the master closes after it)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
    return out


def test_absolute_form_targets_are_accepted_on_every_route(masters, tmp_path):
    # The original C chunkserver reports with "POST http://ip:port/path HTTP/1.1".
    m = masters(tmp_path, heartbeat_timeout=30, token="tok")
    body = json.dumps({"GroupId": 1, "Ip": "10.0.0.1", "Port": 8000}).encode()
    report = json.dumps({"GroupId": 1, "Ip": "10.0.0.1", "Port": 8000, "Status": 0,
                         "TotalFreeSpace": 10, "MaxFreeSpace": 5}).encode()
    base = "http://10.0.0.9:8099"
    posts = [("/v1/chunkserver/initserver", body), ("/v1/chunkserver/batchinitserver",
             b"[" + body + b"]"), ("/v1/chunkserver/reportinfo", report),
             ("/v1/chunkserver/reloadinfo", b""),
             ("/v1/chunkserver/setstatus", json.dumps({"Ip": "10.0.0.1", "Port": 8000,
                                                       "Status": RW}).encode()),
             ("/v1/chunkserver/pendingdelete", b"[]")]
    for path, data in posts:
        answer = _raw(m.port, f"POST {base}{path} HTTP/1.1\r\nHost: x\r\nX-Speedy-Token: tok"
                      f"\r\nContent-Length: {len(data)}\r\nConnection: close\r\n\r\n"
                      .encode() + data)
        assert answer.startswith(b"HTTP/1.1 200 "), (path, answer[:200])
    for path in ("/v1/chunkmaster/route", "/v1/chunkmaster/fid", "/v1/chunkserver/1/groupinfo",
                 "/v1/chunkserver/checkerror", "/v1/chunkmaster/servers", "/metrics",
                 "/v1/chunkmaster/route?x=1"):
        answer = _raw(m.port, f"GET {base}{path} HTTP/1.1\r\nHost: x\r\nX-Speedy-Token: tok"
                      "\r\nConnection: close\r\n\r\n".encode())
        assert answer.startswith(b"HTTP/1.1 200 "), (path, answer[:200])
    assert m.statuses() == {(1, "10.0.0.1", 8000): RW}
    assert _raw(m.port, b"GET http://x/nope HTTP/1.1\r\nConnection: close\r\n\r\n") \
        .startswith(b"HTTP/1.1 404 ")


def test_pendingdelete_records_and_marks_the_server(masters, tmp_path):
    m = masters(tmp_path, heartbeat_timeout=30, token="tok")
    m.register(1, "10.0.0.1", 8000)
    m.register(1, "10.0.0.2", 8000)
    item = {"GroupId": 1, "Ip": "10.0.0.2", "Port": 8000, "Fid": 77}
    assert m.post("/v1/chunkserver/pendingdelete", [item], token=False).status == 403
    for bad in ({"GroupId": 1}, [{"GroupId": 1, "Ip": "10.0.0.2", "Port": 8000}],
                [dict(item, Fid=-1)], [dict(item, Fid=2 ** 63)], "x"):
        r = m.post("/v1/chunkserver/pendingdelete", bad)
        assert r.status == 400 and len(r.text.strip().splitlines()) == 1, r.text
    r = m.post("/v1/chunkserver/pendingdelete", [item, dict(item, Fid=78), item])
    assert r.status == 200 and r.json() == {"Added": 2}
    by_ip = {cs["Ip"]: cs for cs in m.route()["1"]}
    assert by_ip["10.0.0.2"]["PendingDeletes"] == 2
    assert "PendingDeletes" not in by_ip["10.0.0.1"]  # the original's fields only, when 0
    assert {cs["Ip"]: cs.get("PendingDeletes", 0) for cs in
            m.get("/v1/chunkmaster/servers").json()} == {"10.0.0.1": 0, "10.0.0.2": 2}
    with m.ro_db() as c:
        assert c.execute("SELECT count(*) FROM pending_delete").fetchone()[0] == 2
