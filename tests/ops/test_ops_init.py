"""init/: systemd units (systemd-analyze verify, the unit's ExecStart run for real with a
notify socket), the LSB scripts (syntax, exit codes, start/stop/reload against a
temporary config) and the logrotate snippet (a real rotation loses no line)."""
from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import subprocess
import time
import urllib.request

import pytest

from tests.support import PYTHON, ROOT, free_port, wait_port
from tests.support.daemon import notify_socket, spawn, stop_session
from tests.support.server import discard_shm

INIT = os.path.join(ROOT, "init")
UNITS = ("spy_server@.service", "spy_master.service")
SCRIPTS = ("spy_server", "spy_master")
SSD = shutil.which("start-stop-daemon")
SSD_MODES = ["ssd", "kill"] if SSD else ["kill"]


# --- systemd units ------------------------------------------------------------------

def unit_settings(name: str) -> dict[str, list[str]]:
    """The [Service]/[Unit]/[Install] assignments of a unit file, by key."""
    out: dict[str, list[str]] = {}
    for line in open(os.path.join(INIT, name), encoding="utf-8"):
        line = line.strip()
        if line and not line.startswith(("#", ";", "[")):
            key, _, value = line.partition("=")
            out.setdefault(key, []).append(value)
    return out


def localized_unit(name: str, dest_dir, conf: str | None = None) -> str:
    """A copy of the unit with the /opt/speedy install paths pointing at this checkout."""
    text = open(os.path.join(INIT, name), encoding="utf-8").read()
    text = text.replace("/opt/speedy/.venv/bin/python", PYTHON)
    text = text.replace("/opt/speedy/", ROOT + "/")
    if conf:
        text = re.sub(r"--config=\S+", f"--config={conf}", text)
    path = os.path.join(str(dest_dir), name.replace("@.", "@test."))
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


@pytest.mark.parametrize("name", UNITS)
def test_unit_settings(name):
    s = unit_settings(name)
    daemon = "spy_server" if name.startswith("spy_server") else "spy_master"
    assert s["Type"] == ["notify"] and s["NotifyAccess"] == ["main"]
    assert s["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert s["LimitNOFILE"] == ["65536"]
    assert int(s["TimeoutStopSec"][0]) >= 60
    assert s["Restart"] == ["on-failure"]
    for key in ("NoNewPrivileges", "PrivateTmp", "ProtectHome"):
        assert s[key] == ["yes"], key
    assert s["ProtectSystem"] == ["strict"]
    assert set(s["ReadWritePaths"][0].split()) == {"/var/lib/speedy", "/var/log/speedy"}
    assert s["User"] == ["speedy"]
    (start,) = s["ExecStart"]
    assert start.startswith(f"/opt/speedy/.venv/bin/python /opt/speedy/{daemon}.py ")
    assert "--daemonize=0" in start.split()
    conf = "/etc/speedy/spy_server-%i.conf" if daemon == "spy_server" \
        else "/etc/speedy/spy_master.conf"
    assert f"--config={conf}" in start.split()


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="no systemd-analyze")
def test_systemd_analyze_verify(tmp_path):
    paths = [localized_unit(name, tmp_path) for name in UNITS]
    proc = subprocess.run(["systemd-analyze", "verify", *paths], capture_output=True,
                          text=True, timeout=120)
    mine = [ln for ln in (proc.stdout + proc.stderr).splitlines()
            if "spy_" in ln or str(tmp_path) in ln]
    assert proc.returncode == 0 and mine == [], proc.stdout + proc.stderr
    # the same check notices a broken unit (so the assertion above can fail)
    broken = tmp_path / "spy_broken.service"
    broken.write_text(open(paths[1]).read().replace("LimitNOFILE=", "LimitNOFLIE="))
    proc = subprocess.run(["systemd-analyze", "verify", str(broken)], capture_output=True,
                          text=True, timeout=120)
    assert "LimitNOFLIE" in proc.stdout + proc.stderr


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the daemon and every child it forked (its own session), reap it, and
    remove the shared memory a killed chunkserver leaves."""
    stop_session(proc)
    discard_shm(proc.pid)


def master_conf(tmp_path, port: int) -> str:
    """A master config file under tmp_path."""
    conf = tmp_path / "spy_master.conf"
    conf.write_text(f"ip = 127.0.0.1\nport = {port}\ndb = {tmp_path / 'master.db'}\n"
                    f"error_log = {tmp_path / 'spy_master.log'}\n")
    return str(conf)


def run_unit(unit: str, tmp_path) -> tuple[subprocess.Popen, socket.socket]:
    """The unit's ExecStart started as systemd would, with a notify socket: (process, it)."""
    (start,) = [ln.split("=", 1)[1] for ln in open(unit) if ln.startswith("ExecStart=")]
    sock = notify_socket(str(tmp_path / "notify.sock"))
    proc = spawn(start.split(), str(tmp_path / "daemon.out"), cwd=str(tmp_path),
                 env={"NOTIFY_SOCKET": sock.getsockname()})
    return proc, sock


