"""The load generator of ``speedy bench``: processes x threads x persistent connections.

``LoadGenerator`` forks ``procs`` processes; each holds its share of the C connections
(raw protocol ``RawConnection`` to one chunkserver, or ``ClientConnection`` through
``speedy.client``) and, on each phase command, drives them from one thread per
connection, taking the next item from a shared counter and timing every request.  The
parent merges the latencies and error counts into a ``PhaseResult``.

Every payload starts with its fid (or index) as a big-endian u64, so a GET checks that
it got the right file, not just the right number of bytes.
"""
from __future__ import annotations

import itertools
import multiprocessing
import os
import random
import signal
import socket
import struct
import threading
import time
from array import array
from collections import Counter
from dataclasses import asdict, dataclass, field
from typing import Any, Callable

from speedy.wire.protocol import FILE_KEY, REQUEST_HEADER, RESPONSE_HEADER, Err, Op

MiB = 1 << 20
PREFIX = 8  # every payload starts with its fid (or index), big-endian, for checking
PUT_HEAD = struct.Struct(">" + REQUEST_HEADER.format.lstrip(">") +
                         FILE_KEY.format.lstrip(">") + "Q")  # header | key | fid prefix
GET_FRAME = struct.Struct(">" + REQUEST_HEADER.format.lstrip(">") +
                          FILE_KEY.format.lstrip(">"))
U64 = struct.Struct(">Q")
MIXED_MAX = 1 << 24  # large PUTs of a --mixed phase: as many as run until the small ones end
MIXED_LEAD = 0.5  # seconds the large PUTs run before the small ones start


class LoadError(Exception):
    """The load generator could not run (connections refused, a process died)."""


@dataclass
class Target:
    """Where the load goes: a chunkserver (raw protocol) or a master (client library)."""

    kind: str  # "server", "master" or "gateway"
    host: str
    port: int
    group: int = 1
    timeout: float = 30.0
    min_replicas: int | None = None  # master mode: passed to Client when given

    @property
    def address(self) -> str:
        """host:port."""
        return f"{self.host}:{self.port}"


@dataclass
class PhaseResult:
    """The merged figures of one phase."""

    name: str
    size: int
    conns: int
    ops: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    error_kinds: dict = field(default_factory=dict)
    error_sample: str = ""
    client_cpu_s: float = 0.0  # CPU seconds of the load-generator processes
    server_cpu_s: float | None = None  # of the server's processes, when they can be seen

    def cpu_us_per_op(self, seconds: float | None) -> float | None:
        """CPU microseconds per request (successful or not)."""
        total = self.ops + self.errors
        return None if seconds is None or not total else seconds * 1e6 / total

    @property
    def ops_per_s(self) -> float:
        """Successful operations per second of wall time."""
        return self.ops / self.seconds if self.seconds > 0 else 0.0

    @property
    def mb_per_s(self) -> float:
        """Payload MiB per second (what the report calls MB/s)."""
        return self.ops * self.size / MiB / self.seconds if self.seconds > 0 else 0.0

    def to_dict(self) -> dict:
        """JSON-ready figures."""
        d = asdict(self)
        for key in ("seconds", "p50_ms", "p99_ms", "client_cpu_s", "server_cpu_s"):
            if d[key] is not None:
                d[key] = round(d[key], 4)
        d["ops_per_s"] = round(self.ops_per_s, 1)
        d["mb_per_s"] = round(self.mb_per_s, 2)
        return d


# --- connections (run inside the load-generator processes) ------------------------

def error_name(e: BaseException) -> str:
    """A short name for an exception, for the error counters."""
    return "timeout" if isinstance(e, (socket.timeout, BlockingIOError)) else type(e).__name__


