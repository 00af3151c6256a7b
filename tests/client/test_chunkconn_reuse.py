"""Pooled chunkserver connections: reused for reads without a readiness check, yet a
connection the server closed meanwhile costs a retry, never an error."""
from __future__ import annotations

import os
import socket
from contextlib import closing

from tests.support.server import servers  # noqa: F401 (fixture)

from speedy.client.chunkconn import ConnPool, StaleConnection
from speedy.wire.protocol import Err, Op, encode_file_key


def idle(pool: ConnPool, addr: tuple[str, int]) -> list:
    """The idle connections the pool keeps for addr."""
    return list(pool._idle.get(addr, []))


def test_read_after_the_server_restarted_is_retried_on_a_new_connection(servers):
    srv = servers("cs")
    addr = ("127.0.0.1", srv.port)
    data = os.urandom(5000)
    with closing(ConnPool(timeout=10)) as pool:
        assert pool.write(addr, 1, 7, data).ok
        assert bytes(pool.read(addr, 1, 7).body) == data
        [old] = idle(pool, addr)
        srv.stop()
        srv.start()            # same port, same data: every pooled connection is dead
        reply = pool.read(addr, 1, 7)
        assert reply.ok and bytes(reply.body) == data
        [new] = idle(pool, addr)
        assert new is not old and old.sock.fileno() == -1   # the dead one was closed
        # a write checks its pooled connection first: no retry needed, none made
        srv.stop()
        srv.start()
        assert pool.write(addr, 1, 8, data[:100]).ok
        assert bytes(pool.read(addr, 1, 8).body) == data[:100]


def test_a_failed_send_on_a_pooled_connection_is_stale_and_retried(servers):
    srv = servers("cs")
    addr = ("127.0.0.1", srv.port)
    with closing(ConnPool(timeout=10)) as pool:
        assert pool.write(addr, 1, 9, b"x" * 300).ok
        [conn] = idle(pool, addr)
        conn.sock.shutdown(socket.SHUT_WR)   # our side can no longer send on it
        try:
            conn.send(Op.PING, [])
            raise AssertionError("a send on a shut-down socket went through")
        except StaleConnection:
            pass
        pool._idle[addr] = [conn]
        reply = pool.read(addr, 1, 9)
        assert reply.ok and bytes(reply.body) == b"x" * 300


def test_large_and_empty_replies_are_read_whole(servers):
    srv = servers("cs")
    addr = ("127.0.0.1", srv.port)
    big = os.urandom(3 << 20)                # many receives after the first
    with closing(ConnPool(timeout=10)) as pool:
        assert pool.write(addr, 1, 10, big).ok
        assert pool.write(addr, 1, 11, b"").ok
        for _ in range(3):                   # pooled connections, reused
            assert bytes(pool.read(addr, 1, 10).body) == big
            reply = pool.read(addr, 1, 11)
            assert reply.ok and bytes(reply.body) == b""
        missing = pool.read(addr, 1, 12)
        assert missing.err == Err.FILE_NOT_FOUND and bytes(missing.body) == b""
        assert pool.call(addr, Op.READ, [encode_file_key(1, 10)]).body == big

