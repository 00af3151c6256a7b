"""Injectable disk faults for tests; nothing runs on the hot path while they are off.

``SPEEDY_FAULTS`` (read at import, again by every ChunkStore) is a comma-separated
list of rules::

    <op>:<file>[:after=N][:times=M][:errno=NAME]

- ``op``: ``write`` (a record append), ``superblock`` (a superblock rewrite),
  ``ref`` (the 2-byte delete mark), ``fsync``, ``fallocate`` (preallocating a new chunk),
  ``read`` (a ChunkReader read of a record or a CHECK_DISK block).
- ``file``: a chunk file name or an ``fnmatch`` pattern (``*``, ``chunk_1_?.chunk``).
- ``after=N``: the first N matching calls succeed (default 0: the first one fails).
- ``times=M``: fail M calls, then succeed again (default: fail every later call).
- ``errno=NAME``: the error raised, e.g. ``ENOSPC`` (default ``EIO``; ``ENOSPC`` for
  ``fallocate``).

Example: ``SPEEDY_FAULTS="write:chunk_1_2.chunk:after=3,fsync:*:after=0,superblock:*"``.
Callers guard each call with ``if faults.ACTIVE:`` so an unset variable costs one
attribute test. Counters are per process.
"""
from __future__ import annotations

import errno as _errno
import fnmatch
import os
from dataclasses import dataclass

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
ACTIVE = False


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
    """Replace the active rules (None or '' turns faults off)."""
    global ACTIVE
    RULES[:] = parse(spec) if spec else []
    ACTIVE = bool(RULES)


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


load_env()