class RawConnection:
    """One persistent connection to a chunkserver, raw protocol, one request at a time."""

    def __init__(self, target: Target, payload: bytes) -> None:
        self.target = target
        self.size = len(payload)
        self.prefix = min(PREFIX, self.size)
        self.tail = memoryview(payload)[self.prefix:]
        self.buf = bytearray(RESPONSE_HEADER.size + max(self.size, 64))
        self.mv = memoryview(self.buf)
        self.sock: socket.socket | None = None

    def connect(self) -> None:
        """(Re)open the connection: TCP_NODELAY, send/receive timeouts, blocking I/O."""
        self.close()
        sock = socket.create_connection((self.target.host, self.target.port),
                                        timeout=self.target.timeout)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        sec = int(self.target.timeout)
        usec = int((self.target.timeout - sec) * 1e6)
        tv = struct.pack("ll", sec, usec)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        sock.settimeout(None)  # kernel timeouts above: no poll() per call
        self.sock = sock

    def close(self) -> None:
        """Close the socket if open."""
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    def _send(self, parts: list, total: int) -> None:
        """Send header and body with one sendmsg (falling back on a partial send)."""
        sent = self.sock.sendmsg(parts)
        if sent < total:
            self.sock.sendall(b"".join(bytes(p) for p in parts)[sent:])

    def _receive(self) -> tuple[int, int]:
        """Read one response into self.buf; (error, body_len)."""
        recv_into, mv = self.sock.recv_into, self.mv
        cap = len(self.buf)
        got = 0
        while got < RESPONSE_HEADER.size:
            k = recv_into(mv[got:])
            if not k:
                raise ConnectionResetError("server closed the connection")
            got += k
        _op, err, blen = RESPONSE_HEADER.unpack_from(self.buf)
        total = RESPONSE_HEADER.size + blen
        pos = got
        while got < total:
            if pos >= cap:  # longer than expected: keep the head, discard the rest
                pos = RESPONSE_HEADER.size
            k = recv_into(mv[pos:min(cap, pos + total - got)])
            if not k:
                raise ConnectionResetError("server closed the connection")
            got += k
            pos += k
        return err, blen

    def _call(self, parts: list, total: int) -> tuple[int, int]:
        """Round trip, reconnecting first if the last one broke the connection."""
        if self.sock is None:
            self.connect()
        try:
            self._send(parts, total)
            return self._receive()
        except BaseException:
            self.close()
            raise

    def put(self, fid: int) -> str | None:
        """WRITE fid; None on success, else an error name."""
        head = PUT_HEAD.pack(Op.WRITE, FILE_KEY.size + self.size, self.target.group, fid, fid)
        if self.prefix < PREFIX:
            head = head[:len(head) - PREFIX + self.prefix]
        try:
            err, _ = self._call([head, self.tail], len(head) + len(self.tail))
        except OSError as e:
            return error_name(e)
        return None if err == Err.SUCCESS else _err_name(err)

    def get(self, fid: int) -> str | None:
        """READ fid and check its size and fid prefix; None on success, else an error name."""
        try:
            err, blen = self._call([GET_FRAME.pack(Op.READ, FILE_KEY.size,
                                                   self.target.group, fid)],
                                   GET_FRAME.size)
        except OSError as e:
            return error_name(e)
        if err != Err.SUCCESS:
            return _err_name(err)
        if blen != self.size:
            return "wrong size"
        if self.buf[6:6 + self.prefix] != U64.pack(fid)[:self.prefix]:
            return "wrong data"
        return None


def _err_name(code: int) -> str:
    """Err code -> its name."""
    try:
        return Err(code).name
    except ValueError:
        return f"error {code}"


