"""The data dir of a chunkserver: its lock, finding, creating and opening chunk files, and
the whole-buffer writes every file of it gets (through the I/O seam, diskio).

Chunk files are preallocated under ``.speedy/tmp.<name>`` and renamed into place, so a
start that fails half-way leaves no partial chunk file behind.
"""
from __future__ import annotations

import errno
import fcntl
import logging
import os
import shutil
from dataclasses import dataclass, field

from speedy.chunkserver import diskio
from speedy.chunkserver.store import snapshot
from speedy.common.daemonize import StartError
from speedy.format.chunkfile import (MAX_CHUNK_SIZE, RECORD_HEADER_SIZE, SUPERBLOCK_SIZE, FormatError, Superblock, chunk_name,
                        parse_chunk_name)

log = logging.getLogger("speedy.chunkserver.store.chunkstore")

LOCK_FILE = "lock"
TMP_PREFIX = "tmp."
MAX_CHUNK_ID = 0xFFFFFFFF
IOV_MAX = 1024


@dataclass
class Chunk:
    """One open chunk file: committed superblock plus what is staged past it."""

    chunk_id: int
    name: str
    path: str
    fd: int
    capacity: int
    sb: Superblock
    sb_raw: bytes
    sb_valid: bool
    tail: int = SUPERBLOCK_SIZE
    staged: int = 0
    pending: list = field(default_factory=list)  # staged records' buffers not written yet,
    pending_at: int = 0  # from this offset up to tail
    garbage_bytes: int = 0  # deleted records and skipped damage before current_offset
    compacting: bool = False  # no appends while store/compact.py rewrites it

    def add_dead_record(self, size: int) -> None:
        """A deleted record of size data bytes is garbage; an empty one is not (it is what a
        tombstone of store/compact.py looks like, 30 bytes no compaction frees)."""
        if size:
            self.garbage_bytes += RECORD_HEADER_SIZE + size

    def staged_superblock(self) -> Superblock:
        """The superblock that covers the staged records too."""
        return Superblock(self.chunk_id, self.sb.files_alloc + self.staged,
                          self.sb.files_count + self.staged, self.tail, self.capacity - self.tail)


