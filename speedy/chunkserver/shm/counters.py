"""Shared counters of one chunkserver: a header the writer publishes plus one slot per worker.

One small ``multiprocessing.shared_memory`` segment of native u64 words::

    word 0             MAGIC
    words 1..31        server values (SERVER_FIELDS): status, writer figures
    words 32..431      up to MAX_CHUNKS pairs (chunk_id, avail_space), n in "n_chunks"
    words 432..831     the same chunks' (garbage_bytes, used bytes) (store/compact.py)
    then n_slots x SLOT_WORDS: one slot per worker
        GAUGES + COUNTERS                    (conn_count ... write_bytes)
        per opcode: requests | latency_us_sum | len(BUCKETS)+1 bucket counts (last:
                    above the last bound) | len(Err) answers by error code (0 unused)

Each worker writes only its own slot and the writer only the server values, so no lock
is needed; readers sum the slots (totals()). Aligned u64 stores do not tear on the
machines this runs on; a sum may be a moment old, which is fine for statistics.
"""
from __future__ import annotations

from multiprocessing import shared_memory

from speedy.format.chunkfile import chunk_name
from speedy.common.config import MAX_CHUNKS
from speedy.common.metrics import LATENCY_BUCKETS, bucket_index
from speedy.chunkserver.shm.segments import attach_segment, create_segment
from speedy.wire.protocol import Err, Op, ServerStatus

MAGIC = 0x5350595354415453  # "SPYSTATS"
SERVER_FIELDS = ("admin_status", "store_failed", "pending_writes", "file_count",
                 "recovery_us", "commits", "fsyncs", "committed_writes", "index_bytes",
                 "n_chunks", "writer_pid", "batches", "max_batch",
                 "compacting", "compactions", "compact_freed", "compact_moved",
                 "compact_max_slice_us")
SERVER_WORDS = 32
CHUNK_BASE = SERVER_WORDS
GARBAGE_BASE = CHUNK_BASE + 2 * MAX_CHUNKS
HEADER_WORDS = GARBAGE_BASE + 2 * MAX_CHUNKS
GAUGES = ("conn_count", "reading", "writing")
COUNTERS = ("read_count", "write_count", "read_error", "write_error", "read_bytes",
            "write_bytes", "accepted", "dropped_idle")
OPS = tuple(Op)
OP_INDEX = {int(op): i for i, op in enumerate(OPS)}
BUCKETS = LATENCY_BUCKETS
N_COUNTS = len(BUCKETS) + 1
N_CODES = len(Err)
OP_WORDS = 2 + N_COUNTS + N_CODES
SLOT_FIELDS = GAUGES + COUNTERS
SLOT_WORDS = len(SLOT_FIELDS) + len(OPS) * OP_WORDS
_SERVER_INDEX = {name: 1 + i for i, name in enumerate(SERVER_FIELDS)}
_SLOT_INDEX = {name: i for i, name in enumerate(SLOT_FIELDS)}
assert len(SERVER_FIELDS) < SERVER_WORDS


class WorkerStats:
    """One worker's slot: attribute-style counters written only by that worker."""

    __slots__ = ("words", "base")

    def __init__(self, words: memoryview, slot: int) -> None:
        self.words = words
        self.base = HEADER_WORDS + slot * SLOT_WORDS

    def add(self, name: str, n: int = 1) -> None:
        """Add n to a gauge or counter (n may be negative for a gauge)."""
        i = self.base + _SLOT_INDEX[name]
        self.words[i] = max(0, self.words[i] + n)

    def get(self, name: str) -> int:
        """One value of this slot."""
        return self.words[self.base + _SLOT_INDEX[name]]

    def observe(self, op: int, err: int, seconds: float) -> None:
        """Count one answered request of opcode op: its error code and its latency."""
        i = OP_INDEX.get(op)
        if i is None:
            return
        w = self.words
        at = self.base + len(SLOT_FIELDS) + i * OP_WORDS
        w[at] += 1
        w[at + 1] += int(seconds * 1e6)
        w[at + 2 + bucket_index(BUCKETS, seconds)] += 1
        if 0 < err < N_CODES:
            w[at + 2 + N_COUNTS + err] += 1

    def reset_gauges(self) -> None:
        """Zero the gauges (the slot's worker died; counters stay)."""
        for name in GAUGES:
            self.words[self.base + _SLOT_INDEX[name]] = 0


