"""A worker's link to the writer: request ids, packed messages, answers; survives a
writer restart.

The supervisor hands each worker, over the worker's control socket, one end of a
SEQPACKET socketpair whose other end the writer holds, with the name of the fid index
that writer published (``"L" index name`` + one fd). When the writer dies, the link
ends: every request still waiting on it is answered INTERNAL_ERROR (its outcome is
unknown: the writer may have stored it or not) and the pool blocks of writes the writer
never claimed are returned. Until the supervisor hands over the new writer's link,
requests wait up to WRITER_WAIT seconds for it, then get IO_JOB_UNAVAILABLE (not
stored: nothing was sent to any writer).
"""
from __future__ import annotations

import logging
import struct
from typing import Callable

from speedy.chunkserver.messages import FRAME, PACKET_MAX, REPLY, REPLY_PACKET_MAX
from speedy.wire.protocol import Err

log = logging.getLogger("speedy.chunkserver.link")

WRITER_WAIT = 5.0  # seconds a request waits for a new writer before IO_JOB_UNAVAILABLE


class WriterLink:
    """The worker's end of its socketpair to one writer: calls with request ids."""

    def __init__(self, sock, gevent_mod, on_broken: Callable[[list[int]], None]) -> None:
        from gevent.event import AsyncResult, Event
        self._result = AsyncResult
        self.sock = sock
        self.on_broken = on_broken
        self.waiting: dict[int, object] = {}
        self.blocks_of: dict[int, list[int]] = {}  # pool blocks of each waiting WRITE
        self.next_id = 1
        self.broken = False
        self.out: list[bytes] = []  # framed messages not sent yet
        self.wake = Event()
        self.reader = gevent_mod.spawn(self._read_replies)
        self.sender = gevent_mod.spawn(self._send_queued)

    def send(self, head: struct.Struct, *fields, tail: bytes = b"",
             blocks: list[int] | None = None) -> object:
        """Queue head.pack(req_id, *fields) + tail; the AsyncResult of the answer (an Err).

        The messages queued by every greenlet that ran since the sender's last turn go
        to the writer in one packet (one send here, one recv there).
        """
        if self.broken:
            raise OSError("the writer is gone")
        req_id = self.next_id
        self.next_id = (req_id + 1) & 0xFFFFFFFF or 1
        result = self._result()
        self.waiting[req_id] = result
        if blocks:
            self.blocks_of[req_id] = blocks
        msg = head.pack(req_id, *fields) + tail
        self.out.append(FRAME.pack(len(msg)) + msg)
        self.wake.set()
        return result

    def close(self) -> None:
        """End the link (its reader answers what still waits)."""
        try:
            self.sock.close()
        except OSError:
            pass

    def _send_queued(self) -> None:
        """Send the queued messages, packed into packets of up to PACKET_MAX bytes."""
        while not self.broken:
            self.wake.wait()
            self.wake.clear()
            while self.out and not self.broken:
                k = size = 0
                for m in self.out:  # as many messages as fit (at least one)
                    if k and size + len(m) > PACKET_MAX:
                        break
                    size += len(m)
                    k += 1
                packet = b"".join(self.out[:k])
                del self.out[:k]
                try:
                    while not self.sock.send(packet):  # a packet goes whole or not at all:
                        pass  # 0 means it waited and the socket was still full; again
                except OSError as e:
                    log.error("cannot send to the writer: %s", e)
                    self.close()  # the reader sees the end and answers what waits
                    return

    def _read_replies(self) -> None:
        while True:
            try:
                data = self.sock.recv(REPLY_PACKET_MAX)
            except OSError:
                data = b""
            if not data:
                break
            if len(data) % REPLY.size:
                log.error("malformed reply packet of %d bytes from the writer", len(data))
                data = data[:len(data) - len(data) % REPLY.size]
            waiting, blocks_of = self.waiting, self.blocks_of
            for req_id, err in REPLY.iter_unpack(data):  # one packet: the replies of a batch
                result = waiting.pop(req_id, None)
                if result is not None:
                    blocks_of.pop(req_id, None)
                    result.set(err)
        self.broken = True
        self.wake.set()
        if self.waiting:
            log.error("the writer is gone: %d requests answered INTERNAL_ERROR (outcome "
                      "unknown)", len(self.waiting))
        blocks = [b for bl in self.blocks_of.values() for b in bl]
        self.blocks_of.clear()
        self.on_broken(blocks)  # before anyone learns the answers: no yield in between
        for result in self.waiting.values():
            result.set(Err.INTERNAL_ERROR)
        self.waiting.clear()


class WriterSlot:
    """The current link to the writer; replaced when the supervisor hands a new one."""

    def __init__(self, gevent_mod, on_broken: Callable[[list[int]], None]) -> None:
        from gevent.event import Event
        self.gevent = gevent_mod
        self.on_broken = on_broken
        self.link: WriterLink | None = None
        self.ready = Event()

    def install(self, sock) -> None:
        """Use a new writer's link; the old one must have ended first (its answers given)."""
        old = self.link
        if old is not None:
            old.close()
            old.reader.join()
        self.link = WriterLink(sock, self.gevent, self._broken)
        self.ready.set()

    def _broken(self, blocks: list[int]) -> None:
        self.ready.clear()
        self.on_broken(blocks)

    def current(self, wait: float = WRITER_WAIT) -> WriterLink | None:
        """The live link, waiting up to wait seconds for one; None if there is none."""
        link = self.link
        if link is not None and not link.broken:
            return link
        if wait > 0 and self.ready.wait(wait):
            link = self.link
            if link is not None and not link.broken:
                return link
        return None

    def send(self, head: struct.Struct, *fields, tail: bytes = b"",
             blocks: list[int] | None = None, wait: float = WRITER_WAIT) -> object | None:
        """Send on the live link (waiting for one, bounded); the AsyncResult, or None when
        there is no writer (nothing was sent)."""
        link = self.current(wait)
        if link is None:
            return None
        try:
            return link.send(head, *fields, tail=tail, blocks=blocks)
        except OSError:
            return None

    def close(self) -> None:
        """End the current link."""
        if self.link is not None:
            self.link.close()
