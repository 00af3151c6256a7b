"""spy_master.py start-up and stop: bad flags, bad databases, signals, pidfile, daemonize."""
from __future__ import annotations

import os
import signal
import socket
import sqlite3
import subprocess
import time

import pytest

from tests.support import wait_for
from tests.support import free_port
from tests.support.master import MasterProc, http, run_master


@pytest.mark.parametrize("flag,name", [
    ("--heartbeat_timeout=0", "--heartbeat_timeout"),
    ("--heartbeat_timeout=abc", "--heartbeat_timeout"),
    ("--monitor_interval=-1", "--monitor_interval"),
    ("--port=70000", "--port"),
    ("--daemonize=2", "--daemonize"),
    ("--db=/nonexistent/dir/m.db", "--db"),
    ("--no_such_flag=1", "unrecognized"),
])
def test_invalid_flags_exit_2_with_a_message(tmp_path, flag, name):
    r = run_master([flag], cwd=str(tmp_path))
    assert r.returncode == 2, r
    assert name in r.stderr and "Traceback" not in r.stderr


def test_version(tmp_path):
    r = run_master(["--version"], cwd=str(tmp_path))
    assert r.returncode == 0 and "spy_master" in r.stdout


def _one_line_failure(r: subprocess.CompletedProcess, words: str) -> None:
    assert r.returncode == 1, (r.returncode, r.stdout, r.stderr)
    assert words in r.stderr, r.stderr
    assert "Traceback" not in r.stderr
    errors = [line for line in r.stderr.splitlines() if " ERROR " in line or
              line.startswith("spy_master:")]
    assert len(errors) == 1 and words in errors[0], r.stderr


def test_corrupt_database_is_refused_not_reset(tmp_path):
    db = tmp_path / "m.db"
    junk = b"this is not an sqlite database" * 300
    db.write_bytes(junk)
    r = run_master([f"--db={db}", f"--port={free_port()}"], cwd=str(tmp_path))
    _one_line_failure(r, "corrupt")
    assert str(db) in r.stderr
    assert db.read_bytes() == junk  # never a silent reset


