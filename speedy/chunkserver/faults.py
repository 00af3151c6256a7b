"""Injectable disk faults for tests, through the I/O seam of :mod:`speedy.chunkserver.diskio`.

``SPEEDY_FAULTS`` (read once, when the seam is first imported) is a comma-separated
list of rules::

    <op>:<file>[:after=N][:times=M][:errno=NAME]

- ``op``, told by the seam's call on a chunk file: ``write`` (a pwrite/pwritev of
  records), ``superblock`` (a write at offset 0), ``ref`` (a 2-byte write: the delete
  mark), ``fsync`` (fsync or fdatasync), ``fallocate`` (posix_fallocate of a new chunk),
  ``read`` (a pread/preadv of the reader: a record or a CHECK_DISK block).
- ``file``: a chunk file name or an ``fnmatch`` pattern (``*``, ``chunk_1_?.chunk``);
  a chunk being created (``.speedy/tmp.<name>``) counts as ``<name>``. Other files (the
  delete journal, the snapshot) get no faults.
- ``after=N``: the first N matching calls succeed (default 0: the first one fails).
- ``times=M``: fail M calls, then succeed again (default: fail every later call).
- ``errno=NAME``: the error raised, e.g. ``ENOSPC`` (default ``EIO``; ``ENOSPC`` for
  ``fallocate``).

Example: ``SPEEDY_FAULTS="write:chunk_1_2.chunk:after=3,fsync:*:after=0,superblock:*"``.
The rules count every matching call, those of start-up too (creating a chunk writes
its superblock and fsyncs it). Unset, the seam's functions are the os ones: nothing of
this module runs. Counters are per process.
"""
from __future__ import annotations

import errno as _errno
import fnmatch
import os
from dataclasses import dataclass
from typing import Callable

from speedy.format.chunkfile import REF, parse_chunk_name

OPS = frozenset({"write", "superblock", "ref", "fsync", "fallocate", "read"})
ENV = "SPEEDY_FAULTS"


@dataclass
class Rule:
    """One fault: which op on which files, when, and with which errno."""

    op: str
    pattern: str
    after: int = 0
    times: int = -1
    errno: int = _errno.EIO
    seen: int = 0
    failed: int = 0

    def fires(self, op: str, name: str) -> bool:
        """Count a matching call; True when this one must fail."""
        if op != self.op or not fnmatch.fnmatchcase(name, self.pattern):
            return False
        self.seen += 1
        if self.seen <= self.after or (0 <= self.times <= self.failed):
            return False
        self.failed += 1
        return True


RULES: list[Rule] = []
TMP_PREFIX = "tmp."  # a chunk file being preallocated (store/datadir.py)


def parse(spec: str) -> list[Rule]:
    """The rules of a SPEEDY_FAULTS string; ValueError with the bad part."""
    rules = []
    for part in filter(None, (p.strip() for p in spec.split(","))):
        fields = part.split(":")
        if len(fields) < 2 or fields[0] not in OPS or not fields[1]:
            raise ValueError(f"{ENV}: bad rule {part!r}: want <op>:<file>[:after=N]"
                             f"[:times=M][:errno=NAME], op one of {', '.join(sorted(OPS))}")
        rule = Rule(fields[0], fields[1])
        if rule.op == "fallocate":
            rule.errno = _errno.ENOSPC
        for opt in fields[2:]:
            key, _, value = opt.partition("=")
            try:
                if key == "after":
                    rule.after = int(value)
                elif key == "times":
                    rule.times = int(value)
                elif key == "errno":
                    rule.errno = int(value) if value.isdigit() else getattr(_errno, value)
                else:
                    raise ValueError
            except (ValueError, AttributeError):
                raise ValueError(f"{ENV}: bad option {opt!r} in rule {part!r}") from None
        rules.append(rule)
    return rules


def configure(spec: str | None) -> None:
    """Replace the active rules and arm the seam (None or '' turns faults off)."""
    from speedy.chunkserver import diskio
    RULES[:] = parse(spec) if spec else []
    diskio.install(wrappers() if RULES else None)


def load_env() -> None:
    """Configure from SPEEDY_FAULTS if it is set (an unset variable leaves things alone)."""
    spec = os.environ.get(ENV)
    if spec is not None:
        configure(spec)


def check(op: str, name: str) -> None:
    """Raise the configured OSError if a rule says this call fails."""
    for rule in RULES:
        if rule.fires(op, name):
            raise OSError(rule.errno, f"{os.strerror(rule.errno)} (injected {op} fault)", name)


def chunk_of(fd: int) -> str | None:
    """The chunk file name fd is open on (a chunk being created counts), else None."""
    try:
        name = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
    except OSError:
        return None
    if name.startswith(TMP_PREFIX):
        name = name[len(TMP_PREFIX):]
    return name if parse_chunk_name(name) else None


def check_fd(op: str, fd: int) -> None:
    """check() for a call on fd, if it is a chunk file."""
    name = chunk_of(fd)
    if name is not None:
        check(op, name)


def write_op(size: int, offset: int) -> str:
    """The rule op of a write of size bytes at offset into a chunk file."""
    if offset == 0:
        return "superblock"
    return "ref" if size == REF.size else "write"


def wrappers() -> dict[str, Callable]:
    """The seam's functions that fail as the rules say, then do the real call."""
    def pwrite(fd, data, offset):
        check_fd(write_op(len(data), offset), fd)
        return os.pwrite(fd, data, offset)

    def pwritev(fd, bufs, offset):
        check_fd(write_op(sum(memoryview(b).nbytes for b in bufs), offset), fd)
        return os.pwritev(fd, bufs, offset)

    def fsync(fd):
        check_fd("fsync", fd)
        return os.fsync(fd)

    def fdatasync(fd):
        check_fd("fsync", fd)
        return os.fdatasync(fd)

    def posix_fallocate(fd, offset, length):
        check_fd("fallocate", fd)
        return os.posix_fallocate(fd, offset, length)

    def pread(fd, n, offset):
        check_fd("read", fd)
        return os.pread(fd, n, offset)

    def preadv(fd, bufs, offset):
        check_fd("read", fd)
        return os.preadv(fd, bufs, offset)

    return {"pwrite": pwrite, "pwritev": pwritev, "fsync": fsync, "fdatasync": fdatasync,
            "posix_fallocate": posix_fallocate, "pread": pread, "preadv": preadv}
