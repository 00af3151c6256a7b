"""Finishing pending deletes: the master sends DELETE to a chunkserver that reports again.

A client records at the master each delete it could not finish on a replica (POST
/v1/chunkserver/pendingdelete). When that chunkserver reports, the master speaks the
chunkserver protocol to it (a client connection, one DELETE per fid) and drops each fid
the server answers SUCCESS or FILE_NOT_FOUND for. Until then the route marks the server
with PendingDeletes and clients do not read from it.
"""
from __future__ import annotations

import logging
from typing import Any

import gevent
import sqlite_utils

from speedy.client.chunkconn import ChunkConn, ChunkError
from speedy.master import db as mdb
from speedy.wire.protocol import Err, Op, encode_file_key

log = logging.getLogger("speedy.master.deleter")

TIMEOUT = 3.0   # seconds for connecting and for each answer
BATCH = 500     # fids read from the database at a time


class DeleteFailed(Exception):
    """The chunkserver could not be reached or answered an error."""


def delete_fids(ip: str, port: int, group_id: int, fids: list[int],
                timeout: float = TIMEOUT) -> tuple[list[int], dict[int, str]]:
    """DELETE each fid on ip:port; (done, {fid: error}) - done includes FILE_NOT_FOUND."""
    done: list[int] = []
    failed: dict[int, str] = {}
    try:
        conn = ChunkConn((ip, port), timeout, timeout)
    except ChunkError as e:
        raise DeleteFailed(str(e)) from None
    try:
        for fid in fids:
            reply = conn.call(Op.DELETE, [encode_file_key(group_id, fid)])
            if reply.err in (Err.SUCCESS, Err.FILE_NOT_FOUND):
                done.append(fid)
            else:
                failed[fid] = reply.err_name
    except ChunkError as e:
        if not done and not failed:
            raise DeleteFailed(str(e)) from None
    finally:
        conn.close()
    return done, failed


class Deleter:
    """One greenlet per chunkserver with pending deletes, started by kick()."""

    def __init__(self, db: sqlite_utils.Database, counts: Any,
                 timeout: float = TIMEOUT) -> None:
        self.db, self.counts, self.timeout = db, counts, timeout
        self.running: dict[tuple[int, str, int], gevent.Greenlet] = {}

    def kick(self, group_id: int, ip: str, port: int) -> None:
        """Finish that server's pending deletes in the background (if any, once at a time)."""
        key = (group_id, ip, port)
        if key in self.running or not mdb.pending_deletes(self.db, *key, limit=1):
            return
        self.running[key] = gevent.spawn(self._finish, key)

    def _finish(self, key: tuple[int, str, int]) -> None:
        """Delete batch after batch until none is left or the server fails."""
        group_id, ip, port = key
        total = 0
        try:
            while True:
                fids = mdb.pending_deletes(self.db, *key, limit=BATCH)
                if not fids:
                    break
                try:
                    done, failed = delete_fids(ip, port, group_id, fids, self.timeout)
                except DeleteFailed as e:
                    log.info("pending deletes on %s:%d: %s (retrying at its next report)",
                             ip, port, e)
                    mdb.finish_pending_deletes(self.db, *key, [],
                                               {fid: str(e) for fid in fids[:1]})
                    break
                mdb.finish_pending_deletes(self.db, *key, done, failed)
                total += len(done)
                self.counts.deletes_finished += len(done)
                if failed or len(done) < len(fids):
                    log.warning("pending deletes on %s:%d: %d failed (%s); retrying at its "
                                "next report", ip, port, len(failed) or len(fids) - len(done),
                                ", ".join(sorted(set(failed.values()))) or "connection lost")
                    break
        except Exception:
            log.exception("pending deletes on %s:%d failed", ip, port)
        finally:
            self.running.pop(key, None)
        if total:
            log.info("finished %d pending deletes on %d:%s:%d", total, group_id, ip, port)

    def stop(self) -> None:
        """Kill the running greenlets."""
        gevent.killall(list(self.running.values()))
        self.running.clear()
