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


def load(which: str, argv: list[str], env: dict | None = None) -> subprocess.CompletedProcess:
    """load_<which>_config(argv) in a child process, then print 'parsed'."""
    code = (f"import sys; from speedy.common import config; "
            f"config.load_{which}_config(sys.argv[1:]); print('parsed')")
    return subprocess.run([PYTHON, "-c", code, *argv], cwd=ROOT, capture_output=True,
                          text=True, timeout=30, env={"PATH": "/usr/bin:/bin", **(env or {})})


def test_config_file_typo_names_the_file_and_line(tmp_path):
    conf = tmp_path / "m.conf"
    conf.write_text("# master\nport = 9001\n\nheartbeat_timout = 5\n")
    r = load("master", ["--config", str(conf), f"--db={tmp_path}/m.db"])
    assert r.returncode == 2 and "Traceback" not in r.stderr
    last = r.stderr.strip().splitlines()[-1]
    assert f"{conf}, line 4: unknown option 'heartbeat_timout'" in last, r.stderr
    assert "did you mean 'heartbeat_timeout'" in last


@pytest.mark.parametrize("which,prefix", [("master", "SPEEDY_MASTER_"),
                                          ("server", "SPEEDY_SERVER_")])
def test_command_line_only_options_take_no_environment(which, prefix, tmp_path):
    argv = [f"--db={tmp_path}/m.db"] if which == "master" else \
        REQUIRED + [f"--data_dir={tmp_path}"]
    r = load(which, argv, {f"{prefix}PRINT_CONFIG": "true", f"{prefix}VERSION": "1",
                           f"{prefix}CONFIG": "/nonexistent.conf", f"{prefix}HELP": "1"})
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "parsed"
    help_text = load(which, ["--help"]).stdout
    assert f"{prefix}PRINT_CONFIG" not in help_text and f"{prefix}CONFIG]" not in help_text


def test_print_config_masks_secrets_and_names_the_config_file(tmp_path):
    conf = tmp_path / "s.conf"
    conf.write_text("master_ip = 10.1.1.1\nmaster_port = 9000\ngroup_id = 7\n"
                    "token = file-secret\n")
    r = load("server", ["--config", str(conf), f"--data_dir={tmp_path}", "--print_config"])
    assert r.returncode == 0, r.stderr
    assert "file-secret" not in r.stdout
    assert "token = '***'  # from config_file" in r.stdout
    assert r.stdout.splitlines()[0] == f"# config file: {conf}"
    r = load("master", [f"--db={tmp_path}/m.db", "--token=cli-secret", "--print_config"])
    assert "cli-secret" not in r.stdout and "token = '***'" in r.stdout
    assert r.stdout.splitlines()[0] == "# config file: none"
    r = load("master", [f"--db={tmp_path}/m.db", "--print_config"])
    assert "token = ''" in r.stdout  # unset stays visibly unset


@pytest.mark.parametrize("which", ["server", "master"])
def test_help_text(which):
    r = subprocess.run([PYTHON, "-m", f"speedy.{'chunkserver' if which == 'server' else 'master'}",
                        "--help"], cwd=ROOT, capture_output=True, text=True, timeout=30)
    assert r.returncode == 0
    text = r.stdout
    assert "(see --help for every option)" not in text
    assert "(default: None)" not in text and "(default: )" not in text
    assert "http" not in text and "goo.gl" not in text
    flat = " ".join(text.split("options:", 1)[1].split())
    if which == "server":
        admin = flat[flat.index("--admin_allow ADMIN_ALLOW"):flat.index("--token TOKEN")]
        assert admin.count("default") == 1, admin
        assert "--master_ip MASTER_IP chunkmaster address [env var: SPEEDY_SERVER_MASTER_IP]" \
            in flat
        # an error's usage still points at --help, and names each flag once
        r = subprocess.run([PYTHON, "-m", "speedy.chunkserver"], cwd=ROOT,
                           capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and "(see --help for every option)" in r.stderr
        assert r.stderr.splitlines()[-1].endswith("required: --master_ip, --master_port, "
                                                  "--group_id"), r.stderr
    else:
        pid = flat[flat.index("--pidfile PIDFILE"):flat.index("--log_level")]
        assert "supervisor" not in pid and "master" in pid, pid


@pytest.mark.parametrize("spelling", ["--data_dir", "--data-dir"])
def test_both_spellings_of_options(spelling, tmp_path, monkeypatch):
    monkeypatch.chdir("/")
    ns = config.load_server_config(REQUIRED + [f"{spelling}={tmp_path}", "--mem-blocks=9"])
    assert ns.data_dir == str(tmp_path) and ns.mem_blocks == 9
    ns = config.load_server_config(REQUIRED + [spelling, str(tmp_path)])
    assert ns.data_dir == str(tmp_path)
    conf = tmp_path / "m.conf"
    conf.write_text("heartbeat-timeout = 7\nmonitor_interval = 2\n")
    m = config.load_master_config(["--config", str(conf), f"--db={tmp_path}/m.db"])
    assert (m.heartbeat_timeout, m.monitor_interval) == (7.0, 2.0)
    m = config.load_master_config([f"--db={tmp_path}/m.db", "--heartbeat-timeout=8"])
    assert m.heartbeat_timeout == 8.0