class ClientConnection:
    """One speedy.client.Client: put/get through the master's routing."""

    def __init__(self, target: Target, payload: bytes, keys: dict) -> None:
        from speedy.client.client import Client  # only in master mode; importing patches nothing
        options: dict = {"timeout": target.timeout}
        if target.min_replicas is not None:
            options["min_replicas"] = target.min_replicas
        self.client = Client(target.address, **options)
        self.size = len(payload)
        self.prefix = min(PREFIX, self.size)
        self.tail = bytes(payload[self.prefix:])
        self.keys = keys
        self.detail = ""  # the last exception's message, for the error samples

    def connect(self) -> None:
        """Clients connect lazily."""

    def close(self) -> None:
        """Close the client if it can be closed."""
        close = getattr(self.client, "close", None)
        if close:
            close()

    def put(self, index: int) -> str | None:
        """Put one blob; remember its key under its index."""
        try:
            self.keys[index] = self.client.put(U64.pack(index)[:self.prefix] + self.tail)
        except Exception as e:  # the client's own errors: count them, keep going
            self.detail = str(e)
            return error_name(e)
        return None

    def get(self, item: tuple[str, int]) -> str | None:
        """Get one blob by key and check its size and index prefix."""
        key, index = item
        try:
            data = self.client.get(key)
        except Exception as e:
            self.detail = str(e)
            return error_name(e)
        if len(data) != self.size:
            return "wrong size"
        if data[:self.prefix] != U64.pack(index)[:self.prefix]:
            return "wrong data"
        return None


def connection(target: Target, payload: bytes, keys: dict) -> Any:
    """A new connection of the target's kind: server, master or gateway."""
    if target.kind == "server":
        return RawConnection(target, payload)
    if target.kind == "gateway":
        from speedy.bench.gateway import GatewayConnection
        return GatewayConnection(target, payload, keys)
    return ClientConnection(target, payload, keys)


def drive(conn: Any, op: str, items: Any, counter: Any, lat: array,
          errors: Counter, samples: list, stop: Any = None) -> None:
    """One connection's thread: take the next item until none is left (or stop is set),
    time each op."""
    fn = conn.put if op == "put" else conn.get
    n = len(items)
    perf = time.perf_counter
    append = lat.append
    for i in counter:  # itertools.count: next() is atomic under the GIL
        if i >= n or (stop is not None and stop.is_set()):
            break
        t = perf()
        err = fn(items[i])
        append(perf() - t)
        if err is not None:
            errors[err] += 1
            if len(samples) < 3:
                detail = getattr(conn, "detail", "")
                samples.append(f"{op} {items[i]!r}: {err}" + (f" ({detail})" if detail else ""))