def test_master_as_the_unit_runs_it(tmp_path):
    """ExecStart of spy_master.service, Type=notify: READY=1 after bind, STOPPING=1 on TERM."""
    port = free_port()
    unit = localized_unit("spy_master.service", tmp_path, master_conf(tmp_path, port))
    proc, sock = run_unit(unit, tmp_path)
    try:
        msgs = sock.recv(4096).decode()
        assert "READY=1" in msgs.split("\n")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/chunkmaster/fid",
                                    timeout=10) as r:  # ready means answering
            assert r.status == 200
        proc.send_signal(signal.SIGHUP)  # ExecReload
        time.sleep(0.2)
        assert proc.poll() is None
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        seen = ""
        while "STOPPING=1" not in seen:
            seen += sock.recv(4096).decode() + "\n"
        assert proc.wait(60) == 0
        assert time.monotonic() - t0 < 60  # TimeoutStopSec
    finally:
        kill_session(proc)
        sock.close()
    assert "Traceback" not in (tmp_path / "daemon.out").read_text("utf-8", errors="replace")


# --- LSB init scripts -----------------------------------------------------------------

@pytest.mark.parametrize("name", SCRIPTS)
def test_script_syntax_and_lsb_header(name):
    path = os.path.join(INIT, name)
    assert os.access(path, os.X_OK)
    text = open(path, encoding="utf-8").read()
    assert text.startswith("#!/bin/sh\n")
    for sh in ("sh", "dash", "bash"):
        if shutil.which(sh):
            proc = subprocess.run([sh, "-n", path], capture_output=True, text=True)
            assert proc.returncode == 0, (sh, proc.stderr)
    header = text.split("### BEGIN INIT INFO\n", 1)[1].split("### END INIT INFO", 1)[0]
    fields = dict(re.match(r"# ([A-Za-z-]+):\s*(.*)", ln).groups()
                  for ln in header.splitlines() if re.match(r"# [A-Za-z-]+:", ln))
    assert fields["Provides"] == name
    assert fields["Default-Start"] == "2 3 4 5" and fields["Default-Stop"] == "0 1 6"
    for key in ("Required-Start", "Required-Stop", "Short-Description"):
        assert fields[key]


