"""One gateway worker process: gevent (patched here, after fork), a WSGI server on the
shared listening socket, the client library, the record and path metadata databases.

SIGTERM: stop accepting, let in-flight requests finish (STOP_TIMEOUT), exit 0.
SIGHUP: reopen the log file.
"""
from __future__ import annotations

import logging
import signal
import socket
from argparse import Namespace

from speedy.gateway.stats import GatewayStats

log = logging.getLogger("speedy.gateway.worker")

BOOT_ERROR = 4          # exit code: the worker could not start (the supervisor gives up)
STOP_TIMEOUT = 20.0     # seconds in-flight requests get on SIGTERM
CONNECTION_TIMEOUT = 60.0
MAX_CONNECTIONS = 10000
PART_SIZE = 4 << 20
UPLOAD_PARALLEL = 2     # parts in flight per upload: bounds an upload's memory


def run_worker(cfg: Namespace, slot: int, listener: socket.socket,
               stats: GatewayStats) -> int:
    """The worker's body; its exit code."""
    from gevent import monkey
    monkey.patch_all()
    import gevent
    import gevent.event
    import gevent.pool
    import gevent.server
    import gevent.socket

    from speedy.client import Client
    from speedy.common.logs import reopen_logs
    from speedy.gateway.app import GatewayApp, open_meta
    from speedy.gateway.records import RecordError, open_records
    from speedy.gateway.server import HTTPServer

    stats.use_slot(slot)
    try:
        records = open_records(cfg.metadb)
        records.connect()
        meta = open_meta(cfg.metadb)
    except RecordError as e:
        log.error("worker %d: %s", slot, e)
        return BOOT_ERROR
    except Exception as e:  # noqa: BLE001 (the path metadata database failed to open)
        log.error("worker %d: cannot open --metadb: %s", slot, e)
        return BOOT_ERROR
    client = Client(cfg.master, token=cfg.token or None, timeout=cfg.timeout,
                    connect_timeout=min(3.0, cfg.timeout), part_size=PART_SIZE,
                    parallel=UPLOAD_PARALLEL)
    app = GatewayApp(client, meta, signing_key=cfg.signing_key, max_body=cfg.max_body,
                     stats=stats, metrics=stats.render, records=records)

    sock = gevent.socket.socket(listener.family, listener.type, fileno=listener.detach())
    server = HTTPServer(sock, app, gevent.server.StreamServer,
                        gevent.pool.Pool(MAX_CONNECTIONS), CONNECTION_TIMEOUT)
    done = gevent.event.Event()

    def stop() -> None:
        server.stop(timeout=STOP_TIMEOUT)
        done.set()

    def on_hup() -> None:
        reopen_logs()

    server.start()
    gevent.signal_handler(signal.SIGTERM, lambda: gevent.spawn(stop))
    gevent.signal_handler(signal.SIGHUP, on_hup)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGHUP})
    log.debug("worker %d serving", slot)
    done.wait()
    client.close()
    records.close()
    close = getattr(meta, "close", None)
    if close is not None:
        close()
    return 0
