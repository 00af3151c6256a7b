"""The gateway's access log (--access_log) over real HTTP: its lines, logrotate and stop."""
from __future__ import annotations

import json
import os
import signal
import time

from speedy.common.config import parse_networks
from speedy.gateway.access import client_address
from tests.support.cluster import blob, cluster_fixture
from tests.support.daemon import wait_ready
from tests.support.gateway import Gateway, access_lines

cluster = cluster_fixture(groups=1, per_group=2, chunks=4, chunk_size=4 << 20)


def wait_lines(path: str, n: int, timeout: float = 10.0) -> list[dict]:
    """The lines of path once it has at least n besides the readiness checks' (GET
    /metrics while the gateway started), which the workers flush on their own."""
    def ours() -> int:
        return sum(1 for x in access_lines(path) if "/metrics" not in x["request"])
    wait_ready(lambda: ours() >= n, timeout, f"{n} lines in {path}")
    return access_lines(path)


def test_every_answer_gets_a_combined_log_line(cluster, tmp_path):
    path = str(tmp_path / "access.log")
    with Gateway(cluster, tmp_path, workers=2, extra=[f"--access_log={path}"]) as gw:
        body = blob(5000, seed=3)
        status, _, data = gw.request("POST", "/blobs", body, {
            "User-Agent": 'speedy-test/1 "quoted" \\ back', "Referer": "http://example.com/p",
            "Content-Type": "image/png"})
        assert status == 201, data
        key = json.loads(data)["key"]
        assert gw.request("GET", "/" + key)[0] == 200
        assert gw.request("HEAD", "/" + key)[0] == 200
        assert gw.request("GET", "/" + key, headers={"Range": "bytes=0-9"})[0] == 206
        assert gw.request("GET", "/no-such-route?x=1")[0] == 404
        assert gw.exchange(b"BOGUS\r\n\r\n").startswith(b"HTTP/1.1 400")
        assert gw.exchange(b"GET /a\x01b HTTP/1.1\r\n\r\n").startswith(b"HTTP/1.1 400")
        got = {x["request"]: x for x in wait_lines(path, 7)}
        # the metrics scraped while the gateway started (readiness checks) come first
        assert {r for r in got if "/metrics" not in r} == {
            "POST /blobs HTTP/1.1", f"GET /{key} HTTP/1.1", f"HEAD /{key} HTTP/1.1",
            "GET /no-such-route?x=1 HTTP/1.1", "BOGUS", "GET /a\\x01b HTTP/1.1"}, got
        post = got["POST /blobs HTTP/1.1"]
        assert post["status"] == "201" and post["addr"] == "127.0.0.1"
        assert post["agent"] == "speedy-test/1 \\x22quoted\\x22 \\x5C back"
        assert post["referer"] == "http://example.com/p"
        assert int(post["sent"]) == len(data) and float(post["seconds"]) < 30
        when = time.strptime(post["time"], "%d/%b/%Y:%H:%M:%S +0000")
        assert abs(time.mktime(when) - time.mktime(time.gmtime())) < 120
        every = [x for x in access_lines(path) if "/metrics" not in x["request"]]
        assert sorted((x["request"].split(" ")[0], x["status"], x["sent"]) for x in every) == [
            ("BOGUS", "400", str(len("malformed request line\n"))),
            ("GET", "200", "5000"), ("GET", "206", "10"),
            ("GET", "400", str(len("malformed request target\n"))),
            ("GET", "404", got["GET /no-such-route?x=1 HTTP/1.1"]["sent"]),
            ("HEAD", "200", "0"), ("POST", "201", str(len(data)))]
        assert got["GET /no-such-route?x=1 HTTP/1.1"]["agent"] == "-"   # none sent


def test_logrotate_and_stop_lose_no_line(cluster, tmp_path):
    """Rename + SIGHUP moves the workers to a new file; SIGTERM writes what is buffered."""
    path = str(tmp_path / "access.log")
    gw = Gateway(cluster, tmp_path, workers=2, extra=[f"--access_log={path}"])
    with gw:
        for i in range(20):
            assert gw.request("GET", f"/healthz?before={i}")[0] == 200
        wait_lines(path, 20)
        os.rename(path, path + ".1")
        os.kill(gw.proc.pid, signal.SIGHUP)
        sent = 20

        def moved() -> bool:   # a probe a try, until one lands in the new file
            nonlocal sent
            gw.request("GET", "/healthz?probe")
            sent += 1
            return bool(access_lines(path))
        wait_ready(moved, 15, "the access log reopened after SIGHUP")
        time.sleep(1.5)   # the last probes are flushed (to the new file)
        for i in range(200):
            gw.request("GET", f"/healthz?last={i}")
        sent += 200
        gw.proc.send_signal(signal.SIGTERM)
        assert gw.proc.wait(30) == 0
    old, new = access_lines(path + ".1"), access_lines(path)
    requests = [x["request"] for x in old + new if "/metrics" not in x["request"]]
    assert len(requests) == sent, (len(requests), sent)
    assert all(f"GET /healthz?before={i} HTTP/1.1" in {x["request"] for x in old}
               for i in range(20))
    assert sum(1 for x in new if "?last=" in x["request"]) == 200   # written at the stop


