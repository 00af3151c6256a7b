"""The worker's side of the compaction admin opcodes (new): QUERY_GARBAGE and COMPACT."""
from __future__ import annotations

import logging

from speedy.chunkserver.garbage import qualifies
from speedy.chunkserver.messages import COMPACT_MSG, KIND_COMPACT
from speedy.format.chunkfile import SUPERBLOCK_SIZE
from speedy.wire.protocol import (COMPACT_REQUEST, COMPACT_RESULT, SERVER_THRESHOLD, ChunkGarbage, Err, Op,
                                  ProtocolError, decode_compact_request, encode_garbage)

log = logging.getLogger("speedy.chunkserver.worker")


def handle_query_garbage(worker, conn, blen: int, peer: str) -> int:
    """QUERY_GARBAGE (admin): per chunk its garbage, used bytes and avail_space."""
    st = worker.stats
    chunks = [ChunkGarbage(cid, g, used, avail) for cid, g, used, avail in st.garbage()]
    return worker.answer(conn, Op.QUERY_GARBAGE, Err.SUCCESS,
                         encode_garbage(st.get("compacting"), chunks))


def handle_compact(worker, conn, blen: int, peer: str) -> int:
    """COMPACT (admin): the writer compacts the chunks at the threshold; with wait the
    answer comes when they are done, with the bytes the compactions freed meanwhile."""
    op = Op.COMPACT
    if blen != COMPACT_REQUEST.size:
        return worker.refuse_body(conn, op, blen, Err.INTERNAL_ERROR)
    try:
        ppm, wait = decode_compact_request(conn.read_exact(blen))
    except ProtocolError as e:
        log.info("COMPACT from %s refused: %s", peer, e)
        return worker.answer(conn, op, Err.INTERNAL_ERROR)
    st = worker.stats
    threshold = getattr(worker.cfg, "compact_threshold", 0.0) if ppm == SERVER_THRESHOLD \
        else ppm / 1e6
    n = sum(qualifies(g, used, used + SUPERBLOCK_SIZE + avail, threshold)
            for _cid, g, used, avail in st.garbage())
    freed = st.get("compact_freed")
    log.warning("COMPACT (threshold %.3f%s) asked by %s: %d chunks", threshold,
                ", wait" if wait else "", peer, n)
    err = worker.call_writer(COMPACT_MSG, KIND_COMPACT, ppm, int(wait))
    freed = st.get("compact_freed") - freed if wait else 0
    return worker.answer(conn, op, err, COMPACT_RESULT.pack(n, freed) if err == 0 else b"")
