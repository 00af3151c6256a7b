"""`speedy local up|status|down`: a real local cluster, and no process left behind."""
from __future__ import annotations

import http.client
import os
import socket

from tests.support.cluster import run_cli
from tests.support import free_port
from speedy.cli import local


def free_range(n: int) -> int:
    """A base port with base..base+n-1 free now."""
    for _ in range(50):
        base = free_port()
        if base + n < 65536 and all(local.port_free(base + i) for i in range(-11, n)):
            return base
    raise RuntimeError("no free port range")


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
