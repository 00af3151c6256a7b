"""`speedy gateway`: the supervisor of the pre-forked gevent workers.

    supervisor ──fork──> worker 0..n-1   gevent, accept on the shared listening socket
        └─ thread: metrics (--metrics_port); counters shared in one mmap (stats.py)

The supervisor never imports gevent: each worker patches itself after fork. Signal
handlers queue the signal and wake the loop through a pipe. SIGTERM/SIGINT drain the
workers (in-flight requests finish), SIGHUP reopens the logs everywhere, a worker that
dies is replaced. Exit codes: 0 stopped, 1 could not start (one line), 2 bad flags,
4 a worker could not start.
"""
from __future__ import annotations

import logging
import os
import select
import signal
import socket
import sys
import time
from argparse import Namespace
from typing import Sequence

from speedy import __version__
from speedy.common import notify
from speedy.common.config import load_gateway_config
from speedy.common.daemonize import (PidfileError, StartError, daemonize, remove_pidfile,
                                     write_pidfile)
from speedy.common.children import describe_exit, exit_code, exited_children
from speedy.common.listener import bind_listener
from speedy.common.logs import reopen_logs, setup_logging
from speedy.gateway.access import open_log
from speedy.gateway.meta import MetaError, open_meta
from speedy.gateway.meta.postgres import redact
from speedy.gateway.stats import GatewayStats
from speedy.gateway.worker import BOOT_ERROR, STOP_TIMEOUT, run_worker

log = logging.getLogger("speedy.gateway")

EXIT_OK, EXIT_START, EXIT_WORKER_BOOT = 0, 1, 4
RESPAWN_DELAY = 1.0
WAKE_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGCHLD)


