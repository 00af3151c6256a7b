"""Chunk files written by the original C chunkserver, served by spy_server.py over the wire."""
from __future__ import annotations

import glob
import hashlib
import json
import lzma
import os

from tests.support import ROOT
from tests.support.server import running_server
from speedy.wire.protocol import Err, Op, decode_detail_info

# A copy of shared/vectors/original_c (chunk files written by the original C server).
VECTORS = os.path.join(ROOT, "tests", "vectors", "original_c")


def test_original_chunks_read_byte_for_byte(tmp_path):
    with open(os.path.join(VECTORS, "manifest.json")) as f:
        manifest = json.load(f)
    data_dir = tmp_path / "v" / "data"
    data_dir.mkdir(parents=True)
    heads = sorted(glob.glob(os.path.join(VECTORS, "*.chunk.head.xz")))
    assert len(heads) == 2
    for xz in heads:  # short files: the missing tail reads as zeros (CHUNKFILE.md)
        with lzma.open(xz) as src, open(data_dir / os.path.basename(xz)[:-8], "wb") as out:
            out.write(src.read())
    before = {p.name: p.read_bytes() for p in data_dir.iterdir()}
    with running_server(tmp_path, "v", group_id=manifest["group_id"], chunks=2,
                        chunk_size=manifest["chunk_file_size"]) as srv:
        with srv.client() as c:
            for fid, meta in manifest["files"].items():
                err, data = c.read(int(fid), group=manifest["group_id"])
                assert err == Err.SUCCESS, fid
                assert len(data) == meta["size"]
                assert hashlib.sha256(data).hexdigest() == meta["sha256"], fid
                head = data[:300]
                assert head == bytes((int(fid) * 31 + i) % 251 for i in range(len(head)))
            assert c.read(999, group=3)[0] == Err.FILE_NOT_FOUND
            info = decode_detail_info(c.call(Op.QUERY_DETAIL_INFOS)[1])
            assert info.total_file_count == len(manifest["files"])
            assert [cid for cid, _ in info.chunks] == [1, 2]
            assert c.call(Op.CHECK_DISK) == (Err.SUCCESS, b"")
    after = {p.name: p.read_bytes() for p in data_dir.iterdir() if p.is_file()}
    assert after == before  # reading changed nothing: the way back to the original stays open
