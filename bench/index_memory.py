"""Benchmark (not a test): fid index memory per file and ChunkStore.open() time, 1,000,000 files.

    /work/venv/bin/python bench/index_memory.py [--files N] [--dir DIR]

Prints the shared memory the index uses per stored file, then writes N small records
into chunk files by hand and times open() by scanning and open() from the snapshot.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
import zlib

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from speedy.format.chunkfile import SUPERBLOCK_SIZE, Superblock, encode_record_header  # noqa: E402
from speedy.chunkserver.shm.index import FidIndex, IndexReader  # noqa: E402
from speedy.chunkserver.store.chunkstore import ChunkStore  # noqa: E402

CHUNK_SIZE = 64 << 20


def measure_memory(n: int) -> None:
    """Insert n fids into a fresh index; report bytes per file and the time."""
    idx = FidIndex.create(f"spybench{os.getpid()}")
    try:
        t0 = time.monotonic()
        for fid in range(n):
            idx.insert(fid * 2654435761 % (1 << 64), 1 + fid % 20, 55 + fid)
        dt = time.monotonic() - t0
        print(f"index: {n} fids, capacity {idx.capacity} slots, {idx.nbytes()} bytes shared "
              f"memory = {idx.nbytes() / n:.1f} bytes/file (one table for all processes); "
              f"insert {dt:.2f}s ({dt / n * 1e6:.2f} us/fid)")
        reader = IndexReader(idx.name)
        t0 = time.monotonic()
        for fid in range(0, n, 10):
            reader.get(fid * 2654435761 % (1 << 64))
        print(f"reader get: {(time.monotonic() - t0) / (n // 10) * 1e6:.2f} us")
        reader.close()
    finally:
        idx.close()
        idx.unlink()


def write_chunks(data_dir: str, n: int, size: int) -> int:
    """n records of size bytes into as many chunk files of group 1 as needed."""
    per_chunk = (CHUNK_SIZE - SUPERBLOCK_SIZE - 1) // (30 + size)
    fid = 0
    cid = 0
    while fid < n:
        cid += 1
        count = min(per_chunk, n - fid)
        parts = []
        for f in range(fid, fid + count):
            body = (f.to_bytes(8, "big") * (size // 8 + 1))[:size]
            parts.append(encode_record_header(f, size, zlib.adler32(body, 0), 1700000000) + body)
        blob = b"".join(parts)
        off = SUPERBLOCK_SIZE + len(blob)
        with open(os.path.join(data_dir, f"chunk_1_{cid}.chunk"), "wb") as out:
            out.write(Superblock(cid, count, count, off, CHUNK_SIZE - off).encode())
            out.write(blob)
        fid += count
    return cid


def measure_open(data_dir: str, n: int, chunks: int) -> None:
    """open() by scan, then by snapshot, then by snapshot plus a few appended records."""
    for label in ("scan (no snapshot)", "snapshot"):
        idx = FidIndex.create(f"spybench{os.getpid()}o")
        store = ChunkStore(data_dir, 1, chunks, CHUNK_SIZE, False, idx)
        t0 = time.monotonic()
        store.open()
        dt = time.monotonic() - t0
        assert len(idx) == n, (len(idx), n)
        print(f"open() {label}: {dt:.3f}s for {n} files ({store.open_mode}); "
              f"{idx.nbytes() / n:.1f} bytes/file")
        t0 = time.monotonic()
        store.close()
        print(f"close() incl. snapshot save: {time.monotonic() - t0:.3f}s, snapshot "
              f"{os.path.getsize(os.path.join(data_dir, '.speedy', 'index.snap'))} bytes")
        idx.close()
        idx.unlink()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=1_000_000)
    p.add_argument("--size", type=int, default=10, help="bytes per file")
    p.add_argument("--dir", default="", help="scratch dir (default: a temporary one)")
    a = p.parse_args()
    measure_memory(a.files)
    data_dir = a.dir or tempfile.mkdtemp(prefix="speedy-bench-")
    try:
        t0 = time.monotonic()
        chunks = write_chunks(data_dir, a.files, a.size)
        print(f"wrote {a.files} records into {chunks} chunk files in {time.monotonic() - t0:.1f}s")
        measure_open(data_dir, a.files, chunks)
    finally:
        if not a.dir:
            shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
