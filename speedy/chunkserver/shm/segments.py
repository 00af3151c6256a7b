"""Named POSIX shared memory segments of one chunkserver: create, attach, remove.

Every segment of a server is named ``speedy<supervisor pid>_<what>`` in /dev/shm; the
supervisor owns their lifetime and removes them by that prefix (and, at start, the ones
of servers whose supervisor died). Python 3.11's resource_tracker is kept out: it would
unlink segments other processes still use (3.13 has ``track=False`` for this).
"""
from __future__ import annotations

import logging
import os
import re
from multiprocessing import resource_tracker, shared_memory

from speedy.common.daemonize import pid_alive

try:  # the POSIX call SharedMemory.unlink makes, without its resource_tracker message
    import _posixshmem
except ImportError:  # pragma: no cover - non-POSIX
    _posixshmem = None

log = logging.getLogger("speedy.chunkserver.shm")

SHM_DIR = "/dev/shm"
SEGMENT_PREFIX = "speedy"
STALE_NAME = re.compile(rf"^{SEGMENT_PREFIX}(\d+)_")


class Segment(shared_memory.SharedMemory):
    """SharedMemory that does not complain at exit when a view of it is still alive."""

    def __del__(self) -> None:
        try:
            self.close()
        except (BufferError, OSError):
            pass


def untrack(shm: shared_memory.SharedMemory) -> shared_memory.SharedMemory:
    """Stop this process's resource_tracker from unlinking a segment it does not own."""
    try:
        resource_tracker.unregister(shm._name, "shared_memory")  # type: ignore[attr-defined]
    except Exception:  # pragma: no cover - no tracker running
        pass
    return shm


def create_segment(name: str, size: int) -> shared_memory.SharedMemory:
    """A new zero-filled segment; a stale one of the same name is replaced."""
    try:
        shm = Segment(name=name, create=True, size=size)
    except FileExistsError:
        unlink_segment(name)
        shm = Segment(name=name, create=True, size=size)
    return untrack(shm)


def attach_segment(name: str) -> shared_memory.SharedMemory:
    """Attach an existing segment by name."""
    return untrack(Segment(name=name, create=False))


def disable_resource_tracker() -> None:
    """Keep Python 3.11's resource_tracker out of the chunkserver's processes.

    It would start one tracker process per process that attaches a segment and unlink
    segments that other processes still use; here the supervisor owns every segment's
    lifetime and unlinks them by prefix (Python 3.13 has ``track=False`` for this).
    """
    resource_tracker.register = lambda *args, **kwargs: None  # type: ignore[assignment]
    resource_tracker.unregister = lambda *args, **kwargs: None  # type: ignore[assignment]


def server_prefix(pid: int | None = None) -> str:
    """The name prefix of every shared segment of the server whose supervisor is pid."""
    return f"{SEGMENT_PREFIX}{os.getpid() if pid is None else pid}"


def unlink_segment(name: str) -> None:
    """Remove one segment name; missing is fine."""
    try:
        if _posixshmem is not None:
            _posixshmem.shm_unlink("/" + name)
        else:  # pragma: no cover
            shared_memory.SharedMemory(name=name).unlink()
    except FileNotFoundError:
        pass


def segments_with_prefix(prefix: str) -> list[str]:
    """Names of the segments in /dev/shm that start with prefix + '_'."""
    try:
        return sorted(n for n in os.listdir(SHM_DIR) if n.startswith(prefix + "_"))
    except OSError:
        return []


def unlink_prefix(prefix: str) -> int:
    """Remove every segment of one server; returns how many."""
    names = segments_with_prefix(prefix)
    for name in names:
        unlink_segment(name)
    return len(names)


def remove_stale_segments() -> int:
    """Unlink the segments of chunkservers whose supervisor no longer exists (kill -9)."""
    removed = 0
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return 0
    for name in names:
        m = STALE_NAME.match(name)
        if m and int(m.group(1)) != os.getpid() and not pid_alive(int(m.group(1))):
            unlink_segment(name)
            removed += 1
    if removed:
        log.info("removed %d shared memory segments left by dead servers", removed)
    return removed
