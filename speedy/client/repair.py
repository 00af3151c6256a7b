"""`speedy admin repair GROUP`: bring every replica of a group back to the same files.

1. Inventory: each server's chunk files are streamed with DUMP_CHUNK (the chunk ids come
   from QUERY_DETAIL_INFOS) and parsed with speedy.format.chunkfile up to current_offset (the
   zero tail is never transferred: the connection is closed there). Every record's data
   is checked against its adler32 on the way.
2. Per fid, across the servers: live and intact, live but damaged, deleted, or absent.
   - deleted on a server (a deleted record and no live one there): a DELETE that did not
     reach every replica; it is deleted on the others too;
   - intact somewhere: READ from an intact replica (the server checks it again), then
     written to each server where it is absent, or damaged (DELETE first, then WRITE);
   - damaged everywhere: reported, left alone.
   Puts and deletes may run meanwhile: before a copy the target is read again, and a
   copy answered FILE_EXISTS is checked, so a file that an in-flight put wrote after the
   inventory is counted as in place, not as a failure.
The inventory holds one small entry per fid per server in memory.
"""
from __future__ import annotations

import sys
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TextIO

from speedy.client.chunkconn import ChunkConn, ChunkError, ConnPool, Reply
from speedy.format.chunkfile import (RECORD_HEADER_SIZE, SUPERBLOCK_SIZE, FormatError, RecordHeader,
                        Superblock, chunk_name)
from speedy.wire.protocol import Err, Op
from speedy.client.master import ERR, ServerInfo

EXIT_OK, EXIT_FAILED = 0, 3
BLOCK = 1 << 20


@dataclass
class Inventory:
    """What one server holds: fid -> intact?, and its deleted fids."""

    server: ServerInfo
    live: dict[int, bool] = field(default_factory=dict)   # fid -> data checksum ok
    deleted: set[int] = field(default_factory=set)
    error: str = ""
    bytes_read: int = 0
    notes: list[str] = field(default_factory=list)

    def intact(self, fid: int) -> bool:
        return self.live.get(fid, False)

    def deleted_only(self, fid: int) -> bool:
        return fid in self.deleted and fid not in self.live


class DumpReader:
    """The body of a DUMP_CHUNK answer, read on demand."""

    def __init__(self, conn: ChunkConn, size: int):
        self.conn, self.left, self.read_bytes = conn, size, 0

    def read(self, n: int) -> bytes:
        """Exactly n bytes (fewer only at the end of the dump)."""
        n = min(n, self.left)
        data = bytes(self.conn.recv_exact(n)) if n else b""
        self.left -= n
        self.read_bytes += n
        return data


def scan_dump(dump: DumpReader, inv: Inventory, name: str) -> None:
    """Parse a dumped chunk's records into inv."""
    try:
        sb = Superblock.decode(dump.read(SUPERBLOCK_SIZE))
    except FormatError as e:
        inv.notes.append(f"{name}: {e}; its records are not listed")
        return
    pos, end = SUPERBLOCK_SIZE, sb.current_offset
    while pos + RECORD_HEADER_SIZE <= end:
        head = dump.read(RECORD_HEADER_SIZE)
        if len(head) < RECORD_HEADER_SIZE:
            inv.notes.append(f"{name}: dump ends inside a record header at {pos}")
            return
        h = RecordHeader.decode(head)
        if pos + RECORD_HEADER_SIZE + h.size > end:
            inv.notes.append(f"{name}: record at {pos} runs past current_offset")
            return
        csum, left = 0, h.size
        while left:
            piece = dump.read(min(left, BLOCK))
            if not piece:
                inv.notes.append(f"{name}: dump ends inside record {h.fid}")
                return
            csum = zlib.adler32(piece, csum)
            left -= len(piece)
        if h.live:
            inv.live[h.fid] = inv.live.get(h.fid, False) or csum == h.checksum
        else:
            inv.deleted.add(h.fid)
        pos += RECORD_HEADER_SIZE + h.size


def take_inventory(pool: ConnPool, server: ServerInfo, group_id: int) -> Inventory:
    """Every record of every chunk of one server (inv.error when it cannot be read)."""
    inv = Inventory(server)
    try:
        chunks = [cid for cid, _avail in pool.detail_info(server.addr).chunks]
        for cid in chunks:
            name = chunk_name(group_id, cid)
            conn = ChunkConn(server.addr, pool.timeout, pool.connect_timeout)
            try:
                conn.send(Op.DUMP_CHUNK, [name.encode()])
                err, size = conn.recv_header(Op.DUMP_CHUNK)
                if err != Err.SUCCESS:
                    raise ChunkError(f"{server.name}: DUMP_CHUNK {name} answered "
                                     f"{Reply(err).err_name}")
                dump = DumpReader(conn, size)
                scan_dump(dump, inv, name)
                inv.bytes_read += dump.read_bytes
            finally:
                conn.close()  # the zero tail after current_offset is never read
    except ChunkError as e:
        inv.error = str(e)
    return inv


@dataclass
class RepairSummary:
    """What a repair did."""

    files: int = 0
    copied: int = 0
    rewritten: int = 0
    deleted: int = 0
    in_place: int = 0   # written meanwhile (by an in-flight put): nothing to do
    lost: list[int] = field(default_factory=list)
    failed: list[str] = field(default_factory=list)
    seconds: float = 0.0
    scanned_bytes: int = 0


