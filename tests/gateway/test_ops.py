"""The gateway's ops files: the systemd unit run as systemd would, the LSB script run for
real against a gateway, and the example config parsed by the daemon."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import urllib.request

import pytest

from tests.support import PYTHON, ROOT, free_port
from tests.support.daemon import listening, notify_socket, processes, spawn, stop_session

INIT = os.path.join(ROOT, "init")
UNIT = os.path.join(INIT, "speedy_gateway.service")
SCRIPT = os.path.join(INIT, "speedy_gateway")
EXAMPLE = os.path.join(ROOT, "conf", "speedy_gateway.conf.example")


def settings(path: str) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for line in open(path, encoding="utf-8"):
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def gateway_conf(tmp_path, port: int) -> str:
    """The example config with local paths: a config the daemon really reads."""
    text = open(EXAMPLE, encoding="utf-8").read()
    text = text.replace("port = 8088", f"port = {port}")
    text = text.replace("sqlite:////var/lib/speedy/", f"sqlite:///{tmp_path}/")
    text = text.replace("/var/log/speedy/", f"{tmp_path}/")
    text += "workers = 1\nmaster = 127.0.0.1:1\n"
    path = tmp_path / "speedy_gateway.conf"
    path.write_text(text)
    return str(path)


def test_unit_settings_and_verify(tmp_path):
    s = settings(UNIT)
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"] and s["User"] == ["speedy"]
    (start,) = s["ExecStart"]
    assert start.split()[:2] == ["/opt/speedy/.venv/bin/python", "/opt/speedy/spy_gateway.py"]
    assert "--daemonize=0" in start.split()
    assert "--config=/etc/speedy/speedy_gateway.conf" in start.split()
    if shutil.which("systemd-analyze"):
        local_unit = tmp_path / "speedy_gateway.service"
        local_unit.write_text(open(UNIT).read().replace("/opt/speedy/.venv/bin/python", PYTHON)
                              .replace("/opt/speedy/", ROOT + "/"))
        proc = subprocess.run(["systemd-analyze", "verify", str(local_unit)],
                              capture_output=True, text=True, timeout=120)
        mine = [ln for ln in (proc.stdout + proc.stderr).splitlines() if "gateway" in ln]
        assert mine == [], proc.stdout + proc.stderr


def test_unit_exec_start_notifies_ready_and_stopping(tmp_path):
    port = free_port()
    conf = gateway_conf(tmp_path, port)
    (start,) = settings(UNIT)["ExecStart"]
    argv = [PYTHON if a.endswith("/python") else a.replace("/opt/speedy/", ROOT + "/")
            for a in start.split()]
    argv = [re.sub(r"--config=\S+", f"--config={conf}", a) for a in argv]
    with notify_socket(str(tmp_path / "notify.sock")) as ns:
        out = str(tmp_path / "out.log")
        proc = spawn(argv, out, cwd=str(tmp_path), env={"NOTIFY_SOCKET": ns.getsockname()})
        try:
            assert "READY=1" in ns.recv(4096).decode().split("\n")
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
                assert r.status == 200
            proc.send_signal(signal.SIGTERM)
            assert "STOPPING=1" in ns.recv(4096).decode()
            assert proc.wait(60) == 0
        finally:
            stop_session(proc)
    assert "Traceback" not in open(out).read()
    assert "on 127.0.0.1:" in open(tmp_path / "speedy_gateway.log").read()


def test_lsb_script_start_status_reload_stop(tmp_path):
    text = open(SCRIPT, encoding="utf-8").read()
    assert os.access(SCRIPT, os.X_OK) and text.startswith("#!/bin/sh\n")
    assert "# Provides:          speedy_gateway" in text
    assert subprocess.run(["sh", "-n", SCRIPT]).returncode == 0
    port = free_port()
    pidfile = str(tmp_path / "run" / "speedy_gateway.pid")
    env = {**os.environ, "SPEEDY_HOME": ROOT, "PYTHON": PYTHON,
           "CONF": gateway_conf(tmp_path, port), "PIDFILE": pidfile, "RUN_AS": "",
           "DEFAULTS": "/dev/null", "START_CHECK": "0.3", "STOP_TIMEOUT": "30",
           "START_STOP_DAEMON": "none", "PYTHONPATH": ROOT}

    def script(action: str) -> subprocess.CompletedProcess:
        return subprocess.run(["sh", SCRIPT, action], env=env, capture_output=True,
                              text=True, timeout=120)
    pid = None
    try:
        assert script("status").returncode == 3
        r = script("start")
        assert r.returncode == 0, r.stdout + r.stderr
        pid = int(open(pidfile).read())
        assert listening(port)
        assert script("status").returncode == 0
        assert script("reload").returncode == 0
        r = script("stop")
        assert r.returncode == 0, r.stdout + r.stderr
        assert not os.path.exists(pidfile) and pid not in [p.pid for p in processes()]
        assert script("status").returncode == 3
    finally:
        if pid and pid in [p.pid for p in processes()]:
            os.kill(pid, signal.SIGKILL)


@pytest.mark.parametrize("key", ["ip", "port", "workers", "master", "token", "timeout",
                                 "metadb", "signing_key", "max_body", "metrics_port",
                                 "daemonize", "pidfile", "error_log", "log_level",
                                 "s3_access_key", "s3_secret_key", "s3_keys", "s3_region",
                                 "s3_upload_ttl", "maintenance_interval", "min_replicas", "part_size"])
def test_example_names_every_option(key):
    assert re.search(rf"^#?{key} =", open(EXAMPLE).read(), re.M), key


def test_readme_option_table_matches_the_parser():
    from speedy.common.config import gateway_parser
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    text = readme[readme.index("## The HTTP gateway"):readme.index("### Blob routes")]
    listed = {o for line in text.splitlines() if line.startswith("| `-")
              for o in re.findall(r"`(--[a-z0-9_-]+)`", line.split("|")[1])}
    options = {next(o for o in a.option_strings if o.startswith("--"))
               for a in gateway_parser()._actions if a.option_strings and a.dest != "help"}
    assert listed == options
