"""`speedy local up|status|down`: a real local cluster, and no process left behind."""
from __future__ import annotations

import http.client
import os
import socket

from tests.support.cluster import run_cli
from tests.support.daemon import wait_ready
from tests.support import free_port
from speedy.cli import local


def free_range(n: int) -> int:
    """A base port with base..base+n-1 free now."""
    for _ in range(50):
        base = free_port()
        if base + n < 65536 and all(local.port_free(base + i) for i in range(-11, n)):
            return base
    raise RuntimeError("no free port range")


def other_range(first: int) -> int:
    """A free base port whose ports (gateway at base-11 included) miss first's."""
    while True:
        base = free_range(2)
        if abs(base - first) > 13:
            return base


def processes_under(path: str) -> list[int]:
    """Live processes whose command line mentions path."""
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and
            path in local.cmdline(int(p)) and local.alive(int(p))]


def test_local_up_status_down_leaves_no_process(tmp_path):
    root = str(tmp_path / "speedy-local")
    base = free_range(4)
    opts = ["--dir", root, "--base-port", str(base), "--chunks", "2",
            "--chunk-size", str(4 << 20), "--mem-blocks", "8", "--wait", "60"]
    try:
        r = run_cli("local", "up", *opts, timeout=120)
        assert r.returncode == 0, r.stderr
        out = r.stdout.decode()
        assert f"master 127.0.0.1:{base}" in out and "put FILE" in out and "get" in out
        assert len(processes_under(root)) >= 4  # master + 3 supervisors (+ workers)
        r = run_cli("local", "up", *opts, timeout=60)  # idempotent
        assert r.returncode == 0 and b"already" in r.stdout, r.stderr
        r = run_cli("local", "status", "--dir", root)
        assert r.returncode == 0 and r.stdout.count(b"running") == 5  # with the gateway
        assert r.stdout.count(b"master says RW") == 3
        master = ["--master", f"127.0.0.1:{base}"]
        r = run_cli(*master, "put", "-", input=b"hello local")
        assert r.returncode == 0, r.stderr
        key = r.stdout.decode().strip()
        assert run_cli(*master, "get", key).stdout == b"hello local"
        gw = http.client.HTTPConnection("127.0.0.1", base - 11, timeout=30)
        gw.request("GET", "/" + key)
        assert gw.getresponse().read() == b"hello local"
        gw.close()
        # a server that died is started again by the next `up`
        state = local.State.load(root)
        assert state is not None
        local.stop_group(state.servers[0].pid, root, timeout=10)
        r = run_cli("local", "status", "--dir", root)
        assert r.returncode == 3 and b"stopped" in r.stdout
        r = run_cli("local", "up", *opts, timeout=120)
        assert r.returncode == 0 and b"already" not in r.stdout, r.stderr
        assert run_cli(*master, "get", key).stdout == b"hello local"
    finally:
        r = run_cli("local", "down", "--dir", root, timeout=120)
    assert r.returncode == 0, r.stderr
    assert b"stopped" in r.stdout
    assert processes_under(root) == []
    r = run_cli("local", "down", "--dir", root)
    assert r.returncode == 0 and b"nothing to stop" in r.stdout
    r = run_cli("local", "status", "--dir", root)
    assert r.returncode == 1


def test_local_up_on_a_busy_port_fails_cleanly(tmp_path):
    root = str(tmp_path / "busy")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        base = s.getsockname()[1]
        r = run_cli("local", "up", "--dir", root, "--base-port", str(base), timeout=60)
    assert r.returncode == 3
    err = r.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "in use" in err and "Traceback" not in err
    assert processes_under(root) == []


def test_local_up_chunks_0_is_a_usage_error(tmp_path):
    root = tmp_path / "never"
    r = run_cli("local", "up", "--chunks", "0", "--dir", str(root))
    assert r.returncode == 2
    err = r.stderr.decode().strip()
    assert len(err.splitlines()) == 1 and "--chunks" in err and "0" in err, err
    assert not root.exists()


def test_one_server_cluster_and_another_base_port(tmp_path):
    """`local up --servers 1` takes writes with the commands it prints; a second `up`
    with another base port says which cluster runs; after `down`, an `up` on other
    ports drops the old registrations (which would turn RO and block every put)."""
    root = str(tmp_path / "one")
    first = free_range(2)
    second = other_range(first)
    opts = ["--dir", root, "--servers", "1", "--chunks", "1", "--chunk-size", str(4 << 20),
            "--mem-blocks", "8"]
    try:
        r = run_cli("local", "up", *opts, "--base-port", str(first), timeout=120)
        assert r.returncode == 0, r.stderr
        out = r.stdout.decode()
        assert f"--master 127.0.0.1:{first} --min-replicas 1 put FILE" in out, out
        master = ["--master", f"127.0.0.1:{first}"]
        r = run_cli(*master, "put", "-", input=b"needs 2")
        assert r.returncode == 3 and b"--min-replicas" in r.stderr, r.stderr
        r = run_cli(*master, "--min-replicas", "1", "put", "-", input=b"one replica")
        assert r.returncode == 0, r.stderr
        key = r.stdout.decode().strip()
        gw = http.client.HTTPConnection("127.0.0.1", first - 11, timeout=30)  # its gateway
        gw.request("POST", "/blobs", body=b"through the gateway")
        answer = gw.getresponse()
        assert answer.status == 201, answer.read()
        gw.close()
        access = os.path.join(root, "gateway", "access.log")
        wait_ready(lambda: '"POST /blobs HTTP/1.1" 201' in open(access).read(), 10,
                   "the gateway's access log line")
        assert f"http://127.0.0.1:{first - 11}/ui/" in out

        r = run_cli("local", "up", *opts, "--base-port", str(second), timeout=60)
        assert r.returncode == 3
        err = r.stderr.decode().strip()
        assert f"already runs in {root}: master on port {first}, servers on ports " \
               f"{first + 1}" in err, err

        assert run_cli("local", "down", "--dir", root, timeout=120).returncode == 0
        second = other_range(first)   # picked again: the machine's other tests take ports
        r = run_cli("local", "up", *opts, "--base-port", str(second), timeout=120)
        assert r.returncode == 0, r.stderr
        assert f"127.0.0.1:{first + 1}".encode() in r.stderr  # dropped, and said so
        api = local.Master(f"127.0.0.1:{second}", timeout=5.0)
        assert [(s.ip, s.port) for s in api.all_servers()] == [("127.0.0.1", second + 1)]
        master = ["--master", f"127.0.0.1:{second}", "--min-replicas", "1"]
        assert run_cli(*master, "get", key, "-o", "-").stdout == b"one replica"
        assert run_cli(*master, "put", "-", input=b"more").returncode == 0
    finally:
        r = run_cli("local", "down", "--dir", root, timeout=120)
    assert r.returncode == 0, r.stderr
    assert processes_under(root) == []
