"""Benchmark (not a test): compaction on one real chunkserver.

    .venv/bin/python bench/compact.py [--files N] [--size BYTES] [--rate BYTES/S]

Stores --files files of --size bytes, deletes 70% of them (random), then:
  1. a client load (PUT then GET of --load files of 4 KiB, -c connections) with no
     compaction running, --rounds times: the baseline;
  2. COMPACT (threshold 0, every chunk) and the same load rounds while it runs;
  3. the baseline again after it (the spread of 1 and 3 is the machine's noise);
and prints: bytes freed against the bytes deleted (with their 30-byte headers; the
tombstones a compaction keeps for a week cost 30 bytes per deleted file), the live
bytes moved per second (from the server log), the longest slice (how long a request
waited at most), and PUT/GET throughput and p99 during compaction against without.
"""
from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from speedy.bench.runner import free_port  # noqa: E402
from speedy.bench.load import LoadGenerator, PhaseResult, Target  # noqa: E402
from speedy.chunkserver.shm.segments import unlink_prefix  # noqa: E402
from speedy.wire.protocol import (COMPACT_RESULT, FILE_KEY, REQUEST_HEADER,  # noqa: E402
                                  RESPONSE_HEADER, Err, Op, decode_garbage,
                                  encode_compact_request)

SERVER = os.path.join(ROOT, "spy_server.py")
GROUP = 1
MiB = 1 << 20
HEADER = 30
LOAD_BASE = 1 << 50
PIPELINE = 64


