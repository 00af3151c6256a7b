"""`speedy bench --gateway`'s connection against a real gateway that closes idle ones."""
from __future__ import annotations

import socket
import sqlite3
import time

import pytest

from speedy.bench.gateway import GatewayConnection
from speedy.bench.load import Target
from tests.support.cluster import blob, cluster_fixture
from tests.support.gateway import Gateway

cluster = cluster_fixture(groups=1, per_group=2, chunks=2, chunk_size=16 << 20, mem_blocks=16)


@pytest.fixture(scope="module")
def quick(cluster, tmp_path_factory):
    """A gateway that closes connections idle for 1 s."""
    with Gateway(cluster, tmp_path_factory.mktemp("quick"), extra=["--idle_timeout=1"]) as g:
        yield g


@pytest.mark.parametrize("size", [100, 200_000])   # one send, and head then body
def test_a_connection_closed_while_idle_is_reopened_not_counted(quick, size):
    keys: dict = {}
    conn = GatewayConnection(Target("gateway", "127.0.0.1", quick.port, timeout=5),
                             blob(size, seed=size), keys)
    assert conn.put(0) is None, conn.detail
    first = conn.sock
    time.sleep(2.5)                                  # the gateway closes it meanwhile
    assert conn.get((keys[0], 0)) is None, conn.detail
    assert conn.sock is not first                    # a new connection answered
    time.sleep(2.5)
    assert conn.put(1) is None, conn.detail          # an upload after idling: stored once
    assert conn.get((keys[1], 1)) is None, conn.detail
    assert keys[1] != keys[0]
    conn.close()


def test_a_connection_that_breaks_mid_answer_is_an_error(quick):
    """Only a reused connection closed before any byte of the answer is retried."""
    keys: dict = {}
    conn = GatewayConnection(Target("gateway", "127.0.0.1", quick.port, timeout=5),
                             blob(100), keys)
    assert conn.put(0) is None, conn.detail
    conn.buf = b"HTTP/1.1 200 OK\r\n"                # as if part of an answer had come
    conn.sock.shutdown(socket.SHUT_RD)               # and then the end of the stream
    assert conn.get((keys[0], 0)) is not None        # counted, not retried
    assert conn.sock is None


def stored_blobs(gw: Gateway) -> int:
    """Blob records in the gateway's database: one per stored PUT."""
    with sqlite3.connect(gw.metadb[len("sqlite:///"):]) as db:
        return db.execute("SELECT count(*) FROM gateway_blob").fetchone()[0]


def test_a_put_is_never_sent_twice(quick):
    """A reused connection found closed after a PUT went out is an error, not a retry:
    the gateway may have stored the PUT (here it did: its record shows it once)."""
    keys: dict = {}
    conn = GatewayConnection(Target("gateway", "127.0.0.1", quick.port, timeout=5),
                             blob(100), keys)
    assert conn.put(0) is None, conn.detail
    before = stored_blobs(quick)
    conn.sock.shutdown(socket.SHUT_RD)   # the answer to the next request is lost
    assert conn.put(1) == "StaleConnection" and conn.sock is None
    time.sleep(0.5)
    assert stored_blobs(quick) == before + 1          # sent once: stored once
    assert conn.get((keys[0], 0)) is None, conn.detail  # a new connection for the next
