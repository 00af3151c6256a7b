"""The worker<->writer messages: frames, kinds, reply records and packet limits.

Workers talk to the writer over one AF_UNIX SOCK_SEQPACKET socketpair each (the
supervisor creates the pair when it spawns a worker and hands the writer its end with
SCM_RIGHTS over the control socket). A worker packet holds one or more messages, each
framed as ``length u16 | message`` (what its greenlets queued since its last send); a
writer packet holds the replies of one batch to that worker. Messages, native byte order::

    worker -> writer   req_id u32 | kind u8 | ...
        WRITE   ... | fid u64 | size u32 | adler32 u32 | n u16 | n x block u16
        DELETE  ... | fid u64
        KILL    (KILL_PD_WR)
        COMPACT ... | threshold ppm u32 (0xFFFFFFFF: --compact_threshold) | wait u8
                (new: the writer answers at once, or with wait when it has compacted
                the chunks at that threshold; compactor.py)
    writer -> worker   one or more replies per packet: (req_id u32 | error u8) x k

    supervisor -> writer  (control socket)   "L" owner u16 + one fd: a new worker link
    writer -> supervisor                     "R" index name | "E" one-line start error

This module imports nothing, so the worker and the supervisor can speak to the writer
without loading the writer and its store.
"""
from __future__ import annotations

import struct

HEAD = struct.Struct("=IB")  # req_id, kind: the start of every worker message
WRITE_MSG = struct.Struct("=IBQIIH")  # + n x block u16
FID_MSG = struct.Struct("=IBQ")
REPLY = struct.Struct("=IB")
OWNER = struct.Struct("=H")  # after "L" on the control socket
FRAME = struct.Struct("=H")  # length of the message that follows, in a worker's packet
COMPACT_MSG = struct.Struct("=IBIB")
KIND_WRITE, KIND_DELETE, KIND_KILL, KIND_COMPACT = 1, 2, 3, 4
MAX_MSG = 65536
PACKET_MAX = MAX_MSG  # bytes of framed messages a worker sends in one packet
REPLIES_PER_PACKET = 4096  # a packet of replies holds up to this many (20 KiB)
REPLY_PACKET_MAX = 65536  # what a worker receives at once: more than REPLIES_PER_PACKET replies
