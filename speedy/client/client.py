"""The speedy client library: put/get/delete/stat of blobs on a speedy cluster.

    from speedy.client import Client
    with Client("127.0.0.1:8099") as c:
        key = c.put(b"hello")            # "3,10452" (or "3,10452m" for a multi-part file)
        assert c.get(key) == b"hello"
        c.delete(key)

Plain threads and sockets: importing this module patches nothing (no gevent).
"""
from __future__ import annotations

import io
import os
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import BinaryIO, Callable, Iterator

from speedy.client.chunkconn import ChunkError, ConnPool, Reply, format_addr
from speedy.client.pipeline import LARGE_ANSWER, PipeSet
from speedy.wire.manifest import MAGIC as MANIFEST_MAGIC
from speedy.wire.manifest import (Key, KeyFormatError, Manifest, ManifestError, Part, as_key,
                       digest, parse_key)
from speedy.wire.protocol import Err, WriteOutcome, write_outcome
from speedy.client.master import (DEFAULT_MASTER, ERR, INIT, RO, RW,
                      STATUS_CODES, STATUS_NAMES, ClusterError, FidAllocator,
                      IntegrityError, Master, MasterError, NotFoundError, Route,
                      ServerInfo, SpeedyError, UploadError, choose_group,
                      explain_no_group, master_address, not_multipart, read_order,
                      upload_error)

__all__ = ["Client", "Stat", "ServerInfo", "Route", "Master", "FidAllocator",
           "SpeedyError", "ClusterError", "NotFoundError", "IntegrityError",
           "UploadError", "MasterError", "KeyFormatError", "Key", "parse_key",
           "choose_group", "explain_no_group", "read_order", "DEFAULT_MASTER",
           "DEFAULT_PART_SIZE", "INIT", "RW", "RO", "ERR", "STATUS_NAMES", "STATUS_CODES"]

DEFAULT_PART_SIZE = 4 << 20
LARGE_READ = LARGE_ANSWER  # pipelined clients read blobs this large on their own connection
UNDO_ATTEMPTS = 4          # DELETEs of a failed put's fid per server, at most
UNDO_BACKOFF = 0.25        # seconds before the 2nd attempt, doubled after each
Progress = Callable[[int, "int | None"], None]


@dataclass
class Stat:
    """What stat(key) found."""

    key: str
    size: int
    multipart: bool
    parts: int
    replicas: list[str]          # servers that hold the (manifest) blob
    missing: list[str]           # servers of the group that do not, or did not answer
    part_keys: list[str] = field(default_factory=list)


def read_full(f: BinaryIO, n: int) -> bytes:
    """Up to n bytes from f, fewer only at end of file."""
    chunks, got = [], 0
    while got < n:
        b = f.read(n - got)
        if not b:
            break
        chunks.append(b)
        got += len(b)
    return b"".join(chunks)


