"""A worker process: gevent, accepts on the shared listening socket, speaks the protocol.

gevent is imported and monkey-patched only in run_worker(), after the fork. The worker
gets its link to the writer and the fid index's name over its control socket from the
supervisor, at start and again whenever a new writer replaced a dead one (link.py). A
connection is served by one greenlet at a time: requests are read and answered in order,
so pipelined requests are answered in order; an idle connection is parked without one
and counted against the connection limits (conns.py). Upload bodies go into shared pool blocks
claimed as they arrive (upload.py), checksummed on the way, and the writer gets the
block numbers. Reads use the shared fid index and the worker's own read-only
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
from speedy.chunkserver.admin import (handle_compact, handle_dump_chunk, handle_kill,
                                      handle_query_garbage, handle_set_status)
from speedy.chunkserver.conn import AdminPolicy, Closed, Conn, TooSlow, min_rate, stall_timeout
from speedy.chunkserver.conns import SWEEP_EVERY, ConnTable, Park
from speedy.chunkserver.shm.index import IndexReader
from speedy.common.logs import reopen_logs
from speedy.common.sockets import send_all
from speedy.chunkserver.shm.pool import BlockPool, blocks_for
from speedy.wire.protocol import (ADMIN_OPCODES, FILE_KEY, FILE_KEY_SIZE, REQUEST_HEADER,
                       RESPONSE_HEADER, DetailInfo, Err, Op, ServerStatus, encode_detail_info,
                       encode_io_status)
from speedy.chunkserver.reader import ChunkReader, NotFound, ReadFailed
from speedy.chunkserver.shm.counters import StatsView, WorkerStats
from speedy.chunkserver.link import WriterSlot
from speedy.chunkserver.upload import PoolFull, Upload, UploadMemory, per_source_default
from speedy.chunkserver.messages import FID_MSG, KIND_DELETE, KIND_WRITE, WRITE_MSG

log = logging.getLogger("speedy.chunkserver.worker")

SMALL_BODY_MAX = 65536  # a non-WRITE body longer than this is garbage: answer, then close
WHOLE_READ_MAX = 2 << 20  # READs up to this size are read at once, larger ones in pieces
PIECE = 1 << 20
STOP_GRACE = 25.0
DEFAULT_MAX_CONNS = 10000  # per worker, when --max_conns is 0
DEFAULT_PER_SOURCE = 1000  # per worker and source address, when --max_conns_per_ip is 0
DEFAULT_IDLE_TIMEOUT = 300.0
REFUSE_SLACK = 256  # descriptors kept free beyond --max_conns (refused connections, files)
RETIRE_AFTER = 60.0  # seconds a replaced reader (old writer's index, its fds) stays open
BOOT_ERROR = 4  # exit code of a worker that could not start (the supervisor gives up)
KEEPALIVE = ((getattr(socket, "TCP_KEEPIDLE", None), 60),
             (getattr(socket, "TCP_KEEPINTVL", None), 10),
             (getattr(socket, "TCP_KEEPCNT", None), 6))
EMPTY_BODY = frozenset({Op.PING, Op.CHECK_DISK, Op.GET_STATUS, Op.KILL_PD_WR,
                        Op.QUERY_IO_STATUS, Op.QUERY_DETAIL_INFOS, Op.QUERY_GARBAGE})
SERVER_ERRORS = frozenset({Err.WRITE_ERROR, Err.READ_ERROR, Err.INTERNAL_ERROR,
                           Err.CHUNK_UNAVAILABLE, Err.REACH_MEMORY_LIMIT, Err.KILLED,
                           Err.SERVER_READ_ONLY, Err.IO_JOB_UNAVAILABLE})


class LinkError(Exception):
    """The writer link or fid index the supervisor handed over cannot be used."""


class Worker:
    """One worker process's state and request handlers."""

    def __init__(self, cfg: Namespace, slot: int, owner: int, listener: socket.socket,
                 ctl_sock: socket.socket, pool: BlockPool, stats: StatsView) -> None:
        self.cfg = cfg
        self.slot = slot
        self.owner = owner
        self.listener = listener
        self.ctl_sock = ctl_sock
        self.pool = pool
        self.stats = stats
        self.ws: WorkerStats = stats.worker(slot)
        self.uploads = UploadMemory(pool, owner, getattr(cfg, "mem_blocks_per_ip", 0)
                                    or per_source_default(pool.nblocks), slot)
        self.group_id = cfg.group_id
        self.max_body = max_data_size(cfg.chunk_size)
        self.stall = stall_timeout()
        self.idle_timeout = getattr(cfg, "idle_timeout", DEFAULT_IDLE_TIMEOUT)
        self.min_rate = min_rate()
        self.admin = AdminPolicy(cfg.admin_allow)
        self.parent = os.getppid()
        self.stopping = False
        self.exit_code = 0
        max_conns = connection_limit(getattr(cfg, "max_conns", 0))
        self.max_conns = max_conns
        self.per_source_conns = getattr(cfg, "max_conns_per_ip", 0) or min(max_conns,
                                                                          DEFAULT_PER_SOURCE)
        self.handlers = {
            Op.WRITE: self.handle_write, Op.READ: self.handle_read,
            Op.DELETE: self.handle_delete, Op.PING: self.handle_ping,
            Op.CHECK_DISK: self.handle_check_disk,
            Op.SET_STATUS: partial(handle_set_status, self),
            Op.GET_STATUS: self.handle_get_status, Op.KILL_PD_WR: partial(handle_kill, self),
            Op.QUERY_IO_STATUS: self.handle_io_status,
            Op.QUERY_DETAIL_INFOS: self.handle_detail_infos,
            Op.DUMP_CHUNK: partial(handle_dump_chunk, self),
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
            self.ctl = gevent.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET,
                                            fileno=self.ctl_sock.detach())
            self.writer = WriterSlot(gevent, self.release_blocks)
            self.reader = None
            while self.reader is None:  # the first writer link and index
                if not self.take_link():
                    return 0
            lsock = gevent.socket.socket(self.listener.family, self.listener.type,
                                         fileno=self.listener.detach())
            lsock.setblocking(False)
        except Exception as e:
            log.error("worker %d cannot start: %s", self.slot, e)
            return BOOT_ERROR
        self.conns = ConnTable(self.max_conns, self.per_source_conns, gevent.get_hub().loop,
                               lambda conn: self.resumed.spawn(self.serve, conn), self.end)
        # greenlets of new connections, and of parked ones that got their next request
        self.accepting = gevent.pool.Pool(self.max_conns + REFUSE_SLACK)
        self.resumed = gevent.pool.Group()
        self.server = keep_open(gevent.server.StreamServer)(lsock, self.handle,
                                                             spawn=self.accepting)
        gevent.signal_handler(signal.SIGTERM, lambda: gevent.spawn(self.stop))
        gevent.signal_handler(signal.SIGHUP, self._reopen_logs)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGHUP})
        self.done = gevent.event.Event()
        self.server.start()
        gevent.spawn(self.follow_supervisor)
        gevent.spawn(self.sweep_idle)
        log.debug("worker %d serving (pid %d)", self.slot, os.getpid())
        while not self.done.wait(0.5):
            if self.stopping:
                continue
            if os.getppid() != self.parent:
                log.error("worker %d: the supervisor is gone; stopping", self.slot)
                gevent.spawn(self.stop)
        return self.exit_code

    def take_link(self) -> bool:
        """Receive one message of the supervisor: a new writer's link and fid index
        ("L" index name + fd); False when the supervisor is gone."""
        try:
            msg, fds, _flags, _addr = socket.recv_fds(self.ctl, 256, 1)
        except OSError:
            msg, fds = b"", []
        if not msg:
            for fd in fds:
                os.close(fd)
            return False
        if msg[:1] != b"L" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            log.error("worker %d: bad control message %r ignored", self.slot, msg[:16])
            return True
        try:
            index = IndexReader(msg[1:].decode())
        except (OSError, ValueError, TimeoutError) as e:
            os.close(fds[0])
            raise LinkError(f"cannot attach the fid index {msg[1:].decode(errors='replace')}: "
                            f"{e}") from None
        link = self.gevent.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, fileno=fds[0])
        old, self.reader = self.reader, ChunkReader(self.cfg.data_dir, self.group_id, index)
        if old is not None:  # READs under way finish with the old descriptors and index
            self.gevent.spawn_later(RETIRE_AFTER, retire_reader, old)
            log.info("worker %d: attached to the new writer", self.slot)
        self.writer.install(link)
        return True

    def follow_supervisor(self) -> None:
        """Take each new writer's link; stop when the supervisor is gone."""
        try:
            while self.take_link():
                pass
        except LinkError as e:  # the supervisor decides: a new worker, or stop the server
            log.error("worker %d: %s; exiting", self.slot, e)
            self.exit_code = BOOT_ERROR
            self.stop()
            return
        if not self.stopping:
            log.error("worker %d: the supervisor is gone; stopping", self.slot)
            self.stop()

    def release_blocks(self, blocks: list[int]) -> None:
        """Return the blocks of writes a dead writer never claimed (still this worker's,
        and not re-used meanwhile by an upload of this worker)."""
        freed = self.uploads.release_unclaimed(blocks)
        if freed:
            log.warning("worker %d: %d pool blocks of unanswered writes returned",
                        self.slot, freed)

    def _reopen_logs(self) -> None:
        reopen_logs()
        log.info("worker %d: log file reopened", self.slot)

    def stop(self) -> None:
        """Graceful: stop accepting, drop idle connections, let requests in flight finish."""
        if self.stopping:
            return
        self.stopping = True
        self.server.close()
        self.conns.close_all_idle()
        deadline = time.monotonic() + STOP_GRACE
        for group in (self.accepting, self.resumed):
            group.join(timeout=max(0.0, deadline - time.monotonic()))
        self.writer.close()
        busy = len(self.accepting) + len(self.resumed)
        if busy:
            log.warning("worker %d: %d connections still busy after %.0fs; dropped",
                        self.slot, busy, STOP_GRACE)
            self.accepting.kill(timeout=1)
            self.resumed.kill(timeout=1)
        self.done.set()

    # ------------------------------------------------------------------ connections
    def handle(self, sock, addr) -> None:
        """A new client connection: counted (or refused), then served."""
        peer = addr[0] if isinstance(addr, tuple) else str(addr)
        if not self.conns.admit(peer):  # over a limit, and every connection is busy
            sock.close()
            return
        self.ws.add("conn_count")
        self.ws.add("accepted")
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
            for opt, value in KEEPALIVE:
                if opt is not None:
                    sock.setsockopt(socket.IPPROTO_TCP, opt, value)
        except OSError:
            pass
        sock.settimeout(self.stall)
        self.serve(Conn(sock, peer, self.stall, self.min_rate))

    def serve(self, conn: Conn) -> None:
        """Requests in order until the connection ends or is parked (idle: no greenlet,
        no buffer; conns.py)."""
        ws, peer, handlers, conns = self.ws, conn.peer, self.handlers, self.conns
        sock = conn.sock
        current = self.gevent.getcurrent()
        wait_read = self.gevent.socket.wait_read
        parked = False
        try:
            while not self.stopping:
                if conn.r == conn.w:  # between requests
                    conn.start = 0.0
                if conn.r == conn.w and not conn.fill_now():  # idle
                    conns.idle_start(conn, current)
                    conn.release()  # an idle connection holds no buffer
                    try:
                        wait_read(sock.fileno())
                    except Park:
                        if conn.counted:  # (else it was closed to make room meanwhile)
                            conns.park(conn)
                            parked = True
                            return
                    finally:
                        conn.waiter = None
                        if not parked:
                            conns.idle_end(conn)
                    if not conn.counted:  # closed to make room while it woke up
                        break
                    conn.fill()
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
            log.info("connection from %s dropped: no progress for %gs", peer, self.stall)
        except TooSlow as e:
            ws.add("dropped_idle")
            log.info("connection from %s dropped: request too slow (%s, under %g bytes/s "
                     "after %gs)", peer, e, self.min_rate, self.stall)
        except OSError as e:
            log.debug("connection from %s: %s", peer, e)
        finally:
            if not parked:
                conns.leave(conn)
                self.end(conn)

    def end(self, conn: Conn) -> None:
        """The connection is over (uncounted already): close its socket."""
        self.ws.add("conn_count", -1)
        try:
            conn.sock.close()
        except OSError:
            pass

    def sweep_idle(self) -> None:
        """Park the connections idle for a while, close those idle for --idle_timeout."""
        while not self.stopping:
            self.gevent.sleep(SWEEP_EVERY)
            self.conns.sweep(self.idle_timeout)

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
        """WRITE: body into pool blocks claimed as it arrives, adler32 on the way, then the
        writer commits it."""
        op = Op.WRITE
        if blen < FILE_KEY_SIZE:
            conn.skip(blen)
            return self.answer(conn, op, Err.INTERNAL_ERROR)
        group, fid = FILE_KEY.unpack(conn.read_exact(FILE_KEY_SIZE))
        up = Upload(peer, blen - FILE_KEY_SIZE)
        err = None
        if group != self.group_id:
            err = Err.SERVER_ID_MISMATCH
        elif self.stats.status() != ServerStatus.RW:
            err = Err.SERVER_READ_ONLY
        elif up.size > self.max_body:
            err = Err.CHUNK_UNAVAILABLE
        elif blocks_for(up.size) > min(self.pool.nblocks, self.uploads.per_source):
            err = Err.REACH_MEMORY_LIMIT
        elif self.writer.current() is None:  # waits (bounded) for a writer that restarts
            err = Err.IO_JOB_UNAVAILABLE
        else:
            try:
                err = self.receive_write(conn, fid, up)
            except PoolFull as e:
                log.info("WRITE of fid %d from %s: REACH_MEMORY_LIMIT (%s)", fid, peer, e)
                err = Err.REACH_MEMORY_LIMIT
            else:
                up.got = up.size
        ws = self.ws
        if err == Err.SUCCESS:
            ws.add("write_count")
            ws.add("write_bytes", up.size)
        elif err in SERVER_ERRORS:
            ws.add("write_error")
        self.answer(conn, op, err)
        conn.skip(up.size - up.got)  # what a refused write still has to send
        return err

    def receive_write(self, conn: Conn, fid: int, up: Upload) -> int:
        """Receive a WRITE body and hand it to the writer; the writer's answer."""
        uploads, ws = self.uploads, self.ws
        ws.add("writing")
        try:
            uploads.receive(conn, up)
            blocks = up.blocks
            result = self.writer.send(WRITE_MSG, KIND_WRITE, fid, up.size, up.csum,
                                      len(blocks), tail=struct.pack(f"={len(blocks)}H", *blocks),
                                      blocks=blocks)
            if result is None:
                return Err.IO_JOB_UNAVAILABLE  # no writer: nothing was sent, nothing stored
            uploads.handed_over(up)
            return result.get()
        finally:
            ws.add("writing", -1)
            uploads.done(up)

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
        """One request to the writer and its answer: INTERNAL_ERROR (outcome unknown) if
        the writer died meanwhile, IO_JOB_UNAVAILABLE if there was no writer to send it to."""
        result = self.writer.send(head, *fields)
        return Err.IO_JOB_UNAVAILABLE if result is None else result.get()

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

    def handle_get_status(self, conn: Conn, blen: int, peer: str) -> int:
        """GET_STATUS: the effective status byte."""
        return self.answer(conn, Op.GET_STATUS, Err.SUCCESS, bytes([self.stats.status()]))

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

