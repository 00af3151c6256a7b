"""systemd readiness notification (sd_notify) over $NOTIFY_SOCKET, without a dependency.

    $NOTIFY_SOCKET = /run/systemd/notify     a filesystem AF_UNIX datagram socket
                   = @name                   an abstract socket ('@' stands for NUL)

Each call sends one datagram of newline-separated KEY=VALUE assignments. Outside
systemd (the variable unset, or an address family we do not speak) every call is a
no-op returning False, so the daemons call these helpers unconditionally.
"""
from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger("speedy.common.notify")

ENV = "NOTIFY_SOCKET"


def socket_address(value: str | None) -> str | None:
    """The AF_UNIX address for a $NOTIFY_SOCKET value, or None when unusable."""
    if not value:
        return None
    if value[0] == "@":
        return "\0" + value[1:]
    if value[0] == "/":
        return value
    return None  # e.g. vsock:... (VMs): not supported, treated as unset


def notify(state: str) -> bool:
    """Send state (e.g. "READY=1") to the service manager; False when not under systemd."""
    address = socket_address(os.environ.get(ENV))
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(address)
            s.sendall(state.encode("utf-8"))
        return True
    except OSError as e:
        log.warning("sd_notify %r to %s failed: %s; continuing", state.split("\n")[0],
                    os.environ.get(ENV), e)
        return False


def _one_line(text: str) -> str:
    """Text safe for a single KEY=VALUE line."""
    return " ".join(text.split())


def ready(status_text: str = "") -> bool:
    """Tell systemd the service is up (socket bound, recovery done, workers running)."""
    state = "READY=1"
    if status_text:
        state += "\nSTATUS=" + _one_line(status_text)
    return notify(state)


def reloading() -> bool:
    """Tell systemd a reload (SIGHUP) started; follow with ready() when done."""
    usec = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def stopping(status_text: str = "") -> bool:
    """Tell systemd a graceful stop started (SIGTERM received)."""
    state = "STOPPING=1"
    if status_text:
        state += "\nSTATUS=" + _one_line(status_text)
    return notify(state)


def status(text: str) -> bool:
    """Set the one-line status shown by `systemctl status`."""
    return notify("STATUS=" + _one_line(text))


def extend_timeout(seconds: float) -> bool:
    """Ask for seconds more before the start/stop timeout fires (long recovery or drain)."""
    return notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")
