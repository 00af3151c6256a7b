"""The gateway daemon: signed URLs, limits, metrics, signals, workers, config, systemd."""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import time
from urllib.parse import urlsplit

from tests.support import PYTHON, free_port
from tests.support.cluster import blob, cluster_fixture, run_cli
from tests.support.daemon import listening, notify_socket, spawn, stop_session, tail, wait_ready
from tests.support.gateway import Gateway

cluster = cluster_fixture(groups=1, per_group=2, chunks=4, chunk_size=32 << 20,
                          mem_blocks=32)


def signed(gw: Gateway, key: str, method: str = "GET", expires: int = 60) -> str:
    """The path and query `speedy url` prints for key."""
    r = run_cli("url", key, "--signing_key", "s3cret", "--method", method,
                "--expires", str(expires), "--gateway", f"http://{gw.addr}")
    assert r.returncode == 0, r.stderr
    url = urlsplit(r.stdout.decode().strip())
    assert url.netloc == gw.addr
    return f"{url.path}?{url.query}"


def test_signed_urls(cluster, tmp_path):
    with Gateway(cluster, tmp_path, extra=["--signing_key=s3cret"]) as gw:
        status, _, data = gw.request("POST", "/blobs", b"secret bytes")
        assert status == 403 and data.count(b"\n") == 1
        status, _, data = gw.request("POST", signed(gw, "/blobs", "POST"), b"secret bytes")
        assert status == 201, data
        key = json.loads(data)["key"]
        assert gw.request("GET", "/" + key)[0] == 403
        url = signed(gw, key)
        assert gw.request("GET", url)[:3:2] == (200, b"secret bytes")
        assert gw.request("HEAD", url)[0] == 200
        assert gw.request("GET", url[:-3] + "000")[0] == 403         # tampered signature
        assert gw.request("GET", url.replace(key, "1,99999", 1))[0] == 403  # another key
        path, query = url.split("?")
        expired = dict(p.split("=") for p in query.split("&"))
        assert gw.request("GET", f"{path}?expires=1&sig={expired['sig']}")[0] == 403
        assert gw.request("GET", f"{path}?expires=soon&sig=ab")[0] == 403
        assert gw.request("DELETE", url)[0] == 403                    # a GET signature
        assert gw.request("DELETE", signed(gw, key, "DELETE"))[0] == 204
    r = run_cli("url", "1,5")
    assert r.returncode == 2 and b"signing_key" in r.stderr
    r = run_cli("url", "nonsense", "--signing_key", "k")
    assert r.returncode == 2


def test_body_limit_and_metrics(cluster, tmp_path):
    mport = free_port()
    with Gateway(cluster, tmp_path, extra=["--max_body=1000",
                                           f"--metrics_port={mport}"]) as gw:
        status, _, data = gw.request("POST", "/blobs", blob(2000))
        assert status == 413 and data.count(b"\n") == 1
        assert gw.request("POST", "/blobs", blob(1000))[0] == 201
        status, h, text = gw.request("GET", "/metrics")
        assert status == 200 and h["content-type"].startswith("text/plain; version=")
        assert b'speedy_gateway_http_requests_total{code="201",route="upload"} 1.0' in text
        assert b'speedy_gateway_http_requests_total{code="413",route="upload"} 1.0' in text
        assert b"speedy_gateway_received_bytes_total 1000.0" in text
        wait_ready(lambda: listening(mport), 10, "the metrics port")
        import urllib.request
        with urllib.request.urlopen(f"http://127.0.0.1:{mport}/metrics", timeout=10) as r:
            assert b'code="201",route="upload"' in r.read()


def test_sighup_reopens_logs_and_a_killed_worker_is_replaced(cluster, tmp_path):
    with Gateway(cluster, tmp_path, workers=2) as gw:
        os.rename(gw.log, gw.log + ".1")
        os.kill(gw.proc.pid, signal.SIGHUP)
        wait_ready(lambda: "reopened" in tail(gw.log), 10, "a new log file")
        (victim, other) = sorted(gw.worker_pids())
        os.kill(victim, signal.SIGKILL)
        wait_ready(lambda: len(gw.worker_pids()) == 2 and victim not in
                         gw.worker_pids(), 15, "a replacement worker")
        for _ in range(6):
            assert gw.request("POST", "/blobs", b"still here")[0] == 201


