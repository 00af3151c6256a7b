"""Slow uploads hold pool blocks only for bytes they sent (issue 11, item 8).

With --mem_blocks=16, 20 uploads announcing 2 MiB and trickling used to take every block
and starve every normal write (REACH_MEMORY_LIMIT). Blocks are now claimed as the body
arrives, and one source address holds at most --mem_blocks_per_ip of them.
"""
from __future__ import annotations

import socket
import struct

from tests.support import wait_for
from tests.support.server import Client, payload, pool_in_use
from tests.support.sources import client_from
from speedy.wire.protocol import RESPONSE_HEADER, Err, Op, encode_file_key

MiB = 1 << 20


def start_upload(c: Client, fid: int, announced: int, sent: int) -> None:
    """A WRITE announcing announced body bytes, of which only sent are sent (so far)."""
    c.sock.sendall(struct.pack(">BI", Op.WRITE, 10 + announced) + encode_file_key(1, fid)
                   + payload(fid, sent))


def test_trickling_uploads_hold_no_blocks(servers):
    srv = servers("slow", workers=1, mem_blocks=16, chunk_size=64 * MiB)
    slow = [client_from(srv.port) for _ in range(20)]
    try:
        for i, c in enumerate(slow):
            start_upload(c, 1000 + i, 2 * MiB, 100)
        with srv.client() as c:
            for i in range(5):  # each fits only if the slow ones hold nothing
                assert c.write(i + 1, payload(i + 1, 3 * MiB)) == Err.SUCCESS
            assert pool_in_use(srv) == 0
            for c2 in slow[:3]:  # a trickle that goes on claims blocks as its bytes come
                c2.sock.sendall(payload(7, MiB))
            wait_for(lambda: pool_in_use(srv) == 3, timeout=10)
            for i in range(5):
                assert c.read(i + 1) == (Err.SUCCESS, payload(i + 1, 3 * MiB))
    finally:
        for c in slow:
            c.close()
    wait_for(lambda: pool_in_use(srv) == 0, timeout=10)


def test_one_source_holds_at_most_its_share(servers):
    srv = servers("share", workers=1, mem_blocks=16, mem_blocks_per_ip=4, chunk_size=64 * MiB)
    greedy = [client_from(srv.port, "127.0.0.2") for _ in range(6)]
    try:
        for i, c in enumerate(greedy):  # 2 blocks each, stalled before the end
            start_upload(c, 2000 + i, 3 * MiB, MiB + 20000)
        wait_for(lambda: pool_in_use(srv) == 4, timeout=10)
        refused = 0
        for c in greedy:
            c.sock.settimeout(0.5)
            try:
                head = c.recv_exact(RESPONSE_HEADER.size)
            except (TimeoutError, socket.timeout):
                continue
            assert RESPONSE_HEADER.unpack(head) == (Op.WRITE, Err.REACH_MEMORY_LIMIT, 0)
            refused += 1
        assert refused == 4
        assert pool_in_use(srv) == 4
        with client_from(srv.port, "127.0.0.1") as c:  # another source: the rest is its
            for fid in (1, 2):
                assert c.write(fid, payload(fid, 4 * MiB)) == Err.SUCCESS
                assert c.read(fid) == (Err.SUCCESS, payload(fid, 4 * MiB))
            assert c.write(3, payload(3, 5 * MiB)) == Err.REACH_MEMORY_LIMIT  # over any share
        with client_from(srv.port, "127.0.0.2") as c:  # the greedy source: over its share
            assert c.write(4, payload(4, 100)) == Err.REACH_MEMORY_LIMIT
            assert c.ping() == Err.SUCCESS
    finally:
        for c in greedy:
            c.close()
    wait_for(lambda: pool_in_use(srv) == 0, timeout=10)