def lock_dir(data_dir: str, meta_dir: str) -> int:
    """Create the .speedy subdirectory, take its lock (the fd), remove leftovers of a crash."""
    if not os.path.isdir(data_dir):
        raise StartError(f"data dir {data_dir} is not a directory")
    try:
        os.makedirs(meta_dir, exist_ok=True)
        fd = os.open(os.path.join(meta_dir, LOCK_FILE),
                     os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
    except OSError as e:
        raise StartError(f"cannot use {meta_dir}: {e.strerror}") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StartError(f"data dir {data_dir} is in use by another speedy chunkserver "
                         f"(lock {meta_dir}/{LOCK_FILE} is held)") from None
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    for name in os.listdir(meta_dir):
        if name.startswith(TMP_PREFIX) or name.endswith(".tmp"):
            log.info("removing leftover %s", os.path.join(meta_dir, name))
            try:
                os.unlink(os.path.join(meta_dir, name))
            except OSError:
                pass
    return fd


def find_chunks(data_dir: str, group_id: int) -> dict[int, str]:
    """{chunk_id: path} of this group's chunk files; StartError on a foreign one."""
    found: dict[int, str] = {}
    for entry in sorted(os.scandir(data_dir), key=lambda e: e.name):
        parsed = parse_chunk_name(entry.name)
        if parsed is None:
            continue
        group, cid = parsed
        if group != group_id:
            raise StartError(f"{entry.path}: chunk file of group {group}, but this server "
                             f"is --group_id={group_id}; move it away or fix --group_id")
        if entry.name != chunk_name(group, cid) or not 1 <= cid <= MAX_CHUNK_ID:
            raise StartError(f"{entry.path}: bad chunk file name (chunk ids are "
                             f"1..{MAX_CHUNK_ID}, without leading zeros)")
        if entry.is_symlink() or not entry.is_file():
            raise StartError(f"{entry.path}: not a regular file")
        found[cid] = entry.path
    return found


def create_missing(data_dir: str, meta_dir: str, group_id: int, wanted: int, chunk_size: int,
                   found: dict[int, str]) -> dict[int, str]:
    """Create chunks 1..wanted that do not exist; on failure remove those made now."""
    created: dict[int, str] = {}
    try:
        for cid in range(1, wanted + 1):
            if cid not in found:
                created[cid] = create_chunk(data_dir, meta_dir, group_id, cid, chunk_size)
    except StartError:
        for path in created.values():
            try:
                os.unlink(path)
            except OSError:
                pass
        raise
    if created:
        snapshot.sync_dir(data_dir)
    return created


def create_chunk(data_dir: str, meta_dir: str, group_id: int, cid: int, chunk_size: int) -> str:
    """Preallocate one chunk under a temporary name, then rename it into place."""
    name = chunk_name(group_id, cid)
    final = os.path.join(data_dir, name)
    tmp = os.path.join(meta_dir, TMP_PREFIX + name)
    fd = -1
    try:
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        diskio.posix_fallocate(fd, 0, chunk_size)
        pwrite_all(fd, Superblock.empty(cid, chunk_size).encode(), 0)
        diskio.fsync(fd)
        os.rename(tmp, final)
    except OSError as e:
        if fd >= 0:
            os.close(fd)
            fd = -1
        try:
            os.unlink(tmp)
        except OSError:
            pass
        free = shutil.disk_usage(data_dir).free
        raise StartError(f"cannot preallocate {final} to {chunk_size} bytes: "
                         f"{e.strerror} ({free} bytes free on that file system; lower "
                         f"--chunk_size or --chunks, or free some space)") from None
    finally:
        if fd >= 0:
            os.close(fd)
    log.info("created %s, %d bytes preallocated", final, chunk_size)
    return final


def open_chunk(cid: int, path: str, chunk_size: int) -> Chunk:
    """Open one chunk file read-write and read its superblock."""
    name = os.path.basename(path)
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise StartError(f"cannot open {path}: {e.strerror}") from None
    try:
        st = os.fstat(fd)
        raw = os.pread(fd, SUPERBLOCK_SIZE, 0)
    except OSError as e:
        os.close(fd)
        raise StartError(f"cannot read {path}: {e.strerror}") from None
    sb: Superblock | None = None
    why = ""
    try:
        sb = Superblock.decode(raw)
        capacity = sb.current_offset + sb.avail_space
        if sb.chunk_id != cid:
            why = f"it names chunk {sb.chunk_id}"
        elif not SUPERBLOCK_SIZE <= sb.current_offset <= capacity <= MAX_CHUNK_SIZE:
            why = (f"current_offset {sb.current_offset} + avail_space {sb.avail_space} "
                   "out of bounds")
    except FormatError as e:
        why = str(e) if raw.strip(b"\0") else "superblock is all zeros"
    if why:
        log.warning("%s: superblock unusable (%s); rebuilding it from the records", name, why)
        sb = None
        capacity = min(max(chunk_size, st.st_size), MAX_CHUNK_SIZE)
    elif capacity != chunk_size:
        log.info("%s: chunk size %d from its superblock (--chunk_size is %d)",
                 name, capacity, chunk_size)
    ch = Chunk(cid, name, path, fd, capacity,
               sb or Superblock.empty(cid, capacity), raw, sb is not None)
    ch.tail = ch.sb.current_offset
    return ch


def pwrite_all(fd: int, data: bytes, offset: int) -> None:
    """pwrite all of data at offset (a short write is resumed, 0 bytes is an error)."""
    pwritev_all(fd, [data], offset)


def pwritev_all(fd: int, bufs: list, offset: int) -> None:
    """pwritev every buffer at offset, in batches of IOV_MAX, resuming short writes."""
    bufs = [memoryview(b) for b in bufs if len(b)]
    i = 0
    while i < len(bufs):
        n = diskio.pwritev(fd, bufs[i:i + IOV_MAX], offset)
        if n <= 0:
            raise OSError(errno.EIO, "pwritev wrote nothing")
        offset += n
        while n and i < len(bufs):
            if n >= bufs[i].nbytes:
                n -= bufs[i].nbytes
                i += 1
            else:
                bufs[i] = bufs[i][n:]
                n = 0