def test_dash_writes_to_standard_output(cluster, tmp_path):
    with Gateway(cluster, tmp_path, extra=["--access_log=-"]) as gw:
        gw.request("GET", "/healthz?to=stdout")
        wait_ready(lambda: "GET /healthz?to=stdout HTTP/1.1" in open(gw.stdout).read(), 10,
                   "the access line on standard output")


def test_a_failing_log_write_drops_lines_not_requests(cluster, tmp_path):
    """/dev/full fails every write with ENOSPC: requests are still answered, one warning a
    minute says how many lines were dropped."""
    with Gateway(cluster, tmp_path, extra=["--access_log=/dev/full"]) as gw:
        for i in range(3):
            for _ in range(10):
                assert gw.request("GET", "/healthz")[0] == 200
            time.sleep(1.2)   # a flush a second: three failed writes
        (worker,) = gw.worker_pids()
        assert gw.request("GET", "/healthz")[0] == 200 and gw.worker_pids() == [worker]
        log = open(gw.log).read()
        warnings = [x for x in log.splitlines() if "access log /dev/full" in x]
        assert len(warnings) == 1, log[-2000:]
        assert "No space left on device; " in warnings[0] and "lines dropped so far" in \
            warnings[0] and "Traceback" not in log


def test_a_worker_that_cannot_open_the_log_still_serves(cluster, tmp_path):
    """The supervisor checks the file at start; a worker respawned after the file became
    unopenable (here: a directory) serves without it and says so in the error log."""
    path = str(tmp_path / "access.log")
    with Gateway(cluster, tmp_path, extra=[f"--access_log={path}"]) as gw:
        (worker,) = gw.worker_pids()
        os.remove(path)
        os.mkdir(path)
        os.kill(worker, signal.SIGKILL)
        wait_ready(lambda: gw.worker_pids() not in ([], [worker]), 15, "a new worker")
        wait_ready(lambda: gw.request("GET", "/healthz")[0] == 200, 15, "the new worker")
        assert f"cannot open --access_log {path}: Is a directory; serving without it" \
            in open(gw.log).read()


def test_client_address_behind_trusted_proxies():
    trusted = parse_networks("127.0.0.1, 10.0.0.0/8, ::1")
    assert client_address("127.0.0.1", "203.0.113.7, 10.1.1.1", trusted) == "203.0.113.7"
    assert client_address("127.0.0.1", "198.51.100.9, 203.0.113.7", trusted) == "203.0.113.7"
    assert client_address("192.0.2.1", "203.0.113.7", trusted) == "192.0.2.1"  # not a proxy
    assert client_address("127.0.0.1", "", trusted) == "127.0.0.1"
    assert client_address("127.0.0.1", "junk, 10.1.1.1", trusted) == "10.1.1.1"
    assert client_address("::1", "2001:db8::1", trusted) == "2001:db8::1"
    assert client_address("127.0.0.1", "10.2.2.2", trusted) == "10.2.2.2"  # all proxies
    assert client_address("127.0.0.1", "203.0.113.7", ()) == "127.0.0.1"


def test_x_forwarded_for_is_believed_only_from_trusted_proxies(cluster, tmp_path):
    path = str(tmp_path / "access.log")
    forged = {"X-Forwarded-For": "203.0.113.7, 10.1.1.1"}
    with Gateway(cluster, tmp_path, extra=[f"--access_log={path}",
                                           "--trusted_proxies=127.0.0.0/8,10.0.0.0/8"]) as gw:
        gw.request("GET", "/healthz?via=proxy", headers=forged)
        gw.request("GET", "/healthz?via=none")
        got = {x["request"]: x["addr"] for x in wait_lines(path, 2)}
    assert got["GET /healthz?via=proxy HTTP/1.1"] == "203.0.113.7"
    assert got["GET /healthz?via=none HTTP/1.1"] == "127.0.0.1"
    other = str(tmp_path / "other.log")
    with Gateway(cluster, tmp_path, extra=[f"--access_log={other}"]) as gw:
        gw.request("GET", "/healthz?via=untrusted", headers=forged)
        got = {x["request"]: x["addr"] for x in wait_lines(other, 1)}
    assert got["GET /healthz?via=untrusted HTTP/1.1"] == "127.0.0.1"   # not believed
