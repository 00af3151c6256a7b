"""The chunkserver supervisor (the process the operator starts), arbiter style.

    supervisor ──fork──> writer      owns the chunk files and the fid index
        │      ──fork──> worker 0..n-1  gevent, accept on the shared socket
        │  shared memory: pool (speedy<pid>_pool), stats (_stats), index (_ic, _t<n>)
        └─ threads: reporter (POST to the master), metrics (--metrics_port)

Signal handlers only queue the signal and wake the loop through a pipe; the loop
dispatches to handle_<name>. Exit codes:

    0  stopped cleanly (SIGTERM / SIGINT)
    1  could not start: configuration, socket, data dir, chunk files (one-line message)
    2  bad command line (argparse: usage and the flag at fault)
    3  the writer process keeps dying (WRITER_DEATHS deaths in WRITER_DEATH_WINDOW s), or
       a new writer could not start: everything was stopped

A writer that dies is replaced in place: its claimed pool blocks are returned, its fid
index segments unlinked, a new writer recovers the chunk files, and when it is ready
each worker gets a link to it and its index over the worker's control socket. Workers
keep serving READs from the old index meanwhile (it holds only acknowledged writes).
    4  a worker process could not start: everything was stopped
"""
from __future__ import annotations

import logging
import os
import resource
import select
import signal
import socket
import sys
import time
from argparse import Namespace
from dataclasses import dataclass

from speedy.common import notify
from speedy.common.config import load_server_config
from speedy.common.daemonize import (PidfileError, StartError, daemonize, remove_pidfile,
                                     write_pidfile)
from speedy.common.children import describe_exit, exit_code, exited_children
from speedy.common.listener import bind_listener
from speedy.common.logs import reopen_logs, setup_logging
from speedy.chunkserver.shm.pool import MAX_OWNER, WRITER_OWNER, BlockPool
from speedy.chunkserver.shm.segments import (disable_resource_tracker, remove_stale_segments,
                                             segments_with_prefix, server_prefix,
                                             unlink_prefix, unlink_segment)
from speedy.chunkserver.shm.counters import StatsView
from speedy.chunkserver.worker import BOOT_ERROR, run_worker
from speedy.chunkserver.messages import OWNER
from speedy.chunkserver.writer import run_writer

log = logging.getLogger("speedy.chunkserver.supervisor")

EXIT_OK = 0
EXIT_START = 1
EXIT_USAGE = 2
EXIT_WRITER_DIED = 3
EXIT_WORKER_BOOT = 4
STOP_TIMEOUT = 30.0  # workers, then the writer, each get this long to finish
RESPAWN_DELAY = 1.0  # a worker that died within this of its start is respawned this late
WRITER_DEATHS = 3  # the writer dying this many times ...
WRITER_DEATH_WINDOW = 60.0  # ... within this many seconds stops the server (exit 3)
SIGNALS = {signal.SIGTERM: "term", signal.SIGINT: "int", signal.SIGHUP: "hup",
           signal.SIGCHLD: "chld"}
CHILD_SIGNALS = {signal.SIGTERM, signal.SIGHUP}


@dataclass
class WorkerProc:
    """A live worker process."""

    pid: int
    slot: int
    owner: int
    started: float
    ctl: socket.socket  # the supervisor's end of the worker's control socket


def set_process_name(name: str) -> None:
    """Name this process in ps/top (Linux comm, 15 chars); best effort."""
    try:
        with open("/proc/self/comm", "w") as f:
            f.write(name[:15])
    except OSError:
        pass


