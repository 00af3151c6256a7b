"""A worker process: gevent, accepts on the shared listening socket, speaks the protocol.

gevent is imported and monkey-patched only in run_worker(), after the fork. Each
connection is one greenlet (bounded by a gevent Pool): requests are read and answered in
order, so pipelined requests are answered in order. Upload bodies go straight from the
socket into shared pool blocks (recv_into), checksummed on the way, and the writer gets
the block numbers. Reads use the shared fid index and the worker's own read-only
descriptors. Admin opcodes (SET_STATUS, KILL_PD_WR, DUMP_CHUNK) are answered only to
peers in --admin_allow; others get INTERNAL_ERROR.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import struct
import time
import zlib
from argparse import Namespace
from functools import partial

from speedy.format.chunkfile import RECORD_HEADER_SIZE, max_data_size
from speedy.chunkserver.compaction_admin import handle_compact, handle_query_garbage
from speedy.chunkserver.conn import AdminPolicy, Closed, Conn, TooSlow, idle_timeout, min_rate
from speedy.chunkserver.shm.index import IndexReader
from speedy.common.logs import reopen_logs
from speedy.chunkserver.shm.pool import BlockPool, blocks_for
from speedy.wire.protocol import (ADMIN_OPCODES, FILE_KEY, FILE_KEY_SIZE, MAX_CHUNK_NAME, REQUEST_HEADER,
                       RESPONSE_HEADER, DetailInfo, Err, Op, ServerStatus, encode_detail_info,
                       encode_io_status)
from speedy.chunkserver.reader import ChunkReader, NotFound, ReadFailed
from speedy.chunkserver.shm.counters import StatsView, WorkerStats
from speedy.chunkserver.messages import (FID_MSG, FRAME, HEAD, KIND_DELETE, KIND_KILL,
                                         KIND_WRITE, PACKET_MAX, REPLY, REPLY_PACKET_MAX,
                                         WRITE_MSG)

log = logging.getLogger("speedy.chunkserver.worker")

SMALL_BODY_MAX = 65536  # a non-WRITE body longer than this is garbage: answer, then close
WHOLE_READ_MAX = 2 << 20  # READs up to this size are read at once, larger ones in pieces
PIECE = 1 << 20
STOP_GRACE = 25.0
BOOT_ERROR = 4  # exit code of a worker that could not start (the supervisor gives up)
KEEPALIVE = ((getattr(socket, "TCP_KEEPIDLE", None), 60),
             (getattr(socket, "TCP_KEEPINTVL", None), 10),
             (getattr(socket, "TCP_KEEPCNT", None), 6))
EMPTY_BODY = frozenset({Op.PING, Op.CHECK_DISK, Op.GET_STATUS, Op.KILL_PD_WR,
                        Op.QUERY_IO_STATUS, Op.QUERY_DETAIL_INFOS, Op.QUERY_GARBAGE})
SERVER_ERRORS = frozenset({Err.WRITE_ERROR, Err.READ_ERROR, Err.INTERNAL_ERROR,
                           Err.CHUNK_UNAVAILABLE, Err.REACH_MEMORY_LIMIT, Err.KILLED,
                           Err.SERVER_READ_ONLY, Err.IO_JOB_UNAVAILABLE})


class WriterLink:
    """The worker's end of its socketpair to the writer: calls with request ids."""

    def __init__(self, sock, gevent_mod) -> None:
        from gevent.event import AsyncResult, Event
        self._result = AsyncResult
        self.sock = sock
        self.waiting: dict[int, object] = {}
        self.next_id = 1
        self.broken = False
        self.out: list[bytes] = []  # framed messages not sent yet
        self.wake = Event()
        self.reader = gevent_mod.spawn(self._read_replies)
        self.sender = gevent_mod.spawn(self._send_queued)

    def send(self, head: struct.Struct, *fields, tail: bytes = b"") -> object:
        """Queue head.pack(req_id, *fields) + tail; the AsyncResult of the answer (an Err).

        The messages queued by every greenlet that ran since the sender's last turn go
        to the writer in one packet (one send here, one recv there).
        """
        if self.broken:
            raise OSError("the writer is gone")
        req_id = self.next_id
        self.next_id = (req_id + 1) & 0xFFFFFFFF or 1
        result = self._result()
        self.waiting[req_id] = result
        msg = head.pack(req_id, *fields) + tail
        self.out.append(FRAME.pack(len(msg)) + msg)
        self.wake.set()
        return result

    def _send_queued(self) -> None:
        """Send the queued messages, packed into packets of up to PACKET_MAX bytes."""
        while not self.broken:
            self.wake.wait()
            self.wake.clear()
            while self.out:
                k = size = 0
                for m in self.out:  # as many messages as fit (at least one)
                    if k and size + len(m) > PACKET_MAX:
                        break
                    size += len(m)
                    k += 1
                packet = b"".join(self.out[:k])
                del self.out[:k]
                try:
                    while not self.sock.send(packet):  # a packet goes whole or not at all:
                        pass  # 0 means it waited and the socket was still full; again
                except OSError as e:
                    log.error("cannot send to the writer: %s", e)
                    self.sock.close()  # the reader sees the end and answers what waits
                    return

    def _read_replies(self) -> None:
        while True:
            try:
                data = self.sock.recv(REPLY_PACKET_MAX)
            except OSError:
                data = b""
            if not data:
                break
            if len(data) % REPLY.size:
                log.error("malformed reply packet of %d bytes from the writer", len(data))
                data = data[:len(data) - len(data) % REPLY.size]
            waiting = self.waiting
            for req_id, err in REPLY.iter_unpack(data):  # one packet: the replies of a batch
                result = waiting.pop(req_id, None)
                if result is not None:
                    result.set(err)
        self.broken = True
        if self.waiting:
            log.error("the writer is gone: %d requests answered INTERNAL_ERROR",
                      len(self.waiting))
        for result in self.waiting.values():
            result.set(Err.INTERNAL_ERROR)
        self.waiting.clear()


