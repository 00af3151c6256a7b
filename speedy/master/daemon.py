"""spy_master start-up: config, logging, database checks, listen, daemonize, serve, signals.

Order: parse flags (exit 2 when invalid) -> logging -> bind the socket (exit 1 when it
cannot; nothing is created then) -> lock and check the database (exit 1 with a one-line
reason when it is corrupt, locked, foreign, empty or too new; a database this start
created is removed again) -> detach (--daemonize=1) -> pidfile -> gevent monkey-patching
-> serve. SIGTERM/SIGINT stop gracefully, SIGHUP reopens the log file.
"""
from __future__ import annotations

import logging
import os
import resource
import signal
import socket
import sys
import time
from typing import Sequence

from speedy import __version__
from speedy.master import db as mdb
from speedy.master.conns import ConnTable, Limits
from speedy.common.config import load_master_config
from speedy.common.daemonize import (PidfileError, StartError, daemonize, read_pidfile, remove_pidfile,
                        write_pidfile)
from speedy.common.listener import bind_listener
from speedy.common.logs import reopen_logs, setup_logging

log = logging.getLogger("speedy.master")

STOP_TIMEOUT = 2.0         # seconds in-flight requests get on a graceful stop
SPARE_FDS = 64             # descriptors kept free of connections (database, logs)
LINGER_SECONDS = 2.0       # after a 413: drain the client's unread body this long ...
LINGER_BYTES = 16 << 20    # ... or this many bytes, then close


def linger(sock: socket.socket, seconds: float = LINGER_SECONDS,
           limit: int = LINGER_BYTES) -> None:
    """Lingering close after an early answer (413): stop sending, read and drop what the
    client still sends for a while, so that it reads our answer instead of a reset."""
    try:
        sock.shutdown(socket.SHUT_WR)
        deadline, got = time.monotonic() + seconds, 0
        while got < limit:
            left = deadline - time.monotonic()
            if left <= 0:
                break
            sock.settimeout(left)
            data = sock.recv(65536)
            if not data:
                break
            got += len(data)
    except OSError:
        pass


def check_pidfile(path: str) -> None:
    """StartError if path names a live process."""
    pid = read_pidfile(path)
    if pid is None or pid == os.getpid():
        return
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return
    except PermissionError:
        pass
    raise StartError(f"pidfile {path} names a running process ({pid}): is another "
                     "instance running?")


def check_database(path: str, init: bool = False) -> int:
    """Lock the database for this master and check/migrate it; the lock fd (kept open).

    A missing file is created; if it cannot be used after all, it is removed again.
    """
    created = False
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o644)
        os.close(fd)
        created = True
    except FileExistsError:
        pass
    except OSError as e:
        raise StartError(f"cannot open database {path}: {e.strerror}") from None
    try:
        lock_fd = mdb.lock_single_master(path)
        db = mdb.connect(path, init=init or created)
        try:
            n = len(mdb.list_servers(db))
            log.info("database %s: schema %d, %d chunkservers, fid high-water %d", path,
                     mdb.SCHEMA_VERSION, n, mdb.fid_high_water(db))
        finally:
            db.close()
    except BaseException:
        if created:
            for suffix in ("", "-wal", "-shm", "-journal"):
                try:
                    os.unlink(path + suffix)
                except OSError:
                    pass
        raise
    return lock_fd


