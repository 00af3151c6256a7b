"""The one way tests run a daemon: spawn it in its own session, wait until it is ready,
kill its whole session for sure.

    proc = spawn(cmd, out_path, env={"SPEEDY_FAULTS": "..."})
    wait_ready(lambda: listening(port), 30, "spy_server", exited(proc, "spy_server", log))
    ...
    stop_session(proc)  # SIGTERM, SIGKILL after the grace; every process of it gone

ServerProc (server.py), MasterProc (master.py), Cluster (cluster.py) and the tests that
run an init script's command line all go through these functions.
"""
from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from dataclasses import dataclass
from typing import Callable

from speedy.cli import local
from speedy.cli.local import listening  # noqa: F401 (one definition, used by the tests)

POLL = 0.05


class DaemonExited(RuntimeError):
    """The daemon exited while a test waited for it to be ready."""


def spawn(cmd: list[str], out: str, cwd: str | None = None,
          env: dict[str, str] | None = None) -> subprocess.Popen:
    """local.spawn (a new session, output appended to out), env added to this
    process's environment."""
    return local.spawn(cmd, out, cwd, {**os.environ, **(env or {})})


def notify_socket(path: str, timeout: float = 60) -> socket.socket:
    """A datagram socket bound at path, standing in for systemd's notify socket (a daemon
    started with NOTIFY_SOCKET=path sends READY=1 and STOPPING=1 to it)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(path)
    sock.settimeout(timeout)
    return sock


def tail(path: str, size: int = 2000) -> str:
    """The last size characters of a file ("" if there is none)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


def exited(proc: subprocess.Popen, name: str, *logs: str) -> Callable[[], str | None]:
    """A died-check for wait_ready: once proc has exited, its exit code and log tails."""
    def check() -> str | None:
        if proc.poll() is None:
            return None
        tails = "\n".join(f"--- {path}:\n{tail(path)}" for path in logs)
        return f"{name} exited {proc.returncode}\n{tails}"
    return check


def wait_ready(ready: Callable[[], object], timeout: float, what: str,
               died: Callable[[], str | None] = lambda: None) -> None:
    """Poll ready() (an OSError or EOFError counts as not yet) until it is true;
    DaemonExited as soon as died() says why, TimeoutError after timeout seconds."""
    deadline = time.monotonic() + timeout
    while True:
        why = died()
        if why:
            raise DaemonExited(why)
        try:
            if ready():
                return
        except (OSError, EOFError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not ready after {timeout:g}s")
        time.sleep(POLL)


@dataclass
class ProcInfo:
    """One line of /proc/<pid>/stat, the fields the tests look at."""

    pid: int
    comm: str
    state: str
    ppid: int
    sid: int


def processes() -> list[ProcInfo]:
    """Every live (not zombie) process, from /proc."""
    out = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        rest = stat[stat.rindex(")") + 2:].split()
        if rest[0] != "Z":
            out.append(ProcInfo(int(entry), stat[stat.index("(") + 1:stat.rindex(")")],
                                rest[0], int(rest[1]), int(rest[3])))
    return out


def session_pids(sid: int) -> list[int]:
    """Live pids of session sid."""
    return [p.pid for p in processes() if p.sid == sid]


def children_of(pid: int) -> dict[int, str]:
    """{child pid: comm} of pid's live children."""
    return {p.pid: p.comm for p in processes() if p.ppid == pid}


def stop_session(proc: subprocess.Popen | None, sig: int = signal.SIGKILL,
                 grace: float = 10.0) -> int | None:
    """Send sig to proc's session (its process group), SIGKILL what is left after grace
    seconds; reap proc and wait until no process of the session remains. proc's exit
    code (None if it would not die)."""
    if proc is None:
        return None
    if sig != signal.SIGKILL:
        signal_session(proc, sig)
        if session_gone(proc, grace):
            return proc.returncode
    signal_session(proc, signal.SIGKILL)
    session_gone(proc, 10.0)
    return proc.poll()


def signal_session(proc: subprocess.Popen, sig: int) -> None:
    """Send sig to every process of proc's session (a gone one is no error)."""
    try:
        os.killpg(proc.pid, sig)
    except ProcessLookupError:
        pass


def session_gone(proc: subprocess.Popen, timeout: float) -> bool:
    """Wait until proc is reaped and its session empty; False after timeout seconds."""
    deadline = time.monotonic() + timeout
    while proc.poll() is None or session_pids(proc.pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(POLL)
    return True