STANDIN = r'''
"""A stand-in daemon with the flags the init scripts pass (the real one is tested too)."""
import logging, os, signal, sys, time
sys.path.insert(0, os.environ["STANDIN_ROOT"])
from speedy.common.logs import reopen_logs, setup_logging

args = dict(a[2:].split("=", 1) for a in sys.argv[1:] if a.startswith("--") and "=" in a)
if not os.path.isfile(args.get("config", "")):
    print("spy_server: error: cannot read config file", file=sys.stderr)
    sys.exit(2)
mode = os.environ.get("STANDIN_MODE", "")
if args.get("daemonize") == "1":
    if os.fork():
        os._exit(0)
    os.setsid()
    if os.fork():
        os._exit(0)
    os.chdir("/")
    null = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1, 2):
        os.dup2(null, fd)
pidfile = args["pidfile"]
with open(pidfile + ".tmp", "w") as f:
    f.write(f"{os.getpid()}\n")
os.replace(pidfile + ".tmp", pidfile)
if mode == "die":
    time.sleep(0.1)
    os._exit(1)
setup_logging(args.get("error_log", ""))
flags = {"hup": False, "stop": False}
signal.signal(signal.SIGHUP, lambda *a: flags.update(hup=True))
if mode == "ignore_term":
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
else:
    signal.signal(signal.SIGTERM, lambda *a: flags.update(stop=True))
n = 0
while not flags["stop"]:
    if flags["hup"]:
        flags["hup"] = False
        reopen_logs()
        logging.info("SIGHUP: log reopened")
    n += 1
    logging.info("tick %d", n)
    time.sleep(0.002)
logging.info("stopped after tick %d", n)
os.unlink(pidfile)
'''


class Script:
    """Runs init/<name> <action> with a temporary environment; cleans up its daemon."""

    def __init__(self, name: str, tmp_path, mode: str, **env: str) -> None:
        self.name = name
        self.path = os.path.join(INIT, name)
        self.pidfile = str(tmp_path / "run" / f"{name}.pid")  # run/ made by the script
        self.conf = str(tmp_path / f"{name}.conf")
        self.env = {**os.environ, "SPEEDY_HOME": ROOT, "PYTHON": PYTHON,
                    "CONF": self.conf, "PIDFILE": self.pidfile, "RUN_AS": "",
                    "DEFAULTS": "/dev/null", "START_CHECK": "0.3", "START_TIMEOUT": "30",
                    "STOP_TIMEOUT": "20", "STANDIN_ROOT": ROOT,
                    "START_STOP_DAEMON": SSD if mode == "ssd" else "none", **env}
        self.pids: set[int] = set()

    def __call__(self, action: str, **env: str) -> subprocess.CompletedProcess:
        proc = subprocess.run(["sh", self.path, action], env={**self.env, **env},
                              capture_output=True, text=True, timeout=120)
        self.remember()
        return proc

    def pid(self) -> int | None:
        try:
            return int(open(self.pidfile).read())
        except (OSError, ValueError):
            return None

    def remember(self) -> None:
        """Note the pid of a daemon the script started (never a planted stale pid)."""
        pid = self.pid()
        if pid and pid != os.getpid() and is_daemon(pid):
            self.pids.add(pid)

    def cleanup(self) -> None:
        """SIGKILL every daemon left running, with its children (its own process group)."""
        for pid in self.pids:
            if is_daemon(pid):
                try:
                    pgid = os.getpgid(pid)
                    if pgid != os.getpgrp():
                        os.killpg(pgid, signal.SIGKILL)
                    else:
                        os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
                discard_shm(pid)


def running(pid: int) -> bool:
    """pid exists and is not a zombie (an orphan's zombie may linger if init does not reap)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().rsplit(b")", 1)[1].split()[0] != b"Z"
    except OSError:
        return False


def is_daemon(pid: int) -> bool:
    """pid runs a spy_*.py program."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return re.search(rb"spy_[a-z]+\.py", f.read()) is not None
    except OSError:
        return False


@pytest.fixture
def script(tmp_path):
    """make(name, mode, **env) -> Script; every daemon it started is killed at the end."""
    made: list[Script] = []

    def make(name: str, mode: str, **env: str) -> Script:
        s = Script(name, tmp_path, mode, **env)
        made.append(s)
        return s
    yield make
    for s in made:
        s.cleanup()