def raise_fd_limit(limits: Limits) -> None:
    """Raise RLIMIT_NOFILE to what max_connections needs (up to the hard limit), or lower
    max_connections to what the hard limit allows."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = limits.max_connections + SPARE_FDS
    if soft < need:
        new = need if hard == resource.RLIM_INFINITY else min(need, hard)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
            soft = new
        except (ValueError, OSError):
            pass
    if soft < need:
        limits.max_connections = max(16, soft - SPARE_FDS)
        log.warning("open files limited to %d: at most %d connections (raise LimitNOFILE)",
                    soft, limits.max_connections)


def serve(cfg, listener: socket.socket, limits: Limits) -> int:
    """Monkey-patch, run the WSGI server and the monitor until SIGTERM/SIGINT; exit code."""
    from gevent import monkey

    monkey.patch_all()
    import gevent
    import gevent.event
    import gevent.socket
    from gevent.pywsgi import LoggingLogAdapter, WSGIHandler, WSGIServer

    from speedy.common import notify
    from speedy.master.app import MasterApp

    class ReadTimeout(BaseException):  # not caught by gevent's handling of bad requests
        """A request's line and headers were not read within read_timeout: close."""

    class Handler(WSGIHandler):
        """Connection limits and timeouts (speedy.master.conns); TCP_NODELAY."""

        conn = None
        timer = None
        deadline = 0.0
        served = 0

        def handle(self) -> None:
            self.conn = table.open(self.socket, str(self.client_address[0]))
            if self.conn is None:  # over a limit and nothing idle to evict: close now
                self.rfile.close()
                self.socket.close()
                return
            app.connections = table.total
            if self.socket.family in (socket.AF_INET, socket.AF_INET6):
                # keep-alive clients would otherwise wait for delayed ACKs (40 ms a request)
                self.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            try:
                super().handle()
            except (OSError, ReadTimeout):  # timeouts and resets of one client: close
                pass
            finally:
                self._stop_timer()
                table.close(self.conn)
                app.connections = table.total

        def read_requestline(self) -> str:
            self._stop_timer()
            table.set_idle(self.conn)
            self.socket.settimeout(limits.idle_timeout if self.served else limits.read_timeout)
            line = super().read_requestline()
            table.set_busy(self.conn)
            self.socket.settimeout(limits.read_timeout)
            self.deadline = time.monotonic() + limits.read_timeout
            self.timer = gevent.Timeout.start_new(limits.read_timeout, ReadTimeout)
            return line

        def get_environ(self) -> dict:
            env = super().get_environ()
            env["speedy.read_deadline"] = self.deadline
            return env

        def handle_one_response(self) -> None:
            self._stop_timer()  # headers are in; the app bounds the body by the deadline
            self.served += 1
            super().handle_one_response()
            if getattr(self, "environ", None) and self.environ.get("speedy.linger"):
                linger(self.socket)

        def _stop_timer(self) -> None:
            if self.timer is not None:
                self.timer.close()
                self.timer = None

    class AccessLog(LoggingLogAdapter):
        """gevent's access lines with control characters escaped."""

        def write(self, msg: str) -> None:
            super().write("".join(c if c.isprintable() or c == "\n" else
                                  repr(c)[1:-1] for c in msg))

    sock = gevent.socket.socket(listener.family, listener.type, fileno=listener.detach())
    db = mdb.connect(cfg.db, check=False)
    app = MasterApp(db, token=cfg.token, heartbeat_timeout=cfg.heartbeat_timeout,
                    monitor_interval=cfg.monitor_interval)
    table = ConnTable(limits, app.counts)
    server = WSGIServer(
        sock, app, handler_class=Handler, spawn="default",
        log=AccessLog(logging.getLogger("speedy.master.access"), logging.DEBUG),
        error_log=LoggingLogAdapter(logging.getLogger("speedy.master.http"), logging.INFO))
    stop = gevent.event.Event()

    def on_stop(signum: int) -> None:
        log.info("%s received: stopping", signal.Signals(signum).name)
        notify.stopping()
        stop.set()

    def on_hup() -> None:
        notify.reloading()
        reopen_logs()
        log.info("SIGHUP: log file reopened")
        notify.ready()

    gevent.signal_handler(signal.SIGTERM, on_stop, signal.SIGTERM)
    gevent.signal_handler(signal.SIGINT, on_stop, signal.SIGINT)
    gevent.signal_handler(signal.SIGHUP, on_hup)
    server.start()
    app.start_monitor()
    host, port = sock.getsockname()[:2]
    log.info("spy_master %s listening on %s:%d (db %s, heartbeat timeout %.1f s, monitor "
             "every %.1f s, token %s)", __version__, host, port, cfg.db,
             cfg.heartbeat_timeout, cfg.monitor_interval, "required" if cfg.token else "off")
    notify.ready(f"listening on {host}:{port}")
    stop.wait()
    server.stop(timeout=STOP_TIMEOUT)
    app.stop_monitor()
    app.deleter.stop()
    mdb.close(db)
    log.info("stopped")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The spy_master entry point; returns the exit code (2 for invalid flags)."""
    cfg = load_master_config(argv)
    try:
        setup_logging(cfg.error_log, cfg.log_level)
    except OSError as e:
        print(f"spy_master: cannot open log file {cfg.error_log}: {e.strerror}",
              file=sys.stderr)
        return 1
    pidfile_written = False
    try:
        listener = bind_listener(cfg.ip, cfg.port)
        lock_fd = check_database(cfg.db, cfg.init_db)
        limits = Limits(cfg.max_connections, cfg.max_source_connections, cfg.read_timeout,
                        cfg.idle_timeout)
        raise_fd_limit(limits)
        if cfg.daemonize:
            if not cfg.error_log:
                log.warning("--daemonize=1 without --error_log: log lines will be discarded")
            if cfg.pidfile:
                check_pidfile(cfg.pidfile)  # on the terminal, before detaching
            daemonize(keep=[lock_fd, listener])
        if cfg.pidfile:
            write_pidfile(cfg.pidfile)
            pidfile_written = True
        return serve(cfg, listener, limits)
    except (StartError, PidfileError, mdb.MasterDBError) as e:
        log.error("%s", e)
        if cfg.error_log and not cfg.daemonize:
            print(f"spy_master: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0
    finally:
        if pidfile_written:
            remove_pidfile(cfg.pidfile)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
