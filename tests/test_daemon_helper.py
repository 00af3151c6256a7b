"""The one spawn-and-wait helper of the tests (tests/support/daemon.py), on real processes."""
from __future__ import annotations

import signal

import pytest

from tests.support import PYTHON, free_port
from tests.support.daemon import (DaemonExited, exited, listening, session_pids, spawn,
                                  stop_session, wait_ready)

# forks a child that ignores SIGTERM, then both sleep: only SIGKILL of the session ends it
STUBBORN = ("import os, signal, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "os.fork()\n"
            "time.sleep(60)\n")


def test_a_daemon_that_exits_is_reported_with_its_output(tmp_path):
    out = str(tmp_path / "out")
    proc = spawn([PYTHON, "-c", "import sys; print('no such dir', file=sys.stderr); "
                  "sys.exit(3)"], out)
    with pytest.raises(DaemonExited, match="(?s)spy_test exited 3.*no such dir"):
        wait_ready(lambda: listening(free_port()), 20, "spy_test", exited(proc, "spy_test", out))


def test_ready_and_timeout(tmp_path):
    port = free_port()
    out = str(tmp_path / "out")
    proc = spawn([PYTHON, "-c", "import socket, time; s = socket.socket(); "
                  f"s.bind(('127.0.0.1', {port})); s.listen(); time.sleep(60)"], out)
    try:
        wait_ready(lambda: listening(port), 20, "listener", exited(proc, "listener", out))
        with pytest.raises(TimeoutError, match="never: not ready after 0.2s"):
            wait_ready(lambda: False, 0.2, "never")
    finally:
        assert stop_session(proc) == -signal.SIGKILL


def test_stop_session_kills_every_process_of_the_session(tmp_path):
    proc = spawn([PYTHON, "-c", STUBBORN], str(tmp_path / "out"))
    wait_ready(lambda: len(session_pids(proc.pid)) == 2, 20, "the fork")
    assert stop_session(proc, signal.SIGTERM, grace=0.3) == -signal.SIGKILL
    assert session_pids(proc.pid) == []
