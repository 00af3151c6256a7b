"""The `speedy` command without a cluster: usage errors, exit codes, configuration."""
from __future__ import annotations

import socket
import threading

import pytest

from tests.support.cluster import run_cli
from tests.support import free_port


def one_line_error(r) -> str:
    err = r.stderr.decode()
    assert "Traceback" not in err, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("speedy"), err
    return lines[0]


@pytest.fixture(scope="module")
def dead_master() -> str:
    """An address where nothing listens."""
    return f"127.0.0.1:{free_port()}"


@pytest.mark.parametrize("args", [
    [], ["nope"], ["put"], ["get"], ["get", "1,2", "3"], ["rm"], ["stat"], ["admin"],
    ["admin", "add-server", "x", "127.0.0.1:1"], ["admin", "add-server", "0", "h:1"],
    ["admin", "add-server", "1", "h"], ["admin", "set-status", "h:1", "dead"],
    ["--master", "h:99999", "status"], ["--master", ":1", "status"],
    ["--timeout", "0", "status"], ["--part-size", "1X", "status"], ["local", "sideways"],
    ["get", "1,x"], ["get", "0,5"], ["stat", "3;5"], ["rm", "1,2", "bad"],
])
def test_usage_errors_exit_2_with_one_line(args, dead_master):
    r = run_cli("--master", dead_master, *args) if "--master" not in args else run_cli(*args)
    assert r.returncode == 2, (args, r.stderr)
    assert r.stdout == b""
    one_line_error(r)


def test_help_and_version_exit_0():
    for args in (["--help"], ["put", "--help"], ["admin", "set-status", "--help"],
                 ["--version"], ["local", "--help"]):
        r = run_cli(*args)
        assert r.returncode == 0, (args, r.stderr)
        assert r.stdout


@pytest.mark.parametrize("args", [["get", "1,2"], ["stat", "1,2m"], ["rm", "1,2"],
                                  ["status"], ["admin", "add-server", "1", "h:1"],
                                  ["admin", "set-status", "h:1", "ro"]])
def test_unreachable_master_exits_3(args, dead_master):
    r = run_cli("--master", dead_master, *args, timeout=30)
    assert r.returncode == 3, r.stderr
    line = one_line_error(r)
    assert dead_master in line and "unreachable" in line


def test_put_to_an_unreachable_master_prints_no_key(tmp_path, dead_master):
    f = tmp_path / "f"
    f.write_bytes(b"x" * 10)
    r = run_cli("--master", dead_master, "put", str(f))
    assert r.returncode == 3 and r.stdout == b""
    one_line_error(r)


def test_missing_file_exits_1_before_any_upload(tmp_path, dead_master):
    good = tmp_path / "good"
    good.write_bytes(b"x")
    r = run_cli("--master", dead_master, "put", str(good), str(tmp_path / "missing"))
    assert r.returncode == 1 and r.stdout == b""
    assert "missing: no such file" in one_line_error(r)


def test_directory_and_double_stdin_are_usage_errors(tmp_path, dead_master):
    assert run_cli("--master", dead_master, "put", str(tmp_path)).returncode == 2
    assert run_cli("--master", dead_master, "put", "-", "-").returncode == 2


def test_master_from_env_and_config_file(tmp_path):
    port_env, port_conf = free_port(), free_port()
    r = run_cli("status", env={"SPEEDY_MASTER": f"127.0.0.1:{port_env}"})
    assert f"127.0.0.1:{port_env}" in one_line_error(r) and r.returncode == 3
    conf = tmp_path / "speedy" / "client.conf"
    conf.parent.mkdir()
    conf.write_text(f"master = 127.0.0.1:{port_conf}\ntimeout = 2\n")
    r = run_cli("status", env={"XDG_CONFIG_HOME": str(tmp_path)})
    assert f"127.0.0.1:{port_conf}" in one_line_error(r)
    r = run_cli("--config", str(conf), "status")
    assert f"127.0.0.1:{port_conf}" in one_line_error(r)
    # flag over env over config file
    r = run_cli("--master", f"127.0.0.1:{port_env}", "status",
                env={"XDG_CONFIG_HOME": str(tmp_path)})
    assert f"127.0.0.1:{port_env}" in one_line_error(r)
    conf.write_text("no_such_option = 1\n")
    r = run_cli("status", env={"XDG_CONFIG_HOME": str(tmp_path)})
    assert r.returncode == 2
    one_line_error(r)


def test_default_master_is_8099():
    with socket.socket() as s:  # only meaningful when nothing listens on 8099
        if s.connect_ex(("127.0.0.1", 8099)) == 0:
            pytest.skip("something listens on 8099")
    r = run_cli("status")
    assert "127.0.0.1:8099" in one_line_error(r) and r.returncode == 3


@pytest.mark.parametrize("answer", [b"garbage\r\n\r\n", b"",
                                    b"HTTP/1.0 200 OK\r\n\r\nnot json",
                                    b"HTTP/1.0 200 OK\r\n\r\n{\"1\": 5}",
                                    b"HTTP/1.0 500 Oops\r\n\r\ndatabase is locked\n"])
def test_master_that_answers_garbage_is_a_cluster_error(answer):
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]

    def serve():
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.recv(4096)
                conn.sendall(answer)
    t = threading.Thread(target=serve, daemon=True)
    t.start()
    try:
        r = run_cli("--master", f"127.0.0.1:{port}", "--timeout", "2", "get", "1,1")
    finally:
        srv.close()
    assert r.returncode == 3
    line = one_line_error(r)
    assert "internal error" not in line
    if b"500" in answer:
        assert "HTTP 500: database is locked" in line


def test_set_status_on_a_master_without_the_route_says_so():
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(8)
    port = srv.getsockname()[1]

    def serve():  # what the original Go master answers for an unknown path
        while True:
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            with conn:
                conn.recv(4096)
                conn.sendall(b"HTTP/1.0 404 Not Found\r\nContent-Type: text/plain\r\n\r\n"
                             b"404 page not found\n")
    threading.Thread(target=serve, daemon=True).start()
    try:
        r = run_cli("--master", f"127.0.0.1:{port}", "admin", "set-status", "h:1", "ro")
    finally:
        srv.close()
    assert r.returncode == 3
    assert "has no /v1/chunkserver/setstatus route" in one_line_error(r)


def test_bench_is_dispatched():
    r = run_cli("bench", "--help")
    assert r.returncode == 0 and b"bench" in r.stdout


def test_get_to_a_bad_place_is_one_clean_line(tmp_path, dead_master):
    r = run_cli("--master", dead_master, "get", "1,2", "-o", str(tmp_path / "no" / "f"))
    assert r.returncode == 1 and "no such directory" in one_line_error(r)
    r = run_cli("--master", dead_master, "get", "1,2", "-o", str(tmp_path))
    assert r.returncode == 2 and "is a directory" in one_line_error(r)
