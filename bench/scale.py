"""Benchmark (not a test): a real chunkserver holding many small files.

    /work/venv/bin/python bench/scale.py [--files N] [--levels 10000,100000] [--ops M]

For every level (by default 10,000, 100,000 and --files, 1,000,000) it writes that many
small records (--small bytes each) straight into chunk files, starts spy_server.py on
them and prints:

  (b) PUT then GET throughput of --ops 4 KiB files with -c connections (flat is the
      target), with the server's CPU per request;
  (c) index memory per stored file, all processes together: the shared index segments
      plus the private (non-shared-memory) memory the processes gained over the smallest
      level;
and at the largest level (a): time from starting the process to the first PING and the
first verified READ, for a first start (no snapshot: scan), after a clean stop
(snapshot), after kill -9 following writes (stale snapshot: only the tail is scanned)
and after kill -9 following --deletes DELETEs (journaled: the snapshot stays usable).
"""
from __future__ import annotations

import argparse
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import dataclass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from speedy.bench.runner import free_port  # noqa: E402
from speedy.bench.load import LoadGenerator, Target, processes_cpu  # noqa: E402
from speedy.format.chunkfile import SUPERBLOCK_SIZE, Superblock, encode_record_header  # noqa: E402
from speedy.chunkserver.shm.segments import unlink_prefix  # noqa: E402
from speedy.wire.protocol import FILE_KEY, REQUEST_HEADER, RESPONSE_HEADER, Err, Op  # noqa: E402

SERVER = os.path.join(ROOT, "spy_server.py")
GROUP = 1
SMALL_BASE = 1 << 40  # fids of the small files written by hand
PUT_BASE = 1 << 50  # fids of the 4 KiB files put through the server
MiB = 1 << 20
CHUNK_SIZE = 256 * MiB
START_TIMEOUT = 120.0


@dataclass
class Server:
    """A spy_server.py process on a data dir."""

    proc: subprocess.Popen
    port: int
    data_dir: str
    log_path: str
    started: float

    def children(self) -> list[int]:
        """Pids of its writer and workers."""
        try:
            with open(f"/proc/{self.proc.pid}/task/{self.proc.pid}/children") as f:
                return [int(p) for p in f.read().split()]
        except OSError:
            return []

    def pids(self) -> list[int]:
        """The supervisor and its children."""
        return [self.proc.pid, *self.children()]

    def open_mode(self) -> str:
        """How the writer filled the index the last time (from the log)."""
        mode = "?"
        with open(self.log_path, errors="replace") as f:
            for line in f:
                if " chunks in " in line and "files," in line:
                    mode = line.rsplit("(", 1)[-1].strip().rstrip(")")
        return mode

    def stop(self) -> float:
        """SIGTERM and wait; seconds it took."""
        t0 = time.monotonic()
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(60)
        return time.monotonic() - t0

    def kill9(self) -> None:
        """SIGKILL every process of the server and remove its shared memory."""
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(30)
        unlink_prefix(f"speedy{self.proc.pid}")


