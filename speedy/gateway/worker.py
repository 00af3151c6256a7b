"""One gateway worker process: gevent (patched here, after fork), a WSGI server on the
shared listening socket, the client library, the record and path metadata databases.

SIGTERM: drain for --drain_seconds (serve, but /healthz says 503), stop accepting, let
in-flight requests finish (STOP_TIMEOUT), flush the access log, exit 0. SIGHUP: reopen
the log files.
"""
from __future__ import annotations

import logging
import signal
import socket
import time
from argparse import Namespace
from typing import TYPE_CHECKING

from speedy.gateway.stats import GatewayStats

if TYPE_CHECKING:
    from speedy.gateway.access import AccessLog

log = logging.getLogger("speedy.gateway.worker")

BOOT_ERROR = 4          # exit code: the worker could not start (the supervisor gives up)
STOP_TIMEOUT = 20.0     # seconds in-flight requests get on SIGTERM
MAX_CONNECTIONS = 10000
UPLOAD_PARALLEL = 2     # parts in flight per upload: bounds an upload's memory
IDLE_CHUNK_CONNECTIONS = 64  # per chunkserver, per worker
ACCESS_FLUSH = 1.0      # seconds between access log writes, at most


def s3_service(cfg: Namespace, meta):
    """The S3 API of this gateway, or None when no S3 key is configured."""
    from speedy.common.config import s3_key_pairs
    keys = s3_key_pairs(cfg)
    if not keys or meta is None:
        return None
    from speedy.gateway.s3.api import S3Service
    from speedy.gateway.s3.objects import S3Objects
    return S3Service(S3Objects(meta), keys, cfg.s3_region, cfg.s3_upload_ttl)


def maintain(app, interval: float) -> None:
    """Worker 0, forever: retry queued blob frees, abort abandoned S3 uploads."""
    import gevent

    from speedy.gateway.garbage import sweep_garbage
    from speedy.gateway.s3.object_handlers import sweep_uploads
    while True:
        gevent.sleep(interval)
        try:
            if app.meta is not None:
                sweep_garbage(app, older_than=interval)
            if app.s3 is not None:
                sweep_uploads(app, app.s3)
        except Exception as e:  # noqa: BLE001 (maintenance never stops the worker)
            log.warning("maintenance: %s", e)


def flush_access(access: "AccessLog") -> None:
    """Forever: append the access log's buffered lines once a second."""
    import gevent
    while True:
        gevent.sleep(ACCESS_FLUSH)
        access.flush()


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
    from speedy.common.config import parse_networks
    from speedy.common.logs import reopen_logs
    from speedy.gateway.access import AccessLog
    from speedy.gateway.app import GatewayApp
    from speedy.gateway.meta import open_meta
    from speedy.gateway.records import RecordStore
    from speedy.gateway.server import HTTPServer

    stats.use_slot(slot)
    try:
        meta = open_meta(cfg.metadb)
    except Exception as e:  # noqa: BLE001 (the metadata database failed to open)
        log.error("worker %d: cannot open --metadb: %s", slot, e)
        return BOOT_ERROR
    records = RecordStore(meta)
    client = Client(cfg.master, token=cfg.token or None, timeout=cfg.timeout,
                    connect_timeout=min(3.0, cfg.timeout), part_size=cfg.part_size,
                    parallel=UPLOAD_PARALLEL, min_replicas=cfg.min_replicas,
                    pipelined=True)
    # many HTTP connections at once: keep enough idle chunkserver connections to reuse
    client.pool.max_idle = max(client.pool.max_idle, IDLE_CHUNK_CONNECTIONS)
    app = GatewayApp(client, meta, signing_key=cfg.signing_key, max_body=cfg.max_body,
                     stats=stats, metrics=stats.render, records=records)
    app.s3 = s3_service(cfg, meta)
    if slot == 0:
        gevent.spawn(maintain, app, cfg.maintenance_interval)

    try:
        access = AccessLog(cfg.access_log, parse_networks(cfg.trusted_proxies)) \
            if cfg.access_log else None
    except OSError as e:   # the supervisor opened it at start: serving comes first now
        log.error("worker %d: cannot open --access_log %s: %s; serving without it", slot,
                  cfg.access_log, e.strerror or e)
        access = None
    if access is not None:
        gevent.spawn(flush_access, access)
    sock = gevent.socket.socket(listener.family, listener.type, fileno=listener.detach())
    server = HTTPServer(sock, app, gevent.server.StreamServer,
                        gevent.pool.Pool(MAX_CONNECTIONS), cfg.idle_timeout, access)
    done = gevent.event.Event()

    def stop() -> None:
        if cfg.drain_seconds and not app.health.draining:
            app.health.draining = True
            log.info("worker %d: draining for %d s before it stops", slot, cfg.drain_seconds)
            gevent.sleep(cfg.drain_seconds)
        t0 = time.monotonic()
        try:
            server.stop(timeout=STOP_TIMEOUT)
        finally:
            log.debug("worker %d stopped serving in %.3f s", slot, time.monotonic() - t0)
            done.set()

    def on_hup() -> None:
        reopen_logs()
        if access is not None:
            access.reopen()

    server.start()
    gevent.signal_handler(signal.SIGTERM, lambda: gevent.spawn(stop))
    gevent.signal_handler(signal.SIGHUP, on_hup)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM, signal.SIGHUP})
    log.debug("worker %d serving", slot)
    done.wait()
    if access is not None:
        access.close()
    client.close()
    close = getattr(meta, "close", None)
    if close is not None:
        close()
    return 0