def test_sigterm_lets_an_upload_in_flight_finish(cluster, tmp_path):
    gw = Gateway(cluster, tmp_path, workers=1)
    with gw:
        body = blob(300_000, seed=4)
        with socket.create_connection(("127.0.0.1", gw.port), timeout=20) as s:
            s.sendall(b"POST /blobs HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                      b"Content-Length: %d\r\n\r\n" % len(body) + body[:1000])
            time.sleep(0.3)
            os.kill(gw.proc.pid, signal.SIGTERM)
            time.sleep(0.5)
            s.sendall(body[1000:])
            answer = b""
            while chunk := s.recv(65536):
                answer += chunk
        assert answer.startswith(b"HTTP/1.1 201"), answer[:200]
        gw.proc.wait(20)
        assert gw.proc.returncode == 0
        assert not listening(gw.port)
    key = json.loads(answer.split(b"\r\n\r\n", 1)[1])["key"]
    with cluster.client() as c:
        assert c.get(key) == body


def gateway_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return run_cli("gateway", *args, env=env, timeout=60)


def test_config_sources_and_start_errors(tmp_path):
    conf = tmp_path / "gw.conf"
    conf.write_text("port = 9100\nworkers = 3\n")
    r = gateway_cli("--config", str(conf), "--workers", "5", "--print_config",
                    env={"SPEEDY_GATEWAY_MASTER": "10.0.0.1:8099"})
    out = r.stdout.decode()
    assert r.returncode == 0, r.stderr
    assert "port = 9100" in out and "workers = 5  # from command_line" in out
    assert "master = '10.0.0.1:8099'  # from environment" in out
    r = gateway_cli("--workers", "0")
    assert r.returncode == 2 and b"--workers" in r.stderr
    r = gateway_cli("--metadb", "sqlite:////nonexistent/dir/x.db")
    assert r.returncode == 2 and b"does not exist" in r.stderr
    r = gateway_cli("--access_log", "/nonexistent/dir/access.log")
    assert r.returncode == 2 and b"--access_log: directory /nonexistent/dir does not " \
        b"exist" in r.stderr, r.stderr
    r = gateway_cli("--trusted_proxies", "10.0.0.0/8,proxy.example")
    assert r.returncode == 2 and b"'proxy.example' is not an address or network" in \
        r.stderr, r.stderr
    r = gateway_cli("--access_log=-", "--daemonize=1")
    assert r.returncode == 2 and b"name a file" in r.stderr, r.stderr
    r = gateway_cli("--access_log", str(tmp_path), "--metadb", f"sqlite:///{tmp_path}/g.db",
                    "--port", "0")
    assert r.returncode == 1, r.stderr
    assert f"cannot open --access_log {tmp_path}: Is a directory".encode() in r.stderr, r.stderr
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = gateway_cli("--port", str(port), "--metadb", f"sqlite:///{tmp_path}/g.db")
        assert r.returncode == 1 and b"cannot listen" in r.stderr, r.stderr


def test_systemd_notify_ready_and_stopping(cluster, tmp_path):
    path = str(tmp_path / "notify.sock")
    with notify_socket(path, timeout=30) as ns:
        port = free_port()
        proc = spawn([PYTHON, "-m", "speedy", "gateway", f"--port={port}",
                      f"--master={cluster.master_addr}", "--workers=1",
                      f"--metadb=sqlite:///{tmp_path}/g.db", "--log_level=DEBUG"],
                     str(tmp_path / "out.log"), cwd=str(tmp_path), env={"NOTIFY_SOCKET": path})
        try:
            assert b"READY=1" in ns.recv(4096)
            assert listening(port)
            proc.send_signal(signal.SIGTERM)
            assert b"STOPPING=1" in ns.recv(4096)
            assert proc.wait(20) == 0
        finally:
            stop_session(proc)