@pytest.mark.parametrize("mode", SSD_MODES)
@pytest.mark.parametrize("name", SCRIPTS)
def test_nothing_running(script, tmp_path, name, mode):
    s = script(name, mode)
    open(s.conf, "w").close()
    r = s("status")
    assert (r.returncode, r.stdout.strip()) == (3, f"{name} is not running")
    assert s("stop").returncode == 0
    assert s("reload").returncode == 7
    assert s("try-restart").returncode == 0
    # a stale pid file: a dead pid, then a live pid that is not ours (this test runner)
    os.makedirs(os.path.dirname(s.pidfile), exist_ok=True)
    for stale in ("999999999\n", f"{os.getpid()}\n", "garbage\n"):
        with open(s.pidfile, "w") as f:
            f.write(stale)
        r = s("status")
        assert r.returncode == 1 and "pid file" in r.stdout, stale
        assert s("reload").returncode == 7
        r = s("stop")
        assert r.returncode == 0 and not os.path.exists(s.pidfile), r.stdout + r.stderr
    assert s("status").returncode == 3
    r = s("frobnicate")
    assert r.returncode == 3 and "Usage:" in r.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_start_refuses_without_install_or_config(script, tmp_path, name):
    s = script(name, "kill")
    r = s("start")  # CONF does not exist
    assert r.returncode == 6 and s.conf in r.stderr
    open(s.conf, "w").close()
    r = s("start", PYTHON=str(tmp_path / "no-python"))
    assert r.returncode == 5 and "not installed" in r.stderr
    assert s("status").returncode == 3


def standin(tmp_path, mode: str, **env: str) -> tuple[str, dict]:
    """Write the stand-in daemon as tmp_path/spy_server.py; the env for the script."""
    path = tmp_path / "spy_server.py"
    path.write_text(STANDIN)
    log = tmp_path / "log" / "spy_server.log"
    log.parent.mkdir(exist_ok=True)
    return str(log), {"DAEMON": str(path), "DAEMON_ARGS": f"--error_log={log}", **env}


@pytest.mark.parametrize("mode", SSD_MODES)
def test_lifecycle_is_idempotent(script, tmp_path, mode):
    log, env = standin(tmp_path, mode)
    s = script("spy_server", mode, **env)
    open(s.conf, "w").close()
    r = s("start")
    assert r.returncode == 0, r.stdout + r.stderr
    pid = s.pid()
    assert pid and f"(pid {pid})" in r.stdout
    r = s("start")  # already running: success, same process
    assert r.returncode == 0 and "already running" in r.stdout and s.pid() == pid
    r = s("status")
    assert (r.returncode, r.stdout.strip()) == (0, f"spy_server is running (pid {pid})")
    assert s("reload").returncode == 0
    deadline = time.monotonic() + 20
    while "SIGHUP: log reopened" not in open(log).read():
        assert time.monotonic() < deadline, "SIGHUP not handled"
        time.sleep(0.05)
    r = s("restart")
    assert r.returncode == 0, r.stdout + r.stderr
    assert s.pid() not in (None, pid)
    pid = s.pid()
    r = s("stop")
    assert r.returncode == 0 and not os.path.exists(s.pidfile), r.stdout + r.stderr
    assert not running(pid)
    assert "stopped after tick" in open(log).read()  # it stopped gracefully (SIGTERM)
    assert s("stop").returncode == 0
    assert s("status").returncode == 3


@pytest.mark.parametrize("mode", SSD_MODES)
def test_stop_escalates_to_kill(script, tmp_path, mode):
    _, env = standin(tmp_path, mode, STANDIN_MODE="ignore_term", STOP_TIMEOUT="1")
    s = script("spy_server", mode, **env)
    open(s.conf, "w").close()
    assert s("start").returncode == 0
    pid = s.pid()
    t0 = time.monotonic()
    r = s("stop")
    assert r.returncode == 0, r.stdout + r.stderr
    assert time.monotonic() - t0 < 15
    assert not running(pid) and not os.path.exists(s.pidfile)


