"""sd_notify over a real AF_UNIX datagram socket (path and abstract)."""
from __future__ import annotations

import os
import socket
import subprocess
import time

import pytest

from tests.support import PYTHON, ROOT
from speedy.common import notify


@pytest.fixture
def listener(tmp_path, monkeypatch):
    """A datagram socket standing in for systemd's notify socket; NOTIFY_SOCKET points at it."""
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(5)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    yield s
    s.close()


def recv(s: socket.socket) -> dict[str, str]:
    """One datagram as a KEY=VALUE dict."""
    data = s.recv(4096).decode()
    return dict(line.split("=", 1) for line in data.split("\n") if line)


def test_unset_is_a_noop(monkeypatch):
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert notify.notify("READY=1") is False
    assert notify.ready() is False
    assert notify.stopping() is False


def test_unsupported_address_is_a_noop(monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", "vsock:2:1234")
    assert notify.ready() is False


def test_ready_status_stopping(listener):
    assert notify.ready("serving on 127.0.0.1:8000\nwith 2 workers") is True
    msg = recv(listener)
    assert msg == {"READY": "1", "STATUS": "serving on 127.0.0.1:8000 with 2 workers"}
    assert notify.status("draining 3 connections") is True
    assert recv(listener) == {"STATUS": "draining 3 connections"}
    assert notify.stopping() is True
    assert recv(listener) == {"STOPPING": "1"}
    assert notify.extend_timeout(2.5) is True
    assert recv(listener) == {"EXTEND_TIMEOUT_USEC": "2500000"}


def test_reloading_carries_monotonic_usec(listener):
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notify.reloading() is True
    msg = recv(listener)
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert msg["RELOADING"] == "1"
    assert before <= int(msg["MONOTONIC_USEC"]) <= after


def test_abstract_socket(monkeypatch):
    name = f"speedy-test-notify-{os.getpid()}-{time.monotonic_ns()}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind("\0" + name)
        s.settimeout(5)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.ready() is True
        assert recv(s) == {"READY": "1"}


def test_dead_socket_returns_false(tmp_path, monkeypatch):
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "nobody-listens.sock"))
    assert notify.ready() is False


def test_from_a_child_process(listener):
    """The daemons notify from their own process: the environment variable is enough."""
    code = "from speedy.common import notify; import sys; sys.exit(0 if notify.ready('up') else 1)"
    proc = subprocess.run([PYTHON, "-c", code], cwd=ROOT, timeout=60,
                          env={**os.environ, "PYTHONPATH": ROOT})
    assert proc.returncode == 0
    assert recv(listener) == {"READY": "1", "STATUS": "up"}
