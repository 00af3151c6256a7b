"""Chunk files written by the original C chunkserver open and read byte for byte."""
from __future__ import annotations

import glob
import hashlib
import json
import lzma
import os

from tests.support import ROOT
from tests.support.store import Harness, payload

VECTORS = os.path.join(ROOT, "tests", "vectors", "original_c")  # copy of shared/vectors
CHUNK_SIZE = 2147483648


def unpack(dest) -> dict:
    for xz in glob.glob(os.path.join(VECTORS, "*.chunk.head.xz")):
        name = os.path.basename(xz)[: -len(".head.xz")]
        with lzma.open(xz) as src, open(os.path.join(dest, name), "wb") as out:
            out.write(src.read())
    with open(os.path.join(VECTORS, "manifest.json")) as f:
        return json.load(f)


def test_original_chunk_files_read_byte_for_byte(tmp_path):
    manifest = unpack(tmp_path)
    assert manifest["group_id"] == 3
    names = ("chunk_3_1.chunk", "chunk_3_2.chunk")
    sizes = {n: os.path.getsize(tmp_path / n) for n in names}
    superblocks = {n: (tmp_path / n).read_bytes()[:55] for n in names}
    h = Harness(tmp_path, group_id=3, chunks=2, chunk_size=CHUNK_SIZE)
    try:
        h.open()
        assert h.store.open_mode == "scan"
        assert h.store.file_count() == len(manifest["files"])
        for fid_text, want in manifest["files"].items():
            fid = int(fid_text)
            data = h.reader.read(fid)
            assert len(data) == want["size"]
            assert hashlib.sha256(data).hexdigest() == want["sha256"], fid
            assert data == payload(fid, want["size"])
        # the chunk files stay short: nothing was extended or rewritten
        for name, size in sizes.items():
            assert os.path.getsize(tmp_path / name) == size
            assert (tmp_path / name).read_bytes()[:55] == superblocks[name]
        avail = dict(h.store.chunk_stats())
        assert all(0 < a < CHUNK_SIZE for a in avail.values())
        h.reopen()
        assert h.store.open_mode == "snapshot"
        assert h.reader.read(77) == payload(77, 12345)
    finally:
        h.shut()
