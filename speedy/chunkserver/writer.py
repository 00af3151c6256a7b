"""The writer process: the only one that writes chunk files; group commit for the workers.

The messages it exchanges with the workers and the supervisor are in
:mod:`speedy.chunkserver.messages`.

A WRITE carries the pool block numbers of a body the worker already received and
checksummed, never the body. The writer first claims the blocks (owner worker ->
WRITER_OWNER; a message of a worker that died meanwhile finds them gone and is dropped),
stages the record straight from the blocks and, once per round, starts one commit per
touched chunk (records, superblock, one fsync with --sync=1, index inserts); when a
chunk's commit is done it frees the blocks and answers its writes. Commits of large
records run in I/O threads (:mod:`speedy.chunkserver.commits`), one chunk each, in
parallel; those of small records only in the loop (see ChunkStore._pick for which
chunk). The DELETEs of a round that no WRITE separates are one group too (after every
commit under way; one delete-journal append, one fsync per touched file). Nothing is
acknowledged before the fsync covering it.
"""
from __future__ import annotations

import logging
import os
import selectors
import signal
import socket
import struct
import time
from argparse import Namespace
from dataclasses import dataclass

from speedy.chunkserver.commits import Commits
from speedy.chunkserver.compactor import Compactor
from speedy.chunkserver.messages import (FID_MSG, FRAME, HEAD, KIND_COMPACT, KIND_DELETE,
                                         KIND_KILL, KIND_WRITE, MAX_MSG, OWNER,
                                         REPLIES_PER_PACKET, REPLY, WRITE_MSG)
from speedy.chunkserver.store.compact import used_bytes
from speedy.chunkserver.shm.index import FidIndex
from speedy.common.logs import reopen_logs
from speedy.chunkserver.shm.pool import BlockPool
from speedy.chunkserver.shm.segments import unlink_prefix
from speedy.wire.protocol import Err
from speedy.chunkserver.shm.counters import StatsView
from speedy.chunkserver.store.chunkstore import ChunkStore, FileExists, NoRoom, WriteFailed
from speedy.common.daemonize import StartError

log = logging.getLogger("speedy.chunkserver.writer")

PENDING_MAX = 20
PENDING_WAIT = 5.0
SEND_TIMEOUT = 5.0
STOP_GRACE = 30.0
MAX_ROUND = 4096  # messages taken from one link per loop round


@dataclass
class Link:
    """The writer's end of one worker's socketpair."""

    sock: socket.socket
    owner: int
    open: bool = True


@dataclass
class Job:
    """One WRITE on its way through the writer."""

    link: Link
    req_id: int
    fid: int
    size: int
    csum: int
    blocks: list[int]
    deadline: float = 0.0


