"""Child processes of a pre-forking supervisor (chunkserver, gateway): reaping, exit words."""
from __future__ import annotations

import os
import signal
from typing import Iterator


def exited_children() -> Iterator[tuple[int, int]]:
    """(pid, wait status) of every child that has exited, without blocking."""
    while True:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if not pid:
            return
        yield pid, status


def exit_code(status: int) -> int | None:
    """The code a child exited with; None when a signal killed it."""
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else None


def describe_exit(status: int) -> str:
    """'exited with code N' or 'was killed by SIGX'."""
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = str(sig)
        return f"was killed by {name}"
    return f"exited with code {os.WEXITSTATUS(status)}"
