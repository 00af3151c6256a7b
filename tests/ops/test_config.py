"""Configuration: precedence (flags > environment > file > defaults) and clear errors."""
from __future__ import annotations

import subprocess

import pytest

from tests.support import PYTHON, ROOT
from speedy.common import config

REQUIRED = ["--master_ip=127.0.0.1", "--master_port=8099", "--group_id=3"]


def test_defaults_match_the_seed_usage(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ns = config.load_server_config(REQUIRED)
    assert (ns.port, ns.ip, ns.mem_blocks, ns.chunks, ns.sync, ns.daemonize) == \
        (8000, "127.0.0.1", 1024, 20, 0, 0)
    assert ns.data_dir == str(tmp_path)
    assert ns.chunk_size == 2147483648 and ns.report_interval == 10.0
    assert ns.admin_allow == ["127.0.0.1", "::1", "127.0.0.1"]


def test_precedence_flag_over_env_over_file(tmp_path, monkeypatch):
    conf = tmp_path / "s.conf"
    conf.write_text("chunks = 7\nmem_blocks = 9\nsync = 1\n")
    monkeypatch.setenv("SPEEDY_SERVER_MEM_BLOCKS", "11")
    monkeypatch.setenv("SPEEDY_SERVER_CHUNKS", "12")
    ns = config.load_server_config(REQUIRED + ["--config", str(conf), "--chunks=13",
                                               f"--data_dir={tmp_path}"])
    assert (ns.chunks, ns.mem_blocks, ns.sync) == (13, 11, 1)


@pytest.mark.parametrize("flag,why", [
    ("--mem_blocks=5121", "--mem_blocks"), ("--chunks=0", "--chunks"),
    ("--chunks=201", "--chunks"), ("--sync=2", "--sync"), ("--port=70000", "--port"),
    ("--group_id=0", "--group_id"), ("--chunk_size=4294967296", "--chunk_size"),
    ("--data_dir=/nonexistent/x", "--data_dir"), ("--port=abc", "--port"),
])
def test_invalid_values_name_the_flag_and_exit_2(flag, why):
    r = subprocess.run([PYTHON, "-c", "import sys; from speedy.common.config import load_server_config;"
                        " load_server_config(sys.argv[1:])"] + REQUIRED + [flag],
                       cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert why in r.stderr and "Traceback" not in r.stderr


def test_missing_required_prints_usage(tmp_path):
    r = subprocess.run([PYTHON, "-c", "from speedy.common.config import load_server_config;"
                        " load_server_config([])"], cwd=ROOT, capture_output=True, text=True,
                       timeout=30)
    assert r.returncode == 2
    assert "--master_ip=<chunkmaster ip addr>" in r.stderr
    assert "required" in r.stderr


def test_print_config_names_sources(tmp_path):
    conf = tmp_path / "m.conf"
    conf.write_text("heartbeat_timeout = 12\n")
    r = subprocess.run([PYTHON, "-c", "import sys; from speedy.common.config import load_master_config;"
                        " load_master_config(sys.argv[1:])", "--config", str(conf),
                        "--port=9001", "--print_config"], cwd=ROOT, capture_output=True,
                       text=True, timeout=30, env={"SPEEDY_MASTER_MONITOR_INTERVAL": "3",
                                                   "PATH": "/usr/bin:/bin"})
    assert r.returncode == 0, r.stderr
    lines = {ln.split(" = ")[0]: ln for ln in r.stdout.splitlines()}
    assert "from command_line" in lines["port"]
    assert "from environment" in lines["monitor_interval"]
    assert "12.0" in lines["heartbeat_timeout"] and "config_file" in lines["heartbeat_timeout"]
    assert "from default" in lines["db"]