class Writer:
    """The writer's state and loop (runs in the forked writer process)."""

    def __init__(self, cfg: Namespace, pool: BlockPool, stats: StatsView,
                 ctrl: socket.socket, prefix: str) -> None:
        self.cfg = cfg
        self.pool = pool
        self.stats = stats
        self.ctrl = ctrl
        self.prefix = prefix
        self.parent = os.getppid()
        self.sel = selectors.DefaultSelector()
        self.links: dict[int, Link] = {}
        self.pending: list[Job] = []
        self.pending_fids: set[int] = set()
        self.stopping = 0.0  # monotonic deadline once a stop was asked
        self.orphan = False
        self.failed_logged = False
        self.index: FidIndex | None = None
        self.store: ChunkStore | None = None
        self.compactor: Compactor | None = None
        self.max_size = 0
        self._signals: list[int] = []
        self.commits: Commits | None = None
        self.waiting: dict[int, list[Job]] = {}  # chunk id -> its staged writes

    # ------------------------------------------------------------------ start
    def run(self) -> int:
        """Recover the store, report ready, serve until stopped; the process exit code."""
        wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGTERM, self._on_signal)
        signal.signal(signal.SIGHUP, self._on_signal)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGHUP})
        try:
            self.index = FidIndex.create(self.prefix)
            store = ChunkStore(self.cfg.data_dir, self.cfg.group_id, self.cfg.chunks,
                               self.cfg.chunk_size, bool(self.cfg.sync), self.index)
            store.open()
        except StartError as e:
            return self._start_failed(str(e))
        except OSError as e:
            return self._start_failed(f"writer start-up failed ({self.cfg.data_dir}): {e}")
        self.store = store
        self.commits = Commits(store)
        self.compactor = Compactor(store, self.stats, getattr(self.cfg, "compact_threshold", 0.0),
                                   getattr(self.cfg, "compact_rate", 64 << 20), self.reply,
                                   getattr(self.cfg, "compact_keep_deleted", 7 * 86400))
        self.max_size = store.max_size()
        self.stats.set("writer_pid", os.getpid())
        self.stats.set("recovery_us", int(store.open_seconds * 1e6))
        self.publish()
        self.ctrl.sendall(b"R" + self.index.name.encode())
        self.sel.register(self.ctrl, selectors.EVENT_READ, "ctrl")
        self.sel.register(wake_r, selectors.EVENT_READ, "wake")
        self.sel.register(self.commits.wake_r, selectors.EVENT_READ, "io")
        self.ctrl.setblocking(False)
        try:
            self.loop(wake_r)
        finally:
            self.shutdown()
        return 0

    def _start_failed(self, message: str) -> int:
        """Tell the supervisor (which logs it) and clean up."""
        try:
            self.ctrl.sendall(b"E" + message.encode("utf-8", "replace")[:4000])
        except OSError:
            pass
        if self.index is not None:
            self.index.close()
            self.index.unlink()
        return 1

    def _on_signal(self, signum: int, frame) -> None:
        self._signals.append(signum)

    # ------------------------------------------------------------------ loop
    def loop(self, wake_r: int) -> None:
        """Wait for messages, take everything available, one batch per round."""
        while True:
            timeout = 1.0
            if self.pending:
                timeout = max(0.0, min(timeout, self.pending[0].deadline - time.monotonic()))
            timeout = min(timeout, self.compactor.due())  # type: ignore[union-attr]
            batch: list[tuple[Link, bytes]] = []
            for key, _ in self.sel.select(timeout):
                if key.data == "wake":
                    self._drain_wakeup(wake_r)
                elif key.data == "io":
                    self._drain_wakeup(key.fd)
                elif key.data == "ctrl":
                    self.accept_links()
                else:
                    self.receive(key.data, batch)
            self.handle_signals()
            self.process(batch)
            self.finish_commits()
            if not self.stopping and self.compactor.tick():  # type: ignore[union-attr]
                self.publish()
            self.expire_pending()
            if os.getppid() != self.parent and not self.orphan:
                log.error("the supervisor is gone; stopping")
                self.orphan = True
                self.begin_stop()
            if self.stopping and (not self.links or time.monotonic() > self.stopping):
                return

    @staticmethod
    def _drain_wakeup(fd: int) -> None:
        try:
            while os.read(fd, 512):
                pass
        except BlockingIOError:
            pass

    def handle_signals(self) -> None:
        """Act on signals queued by the handler."""
        while self._signals:
            sig = self._signals.pop(0)
            if sig == signal.SIGHUP:
                reopen_logs()
                log.info("log file reopened")
            elif sig == signal.SIGTERM:
                self.begin_stop()

    def begin_stop(self) -> None:
        """Serve the links still open (their workers finish in-flight requests), then exit."""
        if not self.stopping:
            log.info("stopping: %d worker links open, %d pending writes", len(self.links),
                     len(self.pending))
            self.stopping = time.monotonic() + STOP_GRACE

    def accept_links(self) -> None:
        """Take the worker links the supervisor sends (or notice it is gone)."""
        while True:
            try:
                msg, fds, _flags, _addr = socket.recv_fds(self.ctrl, 64, 4)
            except BlockingIOError:
                return
            except OSError:
                msg, fds = b"", []
            if not msg:
                for fd in fds:
                    os.close(fd)
                self.sel.unregister(self.ctrl)
                if not self.orphan:
                    log.error("lost the supervisor's control socket; stopping")
                    self.orphan = True
                    self.begin_stop()
                return
            if msg[:1] != b"L" or len(fds) != 1:
                for fd in fds:
                    os.close(fd)
                log.error("bad control message %r ignored", msg[:16])
                continue
            (owner,) = OWNER.unpack_from(msg, 1)
            sock = socket.socket(fileno=fds[0])
            sock.setblocking(False)
            link = Link(sock, owner)
            self.links[sock.fileno()] = link
            self.sel.register(sock, selectors.EVENT_READ, link)

    def receive(self, link: Link, batch: list) -> None:
        """Every message waiting on one link (up to MAX_ROUND)."""
        for _ in range(MAX_ROUND):
            try:
                data = link.sock.recv(MAX_MSG)
            except BlockingIOError:
                return
            except OSError:
                data = b""
            if not data:
                self.close_link(link)
                return
            at, end = 0, len(data)
            while at + FRAME.size <= end:  # a packet: one or more framed messages
                (n,) = FRAME.unpack_from(data, at)
                msg = data[at + FRAME.size:at + FRAME.size + n]
                at += FRAME.size + n
                if len(msg) < HEAD.size or len(msg) != n:
                    log.error("short message from worker (owner %d) ignored", link.owner)
                    continue
                batch.append((link, msg))
            if at != end:
                log.error("%d stray bytes from worker (owner %d) ignored", end - at, link.owner)

    def close_link(self, link: Link) -> None:
        """Forget a link (its worker exited)."""
        if not link.open:
            return
        link.open = False
        self.links.pop(link.sock.fileno(), None)
        try:
            self.sel.unregister(link.sock)
        except (KeyError, ValueError):
            pass
        link.sock.close()

    def reply(self, link: Link, req_id: int, err: int) -> None:
        """Answer one message."""
        self.send_packet(link, REPLY.pack(req_id, err))

    def send_packet(self, link: Link, data: bytes) -> None:
        """Send one packet of replies; a worker that is gone or stuck loses its link."""
        if not link.open:
            return
        deadline = time.monotonic() + SEND_TIMEOUT
        while True:
            try:
                link.sock.send(data)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    log.error("worker (owner %d) does not read its answers; link closed",
                              link.owner)
                    self.close_link(link)
                    return
                sel = selectors.DefaultSelector()
                sel.register(link.sock, selectors.EVENT_WRITE)
                sel.select(0.1)
                sel.close()
            except OSError:
                self.close_link(link)
                return

    def reply_many(self, answers: list[tuple[Link, int, int]]) -> None:
        """Answer many messages (link, req_id, error): one packet of replies per link."""
        per_link: dict[int, tuple[Link, bytearray]] = {}
        pack = REPLY.pack
        for link, req_id, err in answers:
            entry = per_link.get(id(link))
            if entry is None:
                entry = per_link[id(link)] = (link, bytearray())
            entry[1].extend(pack(req_id, err))
        step = REPLY.size * REPLIES_PER_PACKET
        for link, data in per_link.values():
            for at in range(0, len(data), step):
                self.send_packet(link, bytes(data[at:at + step]))

    # ------------------------------------------------------------------ requests
    def process(self, messages: list[tuple[Link, bytes]]) -> None:
        """Handle one round's messages in order, with one commit for the writes and one
        for each run of DELETEs between them."""
        self.retry_pending()
        jobs = iter(self.claim_writes(messages))
        deletes: list[tuple[Link, int, int]] = []
        for link, data in messages:
            req_id, kind = HEAD.unpack_from(data)
            if kind != KIND_DELETE:
                self.handle_deletes(deletes)  # the DELETEs before it happen first
            if kind == KIND_WRITE:
                job = next(jobs)
                if job is not None:
                    self.admit(job)
            elif kind == KIND_DELETE and len(data) == FID_MSG.size:
                deletes.append((link, req_id, FID_MSG.unpack_from(data)[2]))
            elif kind == KIND_KILL:
                self.handle_kill(link, req_id)
            elif kind == KIND_COMPACT:
                self.compactor.request(link, data)  # type: ignore[union-attr]
            else:
                log.error("unknown message kind %d from worker (owner %d)", kind, link.owner)
                self.reply(link, req_id, Err.INTERNAL_ERROR)
        self.handle_deletes(deletes)
        self.submit()
        self.stats.set("pending_writes", len(self.pending))

    def claim_writes(self, messages: list[tuple[Link, bytes]]) -> list[Job | None]:
        """A Job per WRITE message, in order, its blocks now the writer's (one pool lock).

        None for a malformed message (answered INTERNAL_ERROR) and for a write whose
        blocks are no longer its worker's: the worker died after sending it and the
        supervisor returned them to the pool, so it is dropped.
        """
        jobs: list[Job | None] = []
        for link, data in messages:
            if data[4] != KIND_WRITE:
                continue
            try:
                req_id, _kind, fid, size, csum, n = WRITE_MSG.unpack_from(data)
                blocks = list(struct.unpack_from(f"={n}H", data, WRITE_MSG.size))
            except struct.error:
                log.error("malformed WRITE message from worker (owner %d)", link.owner)
                self.reply(link, HEAD.unpack_from(data)[0], Err.INTERNAL_ERROR)
                jobs.append(None)
                continue
            jobs.append(Job(link, req_id, fid, size, csum, blocks))
        valid = [j for j in jobs if j is not None]
        if not valid:
            return jobs
        claimed = dict(zip(map(id, valid),
                           self.pool.claim_many([(j.blocks, j.link.owner) for j in valid])))
        for i, job in enumerate(jobs):
            if job is not None and not claimed[id(job)]:
                log.warning("write of fid %d dropped: its worker died", job.fid)
                jobs[i] = None
        return jobs

    def refusal(self, job: Job) -> int | None:
        """The error a write gets before it is tried, or None."""
        if self.store.read_only or self.stats.status():  # type: ignore[union-attr]
            return Err.SERVER_READ_ONLY
        if job.size > self.max_size:
            return Err.CHUNK_UNAVAILABLE
        if job.fid in self.pending_fids:
            return Err.FILE_EXISTS
        return None

    def admit(self, job: Job) -> None:
        """Stage a write, or park it in the pending queue, or answer its error."""
        err = self.refusal(job)
        if err is not None:
            self.finish(job, err)
            return
        store = self.store
        try:
            store.stage(job.fid, self.pool.parts(job.blocks, job.size), job.size, job.csum)
        except NoRoom:
            self.park(job)
            return
        except FileExists:
            self.finish(job, Err.FILE_EXISTS)
            return
        except ValueError as e:
            log.error("write of fid %d refused: %s", job.fid, e)
            self.finish(job, Err.INTERNAL_ERROR)
            return
        cid = store.staged[job.fid][0]  # its blocks are freed once its chunk's commit is done
        self.waiting.setdefault(cid, []).append(job)

    def park(self, job: Job) -> None:
        """Queue a write that found no chunk with room (at most PENDING_MAX, PENDING_WAIT s)."""
        if len(self.pending) >= PENDING_MAX:
            self.finish(job, Err.CHUNK_UNAVAILABLE)
            return
        if not job.deadline:  # a retried write keeps its first deadline
            job.deadline = time.monotonic() + PENDING_WAIT
        self.pending.append(job)
        self.pending_fids.add(job.fid)

    def retry_pending(self) -> None:
        """Stage the pending writes that fit now, oldest first."""
        if not self.pending or not any(self.store.can_fit(j.size) for j in self.pending):
            return
        jobs, self.pending = self.pending, []
        self.pending_fids.clear()
        for job in jobs:
            self.admit(job)

    def expire_pending(self) -> None:
        """Answer CHUNK_UNAVAILABLE to pending writes that waited PENDING_WAIT s."""
        now = time.monotonic()
        while self.pending and self.pending[0].deadline <= now:
            job = self.pending.pop(0)
            self.pending_fids.discard(job.fid)
            self.finish(job, Err.CHUNK_UNAVAILABLE)
        self.stats.set("pending_writes", len(self.pending))

    def finish(self, job: Job, err: int) -> None:
        """Free a job's blocks and answer it."""
        if job.blocks:
            self.pool.free(job.blocks)
            job.blocks = []
        self.reply(job.link, job.req_id, err)

    def submit(self) -> None:
        """Start a commit for every chunk with staged writes and none under way."""
        self.commits.start(self.waiting)  # type: ignore[union-attr]

    def finish_commits(self) -> None:
        """Make the written commits visible, answer their writes, start the next ones."""
        commits = self.commits
        if not commits.written:  # type: ignore[union-attr]
            return
        store, st = self.store, self.stats
        answers: list[tuple[Link, int, int]] = []
        freed: list[int] = []
        while (done := commits.take()) is not None:  # type: ignore[union-attr]
            c, jobs = done
            cid = c.chunk.chunk_id
            try:
                store.end_commit(c)  # type: ignore[union-attr]
                err = Err.SUCCESS
            except WriteFailed:
                err = Err.WRITE_ERROR
                self.note_failure()
                jobs = jobs + self.waiting.pop(cid, [])  # dropped by the store with it
            for job in jobs:
                freed.extend(job.blocks)  # the data is in the file (or the write failed)
                job.blocks = []
                answers.append((job.link, job.req_id, err))
            st.add("batches")
            if err == Err.SUCCESS:
                st.add("commits")
                st.add("committed_writes", len(jobs))
                if len(jobs) > st.get("max_batch"):
                    st.set("max_batch", len(jobs))
            if not commits.written:  # type: ignore[union-attr]
                self.submit()  # the chunks freed now; small commits come back at once
        self.pool.free(freed)
        if not commits.inflight:  # type: ignore[union-attr]
            store.maybe_save_snapshot()  # type: ignore[union-attr]
        self.publish()
        self.reply_many(answers)

    def drain(self) -> None:
        """Commit everything staged and wait for every commit under way to finish."""
        self.submit()
        while self.commits.inflight:  # type: ignore[union-attr]
            self.commits.wait_written()  # type: ignore[union-attr]
            self.finish_commits()

    def handle_deletes(self, calls: list[tuple[Link, int, int]]) -> None:
        """DELETEs (link, req_id, fid), emptied: mark the records deleted, drop them from the
        index, as one group (one journal append, one fsync per touched file); then answer."""
        if not calls:
            return
        todo = calls[:]
        calls.clear()
        self.drain()  # the writes before them are committed first
        store = self.store
        if store.read_only or self.stats.status():  # type: ignore[union-attr]
            self.reply_many([(link, req_id, Err.SERVER_READ_ONLY) for link, req_id, _ in todo])
            return
        try:
            found = store.delete_many([fid for _, _, fid in todo])  # type: ignore[union-attr]
            errs = [Err.SUCCESS if f else Err.FILE_NOT_FOUND for f in found]
        except WriteFailed:
            errs = [Err.WRITE_ERROR] * len(todo)
            self.note_failure()
        self.publish()
        self.reply_many([(link, req_id, err) for (link, req_id, _), err in zip(todo, errs)])

    def handle_kill(self, link: Link, req_id: int) -> None:
        """KILL_PD_WR: answer every pending write KILLED."""
        jobs, self.pending = self.pending, []
        self.pending_fids.clear()
        for job in jobs:
            self.finish(job, Err.KILLED)
        if jobs:
            log.info("KILL_PD_WR: %d pending writes killed", len(jobs))
        self.stats.set("pending_writes", 0)
        self.reply(link, req_id, Err.SUCCESS)

    def note_failure(self) -> None:
        """The store hit an I/O error: the server is read-only from now on."""
        self.stats.set("store_failed", 1)
        if not self.failed_logged:
            self.failed_logged = True
            log.error("disk I/O error: the server is read-only (Status 1) until restarted; "
                      "check the disk of %s", self.cfg.data_dir)

    def publish(self) -> None:
        """Write the writer's figures into the stats segment."""
        store, st = self.store, self.stats
        st.set_chunks(store.chunk_stats())  # type: ignore[union-attr]
        st.set_garbage([(ch.garbage_bytes, used_bytes(ch))
                        for ch in store.ordered_chunks()])  # type: ignore[union-attr]
        st.set("file_count", store.file_count())  # type: ignore[union-attr]
        st.set("fsyncs", store.fsync_count)  # type: ignore[union-attr]
        st.set("index_bytes", self.index.nbytes())  # type: ignore[union-attr]

    # ------------------------------------------------------------------ stop
    def shutdown(self) -> None:
        """Answer what is queued, finish the commits under way, flush and close the store."""
        if self.commits is not None:
            self.drain()
            self.commits.shutdown()
        for job in self.pending:
            self.finish(job, Err.CHUNK_UNAVAILABLE)
        self.pending.clear()
        self.stats.set("pending_writes", 0)
        if self.compactor is not None:
            self.compactor.stop()
        if self.store is not None:
            try:
                self.store.close()
            except Exception as e:  # closing must not hide the exit
                log.error("closing the chunk files failed: %s", e)
        for link in list(self.links.values()):
            self.close_link(link)
        if self.index is not None:
            self.index.close()
        if self.orphan:
            unlink_prefix(self.prefix)
        log.info("writer stopped")


def run_writer(cfg: Namespace, pool: BlockPool, stats: StatsView, ctrl: socket.socket,
               prefix: str) -> int:
    """The writer process's body; returns its exit code (0, or 1 for a start error)."""
    return Writer(cfg, pool, stats, ctrl, prefix).run()
