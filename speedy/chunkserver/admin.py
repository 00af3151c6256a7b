"""The worker's side of the admin opcodes: SET_STATUS, KILL_PD_WR, DUMP_CHUNK, and the
compaction ones (new), QUERY_GARBAGE and COMPACT. Each takes the worker it runs in."""
from __future__ import annotations

import logging
import os
import socket

from speedy.chunkserver.conn import Closed
from speedy.chunkserver.garbage import qualifies
from speedy.chunkserver.messages import COMPACT_MSG, HEAD, KIND_COMPACT, KIND_KILL
from speedy.format.chunkfile import SUPERBLOCK_SIZE
from speedy.wire.protocol import (COMPACT_REQUEST, COMPACT_RESULT, MAX_CHUNK_NAME,
                                  RESPONSE_HEADER, SERVER_THRESHOLD, ChunkGarbage, Err, Op,
                                  ProtocolError, ServerStatus, decode_compact_request,
                                  encode_garbage)

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


def handle_set_status(worker, conn, blen: int, peer: str) -> int:
    """SET_STATUS (admin): 0 RW, 1 RO, for every process of the server."""
    op = Op.SET_STATUS
    if blen != 1:
        return worker.refuse_body(conn, op, blen, Err.INTERNAL_ERROR)
    status = conn.read_exact(1)[0]
    if status not in (ServerStatus.RW, ServerStatus.RO):
        return worker.answer(conn, op, Err.INTERNAL_ERROR)
    if status != worker.stats.get("admin_status"):
        log.warning("status set to %s by %s", ServerStatus(status).name, peer)
    worker.stats.set("admin_status", status)
    return worker.answer(conn, op, Err.SUCCESS)


def handle_kill(worker, conn, blen: int, peer: str) -> int:
    """KILL_PD_WR (admin): the writer answers every pending write KILLED."""
    op = Op.KILL_PD_WR
    return worker.answer(conn, op, worker.call_writer(HEAD, KIND_KILL))


def handle_dump_chunk(worker, conn, blen: int, peer: str) -> int:
    """DUMP_CHUNK (admin): one of this server's chunk files, raw, by exact name."""
    op = Op.DUMP_CHUNK
    if blen >= MAX_CHUNK_NAME:
        return worker.refuse_body(conn, op, blen, Err.INTERNAL_ERROR)
    raw = conn.read_exact(blen)
    try:
        path = worker.reader.chunk_path(raw.decode("ascii"))
    except UnicodeDecodeError:
        path = None
    if path is None:
        return worker.answer(conn, op, Err.FILE_NOT_FOUND)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as e:
        log.error("DUMP_CHUNK %s: %s", path, e.strerror)
        return worker.answer(conn, op, Err.READ_ERROR)
    try:
        size = os.fstat(fd).st_size
        if size > 0xFFFFFFFF:
            return worker.answer(conn, op, Err.INTERNAL_ERROR)
        conn.sock.sendall(RESPONSE_HEADER.pack(op, Err.SUCCESS, size))
        send_file(conn.sock, fd, size, worker.stall)
    finally:
        os.close(fd)
    return Err.SUCCESS


def send_file(sock, fd: int, size: int, stall: float) -> None:
    """Send size bytes of fd with sendfile(2), cooperatively; Closed if it comes short."""
    from gevent.socket import wait_write
    out = sock.fileno()
    offset = 0
    while offset < size:
        try:
            n = os.sendfile(out, fd, offset, min(size - offset, 1 << 30))
        except BlockingIOError:
            wait_write(out, timeout=stall, timeout_exc=socket.timeout("send stalled"))
            continue
        if n == 0:  # the file shrank under us: the stream is broken
            raise Closed("chunk file shorter than announced")
        offset += n