class Worker:
    """One worker process's state and request handlers."""

    def __init__(self, cfg: Namespace, slot: int, owner: int, listener: socket.socket,
                 link_sock: socket.socket, pool: BlockPool, stats: StatsView,
                 index_name: str) -> None:
        self.cfg = cfg
        self.slot = slot
        self.owner = owner
        self.listener = listener
        self.link_sock = link_sock
        self.pool = pool
        self.stats = stats
        self.ws: WorkerStats = stats.worker(slot)
        self.index_name = index_name
        self.group_id = cfg.group_id
        self.max_body = max_data_size(cfg.chunk_size)
        self.idle = idle_timeout()
        self.min_rate = min_rate()
        self.admin = AdminPolicy(cfg.admin_allow)
        self.parent = os.getppid()
        self.stopping = False
        self.idle_greenlets: set = set()
        self.handlers = {
            Op.WRITE: self.handle_write, Op.READ: self.handle_read,
            Op.DELETE: self.handle_delete, Op.PING: self.handle_ping,
            Op.CHECK_DISK: self.handle_check_disk, Op.SET_STATUS: self.handle_set_status,
            Op.GET_STATUS: self.handle_get_status, Op.KILL_PD_WR: self.handle_kill,
            Op.QUERY_IO_STATUS: self.handle_io_status,
            Op.QUERY_DETAIL_INFOS: self.handle_detail_infos,
            Op.DUMP_CHUNK: self.handle_dump_chunk,
            Op.QUERY_GARBAGE: partial(handle_query_garbage, self),
            Op.COMPACT: partial(handle_compact, self),
        }

    # ------------------------------------------------------------------ process
    def run(self) -> int:
        """Patch, attach, serve until stopped; the process exit code."""
        from gevent import monkey
        monkey.patch_all()
        import gevent
        import gevent.event
        import gevent.pool
        import gevent.server
        import gevent.socket
        self.gevent = gevent
        try:
            self.reader = ChunkReader(self.cfg.data_dir, self.group_id,
                                      IndexReader(self.index_name))
            link = gevent.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET,
                                        fileno=self.link_sock.detach())
            self.link = WriterLink(link, gevent)
            lsock = gevent.socket.socket(self.listener.family, self.listener.type,
                                         fileno=self.listener.detach())
            lsock.setblocking(False)
        except Exception as e:
            log.error("worker %d cannot start: %s", self.slot, e)
            return BOOT_ERROR
        self.conn_pool = gevent.pool.Pool(connection_limit())
        self.server = gevent.server.StreamServer(lsock, self.handle, spawn=self.conn_pool)
        gevent.signal_handler(signal.SIGTERM, lambda: gevent.spawn(self.stop))
        gevent.signal_handler(signal.SIGHUP, self._reopen_logs)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGHUP})
        self.done = gevent.event.Event()
        self.server.start()
        log.debug("worker %d serving (pid %d)", self.slot, os.getpid())
        while not self.done.wait(0.5):
            if self.stopping:
                continue
            if self.link.broken:
                log.error("worker %d: lost the writer; stopping", self.slot)
                gevent.spawn(self.stop)
            elif os.getppid() != self.parent:
                log.error("worker %d: the supervisor is gone; stopping", self.slot)
                gevent.spawn(self.stop)
        return 0

    def _reopen_logs(self) -> None:
        reopen_logs()
        log.info("worker %d: log file reopened", self.slot)

    def stop(self) -> None:
        """Graceful: stop accepting, drop idle connections, let requests in flight finish."""
        if self.stopping:
            return
        self.stopping = True
        self.server.close()
        for g in list(self.idle_greenlets):
            g.kill(block=False)
        self.conn_pool.join(timeout=STOP_GRACE)
        if len(self.conn_pool):
            log.warning("worker %d: %d connections still busy after %.0fs; dropped",
                        self.slot, len(self.conn_pool), STOP_GRACE)
            self.conn_pool.kill(timeout=1)
        self.done.set()

    # ------------------------------------------------------------------ connections
    def handle(self, sock, addr) -> None:
        """One client connection: requests in order until it closes."""
        ws = self.ws
        ws.add("conn_count")
        ws.add("accepted")
        peer = addr[0] if isinstance(addr, tuple) else str(addr)
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for opt, value in KEEPALIVE:
                if opt is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, opt, value)
        except OSError:
            pass
        conn = Conn(sock, self.idle, self.min_rate)
        current = self.gevent.getcurrent()
        handlers = self.handlers
        try:
            while not self.stopping:
                if conn.r == conn.w:  # between requests: wait without a time limit
                    conn.start = 0.0
                    sock.settimeout(None)
                    self.idle_greenlets.add(current)
                    try:
                        conn.fill()
                    finally:
                        self.idle_greenlets.discard(current)
                    sock.settimeout(self.idle)
                conn.start, conn.got = time.monotonic(), 0
                op, blen = REQUEST_HEADER.unpack(conn.read_exact(5))
                handler = handlers.get(op)
                if handler is None:
                    log.info("unknown opcode %d from %s: connection closed", op, peer)
                    break
                t0 = time.monotonic()
                if op in ADMIN_OPCODES and not self.admin.allows(peer):
                    log.warning("%s from %s refused: not in --admin_allow", Op(op).name, peer)
                    err = self.refuse_body(conn, op, blen, Err.INTERNAL_ERROR)
                elif blen and op in EMPTY_BODY:
                    err = self.refuse_body(conn, op, blen, Err.INTERNAL_ERROR)
                else:
                    err = handler(conn, blen, peer)
                ws.observe(op, err, time.monotonic() - t0)
        except Closed:
            pass
        except (socket.timeout, TimeoutError):
            ws.add("dropped_idle")
            log.info("connection from %s dropped: no progress for %gs", peer, self.idle)
        except TooSlow as e:
            ws.add("dropped_idle")
            log.info("connection from %s dropped: request too slow (%s, under %g bytes/s "
                     "after %gs)", peer, e, self.min_rate, self.idle)
        except OSError as e:
            log.debug("connection from %s: %s", peer, e)
        finally:
            ws.add("conn_count", -1)
            try:
                sock.close()
            except OSError:
                pass

    def answer(self, conn: Conn, op: int, err: int, body: bytes = b"") -> int:
        """Send one response; returns err."""
        send_all(conn.sock, RESPONSE_HEADER.pack(op, err, len(body)) + body)
        return err

    def refuse_body(self, conn: Conn, op: int, blen: int, err: int) -> int:
        """Answer err to a request whose body is wrong or not allowed, and skip the body."""
        self.answer(conn, op, err)
        if blen > SMALL_BODY_MAX:
            raise Closed("oversized body")
        conn.skip(blen)
        return err

    # ------------------------------------------------------------------ data opcodes
    def handle_write(self, conn: Conn, blen: int, peer: str) -> int:
        """WRITE: body into pool blocks, adler32 on the way, then the writer commits it."""
        op = Op.WRITE
        if blen < FILE_KEY_SIZE:
            conn.skip(blen)
            return self.answer(conn, op, Err.INTERNAL_ERROR)
        group, fid = FILE_KEY.unpack(conn.read_exact(FILE_KEY_SIZE))
        size = blen - FILE_KEY_SIZE
        err = None
        blocks = None
        if group != self.group_id:
            err = Err.SERVER_ID_MISMATCH
        elif self.stats.status() != ServerStatus.RW:
            err = Err.SERVER_READ_ONLY
        elif size > self.max_body:
            err = Err.CHUNK_UNAVAILABLE
        else:
            blocks = self.pool.allocate(blocks_for(size), self.owner)
            if blocks is None:
                err = Err.REACH_MEMORY_LIMIT
        ws = self.ws
        if err is not None:
            if err in SERVER_ERRORS:
                ws.add("write_error")
            self.answer(conn, op, err)
            conn.skip(size)
            return err
        ws.add("writing")
        try:
            csum = 0
            for part in self.pool.parts(blocks, size):
                conn.read_into(part)
                csum = zlib.adler32(part, csum)
            try:
                result = self.link.send(WRITE_MSG, KIND_WRITE, fid, size, csum, len(blocks),
                                        tail=struct.pack(f"={len(blocks)}H", *blocks))
            except OSError:
                err = Err.INTERNAL_ERROR
            else:
                blocks = None  # the writer owns them now
                err = result.get()
        finally:
            ws.add("writing", -1)
            if blocks:
                self.pool.free(blocks)
        if err == Err.SUCCESS:
            ws.add("write_count")
            ws.add("write_bytes", size)
        elif err in SERVER_ERRORS:
            ws.add("write_error")
        return self.answer(conn, op, err)

    def handle_read(self, conn: Conn, blen: int, peer: str) -> int:
        """READ: look the fid up, read and verify, send."""
        op = Op.READ
        if blen != FILE_KEY_SIZE:
            return self.refuse_body(conn, op, blen, Err.INTERNAL_ERROR)
        group, fid = FILE_KEY.unpack(conn.read_exact(FILE_KEY_SIZE))
        if group != self.group_id:
            return self.answer(conn, op, Err.SERVER_ID_MISMATCH)
        ws = self.ws
        ws.add("reading")
        try:
            err = self.send_file(conn, fid)
        finally:
            ws.add("reading", -1)
        if err in SERVER_ERRORS:
            ws.add("read_error")
        return err

    def send_file(self, conn: Conn, fid: int) -> int:
        """Answer a READ of fid: verified data, or the error."""
        op, reader = Op.READ, self.reader
        try:
            rec = reader.fetch(fid, WHOLE_READ_MAX)  # header + data, one pread mostly
            size = rec.size
            if rec.buf is None:  # too big to hold: verify it all, then send it in pieces
                chunk_id, offset, csum = rec.chunk_id, rec.offset + RECORD_HEADER_SIZE, rec.csum
                got = 0
                for at in range(0, size, PIECE):
                    got = zlib.adler32(reader.read_at(chunk_id, offset + at,
                                                      min(PIECE, size - at), rec.fd), got)
                if got != csum:
                    raise ReadFailed(f"fid {fid}: checksum mismatch")
        except NotFound:
            return self.answer(conn, op, Err.FILE_NOT_FOUND)
        except ReadFailed as e:
            log.error("READ of fid %d: %s", fid, e)
            return self.answer(conn, op, e.code)
        sock = conn.sock
        if rec.buf is not None:  # the response header goes over the end of the record's
            at = RECORD_HEADER_SIZE - RESPONSE_HEADER.size  # header: one send, no copy
            RESPONSE_HEADER.pack_into(rec.buf, at, op, Err.SUCCESS, size)
            send_all(sock, memoryview(rec.buf)[at:])
        else:
            self.stream_verified(sock, fid, chunk_id, offset, size, csum, rec.fd)
        self.ws.add("read_count")
        self.ws.add("read_bytes", size)
        return Err.SUCCESS

    def stream_verified(self, sock, fid: int, chunk_id: int, offset: int, size: int,
                        csum: int, fd: int = -1) -> None:
        """Send a big record's data in pieces, checksummed again on the way: the last piece
        is held back until the sum matches, so bytes that changed on disk since the first
        check end in a closed connection (a short response), never in a wrong SUCCESS."""
        sock.sendall(RESPONSE_HEADER.pack(Op.READ, Err.SUCCESS, size))
        got = 0
        for at in range(0, size, PIECE):
            try:
                piece = self.reader.read_at(chunk_id, offset + at, min(PIECE, size - at), fd)
            except ReadFailed as e:
                log.error("READ of fid %d failed half-way: %s; connection closed", fid, e)
                raise Closed("read failed half-way") from None
            got = zlib.adler32(piece, got)
            if at + PIECE >= size and got != csum:
                log.error("READ of fid %d: the data changed on disk while it was sent "
                          "(checksum mismatch); connection closed", fid)
                self.ws.add("read_error")
                raise Closed("checksum mismatch half-way")
            sock.sendall(piece)

    def handle_delete(self, conn: Conn, blen: int, peer: str) -> int:
        """DELETE: through the writer."""
        op = Op.DELETE
        if blen != FILE_KEY_SIZE:
            return self.refuse_body(conn, op, blen, Err.INTERNAL_ERROR)
        group, fid = FILE_KEY.unpack(conn.read_exact(FILE_KEY_SIZE))
        if group != self.group_id:
            return self.answer(conn, op, Err.SERVER_ID_MISMATCH)
        if self.stats.status() != ServerStatus.RW:
            return self.answer(conn, op, Err.SERVER_READ_ONLY)
        return self.answer(conn, op, self.call_writer(FID_MSG, KIND_DELETE, fid))

    def call_writer(self, head: struct.Struct, *fields) -> int:
        """One request to the writer and its answer (INTERNAL_ERROR if the writer is gone)."""
        try:
            return self.link.send(head, *fields).get()
        except OSError:
            return Err.INTERNAL_ERROR

    # ------------------------------------------------------------------ other opcodes
    def handle_ping(self, conn: Conn, blen: int, peer: str) -> int:
        """PING."""
        return self.answer(conn, Op.PING, Err.SUCCESS)

    def handle_check_disk(self, conn: Conn, blen: int, peer: str) -> int:
        """CHECK_DISK: read a random 4 KiB of a random chunk."""
        op = Op.CHECK_DISK
        try:
            self.reader.check_disk()
        except ReadFailed as e:
            log.error("CHECK_DISK: %s", e)
            return self.answer(conn, op, Err.CHUNK_CHECK_ERROR)
        return self.answer(conn, op, Err.SUCCESS)

    def handle_set_status(self, conn: Conn, blen: int, peer: str) -> int:
        """SET_STATUS (admin): 0 RW, 1 RO, for every process of the server."""
        op = Op.SET_STATUS
        if blen != 1:
            return self.refuse_body(conn, op, blen, Err.INTERNAL_ERROR)
        status = conn.read_exact(1)[0]
        if status not in (ServerStatus.RW, ServerStatus.RO):
            return self.answer(conn, op, Err.INTERNAL_ERROR)
        if status != self.stats.get("admin_status"):
            log.warning("status set to %s by %s", ServerStatus(status).name, peer)
        self.stats.set("admin_status", status)
        return self.answer(conn, op, Err.SUCCESS)

    def handle_get_status(self, conn: Conn, blen: int, peer: str) -> int:
        """GET_STATUS: the effective status byte."""
        return self.answer(conn, Op.GET_STATUS, Err.SUCCESS, bytes([self.stats.status()]))

    def handle_kill(self, conn: Conn, blen: int, peer: str) -> int:
        """KILL_PD_WR (admin): the writer answers every pending write KILLED."""
        op = Op.KILL_PD_WR
        return self.answer(conn, op, self.call_writer(HEAD, KIND_KILL))

    def handle_io_status(self, conn: Conn, blen: int, peer: str) -> int:
        """QUERY_IO_STATUS: pending, writing, reading."""
        op = Op.QUERY_IO_STATUS
        st = self.stats
        body = encode_io_status(st.get("pending_writes"), st.sum("writing"), st.sum("reading"))
        return self.answer(conn, op, Err.SUCCESS, body)

    def handle_detail_infos(self, conn: Conn, blen: int, peer: str) -> int:
        """QUERY_DETAIL_INFOS: counters of every worker, chunks and files."""
        op = Op.QUERY_DETAIL_INFOS
        st = self.stats
        info = DetailInfo(
            conn_count=st.sum("conn_count"), reading_count=st.sum("reading"),
            writing_count=st.sum("writing"), pending_writes=st.get("pending_writes"),
            read_count=st.sum("read_count"), write_count=st.sum("write_count"),
            read_error=st.sum("read_error"), write_error=st.sum("write_error"),
            read_bytes=st.sum("read_bytes"), write_bytes=st.sum("write_bytes"),
            chunks=st.chunks(), total_file_count=st.get("file_count"))
        return self.answer(conn, op, Err.SUCCESS, encode_detail_info(info))

    def handle_dump_chunk(self, conn: Conn, blen: int, peer: str) -> int:
        """DUMP_CHUNK (admin): one of this server's chunk files, raw, by exact name."""
        op = Op.DUMP_CHUNK
        if blen >= MAX_CHUNK_NAME:
            return self.refuse_body(conn, op, blen, Err.INTERNAL_ERROR)
        raw = conn.read_exact(blen)
        try:
            path = self.reader.chunk_path(raw.decode("ascii"))
        except UnicodeDecodeError:
            path = None
        if path is None:
            return self.answer(conn, op, Err.FILE_NOT_FOUND)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError as e:
            log.error("DUMP_CHUNK %s: %s", path, e.strerror)
            return self.answer(conn, op, Err.READ_ERROR)
        try:
            size = os.fstat(fd).st_size
            if size > 0xFFFFFFFF:
                return self.answer(conn, op, Err.INTERNAL_ERROR)
            conn.sock.sendall(RESPONSE_HEADER.pack(op, Err.SUCCESS, size))
            self.sendfile(conn.sock, fd, size)
        finally:
            os.close(fd)
        return Err.SUCCESS

    def sendfile(self, sock, fd: int, size: int) -> None:
        """Send size bytes of fd with sendfile(2), cooperatively; Closed if it comes short."""
        from gevent.socket import wait_write
        out = sock.fileno()
        offset = 0
        while offset < size:
            try:
                n = os.sendfile(out, fd, offset, min(size - offset, 1 << 30))
            except BlockingIOError:
                wait_write(out, timeout=self.idle, timeout_exc=socket.timeout("send stalled"))
                continue
            if n == 0:  # the file shrank under us: the stream is broken
                raise Closed("chunk file shorter than announced")
            offset += n


def send_all(sock, data: bytes) -> None:
    """sendall, with one plain send first (a small response nearly always goes at once)."""
    n = sock.send(data)
    if n < len(data):
        sock.sendall(memoryview(data)[n:])


def connection_limit() -> int:
    """Connections one worker serves at once (the rest wait in the listen backlog)."""
    import resource
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 65536
    return max(64, min(10000, soft - 64))


def run_worker(cfg: Namespace, slot: int, owner: int, listener: socket.socket,
               link_sock: socket.socket, pool: BlockPool, stats: StatsView,
               index_name: str) -> int:
    """The worker process's body; returns its exit code."""
    return Worker(cfg, slot, owner, listener, link_sock, pool, stats, index_name).run()