@pytest.mark.parametrize("mode", SSD_MODES)
def test_start_reports_failures(script, tmp_path, mode):
    _, env = standin(tmp_path, mode, STANDIN_MODE="die")
    s = script("spy_server", mode, **env)
    open(s.conf, "w").close()
    r = s("start")  # detaches, writes its pid file, dies
    assert r.returncode == 1 and "failed" in r.stdout
    assert s("status").returncode == 1
    r = s("start", CONF=str(tmp_path / "missing.conf"))
    assert r.returncode == 6
    # the daemon refuses its config before detaching: its message and a failure
    r = s("start", STANDIN_MODE="", CONF=str(tmp_path))
    assert r.returncode == 1 and "exit status 2" in r.stdout
    assert "error: cannot read config file" in r.stderr


# --- logrotate ------------------------------------------------------------------------

@pytest.mark.skipif(not shutil.which("logrotate"), reason="no logrotate")
def test_logrotate_keeps_every_line(script, tmp_path):
    log, env = standin(tmp_path, "kill")
    s = script("spy_server", "kill", **env)
    open(s.conf, "w").close()
    text = open(os.path.join(INIT, "logrotate", "speedy")).read()
    assert "copytruncate" not in text.replace("Never copytruncate", "")
    text = text.replace("/var/log/speedy/", os.path.dirname(log) + "/")
    text = text.replace("/run/speedy/", os.path.dirname(s.pidfile) + "/")
    user = subprocess.run(["id", "-un"], capture_output=True, text=True).stdout.strip()
    group = subprocess.run(["id", "-gn"], capture_output=True, text=True).stdout.strip()
    text = text.replace("create 0640 speedy speedy", f"create 0640 {user} {group}")
    conf = tmp_path / "logrotate.conf"
    conf.write_text(text)
    assert s("start").returncode == 0
    time.sleep(0.3)
    proc = subprocess.run(["logrotate", "-f", "-s", str(tmp_path / "lr.state"), str(conf)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    deadline = time.monotonic() + 20
    while "SIGHUP: log reopened" not in open(log).read():
        assert time.monotonic() < deadline, "the daemon did not reopen its log"
        time.sleep(0.05)
    time.sleep(0.2)
    assert s("stop").returncode == 0
    rotated, current = open(log + ".1").read(), open(log).read()
    assert "tick 1\n" in rotated and "stopped after tick" in current
    ticks = [int(x) for x in re.findall(r"tick (\d+)\n", rotated + current)]
    last = int(re.search(r"stopped after tick (\d+)", current).group(1))
    assert ticks[:-1] == list(range(1, last + 1))  # every line, in order, none twice


# --- the real master through its init script --------------------------------------------

@pytest.mark.parametrize("mode", SSD_MODES[:1])
def test_master_init_script_for_real(script, tmp_path, mode):
    port = free_port()
    s = script("spy_master", mode)
    with open(s.conf, "w") as f:
        f.write(open(master_conf(tmp_path, port)).read())
    r = s("start")
    assert r.returncode == 0, r.stdout + r.stderr
    pid = s.pid()
    wait_port(port)
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/chunkmaster/fid", timeout=10) as u:
        assert b"FidBegin" in u.read()
    assert s("start").returncode == 0 and s.pid() == pid
    assert s("status").returncode == 0
    log = tmp_path / "spy_master.log"
    os.rename(log, str(log) + ".1")  # what logrotate does before the SIGHUP
    assert s("reload").returncode == 0
    deadline = time.monotonic() + 20
    while not log.exists():
        assert time.monotonic() < deadline, "log not reopened on SIGHUP"
        time.sleep(0.05)
    r = s("stop")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not os.path.exists(s.pidfile) and not os.path.exists(f"/proc/{pid}")
    assert s("status").returncode == 3
    assert "Traceback" not in open(str(log) + ".1").read() + log.read_text()


# --- the real chunkserver as the unit and the init script run it ------------------------

def server_conf(tmp_path, port: int, metrics_port: int) -> str:
    """A small chunkserver config under tmp_path (its master need not run)."""
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    conf = tmp_path / "spy_server-t.conf"
    conf.write_text(f"ip = 127.0.0.1\nport = {port}\nmaster_ip = 127.0.0.1\n"
                    f"master_port = {free_port()}\ngroup_id = 1\ndata_dir = {data}\n"
                    f"chunks = 2\nchunk_size = 1048576\nmem_blocks = 4\nworkers = 2\n"
                    f"metrics_port = {metrics_port}\nerror_log = {tmp_path / 'spy_server.log'}\n")
    return str(conf)


def scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
        return r.read().decode()


def sample(text: str, line_start: str) -> float:
    (value,) = [ln.rsplit(" ", 1)[1] for ln in text.splitlines() if ln.startswith(line_start + " ")]
    return float(value)


def write_blob(port: int, fid: int, data: bytes) -> int:
    """One WRITE on the wire; the error code."""
    from speedy.wire.protocol import Op, decode_response_header, encode_file_key, encode_request
    with socket.create_connection(("127.0.0.1", port), timeout=20) as s:
        s.sendall(encode_request(Op.WRITE, encode_file_key(1, fid) + data))
        head = b""
        while len(head) < 6:
            chunk = s.recv(6 - len(head))
            assert chunk, "connection closed"
            head += chunk
        return decode_response_header(head)[1]


def test_chunkserver_as_the_unit_runs_it(tmp_path):
    """ExecStart of spy_server@.service: READY=1, metrics move with traffic, SIGHUP after a
    rotation reopens the log, SIGTERM sends STOPPING=1 and exits 0 within TimeoutStopSec."""
    port, mport = free_port(), free_port()
    unit = localized_unit("spy_server@.service", tmp_path, server_conf(tmp_path, port, mport))
    proc, sock = run_unit(unit, tmp_path)
    try:
        assert "READY=1" in sock.recv(4096).decode().split("\n")
        before = scrape(mport)
        assert write_blob(port, 77, b"x" * 1000) == 0
        moved = {'speedy_requests_total{op="write"}': 1, "speedy_write_bytes_total": 1000,
                 "speedy_files": 1}
        deadline = time.monotonic() + 30  # a worker counts a request just after answering
        while True:
            after = scrape(mport)
            deltas = {k: sample(after, k) - sample(before, k) for k in moved}
            if deltas == moved:
                break
            assert time.monotonic() < deadline, deltas
            time.sleep(0.05)
        log = tmp_path / "spy_server.log"
        os.rename(log, str(log) + ".1")
        proc.send_signal(signal.SIGHUP)  # ExecReload, as logrotate's postrotate does
        deadline = time.monotonic() + 30
        while not (log.exists() and log.read_text().count("reopened") >= 4):
            assert time.monotonic() < deadline, "the log was not reopened by every process"
            time.sleep(0.05)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        seen = ""
        while "STOPPING=1" not in seen:
            seen += sock.recv(4096).decode() + "\n"
        assert proc.wait(60) == 0
        assert time.monotonic() - t0 < 60
    finally:
        kill_session(proc)
        sock.close()
    assert "Traceback" not in (tmp_path / "daemon.out").read_text("utf-8", errors="replace")
    assert "stopped (exit code 0)" in log.read_text()


@pytest.mark.parametrize("mode", SSD_MODES[:1])
def test_chunkserver_init_script_for_real(script, tmp_path, mode):
    port, mport = free_port(), free_port()
    s = script("spy_server", mode)
    with open(s.conf, "w") as f:
        f.write(open(server_conf(tmp_path, port, mport)).read())
    r = s("start")
    assert r.returncode == 0, r.stdout + r.stderr
    pid = s.pid()
    wait_port(port)
    assert write_blob(port, 5, b"hello") == 0
    assert s("start").returncode == 0 and s.pid() == pid
    assert s("status").returncode == 0
    assert s("reload").returncode == 0
    r = s("stop")
    assert r.returncode == 0, r.stdout + r.stderr
    assert not os.path.exists(s.pidfile) and not running(pid)
    assert s("status").returncode == 3
    assert "stopped (exit code 0)" in (tmp_path / "spy_server.log").read_text()