class Supervisor:
    """Starts the writer and the workers, keeps them alive, stops them gracefully."""

    def __init__(self, cfg: Namespace) -> None:
        self.cfg = cfg
        self.prefix = server_prefix()
        self.listener: socket.socket | None = None
        self.pool: BlockPool | None = None
        self.stats: StatsView | None = None
        self.ctrl: socket.socket | None = None
        self.index_name = ""
        self.writer_pid = 0
        self.writer_ready = False
        self.writer_since = 0.0  # when the current writer was started
        self.writer_deaths: list[float] = []
        self.workers: dict[int, WorkerProc] = {}
        self.respawn_at: dict[int, float] = {}
        self.next_owner = 1
        self.sig_queue: list[int] = []
        self.pipe: tuple[int, int] | None = None
        self.stopping = False
        self.exit_code = EXIT_OK
        self.reporter = None
        self.metrics_server = None
        self.pidfile_written = False

    # ------------------------------------------------------------------ main
    def run(self) -> int:
        """Start everything, loop until stopped; the exit code."""
        try:
            self.start()
        except (StartError, PidfileError) as e:
            log.error("cannot start: %s", e)
            self.exit_code = EXIT_START
            self.cleanup()
            return EXIT_START
        except BaseException:
            self.cleanup()
            raise
        try:
            self.loop()
        finally:
            self.cleanup()
        return self.exit_code

    def start(self) -> None:
        """Bind, detach, shared memory, writer (recovery), workers, reporter."""
        cfg = self.cfg
        raise_nofile_limit()
        self.listener = bind_listener(cfg.ip, cfg.port, inheritable=True)
        if cfg.daemonize:
            if not cfg.error_log:
                log.warning("--daemonize=1 without --error_log: the log goes nowhere")
            daemonize(keep=[self.listener])
            self.prefix = server_prefix()
        write_pidfile(cfg.pidfile)
        self.pidfile_written = bool(cfg.pidfile)
        set_process_name("spy_server")
        self.init_signals()
        disable_resource_tracker()
        remove_stale_segments()
        try:
            self.pool = BlockPool.create(f"{self.prefix}_pool", cfg.mem_blocks, cfg.workers)
            self.stats = StatsView.create(f"{self.prefix}_stats", cfg.workers)
        except OSError as e:
            raise StartError(f"cannot create shared memory of {cfg.mem_blocks} MiB in "
                             f"/dev/shm: {e.strerror or e}") from None
        self.spawn_writer()
        self.wait_writer_ready()
        for slot in range(cfg.workers):
            self.spawn_worker(slot)
        self.start_reporting()
        log.info("serving on %s:%d: group %d, %d workers, %d pool blocks, data dir %s",
                 cfg.ip, cfg.port, cfg.group_id, cfg.workers, cfg.mem_blocks, cfg.data_dir)
        notify.ready(f"serving on {cfg.ip}:{cfg.port}")

    def loop(self) -> None:
        """Dispatch queued signals; keep the workers alive."""
        while not self.stopping:
            sig = self.sig_queue.pop(0) if self.sig_queue else None
            if sig is None:
                self.sleep(1.0)
                self.poll_writer_start()
                self.maintain_workers()
                continue
            getattr(self, "handle_" + SIGNALS[sig])()

    # ------------------------------------------------------------------ signals
    def init_signals(self) -> None:
        """Handlers that queue the signal and write to the wake-up pipe."""
        r, w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.pipe = (r, w)
        for sig in SIGNALS:
            signal.signal(sig, self.signal)

    def signal(self, sig: int, frame) -> None:
        """The handler: queue (up to 5) and wake the loop."""
        if len(self.sig_queue) < 5:
            self.sig_queue.append(sig)
        self.wakeup()

    def wakeup(self) -> None:
        """Wake the loop's sleep."""
        try:
            os.write(self.pipe[1], b".")  # type: ignore[index]
        except OSError:
            pass

    def sleep(self, seconds: float) -> None:
        """Wait for a signal's wake-up, a starting writer's message, or the time."""
        fds = [self.pipe[0]]  # type: ignore[index]
        if self.writer_pid and not self.writer_ready and self.ctrl is not None:
            fds.append(self.ctrl)
        try:
            ready, _, _ = select.select(fds, [], [], seconds)
            if self.pipe[0] in ready:  # type: ignore[index]
                while os.read(self.pipe[0], 512):  # type: ignore[index]
                    pass
        except BlockingIOError:
            pass
        except InterruptedError:
            pass

    def handle_chld(self) -> None:
        """A child exited."""
        self.reap_workers()

    def handle_hup(self) -> None:
        """Reopen the log file here and in every child."""
        notify.reloading()
        reopen_logs()
        log.info("log file reopened")
        for pid in [self.writer_pid, *self.workers]:
            self.kill(pid, signal.SIGHUP)
        notify.ready()

    def handle_term(self) -> None:
        """Graceful stop."""
        log.info("SIGTERM: stopping gracefully")
        self.stop()

    def handle_int(self) -> None:
        """Graceful stop (Ctrl-C)."""
        log.info("SIGINT: stopping gracefully")
        self.stop()

    # ------------------------------------------------------------------ children
    def fork_child(self, name: str, body) -> int:
        """Fork; the child runs body() and exits with its return value, never returning."""
        pid = os.fork()
        if pid:
            return pid
        code = 1
        try:
            # held until the child installs its own handlers (writer/worker unblock them)
            signal.pthread_sigmask(signal.SIG_BLOCK, CHILD_SIGNALS)
            for sig in SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C: the supervisor decides
            if self.pipe:
                os.close(self.pipe[0])
                os.close(self.pipe[1])
            set_process_name(name)
            code = body()
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            log.exception("%s crashed", name)
            code = 1
        finally:
            logging.shutdown()
            os._exit(code)

    def spawn_writer(self) -> None:
        """Fork the writer with its end of the control socket."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.ctrl = mine

        def body() -> int:
            mine.close()
            self.listener.close()  # type: ignore[union-attr]
            for w in self.workers.values():
                w.ctl.close()
            return run_writer(self.cfg, self.pool, self.stats, theirs, self.prefix)

        self.writer_pid = self.fork_child("spy_writer", body)
        self.writer_since = time.monotonic()
        theirs.close()
        log.info("writer started (pid %d): opening the chunk files", self.writer_pid)

    def wait_writer_ready(self) -> None:
        """Wait until the writer recovered the chunks (signals still handled)."""
        ctrl = self.ctrl
        while True:
            ready, _, _ = select.select([ctrl, self.pipe[0]], [], [], 1.0)  # type: ignore[index]
            if ctrl in ready:
                try:
                    msg = ctrl.recv(4096)  # type: ignore[union-attr]
                except OSError:
                    msg = b""
                if msg[:1] == b"R":
                    self.index_name = msg[1:].decode()
                    self.writer_ready = True
                    return
                self.reap_writer_start()
                raise StartError(msg[1:].decode("utf-8", "replace") if msg[:1] == b"E"
                                 else "the writer process exited during start-up")
            self.sleep(0)
            for sig in list(self.sig_queue):
                if sig in (signal.SIGTERM, signal.SIGINT):
                    self.sig_queue.clear()
                    self.kill(self.writer_pid, signal.SIGKILL)
                    self.reap_writer_start()
                    raise StartError("stopped by a signal during start-up")

    def reap_writer_start(self) -> None:
        """Collect the writer that failed to start."""
        if self.writer_pid:
            try:
                os.waitpid(self.writer_pid, 0)
            except ChildProcessError:
                pass
            self.writer_pid = 0

    def spawn_worker(self, slot: int) -> None:
        """Fork worker number slot with a fresh owner id and a control socket; it gets its
        link to the writer over that socket (now, or when a new writer is ready)."""
        owner = self.new_owner()
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.stats.worker(slot).reset_gauges()  # type: ignore[union-attr]

        def body() -> int:
            mine.close()
            if self.ctrl is not None:
                self.ctrl.close()
            for w in self.workers.values():
                w.ctl.close()
            return run_worker(self.cfg, slot, owner, self.listener, theirs, self.pool,
                              self.stats)

        pid = self.fork_child(f"spy_worker_{slot}", body)
        theirs.close()
        w = self.workers[pid] = WorkerProc(pid, slot, owner, time.monotonic(), mine)
        log.debug("worker %d started (pid %d)", slot, pid)
        if self.writer_ready:
            self.link_worker(w)

    def link_worker(self, w: WorkerProc) -> None:
        """A socketpair between the writer and worker w, and the name of the writer's index."""
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            socket.send_fds(self.ctrl, [b"L" + OWNER.pack(w.owner)], [theirs.fileno()])
            socket.send_fds(w.ctl, [b"L" + self.index_name.encode()], [mine.fileno()])
        except OSError as e:  # the writer or the worker is gone: reaping handles it
            log.warning("cannot link worker %d (pid %d) to the writer: %s", w.slot, w.pid, e)
        finally:
            mine.close()
            theirs.close()

    def new_owner(self) -> int:
        """A pool owner id no live worker has (1..MAX_OWNER, cycling)."""
        used = {w.owner for w in self.workers.values()}
        while True:
            owner = self.next_owner
            self.next_owner = owner % MAX_OWNER + 1
            if owner not in used:
                return owner

    def reap_workers(self) -> None:
        """Collect every exited child: replace workers, stop if the writer died."""
        for pid, status in exited_children():
            how = describe_exit(status)
            if pid == self.writer_pid:
                self.writer_pid = 0
                self.writer_died(how)
                continue
            w = self.workers.pop(pid, None)
            if w is None:
                continue
            w.ctl.close()
            freed = self.pool.free_owner(w.owner)  # type: ignore[union-attr]
            self.stats.worker(w.slot).reset_gauges()  # type: ignore[union-attr]
            if self.stopping:
                continue
            log.error("worker %d (pid %d) %s; %d pool blocks returned", w.slot, pid, how,
                      freed)
            if exit_code(status) == BOOT_ERROR and \
                    self.writer_ready and w.started > self.writer_since:
                # (one that raced a writer's death is replaced like any other)
                log.error("a worker could not start; stopping the server")
                self.exit_code = EXIT_WORKER_BOOT
                self.stop()
                continue
            delay = RESPAWN_DELAY if time.monotonic() - w.started < RESPAWN_DELAY else 0
            self.respawn_at[w.slot] = time.monotonic() + delay

    def writer_died(self, how: str) -> None:
        """Return what the dead writer held; start a new one, unless it keeps dying."""
        was_ready, self.writer_ready = self.writer_ready, False
        if self.ctrl is not None:
            self.ctrl.close()
            self.ctrl = None
        freed = self.pool.free_owner(WRITER_OWNER)  # type: ignore[union-attr]
        self.unlink_index()
        self.stats.set("pending_writes", 0)  # type: ignore[union-attr]
        if self.stopping:
            return
        now = time.monotonic()
        self.writer_deaths = [t for t in self.writer_deaths if now - t < WRITER_DEATH_WINDOW]
        self.writer_deaths.append(now)
        n = len(self.writer_deaths)
        if n >= WRITER_DEATHS:
            log.error("the writer process %s: %d writer deaths in %.0fs, it keeps dying; "
                      "stopping the server", how, n, WRITER_DEATH_WINDOW)
            self.exit_code = EXIT_WRITER_DIED
            self.stop()
            return
        log.error("the writer process %s%s; %d pool blocks returned; starting a new writer "
                  "(writer death %d; %d within %.0fs stop the server)", how, "" if was_ready
                  else " during its start", freed, n, WRITER_DEATHS, WRITER_DEATH_WINDOW)
        self.spawn_writer()

    def poll_writer_start(self) -> None:
        """A new writer's "R" (ready: link every worker) or "E" (start error: stop)."""
        if not self.writer_pid or self.writer_ready or self.ctrl is None:
            return
        try:
            self.ctrl.setblocking(False)
            msg = self.ctrl.recv(4096)
        except BlockingIOError:
            return
        except OSError:
            msg = b""
        finally:
            if self.ctrl is not None:
                self.ctrl.setblocking(True)
        if msg[:1] == b"R":
            self.index_name = msg[1:].decode()
            self.writer_ready = True
            log.info("new writer ready (pid %d): linking %d workers", self.writer_pid,
                     len(self.workers))
            for w in list(self.workers.values()):
                self.link_worker(w)
        elif msg[:1] == b"E":
            log.error("the new writer cannot start: %s; stopping the server",
                      msg[1:].decode("utf-8", "replace"))
            self.exit_code = EXIT_WRITER_DIED
            self.stop()
        else:  # it exited before it was ready: reaping counts the death
            self.ctrl.close()
            self.ctrl = None

    def unlink_index(self) -> None:
        """Unlink the segments a dead writer made (its fid index; workers keep their
        mappings): every segment of this server but the pool and the stats."""
        keep = {self.pool.name, self.stats.name}  # type: ignore[union-attr]
        for name in segments_with_prefix(self.prefix):
            if name not in keep:
                unlink_segment(name)

    def maintain_workers(self) -> None:
        """Spawn the workers that are due."""
        if self.stopping:
            return
        now = time.monotonic()
        for slot, when in sorted(self.respawn_at.items()):
            if when <= now:
                del self.respawn_at[slot]
                self.spawn_worker(slot)

    def kill(self, pid: int, sig: int) -> None:
        """Signal one child; gone is fine."""
        if pid:
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass

    def kill_workers(self, sig: int) -> None:
        """Signal every worker."""
        for pid in list(self.workers):
            self.kill(pid, sig)

    def wait_children(self, timeout: float, writer: bool) -> bool:
        """Reap until no worker (and, if writer, no writer) is left, or timeout; True if done."""
        deadline = time.monotonic() + timeout
        while True:
            self.reap_workers()
            if not self.workers and (not writer or not self.writer_pid):
                return True
            if time.monotonic() > deadline:
                return False
            self.sleep(0.1)
            if any(s in (signal.SIGTERM, signal.SIGINT) for s in self.sig_queue):
                self.sig_queue.clear()
                log.warning("second stop signal: not waiting any longer")
                return False

    # ------------------------------------------------------------------ stop
    def stop(self) -> None:
        """Workers finish in-flight requests, then the writer drains and flushes."""
        if self.stopping:
            return
        self.stopping = True
        notify.stopping()
        if self.listener is not None:
            self.listener.close()  # no new connections get queued
        self.kill_workers(signal.SIGTERM)
        if not self.wait_children(STOP_TIMEOUT, writer=False):
            log.warning("killing %d workers that did not stop", len(self.workers))
            self.kill_workers(signal.SIGKILL)
            self.wait_children(5.0, writer=False)
        self.kill(self.writer_pid, signal.SIGTERM)
        if not self.wait_children(STOP_TIMEOUT, writer=True):
            log.error("killing the writer: it did not stop in %.0fs", STOP_TIMEOUT)
            self.kill(self.writer_pid, signal.SIGKILL)
            self.wait_children(5.0, writer=True)

    def cleanup(self) -> None:
        """Release what start() made, whatever state it got to."""
        if not self.stopping and (self.workers or self.writer_pid):
            self.stopping = True
            self.kill_workers(signal.SIGKILL)
            self.kill(self.writer_pid, signal.SIGTERM)
            self.wait_children(STOP_TIMEOUT, writer=True)
        if self.reporter is not None:
            self.reporter.stop()
            self.reporter.join(self.reporter.timeout + 1)  # it reads the stats segment
        if self.metrics_server is not None:
            self.metrics_server.shutdown()
            self.metrics_server.server_close()
        for seg in (self.pool, self.stats):
            if seg is not None:
                seg.close()
        n = unlink_prefix(self.prefix)
        if n:
            log.debug("unlinked %d shared memory segments", n)
        if self.listener is not None:
            self.listener.close()
        if self.pidfile_written:
            remove_pidfile(self.cfg.pidfile)
        log.info("stopped (exit code %d)", self.exit_code)

    # ------------------------------------------------------------------ reporting
    def totals(self) -> dict:
        """Every figure of the server (for the reports and the metrics)."""
        t = self.stats.totals(self.cfg.group_id)  # type: ignore[union-attr]
        t["pool_blocks_in_use"] = self.pool.in_use()  # type: ignore[union-attr]
        t["pool_blocks_total"] = self.pool.nblocks  # type: ignore[union-attr]
        t["workers"] = len(self.workers)
        return t

    def start_reporting(self) -> None:
        """The reporter thread, and the metrics endpoint when --metrics_port is set."""
        from speedy.chunkserver.reporter import Reporter
        self.reporter = Reporter(self.cfg, self.totals)
        self.reporter.start()
        if self.cfg.metrics_port:
            from speedy.chunkserver.metrics import serve_metrics
            try:
                self.metrics_server = serve_metrics(self.cfg.ip, self.cfg.metrics_port,
                                                    self.totals)
            except OSError as e:
                raise StartError(f"cannot serve metrics on {self.cfg.ip}:"
                                 f"{self.cfg.metrics_port}: {e.strerror or e}") from None


# ---------------------------------------------------------------------- helpers


def raise_nofile_limit() -> None:
    """Raise the soft open-files limit to the hard one (many client connections)."""
    try:
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if soft != hard:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    except (ValueError, OSError):
        pass


def main(argv: list[str] | None = None) -> None:
    """spy_server: parse the configuration, run the supervisor, exit with its code."""
    cfg = load_server_config(argv)
    try:
        setup_logging(cfg.error_log, cfg.log_level)
    except OSError as e:
        print(f"spy_server: error: cannot open --error_log {cfg.error_log}: {e.strerror}",
              file=sys.stderr)
        sys.exit(EXIT_START)
    code = Supervisor(cfg).run()
    if code == EXIT_START and cfg.error_log and not cfg.daemonize:
        print(f"spy_server: could not start; see {cfg.error_log}", file=sys.stderr)
    sys.exit(code)