def plan(invs: list[Inventory]) -> tuple[dict[int, list[Inventory]], dict[int, list[Inventory]],
                                         list[int], int]:
    """(fid -> servers to copy to, fid -> servers to delete on, lost fids, fid count)."""
    fids = set().union(*(set(i.live) | i.deleted for i in invs)) if invs else set()
    copy: dict[int, list[Inventory]] = {}
    delete: dict[int, list[Inventory]] = {}
    lost: list[int] = []
    for fid in sorted(fids):
        if any(i.deleted_only(fid) for i in invs):
            holders = [i for i in invs if fid in i.live]
            if holders:
                delete[fid] = holders
            continue
        if not any(i.intact(fid) for i in invs):
            if any(fid in i.live for i in invs):
                lost.append(fid)
            continue
        need = [i for i in invs if not i.intact(fid)]
        if need:
            copy[fid] = need
    return copy, delete, lost, len(fids)


def repair_group(pool: ConnPool, servers: list[ServerInfo], group_id: int,
                 dry_run: bool = False, out: TextIO = sys.stdout) -> RepairSummary:
    """Inventory every non-ERR server of the group, then copy and delete to match."""
    t0 = time.monotonic()
    rep = RepairSummary()
    members = [s for s in servers if s.status != ERR]
    for s in servers:
        if s.status == ERR:
            print(f"skipping {s.name}: ERR in the master", file=out)
    with ThreadPoolExecutor(max(1, len(members))) as ex:
        invs = list(ex.map(lambda s: take_inventory(pool, s, group_id), members))
    for inv in invs:
        rep.scanned_bytes += inv.bytes_read
        for note in inv.notes:
            print(f"{inv.server.name}: {note}", file=out)
        if inv.error:
            rep.failed.append(f"{inv.server.name}: cannot list its files: {inv.error}")
    good = [i for i in invs if not i.error]
    copy, delete, lost, rep.files = plan(good)
    rep.lost = lost
    for i in good:
        n_copy = sum(i in v for v in copy.values())
        n_del = sum(i in v for v in delete.values())
        print(f"{i.server.name}: {len(i.live)} live files, {n_copy} to copy, "
              f"{n_del} to delete", file=out)
    if dry_run:
        rep.copied = sum(len(v) for v in copy.values())
        rep.deleted = sum(len(v) for v in delete.values())
        rep.seconds = time.monotonic() - t0
        return rep
    apply_plan(pool, good, group_id, copy, delete, rep)
    rep.seconds = time.monotonic() - t0
    return rep


def apply_plan(pool: ConnPool, good: list[Inventory], group_id: int,
               copy: dict[int, list[Inventory]], delete: dict[int, list[Inventory]],
               rep: RepairSummary) -> None:
    """Delete and copy as planned, counting into rep."""
    for fid, holders in delete.items():
        for i in holders:
            r = _call(pool, lambda: pool.delete(i.server.addr, group_id, fid))
            if r in (Err.SUCCESS, Err.FILE_NOT_FOUND):
                rep.deleted += 1
            else:
                rep.failed.append(f"{i.server.name}: DELETE {group_id},{fid}: {r}")
    for fid, targets in copy.items():
        data = None
        for src in [i for i in good if i.intact(fid)]:
            try:
                reply = pool.read(src.server.addr, group_id, fid)
            except ChunkError:
                continue
            if reply.ok:
                data = reply.body
                break
        if data is None:
            rep.failed.append(f"{group_id},{fid}: no intact replica could be read")
            continue
        for t in targets:
            damaged = fid in t.live
            if not damaged and _holds(pool, t.server, group_id, fid, data):
                rep.in_place += 1
                continue
            if damaged:
                _call(pool, lambda: pool.delete(t.server.addr, group_id, fid))
            r = _call(pool, lambda: pool.write(t.server.addr, group_id, fid, data))
            if r == Err.SUCCESS:
                rep.rewritten += damaged
                rep.copied += not damaged
            elif r == Err.FILE_EXISTS and _holds(pool, t.server, group_id, fid, data):
                rep.in_place += 1
            else:
                rep.failed.append(f"{t.server.name}: WRITE {group_id},{fid}: {r}")
        data = None


def _holds(pool: ConnPool, server: ServerInfo, group_id: int, fid: int,
           data: bytes) -> bool:
    """True if server answers READ of fid with exactly data (an in-flight put wrote it)."""
    try:
        reply = pool.read(server.addr, group_id, fid)
    except ChunkError:
        return False
    return reply.ok and bytes(reply.body) == bytes(data)


def _call(pool: ConnPool, fn) -> int | str:
    """The error code of a request, or the connection error as text."""
    try:
        return fn().err
    except ChunkError as e:
        return str(e)


def run(client, group_id: int, dry_run: bool = False, out: TextIO = sys.stdout) -> int:
    """The CLI entry: repair group_id through client's master and pool; exit code."""
    servers = client.master.group_info(group_id)
    if not servers:
        print(f"speedy: group {group_id} has no registered chunkserver", file=out)
        return EXIT_FAILED
    rep = repair_group(client.pool, servers, group_id, dry_run, out)
    verb = "would copy" if dry_run else "copied"
    print(f"group {group_id}: {rep.files} fids on {len(servers)} servers; {verb} "
          f"{rep.copied}, rewrote {rep.rewritten} damaged, deleted {rep.deleted}; "
          f"{rep.in_place} written meanwhile by puts; "
          f"{len(rep.lost)} damaged on every replica; {len(rep.failed)} failures; "
          f"scanned {rep.scanned_bytes} bytes in {rep.seconds:.2f} s", file=out)
    for f in rep.failed[:20]:
        print(f"  failed: {f}", file=out)
    for fid in rep.lost[:20]:
        print(f"  lost: {group_id},{fid}", file=out)
    return EXIT_OK if not rep.failed and not rep.lost else EXIT_FAILED