def test_damaged_pages_are_refused(masters, tmp_path):
    m = masters(tmp_path)
    m.post("/v1/chunkserver/batchinitserver",
           [{"GroupId": g, "Ip": f"10.1.{g % 250}.{g // 250}", "Port": 8000}
            for g in range(1, 600)])
    assert m.stop() == 0
    size = os.path.getsize(m.db)
    with open(m.db, "r+b") as f:
        f.seek(size // 2)
        f.write(os.urandom(size // 2))
    r = run_master([f"--db={m.db}", f"--port={free_port()}"], cwd=str(tmp_path))
    _one_line_failure(r, "corrupt")


def test_locked_database_is_a_clear_error(tmp_path):
    db = str(tmp_path / "m.db")
    m = MasterProc(tmp_path, db=db)
    try:
        m.start()
        assert m.stop() == 0
    finally:
        m.cleanup()
    holder = sqlite3.connect(db, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        t0 = time.monotonic()
        r = run_master([f"--db={db}", f"--port={free_port()}"], cwd=str(tmp_path))
        _one_line_failure(r, "locked")
        assert time.monotonic() - t0 < 20
    finally:
        holder.execute("ROLLBACK")
        holder.close()


def test_second_master_on_the_same_database_is_refused(masters, tmp_path):
    m = masters(tmp_path)
    r = run_master([f"--db={m.db}", f"--port={free_port()}"], cwd=str(tmp_path))
    _one_line_failure(r, "in use by another spy_master")
    assert m.alive() and m.get("/v1/chunkmaster/route").status == 200


def test_foreign_database_is_refused(tmp_path):
    db = str(tmp_path / "other.db")
    c = sqlite3.connect(db)
    c.execute("CREATE TABLE users (name TEXT)")
    c.commit()
    c.close()
    r = run_master([f"--db={db}", f"--port={free_port()}"], cwd=str(tmp_path))
    _one_line_failure(r, "not a speedy master database")


def test_port_in_use_is_a_clear_error(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = run_master([f"--db={tmp_path / 'm.db'}", f"--port={port}"], cwd=str(tmp_path))
    _one_line_failure(r, "cannot listen")
    assert sorted(os.listdir(tmp_path)) == []  # the port is bound first: no database left


def test_empty_database_file_is_refused_unless_init_db(masters, tmp_path):
    db = tmp_path / "m.db"
    db.write_bytes(b"")
    r = run_master([f"--db={db}", f"--port={free_port()}"], cwd=str(tmp_path))
    _one_line_failure(r, "empty file")
    assert "--init_db" in r.stderr and db.read_bytes() == b""
    m = masters(tmp_path, "--init_db", db=str(db))
    assert m.fid() == (1, 101)


def test_missing_fid_state_row_is_a_one_line_error(masters, tmp_path):
    m = masters(tmp_path)
    assert m.stop() == 0
    c = sqlite3.connect(m.db)
    c.execute("DELETE FROM fid_state")
    c.commit()
    c.close()
    r = run_master([f"--db={m.db}", f"--port={free_port()}"], cwd=str(tmp_path))
    _one_line_failure(r, "no fid_state row")


def test_error_goes_to_the_log_file_too(tmp_path):
    db = tmp_path / "m.db"
    db.write_bytes(b"garbage" * 1000)
    log = tmp_path / "master.log"
    r = run_master([f"--db={db}", f"--port={free_port()}", f"--error_log={log}"],
                   cwd=str(tmp_path))
    _one_line_failure(r, "corrupt")
    assert "corrupt" in log.read_text() and "ERROR" in log.read_text()


def test_sigterm_stops_gracefully_and_sighup_reopens_the_log(masters, tmp_path):
    pidfile = tmp_path / "master.pid"
    m = masters(tmp_path, f"--pidfile={pidfile}")
    assert int(pidfile.read_text()) == m.proc.pid
    m.register(1, "10.0.0.1", 8000)
    os.rename(m.log, m.log + ".1")
    m.proc.send_signal(signal.SIGHUP)
    wait_for(lambda: os.path.exists(m.log), what="a new log file after SIGHUP")
    m.register(1, "10.0.0.2", 8000)
    wait_for(lambda: "10.0.0.2" in m.log_text(), what="lines in the reopened log")
    assert "10.0.0.2" not in open(m.log + ".1").read()
    assert m.stop() == 0
    assert "stopped" in m.log_text() and "SIGTERM" in m.log_text()
    assert not pidfile.exists()
    # A clean stop leaves a database that opens without recovery, data intact.
    with sqlite3.connect(m.db) as c:
        assert c.execute("SELECT count(*) FROM chunkserver").fetchone()[0] == 2
    assert not os.path.exists(m.db + "-wal") or os.path.getsize(m.db + "-wal") == 0


def test_sigint_stops_too(masters, tmp_path):
    m = masters(tmp_path)
    assert m.kill(signal.SIGINT) == 0


def test_daemonize_writes_and_removes_the_pidfile(tmp_path):
    pidfile = tmp_path / "run" / "master.pid"
    pidfile.parent.mkdir()
    port = free_port()
    log = tmp_path / "master.log"
    # Relative paths are resolved before the daemon changes directory to /.
    r = run_master(["--daemonize=1", "--db=rel.db", f"--port={port}",
                    "--error_log=master.log", "--pidfile=run/master.pid"], cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    pid = None
    try:
        pid = int(wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(),
                           what="pidfile"))
        wait_for(lambda: _answers(port), what="daemon answering")
        assert (tmp_path / "rel.db").exists()
        assert http(port, "GET", "/v1/chunkmaster/fid").json() == {"FidBegin": 1,
                                                                   "FidEnd": 101}
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not pidfile.exists(), what="pidfile removed")
        wait_for(lambda: not _alive(pid), what="daemon gone")
        assert "listening on" in log.read_text() and "stopped" in log.read_text()
    finally:
        if pid and _alive(pid):
            os.kill(pid, signal.SIGKILL)


def _answers(port: int) -> bool:
    try:
        return http(port, "GET", "/v1/chunkserver/checkerror", timeout=2).status == 200
    except OSError:
        return False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is not alive
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


@pytest.mark.parametrize("daemonize", ["0", "1"])
def test_pidfile_of_a_running_process_is_refused(tmp_path, daemonize):
    pidfile = tmp_path / "master.pid"
    pidfile.write_text(f"{os.getpid()}\n")  # this test process: alive
    r = run_master([f"--db={tmp_path / 'm.db'}", f"--port={free_port()}",
                    f"--pidfile={pidfile}", f"--daemonize={daemonize}"], cwd=str(tmp_path))
    _one_line_failure(r, "names a running process")
    assert pidfile.read_text() == f"{os.getpid()}\n"


def test_graceful_stop_is_prompt_with_idle_keepalive_clients(masters, tmp_path):
    m = masters(tmp_path)
    conns = []
    for _ in range(5):  # idle keep-alive connections after one request each
        s = socket.create_connection(("127.0.0.1", m.port), timeout=10)
        s.sendall(b"GET /v1/chunkserver/checkerror HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).startswith(b"HTTP/1.1 200")
        conns.append(s)
    t0 = time.monotonic()
    assert m.stop() == 0
    assert time.monotonic() - t0 < 10
    for s in conns:
        s.close()


def test_print_config_names_the_file_and_masks_the_token(tmp_path):
    conf = tmp_path / "m.conf"
    conf.write_text("token = s3cret\nmax_connections = 500\n")
    r = run_master([f"--config={conf}", "--read_timeout=3", "--print_config"],
                   cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    lines = {ln.split(" = ")[0]: ln for ln in r.stdout.splitlines()}
    assert "s3cret" not in r.stdout and "'***'" in lines["token"]
    assert r.stdout.splitlines()[0] == f"# config file: {conf}"
    assert "# from config_file;" in lines["max_connections"]
    assert "# from command_line;" in lines["read_timeout"]
    assert "# from defaults;" in lines["idle_timeout"]
