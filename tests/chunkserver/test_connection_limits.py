"""Idle connections cannot lock a chunkserver (issue 11, item 6): --max_conns,
--max_conns_per_ip and --idle_timeout, with a few hundred real connections."""
from __future__ import annotations

import socket
import struct
import time

from tests.support import wait_for
from tests.support.server import Client, payload
from tests.support.sources import connect
from speedy.wire.protocol import Err, Op, decode_detail_info, encode_file_key


def closed_by_server(sock: socket.socket) -> bool:
    """Whether the server closed sock (without waiting)."""
    sock.setblocking(False)
    try:
        return sock.recv(1) == b""
    except BlockingIOError:
        return False
    except OSError:
        return True
    finally:
        sock.setblocking(True)


def refused(sock: socket.socket) -> bool:
    """Whether a PING on sock gets no answer: the server closed it at once."""
    sock.settimeout(5)
    try:
        sock.sendall(struct.pack(">BI", Op.PING, 0))
        return sock.recv(6) == b""
    except ConnectionResetError:
        return True
    finally:
        sock.close()


def open_conns(srv) -> int:
    """Connections the server counts now (QUERY_DETAIL_INFOS), this one included."""
    with srv.client(timeout=10) as c:
        err, body = c.call(Op.QUERY_DETAIL_INFOS)
        assert err == Err.SUCCESS
        return decode_detail_info(body).conn_count


def served(srv, fid: int) -> bool:
    """A new client's PING, WRITE and READ all answered within 5 s."""
    with Client(srv.port, timeout=5) as c:
        return (c.ping() == Err.SUCCESS and c.write(fid, payload(fid, 5000)) == Err.SUCCESS
                and c.read(fid) == (Err.SUCCESS, payload(fid, 5000)))


def test_idle_flood_is_held_back_and_new_clients_served(servers):
    srv = servers("flood", workers=2, max_conns=100, max_conns_per_ip=1000)
    flood = [connect(srv.port) for _ in range(400)]
    try:
        assert served(srv, 1)
        wait_for(lambda: open_conns(srv) <= 2 * 100, timeout=10)  # the closed ones end
        time.sleep(0.5)
        gone = sum(closed_by_server(s) for s in flood)
        assert gone >= 400 - 2 * 100
        assert not any(closed_by_server(s) for s in flood[-50:])  # the oldest went first
        assert served(srv, 2)
    finally:
        for s in flood:
            s.close()
    assert "idle connections closed to make room" in srv.log()


def test_one_source_is_limited_others_are_not(servers):
    srv = servers("persrc", workers=1, max_conns=300, max_conns_per_ip=50)
    flood = [connect(srv.port, "127.0.0.2") for _ in range(200)]
    others = [connect(srv.port, "127.0.0.3") for _ in range(40)]
    try:
        assert served(srv, 1)
        time.sleep(0.5)
        assert sum(not closed_by_server(s) for s in flood) <= 50
        assert not any(closed_by_server(s) for s in others)
    finally:
        for s in flood + others:
            s.close()


def test_busy_connections_are_kept_and_a_new_one_refused(servers):
    srv = servers("busy", workers=1, max_conns=20, max_conns_per_ip=1000)
    busy = [connect(srv.port) for _ in range(20)]
    try:
        for i, s in enumerate(busy):  # a request under way: not idle, never closed for room
            s.sendall(struct.pack(">BI", Op.WRITE, 10 + 5000) + encode_file_key(1, 100 + i)
                      + b"x" * 100)
        time.sleep(1.0)  # every one admitted and waiting for the rest of its body
        extra = connect(srv.port)
        extra.settimeout(5)
        assert refused(extra)

        for i, s in enumerate(busy):
            s.sendall(payload(100 + i, 5000)[100:])
            assert s.recv(6) == struct.pack(">BBI", Op.WRITE, Err.SUCCESS, 0)
        assert served(srv, 1)  # the finished ones are idle now: one makes room
    finally:
        for s in busy:
            s.close()


def test_idle_timeout_closes_idle_connections_only(servers):
    srv = servers("idle", workers=1, idle_timeout=1)
    idle = connect(srv.port)
    with srv.client() as active:
        for _ in range(8):  # a request every 0.3 s: never idle for 1 s
            assert active.ping() == Err.SUCCESS
            time.sleep(0.3)
        assert wait_for(lambda: closed_by_server(idle), timeout=5)
        assert active.ping() == Err.SUCCESS
    idle.close()