class Supervisor:
    """Forks the workers, replaces the ones that die, stops them gracefully."""

    def __init__(self, cfg: Namespace):
        self.cfg = cfg
        self.listener: socket.socket | None = None
        self.stats = GatewayStats(cfg.workers)
        self.workers: dict[int, tuple[int, float]] = {}   # pid -> (slot, started)
        self.due: dict[int, float] = {}                   # slot -> respawn time
        self.queue: list[int] = []
        self.pipe = (-1, -1)   # the signal wake-up pipe, made after daemonizing
        self.stopping = False
        self.code = EXIT_OK
        self.metrics_server = None

    def run(self) -> int:
        """Start, loop until stopped, clean up; the exit code."""
        pidfile = False
        try:
            self.start()
            pidfile = bool(self.cfg.pidfile)
            while not self.stopping:
                self.wait(1.0)
                for sig in self.take_signals():
                    self.handle(sig)
                self.respawn()
        except (StartError, PidfileError) as e:
            log.error("cannot start: %s", e)
            self.code = EXIT_START
        finally:
            self.stop()
            if self.metrics_server is not None:
                self.metrics_server.shutdown()
                self.metrics_server.server_close()
            if pidfile:
                remove_pidfile(self.cfg.pidfile)
        log.info("stopped (exit code %d)", self.code)
        return self.code

    def start(self) -> None:
        """Check the database, bind, detach, fork the workers, tell systemd."""
        cfg = self.cfg
        try:
            open_meta(cfg.metadb).close()   # create or migrate it now: a bad one is a start error
        except MetaError as e:
            raise StartError(f"--metadb: {e}") from None
        if cfg.access_log and cfg.access_log != "-":
            try:
                os.close(open_log(cfg.access_log))   # the workers open it: fail here, once
            except OSError as e:
                raise StartError(f"cannot open --access_log {cfg.access_log}: "
                                 f"{e.strerror or e}") from None
        self.listener = bind_listener(cfg.ip, cfg.port, inheritable=True)
        if cfg.daemonize:
            if not cfg.error_log:
                log.warning("--daemonize=1 without --error_log: the log goes nowhere")
            daemonize(keep=[self.listener])
        write_pidfile(cfg.pidfile)
        self.pipe = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        for sig in WAKE_SIGNALS:
            signal.signal(sig, self.on_signal)
        for slot in range(cfg.workers):
            self.spawn(slot)
        if cfg.metrics_port:
            try:
                self.metrics_server = self.stats.serve(cfg.ip, cfg.metrics_port)
            except OSError as e:
                raise StartError(f"cannot serve metrics on {cfg.ip}:{cfg.metrics_port}: "
                                 f"{e.strerror or e}") from None
        host, port = self.listener.getsockname()[:2]
        log.info("speedy gateway %s on %s:%d: master %s, metadb %s, %d workers, signed "
                 "URLs %s", __version__, host, port, cfg.master, redact(cfg.metadb),
                 cfg.workers, "on" if cfg.signing_key else "off")
        notify.ready(f"serving on {host}:{port}")

    # -- signals -------------------------------------------------------------------

    def on_signal(self, sig: int, _frame) -> None:
        """Queue the signal and wake the loop."""
        if len(self.queue) < 8:
            self.queue.append(sig)
        try:
            os.write(self.pipe[1], b".")
        except OSError:
            pass

    def wait(self, seconds: float) -> None:
        """Sleep until a signal or the time."""
        if self.pipe[0] < 0:
            time.sleep(seconds)
            return
        try:
            if select.select([self.pipe[0]], [], [], seconds)[0]:
                while os.read(self.pipe[0], 512):
                    pass
        except (BlockingIOError, InterruptedError):
            pass

    def take_signals(self) -> list[int]:
        """The queued signals, oldest first."""
        out, self.queue = self.queue, []
        return out

    def handle(self, sig: int) -> None:
        """Act on one signal."""
        if sig in (signal.SIGTERM, signal.SIGINT):
            log.info("%s: stopping gracefully", signal.Signals(sig).name)
            self.stopping = True
        elif sig == signal.SIGHUP:
            notify.reloading()
            reopen_logs()
            log.info("SIGHUP: log files reopened")
            for pid in self.workers:
                self.kill(pid, signal.SIGHUP)
            notify.ready()
        elif sig == signal.SIGCHLD:
            self.reap()

    # -- workers -------------------------------------------------------------------

    def spawn(self, slot: int) -> None:
        """Fork worker slot; the child never returns."""
        # TERM and HUP stay blocked in the child until its own handlers are set: a stop
        # signal sent right after the fork must not reach the supervisor's handler there
        signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM, signal.SIGHUP})
        pid = os.fork()
        if pid:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGHUP})
            self.workers[pid] = (slot, time.monotonic())
            return
        code = 1
        try:
            for sig in WAKE_SIGNALS:
                signal.signal(sig, signal.SIG_DFL)
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            os.close(self.pipe[0])
            os.close(self.pipe[1])
            try:
                with open("/proc/self/comm", "w") as f:
                    f.write(f"spy_gateway_{slot}"[:15])
            except OSError:
                pass
            code = run_worker(self.cfg, slot, self.listener, self.stats)
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            log.exception("gateway worker %d crashed", slot)
        finally:
            logging.shutdown()
            os._exit(code)

    def reap(self) -> None:
        """Collect exited workers; schedule replacements (or stop on a boot error)."""
        for pid, status in exited_children():
            slot, started = self.workers.pop(pid, (None, 0.0))
            if slot is None or self.stopping:
                continue
            if exit_code(status) == BOOT_ERROR:
                log.error("worker %d could not start: stopping", slot)
                self.code = EXIT_WORKER_BOOT
                self.stopping = True
                continue
            log.error("worker %d (pid %d) %s: replacing it", slot, pid, describe_exit(status))
            quick = time.monotonic() - started < RESPAWN_DELAY
            self.due[slot] = time.monotonic() + (RESPAWN_DELAY if quick else 0.0)

    def respawn(self) -> None:
        """Fork the replacements that are due."""
        now = time.monotonic()
        for slot, when in sorted(self.due.items()):
            if when <= now and not self.stopping:
                del self.due[slot]
                self.spawn(slot)

    def kill(self, pid: int, sig: int) -> None:
        """Signal one worker; gone is fine."""
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def stop(self) -> None:
        """Close the socket, let the workers drain, kill what is left."""
        self.stopping = True
        if self.workers:
            notify.stopping()
        if self.listener is not None:
            self.listener.close()
            self.listener = None
        drain = self.cfg.drain_seconds
        for sig, grace in ((signal.SIGTERM, drain + STOP_TIMEOUT + 2.0), (signal.SIGKILL, 5.0)):
            for pid in list(self.workers):
                self.kill(pid, sig)
            deadline = time.monotonic() + grace
            while self.workers and time.monotonic() < deadline:
                self.reap()
                self.wait(0.05)
                if any(s in (signal.SIGTERM, signal.SIGINT) for s in self.take_signals()):
                    break  # a second stop signal: do not wait any longer
            if not self.workers:
                break


def main(argv: Sequence[str] | None = None) -> int:
    """The `speedy gateway` entry point; the exit code."""
    cfg = load_gateway_config(argv)
    try:
        setup_logging(cfg.error_log, cfg.log_level)
    except OSError as e:
        print(f"speedy gateway: cannot open --error_log {cfg.error_log}: {e.strerror}",
              file=sys.stderr)
        return EXIT_START
    code = Supervisor(cfg).run()
    if code == EXIT_START and cfg.error_log and not cfg.daemonize:
        print(f"speedy gateway: could not start; see {cfg.error_log}", file=sys.stderr)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
