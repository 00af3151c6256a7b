"""Detaching as a daemon (python-daemon) and the pidfile, for both daemons.

Call order in a daemon's start-up: load the config (relative paths are already made
absolute there), set up logging, bind sockets (so that a port in use is reported on the
terminal), daemonize(keep=[sockets]), write_pidfile(); at exit remove_pidfile().
gevent must be set up only after daemonize() (it forks twice).
"""
from __future__ import annotations

import errno
import logging
import os

from speedy.common.logs import log_files

log = logging.getLogger("speedy.common.daemonize")


class StartError(Exception):
    """A daemon cannot start; the message is the one-line reason for the operator."""


class PidfileError(Exception):
    """The pidfile cannot be written, or names a running process."""


def daemonize(keep: list | None = None) -> None:
    """Detach: double fork, new session, cwd '/', umask 022, stdio to /dev/null.

    Open log files (speedy.common.logs.log_files()) and the objects or descriptors in keep stay
    open. No signal handlers are installed: the caller installs its own afterwards.
    """
    import daemon  # python-daemon; imported here so that a foreground run never needs it

    ctx = daemon.DaemonContext(
        working_directory="/",
        umask=0o022,
        detach_process=True,
        files_preserve=list(keep or []) + log_files(),
        signal_map={},
        prevent_core=False,
    )
    ctx.open()


def read_pidfile(path: str) -> int | None:
    """The pid written in path, or None if missing or not a number."""
    try:
        with open(path, encoding="ascii") as f:
            return int(f.read().strip() or "x")
    except (OSError, ValueError):
        return None


def pid_alive(pid: int) -> bool:
    """Whether a process with this pid exists (kill 0; a pid we may not signal exists)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def write_pidfile(path: str) -> None:
    """Write this process's pid to path (atomically); refuse if it names a live process."""
    if not path:
        return
    old = read_pidfile(path)
    if old is not None and old != os.getpid() and pid_alive(old):
        raise PidfileError(f"pidfile {path} names a running process ({old}): "
                           "is another instance running?")
    tmp = f"{path}.{os.getpid()}.tmp"
    try:
        with open(tmp, "w", encoding="ascii") as f:
            f.write(f"{os.getpid()}\n")
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise PidfileError(f"cannot write pidfile {path}: {e.strerror}") from None


def remove_pidfile(path: str) -> None:
    """Remove path if it still names this process."""
    if not path or read_pidfile(path) != os.getpid():
        return
    try:
        os.unlink(path)
    except OSError as e:
        if e.errno != errno.ENOENT:
            log.warning("cannot remove pidfile %s: %s", path, e.strerror)
