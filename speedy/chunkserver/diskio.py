"""The chunkserver's disk I/O seam: every chunk file write, fsync, preallocation and read.

The store, the data dir, the recovery and the reader call ``diskio.pwritev(...)`` and
friends, looked up at each call. They are the ``os`` functions themselves, so the seam
costs nothing; when ``SPEEDY_FAULTS`` is set at start (or a test calls
``faults.configure``), :mod:`speedy.chunkserver.faults` swaps them once for wrappers that
raise the configured errors where a real failing disk would: inside the pwritev of a
batch commit, the fsync after it, the preallocation of a new chunk.
"""
from __future__ import annotations

import os
from typing import Callable

CALLS = ("pwrite", "pwritev", "fsync", "fdatasync", "posix_fallocate", "pread", "preadv")

pwrite = os.pwrite
pwritev = os.pwritev
fsync = os.fsync
fdatasync = os.fdatasync
posix_fallocate = os.posix_fallocate
pread = os.pread
preadv = os.preadv


def install(calls: dict[str, Callable] | None) -> None:
    """Use these functions in place of the os ones (None or {}: the os ones again)."""
    space = globals()
    for name in CALLS:
        space[name] = (calls or {}).get(name) or getattr(os, name)


if os.environ.get("SPEEDY_FAULTS"):  # chosen once, at start (inherited by the forks)
    from speedy.chunkserver.faults import load_env
    load_env()
