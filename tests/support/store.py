"""Helpers for the storage tests: stores on tmp_path, hand-made records, quick reopen."""
from __future__ import annotations

import contextlib
import itertools
import os
import zlib
from dataclasses import dataclass
from typing import Callable, Iterator

from speedy.chunkserver import diskio
from speedy.format import chunkfile
from speedy.format.chunkfile import RECORD_HEADER_SIZE, SUPERBLOCK_SIZE, RecordHeader, Superblock
from speedy.chunkserver.shm.index import FidIndex, IndexReader
from speedy.chunkserver.reader import ChunkReader
from speedy.chunkserver.store.chunkstore import ChunkStore

MiB = 1 << 20
_seq = itertools.count()


def payload(fid: int, size: int) -> bytes:
    """The vectors' pattern: byte i of file fid is (fid*31 + i) % 251."""
    base = (fid * 31) % 251
    pattern = bytes((base + i) % 251 for i in range(251))
    reps = size // 251 + 1
    return (pattern * reps)[:size]


class Harness:
    """A store (with its own shared index) and a reader on one data dir; closes everything."""

    def __init__(self, data_dir, group_id: int = 1, chunks: int = 2, chunk_size: int = MiB,
                 sync: bool = False) -> None:
        self.args = (str(data_dir), group_id, chunks, chunk_size, sync)
        self.data_dir = str(data_dir)
        self.group_id = group_id
        self.store: ChunkStore | None = None
        self.index: FidIndex | None = None
        self.ireader: IndexReader | None = None
        self.reader: ChunkReader | None = None

    def open(self, **changes) -> ChunkStore:
        """Open the store (a fresh index), and a reader on it."""
        self.shut()
        args = dict(zip(("data_dir", "group_id", "chunks", "chunk_size", "sync"), self.args))
        args.update(changes)
        self.index = FidIndex.create(f"spyst{os.getpid()}x{next(_seq)}", capacity=1024)
        self.store = ChunkStore(index=self.index, **args)
        try:
            self.store.open()
        except BaseException:
            self.store = None
            self._drop_index()
            raise
        self.ireader = IndexReader(self.index.name)
        self.reader = ChunkReader(args["data_dir"], args["group_id"], self.ireader)
        return self.store

    def reopen(self, snapshot: bool = True, **changes) -> ChunkStore:
        """Close and open again; without the snapshot when snapshot=False."""
        self.shut()
        if not snapshot:
            remove_snapshot(self.data_dir)
        return self.open(**changes)

    def put(self, fid: int, data: bytes) -> None:
        """Stage and commit one write."""
        self.store.stage(fid, [memoryview(data)], len(data), zlib.adler32(data, 0))
        assert self.store.commit() == [fid]

    def shut(self) -> None:
        """Close store, reader and index (the chunk files stay)."""
        if self.reader is not None:
            self.reader.close()
            self.reader = None
        if self.ireader is not None:
            self.ireader.close()
            self.ireader = None
        if self.store is not None:
            self.store.close()
            self.store = None
        self._drop_index()

    def crash(self) -> None:
        """Drop everything without close(): no flush, no snapshot save."""
        if self.store is not None:
            self.store._close_files()
            self.store = None
        self.shut()

    def _drop_index(self) -> None:
        if self.index is not None:
            self.index.close()
            self.index.unlink()
            self.index = None


def remove_snapshot(data_dir) -> None:
    try:
        os.unlink(os.path.join(str(data_dir), ".speedy", "index.snap"))
    except FileNotFoundError:
        pass


def record(fid: int, data: bytes, ts: int = 1700000000, ref: int = 1) -> bytes:
    """A whole record as the original writes it."""
    return chunkfile.encode_record_header(fid, len(data), zlib.adler32(data, 0), ts, ref) + data


def write_chunk(path, chunk_id: int, records: list[bytes], capacity: int = MiB,
                superblock: bool = True, extra: bytes = b"") -> Superblock:
    """A chunk file made by hand: superblock + records (+ bytes after current_offset)."""
    body = b"".join(records)
    offset = SUPERBLOCK_SIZE + len(body)
    sb = Superblock(chunk_id, len(records), len(records), offset, capacity - offset)
    with open(path, "wb") as f:
        f.write(sb.encode() if superblock else bytes(SUPERBLOCK_SIZE))
        f.write(body)
        f.write(extra)
    return sb


@contextlib.contextmanager
def writes_recorded(log: list, name: Callable[[str], str | None]) -> Iterator[list]:
    """Append (name(path), offset, bytes written) to log for every pwritev through the I/O
    seam while inside (the writes still reach the disk); a name of None is not logged."""
    real = diskio.pwritev

    def recording(fd, bufs, offset):
        n = real(fd, bufs, offset)
        label = name(os.readlink(f"/proc/self/fd/{fd}"))
        if label is not None:
            log.append((label, offset, b"".join(bytes(b) for b in bufs)[:n]))
        return n

    diskio.pwritev = recording
    try:
        yield log
    finally:
        diskio.pwritev = real


def read_superblock(path) -> Superblock:
    with open(path, "rb") as f:
        return Superblock.decode(f.read(SUPERBLOCK_SIZE))


def patch(path, offset: int, data: bytes) -> None:
    """Overwrite bytes of a file in place."""
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


@dataclass
class Rec:
    """Where one record lies."""

    fid: int
    path: str
    chunk_id: int
    offset: int  # of the header
    size: int

    @property
    def data_offset(self) -> int:
        return self.offset + RECORD_HEADER_SIZE


def records(data_dir: str) -> dict[int, Rec]:
    """fid -> Rec of every live record up to current_offset, found by parsing the files."""
    out: dict[int, Rec] = {}
    for name in sorted(os.listdir(data_dir)):
        if not name.endswith(".chunk"):
            continue
        path = os.path.join(data_dir, name)
        with open(path, "rb") as f:
            sb = Superblock.decode(f.read(SUPERBLOCK_SIZE))
            pos = SUPERBLOCK_SIZE
            while pos + RECORD_HEADER_SIZE <= sb.current_offset:
                f.seek(pos)
                h = RecordHeader.decode(f.read(RECORD_HEADER_SIZE))
                if h.live:
                    out[h.fid] = Rec(h.fid, path, sb.chunk_id, pos, h.size)
                pos += RECORD_HEADER_SIZE + h.size
    return out
