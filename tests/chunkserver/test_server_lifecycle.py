"""spy_server.py as a process: command line, start errors, signals, restarts, crashes."""
from __future__ import annotations

import os
import signal
import socket
import struct
import subprocess
import threading

import pytest

from tests.support import PYTHON, free_port
from tests.support.daemon import session_pids, spawn, stop_session
from tests.support import wait_for
from tests.support.server import SPY_SERVER, payload
from speedy.chunkserver.shm.pool import BlockPool
from speedy.wire.protocol import Err, Op, encode_file_key
from speedy.chunkserver.shm.counters import StatsView

MiB = 1 << 20
REQUIRED = ["--master_ip=127.0.0.1", "--master_port=1", "--group_id=1"]


def run_cli(*args, cwd=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([PYTHON, SPY_SERVER, *args], capture_output=True, text=True,
                          cwd=cwd, timeout=timeout)


def test_missing_required_flags_print_usage():
    r = run_cli()
    assert r.returncode == 2
    assert "usage:" in r.stderr and "--master_ip" in r.stderr and "--group_id" in r.stderr
    assert "Traceback" not in r.stderr


@pytest.mark.parametrize("flag", ["--mem_blocks=0", "--chunks=201", "--sync=2", "--port=70000",
                                  "--group_id=0", "--chunk_size=12"])
def test_invalid_value_names_the_flag(tmp_path, flag):
    r = run_cli(*REQUIRED, f"--data_dir={tmp_path}", flag)
    assert r.returncode == 2
    assert flag.split("=")[0] in r.stderr and "Traceback" not in r.stderr


def test_chunks_of_another_group_refuse_start(tmp_path):
    (tmp_path / "chunk_9_1.chunk").write_bytes(b"\0" * 4096)
    r = run_cli(*REQUIRED, f"--data_dir={tmp_path}", f"--port={free_port()}",
                "--chunk_size=1048576")
    assert r.returncode == 1
    errors = [line for line in r.stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and "group 9" in errors[0], r.stderr
    assert "Traceback" not in r.stderr
    assert not [n for n in os.listdir("/dev/shm") if n.startswith("speedy") and
                not os.path.exists(f"/proc/{n[6:].split('_')[0]}")]


def test_port_in_use_refuses_start(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        r = run_cli(*REQUIRED, f"--data_dir={tmp_path}", f"--port={busy.getsockname()[1]}")
    assert r.returncode == 1
    assert "cannot listen on 127.0.0.1" in r.stderr and "Traceback" not in r.stderr
    assert not list(tmp_path.iterdir())  # nothing created


def test_sigterm_finishes_in_flight_write_and_releases_everything(servers):
    srv = servers("term", workers=2, mem_blocks=8)
    data = payload(5, 2 * MiB + 3)
    idle = srv.client()
    busy = srv.client()
    assert idle.write(1, b"kept") == Err.SUCCESS
    busy.sock.sendall(struct.pack(">BI", Op.WRITE, 10 + len(data)) + encode_file_key(1, 5)
                      + data[:MiB + 100])
    pool = BlockPool.attach(f"speedy{srv.pid}_pool")
    try:
        wait_for(lambda: pool.in_use() == 1)  # blocks only for bytes sent
    finally:
        pool.close()
    srv.signal(signal.SIGTERM)
    assert idle.closed(timeout=10)  # idle connections are closed at once

    def refused() -> bool:
        try:
            socket.create_connection(("127.0.0.1", srv.port), timeout=1).close()
        except ConnectionRefusedError:
            return True
        return False

    wait_for(refused, timeout=10)  # no new connections
    busy.sock.sendall(data[MiB + 100:])
    assert busy.response() == (Op.WRITE, Err.SUCCESS, b"")
    assert busy.closed(timeout=10)
    assert srv.wait(60) == 0
    assert srv.shm_segments() == []
    log = srv.log()
    assert "SIGTERM: stopping gracefully" in log and "stopped (exit code 0)" in log
    srv.port = 0
    srv.start()  # a restart keeps every file
    with srv.client() as c:
        assert c.read(1) == (Err.SUCCESS, b"kept")
        assert c.read(5) == (Err.SUCCESS, data)


def test_sync_group_commit_survives_kill_9(servers):
    srv = servers("sync", sync=1, workers=2, mem_blocks=32, chunk_size=8 * MiB)
    acked: list[int] = []
    lock = threading.Lock()
    stop = threading.Event()

    def writer(n: int) -> None:
        try:
            with srv.client(timeout=10) as c:
                for i in range(10_000):
                    if stop.is_set():
                        return
                    fid = n * 100_000 + i
                    if c.write(fid, payload(fid, 4096)) == Err.SUCCESS:
                        with lock:
                            acked.append(fid)
        except (OSError, EOFError):
            pass  # the server was killed under us

    stats = StatsView.attach(f"speedy{srv.pid}_stats")
    threads = [threading.Thread(target=writer, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    try:
        wait_for(lambda: len(acked) >= 300, timeout=60)
        totals = stats.totals()
    finally:
        stats.close()
        srv.kill9()  # every process of the server, in the middle of the writes
        stop.set()
        for t in threads:
            t.join(30)
    assert totals["committed_writes"] >= 300
    assert totals["max_batch"] > 1, totals  # writes shared a commit (and its fsyncs)
    assert totals["commits"] < totals["committed_writes"]
    srv.port = 0
    srv.start()
    with srv.client() as c:
        for fid in acked:
            assert c.read(fid) == (Err.SUCCESS, payload(fid, 4096)), fid


def test_sighup_reopens_the_log_in_every_process(servers):
    srv = servers("hup", workers=2)
    os.rename(srv.log_path, srv.log_path + ".1")
    srv.signal(signal.SIGHUP)
    wait_for(lambda: srv.log().count("log file reopened") == 4, timeout=20)
    with srv.client() as c:
        assert c.ping() == Err.SUCCESS
    assert "log file reopened" not in open(srv.log_path + ".1").read()


def test_daemonize_with_pidfile(tmp_path):
    port = free_port()
    pidfile = tmp_path / "spy.pid"
    log = tmp_path / "server.log"
    (tmp_path / "data").mkdir()
    r = run_cli(*REQUIRED, "--data_dir=data", f"--port={port}", "--daemonize=1",
                "--chunk_size=1048576", "--workers=1", "--mem_blocks=2",
                "--pidfile=spy.pid", "--error_log=server.log", cwd=tmp_path, timeout=30)
    assert r.returncode == 0, r.stderr
    pid = wait_for(lambda: pidfile.exists() and int(pidfile.read_text() or 0), timeout=20)
    try:
        from tests.support.server import Client

        def serving() -> bool:
            try:
                with Client(port, timeout=2) as c:
                    return c.ping() == Err.SUCCESS
            except (OSError, EOFError):
                return False

        wait_for(serving, timeout=30)
        assert os.readlink(f"/proc/{pid}/cwd") == "/"
        status = open(f"/proc/{pid}/status").read()
        assert "Umask:\t0022" in status
        assert (tmp_path / "data" / "chunk_1_1.chunk").exists()  # relative path resolved
        assert "serving on 127.0.0.1" in log.read_text()
        os.kill(pid, signal.SIGTERM)
        wait_for(lambda: not os.path.exists(f"/proc/{pid}"), timeout=60)
        assert not pidfile.exists()
        assert not [n for n in os.listdir("/dev/shm") if n.startswith(f"speedy{pid}_")]
    finally:
        if os.path.exists(f"/proc/{pid}"):
            os.killpg(os.getpgid(pid), signal.SIGKILL)


def test_pidfile_of_a_running_process_refuses_start(tmp_path):
    pidfile = tmp_path / "spy.pid"
    pidfile.write_text(f"{os.getpid()}\n")  # this test process: alive
    r = run_cli(*REQUIRED, f"--data_dir={tmp_path}", f"--port={free_port()}",
                f"--pidfile={pidfile}")
    assert r.returncode == 1
    assert "names a running process" in r.stderr and "Traceback" not in r.stderr
    assert pidfile.read_text() == f"{os.getpid()}\n"  # left alone


def test_disk_faults_turn_the_server_read_only(servers):
    faults = "write:*:after=2,read:*:after=1"  # SPEEDY_FAULTS: see speedy/chunkserver/faults.py
    srv = servers("faults", workers=1, env={"SPEEDY_FAULTS": faults})
    with srv.client() as c:
        assert c.write(1, b"one") == Err.SUCCESS
        assert c.write(2, b"two") == Err.SUCCESS
        assert c.write(3, b"three") == Err.WRITE_ERROR  # the disk write failed
        assert c.write(4, b"four") == Err.SERVER_READ_ONLY  # and the server knows it
        assert c.delete(1) == Err.SERVER_READ_ONLY
        assert c.call(Op.GET_STATUS) == (Err.SUCCESS, b"\x01")
        assert c.call(Op.SET_STATUS, b"\x00") == (Err.SUCCESS, b"")
        assert c.call(Op.GET_STATUS) == (Err.SUCCESS, b"\x01")  # a disk failure stays
        assert c.read(1) == (Err.SUCCESS, b"one")  # 1 read: header and data at once
        assert c.read(2)[0] == Err.READ_ERROR
        assert c.read(3)[0] == Err.FILE_NOT_FOUND  # a failed write leaves nothing
        assert c.call(Op.CHECK_DISK) == (Err.CHUNK_CHECK_ERROR, b"")
        stats = StatsView.attach(f"speedy{srv.pid}_stats")
        try:
            totals = stats.totals()
        finally:
            stats.close()
    assert totals["status"] == 1 and totals["write_error"] == 2 and totals["read_error"] == 1
    assert "the server is read-only (Status 1)" in srv.log()


def test_worker_that_cannot_boot_stops_the_server(servers):
    srv = servers("boot", workers=1)
    os.unlink(f"/dev/shm/speedy{srv.pid}_ic")  # a replacement worker cannot attach the index
    worker = [pid for pid, comm in srv.children().items() if comm.startswith("spy_worker")]
    os.kill(worker[0], signal.SIGKILL)
    assert srv.wait(60) == 4
    assert srv.shm_segments() == []
    assert "a worker could not start; stopping the server" in srv.log()


def test_metrics_port_in_use_is_a_clear_start_error(tmp_path):
    """Exit 1 with one line, after the workers were forked: nothing is left behind."""
    out = str(tmp_path / "out")
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        mport = taken.getsockname()[1]
        proc = spawn([PYTHON, SPY_SERVER, *REQUIRED, f"--data_dir={tmp_path}",
                      f"--port={free_port()}", "--workers=1", "--mem_blocks=4", "--chunks=2",
                      f"--chunk_size={4 * MiB}", f"--metrics_port={mport}"], out)
        try:
            assert proc.wait(60) == 1
        finally:
            stop_session(proc)
    text = open(out).read()
    assert f"cannot serve metrics on 127.0.0.1:{mport}" in text and "Traceback" not in text
    assert session_pids(proc.pid) == []
    assert [n for n in os.listdir("/dev/shm") if n.startswith(f"speedy{proc.pid}_")] == []