def retire_reader(reader: ChunkReader) -> None:
    """Close a reader a new writer's replaced: its descriptors, then its index."""
    reader.close()
    try:
        reader.index.close()
    except BufferError:  # a view still in use: the mapping goes with the process
        pass


def keep_open(server_class):
    """A StreamServer class that leaves the socket open when handle() returns: the worker
    closes it itself (a parked connection lives on without its greenlet)."""

    class Server(server_class):
        def do_close(self, sock, *args) -> None:
            pass

    return Server


def connection_limit(wanted: int = 0) -> int:
    """Connections one worker counts (--max_conns, 0: automatic), kept within the
    open-files limit (REFUSE_SLACK more are accepted to be refused or make room)."""
    import resource
    soft, _hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        soft = 1 << 20
    room = max(64, soft - 64 - REFUSE_SLACK)
    if wanted > room:
        log.warning("--max_conns %d is more than the open-files limit allows; %d used",
                    wanted, room)
    return min(wanted or DEFAULT_MAX_CONNS, room)


def run_worker(cfg: Namespace, slot: int, owner: int, listener: socket.socket,
               ctl_sock: socket.socket, pool: BlockPool, stats: StatsView) -> int:
    """The worker process's body; returns its exit code."""
    return Worker(cfg, slot, owner, listener, ctl_sock, pool, stats).run()