def body(fid: int, size: int) -> bytes:
    return (fid.to_bytes(8, "big") * (size // 8 + 1))[:size]


class Conn:
    """A raw protocol connection with pipelined calls."""

    def __init__(self, port: int, timeout: float = 600.0) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def _recv(self, n: int) -> bytes:
        while len(self.buf) < n:
            data = self.sock.recv(1 << 20)
            if not data:
                raise EOFError("server closed the connection")
            self.buf += data
        out, self.buf = self.buf[:n], self.buf[n:]
        return out

    def response(self) -> tuple[int, bytes]:
        _op, err, n = RESPONSE_HEADER.unpack(self._recv(6))
        return err, self._recv(n)

    def pipeline(self, frames: list[bytes]) -> list[int]:
        errs = []
        for at in range(0, len(frames), PIPELINE):
            part = frames[at:at + PIPELINE]
            self.sock.sendall(b"".join(part))
            errs += [self.response()[0] for _ in part]
        return errs

    def call(self, op: int, payload: bytes = b"") -> tuple[int, bytes]:
        self.sock.sendall(REQUEST_HEADER.pack(op, len(payload)) + payload)
        return self.response()

    def close(self) -> None:
        self.sock.close()


def frame(op: int, fid: int, data: bytes = b"") -> bytes:
    return REQUEST_HEADER.pack(op, FILE_KEY.size + len(data)) + FILE_KEY.pack(GROUP, fid) + data


def start(data_dir: str, args) -> tuple[subprocess.Popen, int, str]:
    port = free_port()
    log = os.path.join(data_dir, "server.log")
    cmd = [sys.executable, SERVER, f"--port={port}", "--ip=127.0.0.1", f"--data_dir={data_dir}",
           f"--group_id={GROUP}", "--master_ip=127.0.0.1", f"--master_port={free_port()}",
           f"--chunks={args.chunks}", f"--chunk_size={args.chunk_size}", "--mem_blocks=64",
           f"--workers={args.workers}", "--report_interval=3600", f"--error_log={log}",
           "--compact_threshold=0", f"--compact_rate={args.rate}",
           f"--compact_keep_deleted={args.keep_deleted}"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            start_new_session=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            c = Conn(port, 2)
            if c.call(Op.PING)[0] == Err.SUCCESS:
                c.close()
                return proc, port, log
        except OSError:
            time.sleep(0.1)
    raise SystemExit(f"server did not start: {proc.stderr.read().decode()[-2000:]}")


def garbage(port: int) -> tuple[int, list]:
    c = Conn(port)
    try:
        err, payload = c.call(Op.QUERY_GARBAGE)
        return decode_garbage(payload)
    finally:
        c.close()


def load_rounds(target: Target, args, start_fid: int, rounds: int,
                until=None) -> tuple[list[PhaseResult], list[PhaseResult], int]:
    """PUT then GET of args.load files per round; (puts, gets, next fid)."""
    puts, gets = [], []
    gen = LoadGenerator(target, 4096, args.conns, args.procs)
    try:
        for _ in range(rounds):
            fids = list(range(start_fid, start_fid + args.load))
            start_fid += args.load
            put, _ = gen.run("PUT", "put", fids)
            random.shuffle(fids)
            get, _ = gen.run("GET", "get", fids)
            puts.append(put)
            gets.append(get)
            if until is not None and until():
                break
    finally:
        gen.close()
    return puts, gets, start_fid


def summary(results: list[PhaseResult]) -> tuple[float, float, int]:
    """(ops/s over the rounds, worst p99 ms, errors)."""
    ops = sum(r.ops for r in results)
    secs = sum(r.seconds for r in results)
    return ops / secs if secs else 0.0, max(r.p99_ms for r in results), \
        sum(r.errors for r in results)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--files", type=int, default=24000)
    p.add_argument("--size", type=int, default=16384)
    p.add_argument("--delete", type=float, default=0.7)
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--chunk_size", type=int, default=64 * MiB)
    p.add_argument("--rate", type=int, default=64 * MiB, help="--compact_rate")
    p.add_argument("--keep_deleted", type=int, default=7 * 86400)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--load", type=int, default=2000, help="files per load round")
    p.add_argument("--rounds", type=int, default=3, help="baseline load rounds")
    p.add_argument("-c", "--conns", type=int, default=8)
    p.add_argument("--procs", type=int, default=1)
    p.add_argument("--dir", default=None)
    args = p.parse_args()
    base = tempfile.mkdtemp(prefix="spy-compact-", dir=args.dir)
    data_dir = os.path.join(base, "data")
    os.makedirs(data_dir)
    proc, port, log = start(data_dir, args)
    try:
        t0 = time.monotonic()
        c = Conn(port)
        errs = c.pipeline([frame(Op.WRITE, fid, body(fid, args.size))
                           for fid in range(1, args.files + 1)])
        stored = sum(e == Err.SUCCESS for e in errs)
        doomed = random.Random(1).sample(range(1, args.files + 1),
                                         int(args.files * args.delete))
        derrs = c.pipeline([frame(Op.DELETE, fid) for fid in doomed])
        c.close()
        deleted_bytes = sum(1 for e in derrs if e == Err.SUCCESS) * (args.size + HEADER)
        print(f"stored {stored} files of {args.size} bytes, deleted {len(doomed)} "
              f"({deleted_bytes / MiB:.1f} MiB with headers) in {time.monotonic() - t0:.1f}s")
        _, chunks = garbage(port)
        print(f"garbage before: {sum(g.garbage_bytes for g in chunks) / MiB:.1f} MiB in "
              f"{sum(1 for g in chunks if g.garbage_bytes)} chunks")
        target = Target("server", "127.0.0.1", port, GROUP)
        base_puts, base_gets, fid = load_rounds(target, args, LOAD_BASE, args.rounds)

        result: dict = {}

        def compact_all() -> None:
            cc = Conn(port)
            t = time.monotonic()
            err, payload = cc.call(Op.COMPACT, encode_compact_request(0.0, True))
            result["seconds"] = time.monotonic() - t
            result["err"] = err
            if err == Err.SUCCESS:
                result["n"], result["freed"] = COMPACT_RESULT.unpack(payload)
            cc.close()

        th = threading.Thread(target=compact_all)
        th.start()
        time.sleep(0.05)
        puts, gets, fid = load_rounds(target, args, fid, 1000, until=lambda: not th.is_alive())
        th.join()
        after_puts, after_gets, fid = load_rounds(target, args, fid, args.rounds)
        if result.get("err") != Err.SUCCESS:
            print(f"COMPACT failed: {result}")
            return 1
        moved = secs = 0.0
        longest, phase = 0.0, "-"
        pat = re.compile(r"compacted: (\d+) files, (\d+) bytes moved in ([\d.]+)s, (\d+) bytes "
                         r"freed \(longest slice ([\d.]+) ms, (\w+)\)")
        with open(log, errors="replace") as f:
            for line in f:
                m = pat.search(line)
                if m:
                    moved += int(m.group(2))
                    secs += float(m.group(3))
                    if float(m.group(5)) > longest:
                        longest, phase = float(m.group(5)), m.group(6)
        freed = result["freed"]
        print(f"compacted {result['n']} chunks in {result['seconds']:.2f}s: freed "
              f"{freed / MiB:.1f} MiB = {100 * freed / deleted_bytes:.2f}% of the deleted bytes "
              f"with headers; {moved / MiB:.1f} MiB live moved at {moved / MiB / secs:.1f} MiB/s "
              f"(rate limit {args.rate / MiB:.0f} MiB/s); longest slice {longest:.1f} ms ({phase})")
        for name, base_r, during, after in (("PUT", base_puts, puts, after_puts),
                                            ("GET", base_gets, gets, after_gets)):
            b_ops, b_p99, b_err = summary(base_r)
            d_ops, d_p99, d_err = summary(during)
            a_ops, a_p99, a_err = summary(after)
            print(f"{name} 4 KiB x {args.conns} conns: before compaction {b_ops:,.0f}/s "
                  f"p99 {b_p99:.2f} ms; during {d_ops:,.0f}/s p99 {d_p99:.2f} ms "
                  f"({len(during)} rounds); after {a_ops:,.0f}/s p99 {a_p99:.2f} ms; "
                  f"errors {b_err}/{d_err}/{a_err}")
        return 0
    finally:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(60)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(30)
        unlink_prefix(f"speedy{proc.pid}")
        shutil.rmtree(base, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
