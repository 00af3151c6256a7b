"""First use of the `speedy` command against a real cluster (issue 15): messages, exit
codes, terminals, progress, config files, spellings."""
from __future__ import annotations

import os
import pty
import subprocess
import sys

from tests.support import ROOT
from tests.support.cluster import blob, cluster_fixture, run_cli

cluster = cluster_fixture(groups=1, per_group=2, chunks=2, chunk_size=16 << 20,
                          mem_blocks=16)


def one_line(r) -> str:
    err = r.stderr.decode().strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def run_on_tty(args: list[str], which: str, stdin: bytes = b"") -> tuple[int, bytes, bytes]:
    """`python -m speedy args` with stdout or stderr on a pseudo-terminal:
    (exit code, what the terminal got, what the other stream got)."""
    master_fd, slave_fd = pty.openpty()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SPEEDY_")}
    env.update(HOME="/nonexistent", XDG_CONFIG_HOME="/nonexistent", PYTHONPATH=ROOT)
    streams = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, which: slave_fd}
    proc = subprocess.Popen([sys.executable, "-m", "speedy", *args], stdin=subprocess.PIPE,
                            env=env, cwd=ROOT, **streams)
    os.close(slave_fd)
    other = proc.stderr if which == "stdout" else proc.stdout
    proc.stdin.write(stdin)
    proc.stdin.close()
    got = bytearray()
    while True:
        try:
            chunk = os.read(master_fd, 65536)
        except OSError:  # EIO: the last writer closed the terminal
            break
        if not chunk:
            break
        got += chunk
    rest = other.read()
    code = proc.wait(60)
    os.close(master_fd)
    return code, bytes(got), rest


def test_get_multipart_suffix_on_a_plain_key(cluster):
    key = cluster.cli("put", "-", input=b"plain bytes").stdout.decode().strip()
    assert "m" not in key
    r = cluster.cli("get", key + "m")
    assert r.returncode == 1
    assert f"{key}m is not a multi-part file" in one_line(r)
    r = cluster.cli("stat", key + "m")
    assert r.returncode == 1 and "not a multi-part file" in one_line(r)
    r = cluster.cli("get", "1,999999m")
    assert r.returncode == 1 and "1,999999m not found" in one_line(r)


def test_remove_unknown_server_exits_1(cluster):
    r = cluster.cli("admin", "remove-server", "1", "127.0.0.1:1")
    assert r.returncode == 1
    assert "127.0.0.1:1 is not registered in group 1" in one_line(r)


def test_master_given_as_url(cluster):
    for url in (f"http://{cluster.master_addr}", f"http://{cluster.master_addr}/"):
        r = run_cli("--master", url, "status")
        assert r.returncode == 0, r.stderr
    r = run_cli("--master", f"https://{cluster.master_addr}", "status")
    assert r.returncode == 2 and "plain HTTP" in one_line(r)


def test_get_refuses_a_terminal(cluster):
    key = cluster.cli("put", "-", input=b"binary\x00bytes").stdout.decode().strip()
    code, tty, err = run_on_tty(["--master", cluster.master_addr, "get", key], "stdout")
    assert code == 2 and tty == b""
    assert b"refusing to write" in err and b"-o -" in err
    code, tty, err = run_on_tty(["--master", cluster.master_addr, "get", key, "-o", "-"],
                                "stdout")
    assert code == 0 and tty.replace(b"\r\n", b"\n") == b"binary\x00bytes", err


def test_stdin_upload_progress_ends_with_a_total_and_rate(cluster):
    data = blob(5 << 20, 3)
    code, tty, out = run_on_tty(["--master", cluster.master_addr, "put", "-"], "stderr",
                                stdin=data)
    assert code == 0, tty
    text = tty.decode()
    final = text.replace("\r", "\n").strip().splitlines()[-1]
    assert final.startswith("put stdin: 5.0 MiB in ") and final.endswith("/s"), text
    key = out.decode().strip()
    assert cluster.cli("get", key, "-o", "-").stdout == data


def test_file_upload_progress_shows_rate(cluster, tmp_path):
    path = tmp_path / "big"
    path.write_bytes(blob(9 << 20, 4))
    code, tty, out = run_on_tty(["--master", cluster.master_addr, "--parallel", "1",
                                 "--part-size", "1M", "put", str(path)], "stderr")
    assert code == 0, tty
    lines = tty.decode().replace("\r", "\n").split("\n")
    assert any("/9.0 MiB" in ln and "%" in ln and "/s" in ln for ln in lines), lines
    assert any(ln.startswith(f"put {path}: 9.0 MiB in ") for ln in lines), lines


def test_client_config_file_typo_names_file_and_line(cluster, tmp_path):
    conf = tmp_path / "client.conf"
    conf.write_text(f"master = {cluster.master_addr}\npart_sise = 1M\n")
    r = run_cli("-c", str(conf), "status")
    assert r.returncode == 2
    assert f"{conf}, line 2: unknown option 'part_sise' (did you mean 'part_size'?)" \
        in one_line(r)


def test_both_spellings_of_client_options(cluster, tmp_path):
    r = cluster.cli("--part_size", "1M", "--min_replicas", "2", "put", "-", input=b"x" * 10)
    assert r.returncode == 0, r.stderr
    conf = tmp_path / "client.conf"
    conf.write_text(f"master = {cluster.master_addr}\nmin-replicas = 2\npart_size = 2M\n")
    assert run_cli("-c", str(conf), "status").returncode == 0