def load_worker(pipe: Any, target: Target, payload_size: int, nconns: int, seed: int,
                stop: Any = None) -> None:
    """A load-generator process: hold nconns connections, run phases on command (a phase
    ends early once the stop event, when given, is set)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    rnd = random.Random(seed)
    payload = bytes(rnd.getrandbits(8) for _ in range(min(payload_size, 4096)))
    payload = (payload * (payload_size // 4096 + 1))[:payload_size]
    keys: dict = {}
    conns: list = []
    while True:
        try:
            cmd = pipe.recv()
        except (EOFError, OSError):
            break
        if cmd[0] == "quit":
            break
        if cmd[0] == "connect":
            try:
                for _ in range(nconns):
                    conn = connection(target, payload, keys)
                    conns.append(conn)
                    conn.connect()
                pipe.send(("ok",))
            except Exception as e:
                pipe.send(("error", f"{error_name(e)}: {e}"))
            continue
        _, op, items = cmd
        keys.clear()
        counter = itertools.count()
        lats = [array("d") for _ in conns]
        errors = [Counter() for _ in conns]
        samples: list = []
        threads = [threading.Thread(target=drive, args=(c, op, items, counter, lat, err,
                                                        samples, stop))
                   for c, lat, err in zip(conns, lats, errors)]
        cpu0 = time.process_time()
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        t1 = time.perf_counter()
        cpu = time.process_time() - cpu0
        merged = array("d")
        for lat in lats:
            merged.extend(lat)
        total_errors = sum(errors, Counter())
        pipe.send(("done", t0, t1, merged.tobytes(), dict(total_errors), samples, dict(keys),
                   cpu))
    for conn in conns:
        conn.close()


# --- the parent side ---------------------------------------------------------------

class LoadGenerator:
    """procs processes holding C connections between them."""

    def __init__(self, target: Target, size: int, conns: int, procs: int,
                 stop: Any = None) -> None:
        self.target, self.size, self.conns = target, size, conns
        procs = max(1, min(procs, conns))
        self.shares = [conns // procs + (i < conns % procs) for i in range(procs)]
        ctx = multiprocessing.get_context("fork")
        self.workers: list = []
        self.pipes: list = []
        seed = random.randrange(1 << 30)
        for i, share in enumerate(self.shares):
            parent, child = ctx.Pipe()
            p = ctx.Process(target=load_worker, args=(child, target, size, share, seed, stop),
                            name=f"speedy-bench-{i}", daemon=True)
            p.start()
            child.close()
            self.workers.append(p)
            self.pipes.append(parent)
        for reply in self._gather(("connect",)):
            if reply[0] != "ok":
                self.close()
                raise LoadError(f"cannot connect to {target.address}: {reply[1]}")

    def _gather(self, cmd: tuple | None = None, per_worker: list | None = None) -> list:
        """Send a command to every worker (or one each), return their replies."""
        for i, pipe in enumerate(self.pipes):
            pipe.send(per_worker[i] if per_worker is not None else cmd)
        replies = []
        for pipe, proc in zip(self.pipes, self.workers):
            try:
                replies.append(pipe.recv())
            except (EOFError, OSError):
                raise LoadError(f"load generator {proc.name} died "
                                f"(exit code {proc.exitcode})") from None
        return replies

    def run(self, name: str, op: str, items: Any,
            probe: Callable[[], float | None] | None = None) -> tuple[PhaseResult, dict]:
        """One phase over items, shared by the workers in proportion to their connections.

        probe, when given, returns the server's CPU seconds so far (read around the phase).
        """
        cmds, start, cum = [], 0, 0
        for share in self.shares:
            cum += share
            end = len(items) * cum // self.conns
            cmds.append(("run", op, items[start:end]))
            start = end
        before = probe() if probe else None
        replies = self._gather(per_worker=cmds)
        after = probe() if probe else None
        lat = array("d")
        errors: Counter = Counter()
        samples: list = []
        keys: dict = {}
        for _, _t0, _t1, lat_bytes, errs, smp, k, _cpu in replies:
            chunk = array("d")
            chunk.frombytes(lat_bytes)
            lat.extend(chunk)
            errors.update(errs)
            samples.extend(smp)
            keys.update(k)
        seconds = max(r[2] for r in replies) - min(r[1] for r in replies)
        ordered = sorted(lat)
        failed = sum(errors.values())
        result = PhaseResult(
            name=name, size=self.size, conns=self.conns, ops=len(lat) - failed,
            errors=failed, seconds=seconds, p50_ms=percentile(ordered, 50) * 1e3,
            p99_ms=percentile(ordered, 99) * 1e3, error_kinds=dict(errors),
            error_sample="; ".join(samples[:3]), client_cpu_s=sum(r[7] for r in replies),
            server_cpu_s=None if before is None or after is None else after - before)
        return result, keys

    def close(self) -> None:
        """Stop the workers."""
        for pipe in self.pipes:
            try:
                pipe.send(("quit",))
            except OSError:
                pass
        for p in self.workers:
            p.join(10)
            if p.is_alive():
                p.terminate()
                p.join(5)
        for pipe in self.pipes:
            pipe.close()
        self.workers, self.pipes = [], []


def percentile(ordered: list | array, pct: float) -> float:
    """The pct-th percentile of sorted values (nearest rank), 0 when empty."""
    if not ordered:
        return 0.0
    rank = max(1, -(-len(ordered) * pct // 100))
    return ordered[int(rank) - 1]


def run_load(target: Target, n: int, conns: int, size: int, procs: int, fid_start: int,
             probe: Callable[[], float | None] | None = None) -> list[PhaseResult]:
    """PUT n files, then GET them back in random order: [put, get] results.

    probe: the server's cumulative CPU seconds (see processes_cpu), or None.
    """
    gen = LoadGenerator(target, size, conns, procs)
    try:
        put, order = put_phase(gen, n, fid_start, probe)
        return [put, get_phase(gen, order, n, probe)]
    finally:
        gen.close()


def run_alternated(target: Target, base: Target, n: int, conns: int, size: int, procs: int,
                   rounds: int, probe: Callable[[], float | None] | None = None
                   ) -> list[tuple[PhaseResult, PhaseResult, PhaseResult, PhaseResult]]:
    """PUT n files through target and through base, then GET them back rounds times,
    target and base in turn (a noisy machine slows both alike): per round (target PUT,
    target GET, base PUT, base GET), the PUTs being the same every round."""
    gens = [LoadGenerator(target, size, conns, procs), LoadGenerator(base, size, conns, procs)]
    try:
        probes = (probe, None)
        puts = [put_phase(gen, n, 0, pr) for gen, pr in zip(gens, probes)]
        out = []
        for _ in range(rounds):
            gets = [get_phase(gen, order, n, pr)
                    for gen, (_put, order), pr in zip(gens, puts, probes)]
            out.append((puts[0][0], gets[0], puts[1][0], gets[1]))
        return out
    finally:
        for gen in gens:
            gen.close()


def put_phase(gen: "LoadGenerator", n: int, fid_start: int,
              probe: Callable[[], float | None] | None) -> tuple[PhaseResult, list]:
    """PUT n files: the result and what a GET phase reads (fids, or (key, index) pairs)."""
    if gen.target.kind == "server":
        put, _ = gen.run("PUT", "put", range(fid_start, fid_start + n), probe)
        return put, list(range(fid_start, fid_start + n))
    put, keys = gen.run("PUT", "put", range(n), probe)
    return put, [(key, i) for i, key in keys.items()]


def get_phase(gen: "LoadGenerator", order: list, n: int,
              probe: Callable[[], float | None] | None) -> PhaseResult:
    """GET what put_phase stored, in a new random order; files never put count as errors."""
    random.shuffle(order)
    get, _ = gen.run("GET", "get", order, probe)
    if len(order) < n:  # never put: cannot be read either
        get.errors += n - len(order)
        get.error_kinds["not put"] = n - len(order)
    return get


def run_mixed(target: Target, n: int, conns: int, size: int, big_size: int, big_conns: int,
              procs: int, fid_start: int, big_max: int = MIXED_MAX,
              probe: Callable[[], float | None] | None = None) -> list[PhaseResult]:
    """PUT n files of size (fids from fid_start) while big_conns connections PUT files of
    big_size (the fids after them, at most big_max) until those are done: [small, big].

    probe's CPU figure, on the small phase, covers the server's work for both loads.
    """
    stop = multiprocessing.get_context("fork").Event()
    big = LoadGenerator(target, big_size, big_conns, max(1, procs // 2), stop)
    small = None
    done: dict = {}

    def drive_big() -> None:
        try:
            done["big"] = big.run("PUT", "put", range(fid_start + n, fid_start + n + big_max))[0]
        except LoadError as e:
            done["error"] = e

    thread = threading.Thread(target=drive_big, daemon=True)
    try:
        small = LoadGenerator(target, size, conns, procs)
        thread.start()
        time.sleep(MIXED_LEAD)  # the large uploads are under way first
        result, _ = small.run("PUT", "put", range(fid_start, fid_start + n), probe)
    finally:
        stop.set()
        thread.join()
        big.close()
        if small is not None:
            small.close()
    if "error" in done:
        raise done["error"]
    return [result, done["big"]]


def processes_cpu(pids: list[int] | None = None, pgid: int | None = None) -> float | None:
    """CPU seconds (user + system, plus reaped children) of the given processes or of
    every process in a process group; None where /proc cannot tell."""
    if pgid is not None:
        try:
            pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
        except OSError:
            return None
    tick = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    total = 0
    seen = False
    for pid in pids or ():
        try:
            with open(f"/proc/{pid}/stat", "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if pgid is not None and int(fields[2]) != pgid:
            continue
        total += sum(int(x) for x in fields[11:15])  # utime stime cutime cstime
        seen = True
    return total / tick if seen else None