class Client:
    """A speedy cluster, seen through its master."""

    def __init__(self, master: str = DEFAULT_MASTER, *, token: str | None = None,
                 timeout: float = 10.0, connect_timeout: float = 3.0,
                 master_timeout: float = 5.0, part_size: int = DEFAULT_PART_SIZE,
                 parallel: int = 4, min_replicas: int = 2, route_ttl: float = 5.0,
                 write_attempts: int = 3, undo_attempts: int = UNDO_ATTEMPTS,
                 pipelined: bool = False):
        """pipelined: READs share a few connections per chunkserver, answered in order
        (speedy.client.pipeline): for a process with many concurrent readers."""
        if part_size < 1:
            raise ValueError("part_size must be >= 1")
        self.master = Master(master_address(master), token, master_timeout)
        self.pool = ConnPool(timeout, connect_timeout)
        self.reads: ConnPool | PipeSet = PipeSet(timeout, connect_timeout) if pipelined \
            else self.pool   # where READs go
        self.fids = FidAllocator(self.master.fid_range)
        self.part_size = part_size
        self.parallel = max(1, parallel)
        self.min_replicas = min_replicas
        self.route_ttl = route_ttl
        self.write_attempts = max(1, write_attempts)
        self.undo_attempts = max(1, undo_attempts)
        self._route: Route | None = None
        self._route_lock = threading.Lock()
        self._pools_lock = threading.Lock()
        self._io: ThreadPoolExecutor | None = None
        self._parts: ThreadPoolExecutor | None = None

    # -- plumbing ----------------------------------------------------------------------

    def __enter__(self) -> "Client":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the worker threads and close pooled connections."""
        with self._pools_lock:
            for ex in (self._io, self._parts):
                if ex is not None:
                    ex.shutdown(wait=True, cancel_futures=True)
            self._io = self._parts = None
        self.pool.close()
        if self.reads is not self.pool:
            self.reads.close()

    def _executor(self, kind: str) -> ThreadPoolExecutor:
        with self._pools_lock:
            if kind == "io":
                if self._io is None:
                    self._io = ThreadPoolExecutor(max(16, 4 * self.parallel),
                                                  thread_name_prefix="speedy-io")
                return self._io
            if self._parts is None:
                self._parts = ThreadPoolExecutor(self.parallel,
                                                 thread_name_prefix="speedy-part")
            return self._parts

    def route(self, force: bool = False) -> Route:
        """The route, refetched when older than route_ttl (a stale one if the master fails)."""
        r = self._route   # the fresh route needs no lock
        if not force and self._fresh(r):
            return r
        with self._route_lock:
            r = self._route
            if not force and self._fresh(r):   # another thread fetched it meanwhile
                return r
            try:
                self._route = self.master.route()
            except ClusterError:
                if r is None:
                    raise
                r.fetched = time.monotonic() - self.route_ttl + 1.0  # retry in 1 s
            return self._route

    def _fresh(self, r: Route | None) -> bool:
        """Whether route r was fetched less than route_ttl ago."""
        return r is not None and time.monotonic() - r.fetched < self.route_ttl

    def invalidate_route(self) -> None:
        """Refetch the route on next use (after an error)."""
        with self._route_lock:
            if self._route is not None:
                self._route.fetched = 0.0

    def _group(self, group_id: int) -> list[ServerInfo]:
        """The servers of a group (route refreshed once if it is missing)."""
        route = self.route()
        servers = route.groups.get(group_id)
        if not servers and time.monotonic() - route.fetched > 1.0:
            servers = self.route(force=True).groups.get(group_id)
        if not servers:
            raise NotFoundError(f"group {group_id} is not in the master's route")
        return servers

    def _fan_out(self, fn: Callable[[ServerInfo], Reply],
                 servers: list[ServerInfo]) -> list[Reply | ChunkError]:
        """fn on every server at once; a Reply or the ChunkError per server."""
        def run(s: ServerInfo) -> Reply | ChunkError:
            try:
                return fn(s)
            except ChunkError as e:
                return e
        if len(servers) == 1:
            return [run(servers[0])]
        futures = [self._executor("io").submit(run, s) for s in servers]
        return [f.result() for f in futures]

    # -- writes ------------------------------------------------------------------------

    def put(self, data: bytes | bytearray | memoryview | BinaryIO, *,
            progress: Progress | None = None, size: int | None = None) -> str:
        """Store bytes or a binary file object's contents; returns the new key.

        Larger than part_size: stored as parts plus a manifest, key "<g>,<fid>m".
        size is only a hint for progress reports of file objects.
        """
        if isinstance(data, str):
            raise TypeError("put() takes bytes or a binary file; use put_file(path)")
        if isinstance(data, (bytes, bytearray, memoryview)):
            view = memoryview(data).cast("B")
            total = len(view)
            if total <= self.part_size:
                key = self._put_blob(view)
                if progress:
                    progress(total, total)
                return str(key)
            parts: Iterator = (view[i:i + self.part_size]
                               for i in range(0, total, self.part_size))
            return str(self._put_multipart(parts, progress, total))
        first = read_full(data, self.part_size + 1)
        if len(first) <= self.part_size:
            key = self._put_blob(first)
            if progress:
                progress(len(first), len(first))
            return str(key)
        return str(self._put_multipart(self._file_parts(data, first), progress, size))

    def put_file(self, path: str, *, progress: Progress | None = None) -> str:
        """Store the file at path; returns the new key."""
        with open(path, "rb") as f:
            try:
                size = os.fstat(f.fileno()).st_size or None
            except OSError:
                size = None
            return self.put(f, progress=progress, size=size)

    def _file_parts(self, f: BinaryIO, first: bytes) -> Iterator[bytes]:
        """Parts of exactly part_size bytes (the last may be shorter)."""
        yield first[:self.part_size]
        rest = first[self.part_size:]
        while True:
            chunk = rest + read_full(f, self.part_size - len(rest))
            rest = b""
            if not chunk:
                return
            yield chunk

    def _put_blob(self, data: bytes | memoryview) -> Key:
        """Write one blob to every RW server of a group; retried with a new fid."""
        size = len(data)
        failed: set[int] = set()
        cleaned: list[str] = []
        orphans: dict[str, str] = {}
        last: SpeedyError | None = None
        for attempt in range(self.write_attempts):
            if attempt:
                time.sleep(min(0.25 * 2 ** attempt, 2.0))
            route = self.route(force=attempt > 0)
            g = choose_group(route.groups, size, self.min_replicas, failed)
            if g is None and failed:
                g = choose_group(route.groups, size, self.min_replicas)
            if g is None:
                why = explain_no_group(route.groups, size, self.min_replicas)
                if f"need {self.min_replicas}" in why:
                    why += " (fewer replicas: --min-replicas, Client(min_replicas=))"
                last = ClusterError(why)
                continue
            servers = [s for s in route.groups[g] if s.status == RW]
            fid = self.fids.take()
            replies = self._fan_out(lambda s: self.pool.write(s.addr, g, fid, data), servers)
            if all(isinstance(r, Reply) and r.ok for r in replies):
                return Key(g, fid)
            why = "; ".join(str(r) if isinstance(r, ChunkError) else f"{s.name}: {r.err_name}"
                            for s, r in zip(servers, replies)
                            if not (isinstance(r, Reply) and r.ok))
            # Delete wherever the write may have landed: SUCCESS, or an "unknown" outcome
            # (WRITE_ERROR, INTERNAL_ERROR, no answer). Refused-before-I/O answers stored
            # nothing (and FILE_EXISTS is someone else's file: keep it).
            maybe = [s for s, r in zip(servers, replies)
                     if write_outcome(r.err if isinstance(r, Reply) else None)
                     != WriteOutcome.NOT_STORED]
            left = self._undo_write(Key(g, fid), maybe)
            orphans.update({f"{g},{fid}@{name}": reason for name, reason in left.items()})
            cleaned.append(f"{g},{fid}")
            failed.add(g)
            self.invalidate_route()
            last = UploadError(f"write of {size} bytes to group {g} failed ({why})")
        msg = str(last) + (f" after {self.write_attempts} attempts"
                           if self.write_attempts > 1 else "")
        raise upload_error(msg, cleaned, orphans)

    def _undo_write(self, key: Key, servers: list[ServerInfo]) -> dict[str, str]:
        """DELETE key on servers until each answers SUCCESS or FILE_NOT_FOUND (at most
        undo_attempts rounds, no new round after one socket timeout's worth of time);
        {server: last reason} of those where it may still be readable."""
        left: dict[str, str] = {}
        t0 = time.monotonic()
        for attempt in range(self.undo_attempts):
            if attempt and time.monotonic() - t0 > self.pool.timeout:
                break
            if attempt:
                time.sleep(UNDO_BACKOFF * 2 ** (attempt - 1))
            replies = self._fan_out(
                lambda s: self.pool.delete(s.addr, key.group_id, key.fid), servers)
            left = {s.name: (str(r).removeprefix(f"{s.name}: ") if isinstance(r, ChunkError)
                             else r.err_name)
                    for s, r in zip(servers, replies)
                    if not (isinstance(r, Reply) and r.err in (Err.SUCCESS, Err.FILE_NOT_FOUND))}
            servers = [s for s in servers if s.name in left]
            if not servers:
                break
        return left

    def _put_part(self, data: bytes | memoryview) -> Part:
        key = self._put_blob(data)
        return Part(key.group_id, key.fid, len(data), digest(data))

    def _put_multipart(self, chunks: Iterator, progress: Progress | None,
                       total: int | None) -> Key:
        """Upload parts concurrently (at most `parallel` in flight), then the manifest."""
        pool = self._executor("parts")
        inflight: deque[Future] = deque()
        parts: list[Part] = []
        done = 0
        try:
            for chunk in chunks:
                inflight.append(pool.submit(self._put_part, chunk))
                while len(inflight) >= self.parallel:
                    parts.append(inflight.popleft().result())
                    done += parts[-1].size
                    if progress:
                        progress(done, total)
            while inflight:
                parts.append(inflight.popleft().result())
                done += parts[-1].size
                if progress:
                    progress(done, total)
            manifest = Manifest(done, self.part_size, parts).encode()
            key = self._put_blob(manifest)
            return Key(key.group_id, key.fid, True)
        except BaseException as e:
            for f in inflight:
                f.cancel()
            for f in inflight:
                try:
                    parts.append(f.result())
                except BaseException:
                    pass
            cleaned = [str(p.key) for p in parts]
            orphans = {f"{p.key}@{name}": why for p in parts
                       for name, why in self._undo_write(p.key, self._members(p.key)).items()}
            if isinstance(e, UploadError):
                orphans.update(getattr(e, "reasons", dict.fromkeys(e.orphans, "unknown")))
                raise upload_error(getattr(e, "message", str(e)), cleaned + e.cleaned,
                                   orphans) from None
            if isinstance(e, SpeedyError):
                raise upload_error(f"multi-part upload failed: {e}", cleaned, orphans) from e
            raise

    def _members(self, key: Key) -> list[ServerInfo]:
        """The servers of key's group ([] when the route does not know it)."""
        try:
            return self._group(key.group_id)
        except SpeedyError:
            return []

    def _delete_quietly(self, key: Key, servers: list[ServerInfo] | None = None) -> list[str]:
        """DELETE a blob wherever possible; the servers it may still be on."""
        if servers is None:
            try:
                servers = self._group(key.group_id)
            except SpeedyError:
                return [f"group {key.group_id}"]
        replies = self._fan_out(lambda s: self.pool.delete(s.addr, key.group_id, key.fid),
                                servers)
        return [s.name for s, r in zip(servers, replies)
                if not (isinstance(r, Reply) and r.err in (Err.SUCCESS, Err.FILE_NOT_FOUND))]

    # -- reads -------------------------------------------------------------------------

    def _read_blob(self, key: Key, verify: Callable[[bytes], bool] | None = None, *,
                   large: bool = False):
        """A blob's bytes from the first replica that has them, RW servers first. large:
        on a connection of its own, not behind others on a pipe (pipelined clients)."""
        not_found, errors = [], []
        damaged = False
        reads = self.pool if large else self.reads
        for s in read_order(self._group(key.group_id)):
            try:
                r = reads.read(s.addr, key.group_id, key.fid)
            except ChunkError as e:
                errors.append(str(e))
                self.invalidate_route()
                continue
            if r.ok and (verify is None or verify(r.body)):
                return r.body
            if r.err == Err.FILE_NOT_FOUND:
                not_found.append(s.name)
                continue
            damaged = damaged or r.ok or r.err == Err.READ_ERROR
            errors.append(f"{s.name}: {r.err_name if not r.ok else 'bad checksum'}")
        if not_found and not damaged:
            raise NotFoundError(f"{key} not found"
                                + (f" ({'; '.join(errors)})" if errors else ""))
        cls = IntegrityError if damaged else ClusterError
        raise cls(f"cannot read {key}: {'; '.join(errors)}")

    def _read_manifest(self, key: Key) -> Manifest:
        """The manifest of a multi-part key (NotFoundError naming key, with its m)."""
        plain: list[bool] = []

        def valid(body: bytes) -> bool:
            try:
                Manifest.decode(body)
                return True
            except ManifestError:
                plain.append(bytes(body[:len(MANIFEST_MAGIC)]) != MANIFEST_MAGIC)
                return False
        try:
            return Manifest.decode(self._read_blob(key.blob(), valid))
        except NotFoundError as e:
            text, blob = str(e), f"{key.blob()} not found"
            raise NotFoundError(f"{key} not found" + text[len(blob):]
                                if text.startswith(blob) else text) from None
        except IntegrityError:
            if plain and all(plain):
                raise not_multipart(key) from None
            raise

    def _read_part(self, key: Key, i: int, part: Part) -> bytes:
        """One part, verified against its size and sha256."""
        try:
            return self._read_blob(part.key, lambda b: len(b) == part.size
                                   and digest(b) == part.sha256,
                                   large=part.size >= LARGE_READ)
        except NotFoundError:
            raise IntegrityError(f"{key}: part {i} ({part.key}) is missing") from None
        except ClusterError as e:
            raise IntegrityError(f"{key}: part {i}: {e}") from None

    def manifest(self, key: str | Key) -> Manifest:
        """The manifest (total size, parts) of a multi-part key; for reading it in parts."""
        return self._read_manifest(as_key(key))

    def read_part(self, key: str | Key, i: int, part: Part) -> bytes:
        """Part i of a multi-part key's manifest, verified against its size and sha256."""
        return self._read_part(as_key(key), i, part)

    def read(self, key: str | Key, *, size_hint: int | None = None) -> bytes | bytearray:
        """The bytes of a plain key as they were received (no copy). size_hint: the size
        the caller expects, when it knows (a large blob skips the shared pipes)."""
        k = as_key(key)
        if k.multipart:
            raise ValueError(f"{k} is a multi-part key: use get_to or read_part")
        return self._read_blob(k, large=size_hint is not None and size_hint >= LARGE_READ)

    def get(self, key: str | Key) -> bytes:
        """The bytes stored under key."""
        k = as_key(key)
        if not k.multipart:
            return bytes(self._read_blob(k))
        out = io.BytesIO()
        self.get_to(k, out)
        return out.getvalue()

    def get_to(self, key: str | Key, out: BinaryIO, *,
               progress: Progress | None = None) -> int:
        """Stream the bytes under key to out (at most two parts in memory); the size."""
        k = as_key(key)
        if not k.multipart:
            body = self._read_blob(k)
            out.write(body)
            if progress:
                progress(len(body), len(body))
            return len(body)
        m = self._read_manifest(k)
        done = 0
        nxt: Future | None = None
        try:
            if m.parts:
                nxt = self._executor("io").submit(self._read_part, k, 0, m.parts[0])
            for i in range(len(m.parts)):
                data = nxt.result()
                nxt = None
                if i + 1 < len(m.parts):
                    nxt = self._executor("io").submit(self._read_part, k, i + 1,
                                                      m.parts[i + 1])
                out.write(data)
                done += len(data)
                del data
                if progress:
                    progress(done, m.total_size)
        finally:
            if nxt is not None:
                nxt.cancel()
        return done

    def stat(self, key: str | Key) -> Stat:
        """Size, parts and the replicas that hold key (READs every replica)."""
        k = as_key(key)
        servers = self._group(k.group_id)
        replies = self._fan_out(lambda s: self.reads.read(s.addr, k.group_id, k.fid), servers)
        have = [(s, r) for s, r in zip(servers, replies) if isinstance(r, Reply) and r.ok]
        missing = [s.name for s, r in zip(servers, replies)
                   if not (isinstance(r, Reply) and r.ok)]
        if not have:
            if any(isinstance(r, Reply) and r.err == Err.FILE_NOT_FOUND for r in replies):
                raise NotFoundError(f"{k} not found")
            raise ClusterError(f"cannot stat {k}: no replica answered")
        body = have[0][1].body
        if not k.multipart:
            return Stat(str(k), len(body), False, 1, [s.name for s, _ in have], missing)
        try:
            m = Manifest.decode(body)
        except ManifestError as e:
            if not bytes(body[:len(MANIFEST_MAGIC)]) == MANIFEST_MAGIC:
                raise not_multipart(k) from None
            raise IntegrityError(f"{k}: {e}") from None
        return Stat(str(k), m.total_size, True, len(m.parts), [s.name for s, _ in have],
                    missing, [str(p.key) for p in m.parts])

    # -- delete ------------------------------------------------------------------------

    def delete(self, key: str | Key) -> list[str]:
        """Delete key from every replica it can reach; the servers it could not.

        NotFoundError when every replica that answered says it has no such key;
        ClusterError when no replica answered. A multi-part key loses its manifest first, then parts.
        """
        k = as_key(key)
        if not k.multipart:
            return self._delete_blob(k)
        m = self._read_manifest(k)
        missed = set(self._delete_blob(k.blob()))
        for p in m.parts:
            missed.update(self._delete_quietly(p.key))
        return sorted(missed)

    def _delete_blob(self, key: Key) -> list[str]:
        servers = self._group(key.group_id)
        replies = self._fan_out(lambda s: self.pool.delete(s.addr, key.group_id, key.fid),
                                servers)
        answered = [r for r in replies if isinstance(r, Reply)]
        if not answered:
            self.invalidate_route()
            raise ClusterError(f"cannot delete {key}: no replica reachable ("
                               + "; ".join(str(r) for r in replies) + ")")
        if all(r.err == Err.FILE_NOT_FOUND for r in answered):
            silent = [s.name for s, r in zip(servers, replies) if not isinstance(r, Reply)]
            raise NotFoundError(f"{key} not found" + (
                f" (no answer from {', '.join(silent)})" if silent else ""))
        missed = [s for s, r in zip(servers, replies)
                  if not (isinstance(r, Reply) and r.err in (Err.SUCCESS, Err.FILE_NOT_FOUND))]
        if missed:  # the master finishes them; meanwhile nobody reads from those servers
            self.master.record_pending_deletes(key.group_id, key.fid, missed)
            self.invalidate_route()
        return [s.name for s in missed]

    # -- cluster -----------------------------------------------------------------------

    def servers(self) -> list[ServerInfo]:
        """Every registered chunkserver (ERR ones too), sorted by group and address."""
        listed = self.master.all_servers()
        if listed is not None:
            return sorted(listed, key=lambda s: (s.group_id, s.ip, s.port))
        groups = self.route(force=True).groups
        out: list[ServerInfo] = []
        for g in sorted(groups):
            try:
                out += self.master.group_info(g)
            except MasterError:
                out += groups[g]
        return sorted(out, key=lambda s: (s.group_id, s.ip, s.port))

    def add_server(self, group_id: int, host: str, port: int) -> None:
        """Register a chunkserver with the master (status INIT until it reports)."""
        self.master.init_server(group_id, host, port)
        self.invalidate_route()

    def remove_server(self, group_id: int, host: str, port: int) -> None:
        """Drop a chunkserver from the master's registry; NotFoundError if it is not there."""
        try:
            self.master.request("POST", "/v1/chunkserver/removeserver",
                                {"GroupId": group_id, "Ip": host, "Port": port})
        except MasterError as e:
            if e.status == 404:
                raise NotFoundError(f"{format_addr((host, port))} is not registered in "
                                    f"group {group_id}") from None
            raise
        self.invalidate_route()

    def set_server_status(self, host: str, port: int, status: int | str) -> None:
        """Set a chunkserver's status in the master: RW, RO or ERR (or 1, 2, 3)."""
        code = STATUS_CODES.get(str(status).lower(), status)
        if code not in (RW, RO, ERR):
            raise ValueError(f"status must be rw, ro or err, not {status!r}")
        self.master.set_status(host, port, int(code))
        self.invalidate_route()