def small_body(fid: int, size: int) -> bytes:
    """The deterministic body of a hand-written file."""
    return (fid.to_bytes(8, "big") * (size // 8 + 1))[:size]


def write_small_files(data_dir: str, n: int, size: int, chunk_size: int) -> int:
    """n records of size bytes straight into chunk files (sparse, chunk_size each); chunks."""
    per_chunk = (chunk_size // 2 - SUPERBLOCK_SIZE) // (30 + size)  # leave room for PUTs
    done = cid = 0
    while done < n:
        cid += 1
        count = min(per_chunk, n - done)
        parts = []
        for fid in range(SMALL_BASE + done, SMALL_BASE + done + count):
            body = small_body(fid, size)
            parts.append(encode_record_header(fid, size, zlib.adler32(body, 0), 1700000000))
            parts.append(body)
        blob = b"".join(parts)
        end = SUPERBLOCK_SIZE + len(blob)
        with open(os.path.join(data_dir, f"chunk_{GROUP}_{cid}.chunk"), "wb") as out:
            out.write(Superblock(cid, count, count, end, chunk_size - end).encode())
            out.write(blob)
            out.truncate(chunk_size)
        done += count
    return cid


def start_server(data_dir: str, chunks: int, chunk_size: int, workers: int) -> Server:
    """Start spy_server.py (not waiting for it)."""
    port = free_port()
    log_path = os.path.join(data_dir, "server.log")
    cmd = [sys.executable, SERVER, f"--port={port}", "--ip=127.0.0.1", f"--data_dir={data_dir}",
           f"--group_id={GROUP}", "--master_ip=127.0.0.1", f"--master_port={free_port()}",
           f"--chunks={chunks}", f"--chunk_size={chunk_size}", "--mem_blocks=128",
           f"--workers={workers}", "--sync=0", "--report_interval=3600"]
    t0 = time.monotonic()
    with open(log_path, "ab") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
    return Server(proc, port, data_dir, log_path, t0)


def call(sock: socket.socket, op: int, body: bytes = b"") -> tuple[int, bytes]:
    """One request, its (error, body)."""
    sock.sendall(REQUEST_HEADER.pack(op, len(body)) + body)
    head = b""
    while len(head) < RESPONSE_HEADER.size:
        more = sock.recv(RESPONSE_HEADER.size - len(head))
        if not more:
            raise ConnectionError("closed")
        head += more
    _op, err, blen = RESPONSE_HEADER.unpack(head)
    data = b""
    while len(data) < blen:
        more = sock.recv(blen - len(data))
        if not more:
            raise ConnectionError("closed")
        data += more
    return err, data


def wait_serving(srv: Server, fid: int, size: int) -> tuple[float, float]:
    """Seconds from process start to the first PING answered and the first verified READ."""
    deadline = srv.started + START_TIMEOUT
    ping_at = None
    while time.monotonic() < deadline:
        if srv.proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {srv.proc.returncode}; "
                               f"see {srv.log_path}")
        try:
            with socket.create_connection(("127.0.0.1", srv.port), timeout=5) as s:
                if call(s, Op.PING)[0] == Err.SUCCESS and ping_at is None:
                    ping_at = time.monotonic() - srv.started
                err, data = call(s, Op.READ, FILE_KEY.pack(GROUP, fid))
                if err == Err.SUCCESS:
                    if data != small_body(fid, size):
                        raise RuntimeError(f"READ of fid {fid} returned wrong data")
                    return ping_at, time.monotonic() - srv.started
        except OSError:
            pass
        time.sleep(0.005)
    raise RuntimeError(f"the server was not serving after {START_TIMEOUT:g}s; see {srv.log_path}")


def read_error(srv: Server, fid: int) -> int:
    """The error code of one READ."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        return call(s, Op.READ, FILE_KEY.pack(GROUP, fid))[0]


def delete(srv: Server, fids: list[int]) -> list[int]:
    """The error codes of DELETEs of fids, one after another on one connection."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        return [call(s, Op.DELETE, FILE_KEY.pack(GROUP, fid))[0] for fid in fids]


def read_errors(srv: Server, fids: list[int]) -> list[int]:
    """The error codes of READs of fids, on one connection."""
    with socket.create_connection(("127.0.0.1", srv.port), timeout=10) as s:
        return [call(s, Op.READ, FILE_KEY.pack(GROUP, fid))[0] for fid in fids]


def shm_bytes(pid: int) -> dict[str, int]:
    """{segment suffix: bytes} of the server's shared memory segments."""
    out = {}
    prefix = f"speedy{pid}_"
    for name in os.listdir("/dev/shm"):
        if name.startswith(prefix):
            out[name[len(prefix):]] = os.stat(os.path.join("/dev/shm", name)).st_size
    return out


def private_bytes(pids: list[int]) -> int:
    """Private memory of the processes outside shared memory segments (smaps)."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/smaps") as f:
                shm = False
                for line in f:
                    first = line.split(None, 1)[0]
                    if "-" in first and not first.endswith(":"):  # a mapping's header line
                        shm = "/dev/shm/" in line or "SYSV" in line
                    elif not shm and first in ("Private_Clean:", "Private_Dirty:"):
                        total += int(line.split()[1]) * 1024
        except OSError:
            pass
    return total


def measure_memory(srv: Server, files: int) -> tuple[int, int]:
    """(index shared bytes, private bytes of all processes); prints the first."""
    seg = shm_bytes(srv.proc.pid)
    index = sum(v for k, v in seg.items() if k == "ic" or k.startswith("t"))
    print(f"    index segments: {index:,} bytes = {index / files:.1f} B/file shared "
          f"(all segments: {', '.join(f'{k} {v:,}' for k, v in sorted(seg.items()))})")
    return index, private_bytes(srv.pids())


def throughput(srv: Server, ops: int, conns: int, size: int, level: int) -> dict:
    """PUT ops files of size, GET them back in random order; ops/s and server CPU/op."""
    target = Target("server", "127.0.0.1", srv.port, GROUP)
    pids = srv.pids()
    gen = LoadGenerator(target, size, conns, min(conns, 2))
    out = {}
    try:
        base = PUT_BASE + level * 10
        fids = list(range(base, base + ops))
        for name, op, items in (("PUT", "put", fids), ("GET", "get", None)):
            if items is None:
                items = fids[:]
                random.shuffle(items)
            r, _ = gen.run(name, op, items, lambda: processes_cpu(pids))
            cpu = r.server_cpu_s / max(1, r.ops) * 1e6 if r.server_cpu_s is not None else 0
            out[name] = r.ops / r.seconds if r.seconds else 0.0
            print(f"    {name} {size // 1024}KiB c={conns}: {out[name]:>9,.0f} ops/s  "
                  f"p50 {r.p50_ms:.2f} ms p99 {r.p99_ms:.2f} ms  server CPU {cpu:.0f} us/req"
                  f"  errors {r.errors}")
    finally:
        gen.close()
    return out


def startup_scenarios(srv: Server, args: argparse.Namespace, data_dir: str, chunks: int,
                      first: tuple[float, float]) -> Server:
    """(a) at the largest level; returns the server left running."""
    probe = SMALL_BASE + args.files // 2
    rows = [("first start, no snapshot", srv.open_mode(), first)]
    stop_s = srv.stop()
    srv = start_server(data_dir, chunks, args.chunk_size, args.workers)
    timing = wait_serving(srv, probe, args.small)
    rows.append((f"after a clean stop ({stop_s:.2f}s to stop)", srv.open_mode(), timing))
    target = Target("server", "127.0.0.1", srv.port, GROUP)
    gen = LoadGenerator(target, 4096, 4, 2)
    try:
        r, _ = gen.run("PUT", "put", range(PUT_BASE - 10_000, PUT_BASE - 10_000 + 2000))
    finally:
        gen.close()
    srv.kill9()
    srv = start_server(data_dir, chunks, args.chunk_size, args.workers)
    timing = wait_serving(srv, probe, args.small)
    ok = read_error(srv, PUT_BASE - 10_000 + 1999) == Err.SUCCESS
    rows.append((f"kill -9 after {r.ops} PUTs (readable after: {ok})", srv.open_mode(), timing))
    step = max(1, args.files // args.deletes)
    gone = [SMALL_BASE + i * step + 7 for i in range(args.deletes) if i * step + 7 < args.files]
    gone.append(SMALL_BASE + args.files - 1)  # inside the 4 KiB the snapshot's stamp checks
    gone.append(PUT_BASE - 10_000 + 5)  # one of the PUTs above, in another chunk
    gone = [fid for fid in dict.fromkeys(gone) if fid != probe]
    ok = sum(e == Err.SUCCESS for e in delete(srv, gone))
    srv.kill9()
    srv = start_server(data_dir, chunks, args.chunk_size, args.workers)
    timing = wait_serving(srv, probe, args.small)
    after = next((e for e in read_errors(srv, gone) if e != Err.FILE_NOT_FOUND),
                 Err.FILE_NOT_FOUND)  # the first fid that is not gone says how
    rows.append((f"kill -9 after {len(gone)} DELETEs ({ok} ok, READ after: {Err(after).name})",
                 srv.open_mode(), timing))
    print(f"  (a) start-up with {args.files:,} files stored (target: serving within 2 s):")
    for label, mode, (ping, read) in rows:
        print(f"    {label:58s} first PING {ping:6.3f}s  first READ {read:6.3f}s  ({mode})")
    return srv


def run_level(level: int, args: argparse.Namespace, largest: bool, mem: dict) -> dict:
    """Write level files, start the server, measure; the throughput figures."""
    data_dir = tempfile.mkdtemp(prefix="speedy-scale-", dir=args.dir or None)
    srv = None
    try:
        t0 = time.monotonic()
        chunks = write_small_files(data_dir, level, args.small, args.chunk_size)
        print(f"level {level:,} files of {args.small} B: written by hand into {chunks} chunk "
              f"files in {time.monotonic() - t0:.1f}s")
        chunks += 1  # one more, empty, for the PUTs
        srv = start_server(data_dir, chunks, args.chunk_size, args.workers)
        first = wait_serving(srv, SMALL_BASE + level // 2, args.small)
        time.sleep(0.5)  # let the processes settle before looking at their memory
        print("  (c) memory (just after start-up):")
        mem[level] = measure_memory(srv, level)
        if largest and not args.no_startup:
            srv = startup_scenarios(srv, args, data_dir, chunks, first)
        else:
            print(f"    start-up ({srv.open_mode()}): first PING {first[0]:.3f}s, "
                  f"first READ {first[1]:.3f}s")
        print("  (b) throughput:")
        return throughput(srv, args.ops, args.c, 4096, level)
    finally:
        if srv is not None:
            srv.stop()
            if srv.proc.poll() is None:
                srv.kill9()
            unlink_prefix(f"speedy{srv.proc.pid}")
        shutil.rmtree(data_dir, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--files", type=int, default=1_000_000, help="largest level (default 1M)")
    p.add_argument("--levels", default="10000,100000",
                   help="smaller levels, comma-separated (default 10000,100000)")
    p.add_argument("--small", type=int, default=32, help="bytes per stored small file")
    p.add_argument("--ops", type=int, default=20_000, help="4 KiB PUTs/GETs per level")
    p.add_argument("-c", type=int, default=16, help="connections (default 16)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--chunk-size", type=int, default=CHUNK_SIZE)
    p.add_argument("--dir", default="", help="parent of the scratch data dirs")
    p.add_argument("--no-startup", action="store_true", help="skip the start-up scenarios")
    p.add_argument("--deletes", type=int, default=1000,
                   help="DELETEs before the last kill -9 of the start-up scenarios")
    args = p.parse_args(argv)
    levels = sorted({int(x) for x in args.levels.split(",") if x.strip() and
                     int(x) < args.files} | {args.files})
    print(f"speedy scale bench: levels {', '.join(f'{x:,}' for x in levels)}; "
          f"{os.cpu_count()} CPUs; figures are noisy on a shared machine")
    results: dict[int, dict] = {}
    mem: dict[int, tuple[int, int]] = {}
    for level in levels:
        results[level] = run_level(level, args, level == levels[-1], mem)
    base = levels[0]
    print("summary (b): 4 KiB ops/s by files stored (ratio to the smallest level)")
    for level in levels:
        r = results[level]
        print(f"  {level:>10,}: PUT {r['PUT']:>9,.0f} ({r['PUT'] / results[base]['PUT']:.2f}x)"
              f"  GET {r['GET']:>9,.0f} ({r['GET'] / results[base]['GET']:.2f}x)")
    top = levels[-1]
    index, private = mem[top]
    extra = (private - mem[base][1]) / (top - base) if top > base else 0.0
    print(f"summary (c): index memory at {top:,} files: {index / top:.1f} B/file shared + "
          f"{extra:.1f} B/file private growth over {base:,} files = "
          f"{index / top + max(0.0, extra):.1f} B/file (target <= 40)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