class StatsView:
    """The whole segment: server values, chunks, worker slots, and their sums."""

    def __init__(self, shm: shared_memory.SharedMemory, n_slots: int) -> None:
        self.shm = shm
        self.name = shm.name
        self.n_slots = n_slots
        self.words = shm.buf.cast("Q")

    @staticmethod
    def segment_size(n_slots: int) -> int:
        """Bytes of a segment with n_slots worker slots."""
        return 8 * (HEADER_WORDS + n_slots * SLOT_WORDS)

    @classmethod
    def create(cls, name: str, n_slots: int) -> "StatsView":
        """A new zeroed segment (the supervisor, before forking)."""
        view = cls(create_segment(name, cls.segment_size(n_slots)), n_slots)
        view.words[0] = MAGIC
        return view

    @classmethod
    def attach(cls, name: str) -> "StatsView":
        """Attach by name (tools and tests)."""
        shm = attach_segment(name)
        n = (shm.size // 8 - HEADER_WORDS) // SLOT_WORDS
        view = cls(shm, n)
        if view.words[0] != MAGIC:
            view.close()
            raise ValueError(f"{name} is not a speedy stats segment")
        return view

    # -- server values (written by the writer, status also by workers)
    def set(self, name: str, value: int) -> None:
        """Publish one server value."""
        self.words[_SERVER_INDEX[name]] = value

    def get(self, name: str) -> int:
        """One server value."""
        return self.words[_SERVER_INDEX[name]]

    def add(self, name: str, n: int = 1) -> None:
        """Add to a server value (writer only)."""
        self.words[_SERVER_INDEX[name]] += n

    def status(self) -> int:
        """The effective status: RO if an admin set it or the store failed."""
        w = self.words
        if w[_SERVER_INDEX["admin_status"]] or w[_SERVER_INDEX["store_failed"]]:
            return ServerStatus.RO
        return ServerStatus.RW

    def set_chunks(self, chunks: list[tuple[int, int]]) -> None:
        """Publish (chunk_id, avail_space) of every chunk."""
        w = self.words
        chunks = chunks[:MAX_CHUNKS]
        for i, (cid, avail) in enumerate(chunks):
            w[CHUNK_BASE + 2 * i] = cid
            w[CHUNK_BASE + 2 * i + 1] = avail
        self.set("n_chunks", len(chunks))

    def set_garbage(self, garbage: list[tuple[int, int]]) -> None:
        """Publish (garbage_bytes, used bytes) of the chunks, in set_chunks' order."""
        w = self.words
        for i, (g, used) in enumerate(garbage[:MAX_CHUNKS]):
            w[GARBAGE_BASE + 2 * i] = g
            w[GARBAGE_BASE + 2 * i + 1] = used

    def garbage(self) -> list[tuple[int, int, int, int]]:
        """(chunk_id, garbage_bytes, used bytes, avail_space) per chunk."""
        w = self.words
        return [(cid, w[GARBAGE_BASE + 2 * i], w[GARBAGE_BASE + 2 * i + 1], avail)
                for i, (cid, avail) in enumerate(self.chunks())]

    def chunks(self) -> list[tuple[int, int]]:
        """(chunk_id, avail_space) as the writer last published them."""
        w = self.words
        n = min(self.get("n_chunks"), MAX_CHUNKS)
        return [(w[CHUNK_BASE + 2 * i], w[CHUNK_BASE + 2 * i + 1]) for i in range(n)]

    # -- worker slots
    def worker(self, slot: int) -> WorkerStats:
        """The slot of worker number slot."""
        if not 0 <= slot < self.n_slots:
            raise IndexError(f"no stats slot {slot}")
        return WorkerStats(self.words, slot)

    def sum(self, name: str) -> int:
        """One gauge or counter summed over every worker slot."""
        w, i = self.words, HEADER_WORDS + _SLOT_INDEX[name]
        return sum(w[i + s * SLOT_WORDS] for s in range(self.n_slots))

    def totals(self, group_id: int = 0) -> dict:
        """Every figure of the server: worker slots summed, server values, chunks, per opcode.

        Keys: the SLOT_FIELDS and SERVER_FIELDS, status, recovery_seconds, chunks
        [(chunk_id, avail)], and the keys speedy.chunkserver.metrics.families() reads
        (requests, errors, latency, files, connections, read_only, pending_writes,
        reads_in_flight, writes_in_flight, chunk_free_bytes: named with group_id).
        """
        w = self.words
        out: dict = {name: 0 for name in SLOT_FIELDS}
        requests = {op: 0 for op in OPS}
        errors: dict = {}
        latency = {op: {"counts": [0] * N_COUNTS, "sum": 0.0} for op in OPS}
        for s in range(self.n_slots):
            base = HEADER_WORDS + s * SLOT_WORDS
            for i, name in enumerate(SLOT_FIELDS):
                out[name] += w[base + i]
            for j, op in enumerate(OPS):
                at = base + len(SLOT_FIELDS) + j * OP_WORDS
                if not w[at]:
                    continue
                requests[op] += w[at]
                h = latency[op]
                h["sum"] += w[at + 1] / 1e6
                counts = h["counts"]
                for k in range(N_COUNTS):
                    counts[k] += w[at + 2 + k]
                for code in range(1, N_CODES):
                    n = w[at + 2 + N_COUNTS + code]
                    if n:
                        errors[(op, Err(code))] = errors.get((op, Err(code)), 0) + n
        for name in SERVER_FIELDS:
            out[name] = self.get(name)
        chunks = self.chunks()
        out.update(
            status=int(self.status()), recovery_seconds=out["recovery_us"] / 1e6,
            compact_max_slice_seconds=out["compact_max_slice_us"] / 1e6,
            chunks=chunks, requests=requests, errors=errors, latency=latency,
            files=out["file_count"], connections=out["conn_count"],
            read_only=int(self.status()), reads_in_flight=out["reading"],
            writes_in_flight=out["writing"],
            chunk_free_bytes={chunk_name(group_id, cid) if group_id else str(cid): avail
                              for cid, avail in chunks},
            chunk_garbage_bytes={chunk_name(group_id, cid) if group_id else str(cid): g
                                 for cid, g, _used, _avail in self.garbage()})
        return out

    def close(self) -> None:
        """Unmap."""
        self.words.release()
        try:
            self.shm.close()
        except BufferError:  # pragma: no cover
            pass
