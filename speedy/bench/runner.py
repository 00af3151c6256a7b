"""``speedy bench``: PUT then GET N files with C connections, against a baseline.

Targets: one chunkserver over the raw protocol (``--server HOST:PORT --group G``), a
cluster through ``speedy.client.Client`` (``--master HOST:PORT``), an HTTP gateway
(``--gateway HOST:PORT``, compared with ``--client-baseline MASTER``), or a temporary
spy_server.py started for the run (``--start-server``).  The load generator is several
processes (``--procs``), each driving its share of the C persistent connections from
one thread per connection; every operation's latency is recorded and the parent merges
them.  In the same run the identical load is sent to ``speedy.bench.sink`` (a loopback server
that stores nothing) and the raw sequential write speed of the data disk is measured, and
every figure is printed with its ratio to that baseline.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field

from speedy.bench.load import (GET_FRAME, MIXED_MAX, LoadError, MiB, PhaseResult, Target,
                               processes_cpu, run_alternated, run_load, run_mixed)
from speedy.common.config import byte_size
from speedy.wire.protocol import FILE_KEY, RESPONSE_HEADER, Err, Op

SERVER_MODULE = ["-m", "speedy.chunkserver"]  # spy_server, from any directory
EXIT_OK, EXIT_ERRORS, EXIT_USAGE, EXIT_FAILED = 0, 3, 2, 3


class BenchError(Exception):
    """The benchmark cannot run (target unreachable, server did not start...)."""


def parse_size(text: str) -> int:
    """'4k', '64KiB', '1m', '1MB', '4096' -> bytes (k/m/g are powers of 1024)."""
    value = byte_size(text)
    if value > 0xFFFFFFFF - FILE_KEY.size:
        raise argparse.ArgumentTypeError(f"{text!r} is too large for one file")
    return value


def size_label(n: int) -> str:
    """4096 -> '4KiB', 1048576 -> '1MiB', 1000 -> '1000B'."""
    for unit, name in ((1 << 30, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= unit and n % unit == 0:
            return f"{n // unit}{name}"
    return f"{n}B"


def parse_address(text: str) -> tuple[str, int]:
    """'host:port' -> (host, port)."""
    host, sep, port = text.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise argparse.ArgumentTypeError(f"{text!r} is not HOST:PORT")
    return host.strip("[]"), int(port)


def group_id(text: str) -> int:
    """An argparse type: a group id (u16)."""
    if not text.isdigit() or not 0 <= int(text) <= 0xFFFF:
        raise argparse.ArgumentTypeError(f"{text!r} is not a group id (0..65535)")
    return int(text)


def positive_float(text: str) -> float:
    """An argparse type: a number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 < value < 1e6:
        raise argparse.ArgumentTypeError(f"{text!r} must be > 0")
    return value


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return int(text)


def preflight(target: Target) -> None:
    """Fail early and clearly when the target is unreachable or in another group."""
    if target.kind == "gateway":
        preflight_gateway(target)
        return
    if target.kind != "server":
        preflight_master(target)
        return
    try:
        with socket.create_connection((target.host, target.port), timeout=5) as s:
            s.settimeout(10)
            s.sendall(GET_FRAME.pack(Op.READ, FILE_KEY.size, target.group, 0))
            head = b""
            while len(head) < RESPONSE_HEADER.size:
                part = s.recv(RESPONSE_HEADER.size - len(head))
                if not part:
                    raise BenchError(f"{target.address} closed the connection "
                                     "(is it a chunkserver?)")
                head += part
    except OSError as e:
        raise BenchError(f"cannot reach chunkserver {target.address}: "
                         f"{e.strerror or e}") from None
    _op, err, _n = RESPONSE_HEADER.unpack(head)
    if err == Err.SERVER_ID_MISMATCH:
        raise BenchError(f"chunkserver {target.address} is not in group {target.group} "
                         "(use --group)")


def preflight_master(target: Target) -> None:
    """The master must answer a route request."""
    try:
        from speedy.client.client import Client
    except ImportError as e:
        raise BenchError(f"--master needs speedy.client, which cannot be imported: "
                         f"{e}") from None
    try:
        with Client(target.address, timeout=target.timeout) as client:
            client.route(force=True)
    except Exception as e:
        raise BenchError(f"cannot use master {target.address}: {e}") from None


def preflight_gateway(target: Target) -> None:
    """The gateway must answer HTTP (GET /metrics)."""
    import http.client
    try:
        conn = http.client.HTTPConnection(target.host, target.port, timeout=10)
        conn.request("GET", "/metrics")
        conn.getresponse().read()
        conn.close()
    except (OSError, http.client.HTTPException) as e:
        raise BenchError(f"cannot reach gateway {target.address}: {e}") from None


def measure_disk(directory: str, nbytes: int) -> float:
    """Raw sequential write speed of directory's disk in MiB/s (write + fsync)."""
    block = os.urandom(MiB)
    fd, path = tempfile.mkstemp(prefix=".speedy-bench-disk-", dir=directory)
    try:
        t0 = time.perf_counter()
        left = nbytes
        while left > 0:
            left -= os.write(fd, block[:min(left, MiB)])
        os.fsync(fd)
        seconds = time.perf_counter() - t0
    finally:
        os.close(fd)
        os.unlink(path)
    return nbytes / MiB / seconds if seconds > 0 else 0.0


# --- a temporary chunkserver ---------------------------------------------------------

@dataclass
class ServerProcess:
    """A spy_server.py started for this run."""

    proc: subprocess.Popen
    port: int
    data_dir: str
    log_path: str
    command: list
    flags: dict = field(default_factory=dict)

    def log_tail(self, lines: int = 15) -> str:
        """The last lines of its output."""
        try:
            with open(self.log_path, errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """SIGTERM its process group, SIGKILL after 15 s, remove its data dir."""
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        try:  # workers of a dead supervisor: same process group
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        shutil.rmtree(self.data_dir, ignore_errors=True)


def free_port() -> int:
    """A loopback TCP port that is free now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SERVER_FLAGS = ("chunks", "chunk_size", "mem_blocks", "workers", "sync")


def server_defaults() -> dict:
    """The chunkserver's own defaults of the flags the bench can set."""
    from speedy.common.config import server_parser
    p = server_parser()
    return {name: p.get_default(name) for name in SERVER_FLAGS}


def server_flags(args: argparse.Namespace) -> dict:
    """{flag: (value, 'default' or 'given')}: the server's defaults unless told otherwise."""
    defaults = server_defaults()
    flags = {}
    for name in SERVER_FLAGS:
        given = getattr(args, name, None)
        flags[name] = (defaults[name], "default") if given is None else (given, "given")
    return flags


def flags_label(flags: dict) -> str:
    """'chunks=4 (given), chunk_size=2GiB (default), ...'."""
    def show(name: str, value: int) -> str:
        return size_label(value) if name == "chunk_size" else str(value)
    return ", ".join(f"{name}={show(name, v)} ({how})" for name, (v, how) in flags.items())


def check_room(parent_dir: str, flags: dict) -> None:
    """Refuse to start a server whose preallocated chunks would not fit on the disk."""
    need = flags["chunks"][0] * flags["chunk_size"][0]
    st = os.statvfs(parent_dir)
    free = st.f_bavail * st.f_frsize
    if need > free - 4 * (1 << 30):
        raise BenchError(f"the server's {flags['chunks'][0]} chunks of "
                         f"{size_label(flags['chunk_size'][0])} do not fit in {parent_dir} "
                         f"({free / (1 << 30):.1f} GiB free, 4 GiB kept): use --disk-dir on a "
                         "larger disk, or --chunks / --chunk-size")


def spawn_server(args: argparse.Namespace, parent_dir: str) -> ServerProcess:
    """Start spy_server.py on a free loopback port with a temporary data dir; wait for it.

    Only the flags given to the bench are passed: the rest are the server's defaults.
    """
    flags = server_flags(args)
    check_room(parent_dir, flags)
    data_dir = tempfile.mkdtemp(prefix="speedy-bench-server-", dir=parent_dir)
    port = free_port()
    cmd = [sys.executable, *SERVER_MODULE, f"--port={port}", "--ip=127.0.0.1",
           f"--data_dir={data_dir}", f"--group_id={args.group}", "--master_ip=127.0.0.1",
           f"--master_port={free_port()}", "--report_interval=3600"]
    cmd += [f"--{name}={value}" for name, (value, how) in flags.items() if how == "given"]
    log_path = os.path.join(data_dir, "server.log")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                start_new_session=True)
    server = ServerProcess(proc, port, data_dir, log_path, cmd, flags)
    deadline = time.monotonic() + args.start_timeout
    target = Target("server", "127.0.0.1", port, args.group)
    while True:
        if proc.poll() is not None:
            tail = server.log_tail()
            server.stop()
            raise BenchError(f"spy_server.py exited with code {proc.returncode}:\n{tail}")
        try:
            preflight(target)
            return server
        except BenchError:
            if time.monotonic() > deadline:
                tail = server.log_tail()
                server.stop()
                raise BenchError(f"spy_server.py not serving after {args.start_timeout:g} s"
                                 f":\n{tail}") from None
            time.sleep(0.1)


# --- report ----------------------------------------------------------------------------

def ratio(value: float, base: float) -> str:
    """'0.41x' (or 'n/a' without a base)."""
    return f"{value / base:.2f}x" if base > 0 else "n/a"


def median_rate(results: list[PhaseResult]) -> PhaseResult:
    """The result with the median ops/s (the lower middle one of an even count)."""
    return sorted(results, key=lambda r: r.ops_per_s)[(len(results) - 1) // 2]


def round_ratios(report: dict) -> list[float]:
    """Per alternated round: the target's GET ops/s over the client library's."""
    return [g.ops_per_s / c.ops_per_s for _p, g, _cp, c in report.get("rounds", [])
            if c.ops_per_s > 0]


def phase_line(r: PhaseResult, label: str = "") -> str:
    """'PUT 4KiB c=16: 12,345 ops/s 48.2 MB/s p50 0.91 ms p99 3.10 ms errors 0'."""
    line = (f"{label}{r.name} {size_label(r.size)} c={r.conns}: {r.ops_per_s:,.0f} ops/s "
            f"{r.mb_per_s:,.1f} MB/s p50 {r.p50_ms:.2f} ms p99 {r.p99_ms:.2f} ms "
            f"errors {r.errors}")
    if r.errors:
        kinds = ", ".join(f"{k}: {v}" for k, v in sorted(r.error_kinds.items()))
        line += f" [{kinds}]"
    return line


def cpu_line(r: PhaseResult) -> str | None:
    """'  CPU per request: load generator 21 us, server 160 us' (what can be measured)."""
    parts = []
    for who, seconds in (("load generator", r.client_cpu_s), ("server", r.server_cpu_s)):
        us = r.cpu_us_per_op(seconds)
        if us is not None:
            parts.append(f"{who} {us:,.0f} us")
    return "    CPU per request: " + ", ".join(parts) if parts else None


def format_report(report: dict) -> str:
    """The human-readable report."""
    out = [f"speedy bench: {report['target']} ({report['mode']}), {report['n']:,} files of "
           f"{size_label(report['size'])}, c={report['c']}, {report['procs']} load processes, "
           f"{os.cpu_count()} CPUs"]
    if report.get("server_command"):
        out.append("server: " + " ".join(report["server_command"][1:]))
        out.append("server flags: " + report["server_flags_label"])
    sink = {p.name: p for p in report.get("sink_results", [])}
    client = {p.name: p for p in report.get("client_results", [])}
    disk = report.get("disk_mb_per_s")
    for r in report["results"]:
        line = phase_line(r)
        notes = []
        if r.name in sink:
            notes.append(f"{ratio(r.ops_per_s, sink[r.name].ops_per_s)} sink")
        ratios = round_ratios(report) if r.name == "GET" else []
        if ratios:
            notes.append(f"{statistics.median(ratios):.2f}x client library, median of "
                         f"{len(ratios)} alternated rounds")
        elif r.name in client:
            notes.append(f"{ratio(r.ops_per_s, client[r.name].ops_per_s)} client library")
        if r.name == "PUT" and disk:
            notes.append(f"{ratio(r.mb_per_s, disk)} disk MB/s")
        if notes:
            line += "  (" + ", ".join(notes) + ")"
        out.append(line)
        out.extend(x for x in (cpu_line(r),) if x)
        if r.error_sample:
            out.append(f"    e.g. {r.error_sample}")
    if len(report.get("rounds", [])) > 1:
        out.append("    GET rounds (alternated, client library last): " + ", ".join(
            f"{g.ops_per_s:,.0f}/{c.ops_per_s:,.0f} = {ratio(g.ops_per_s, c.ops_per_s)}"
            for _p, g, _cp, c in report["rounds"]))
    mixed = report.get("mixed_results")
    if mixed:
        small, big = mixed
        out.append(f"mixed: PUT {size_label(small.size)} c={small.conns} while PUT "
                   f"{size_label(big.size)} c={big.conns} run:")
        for r in mixed:
            line = "  " + phase_line(r, "MIXED ")
            if r is big and disk:
                line += f"  ({ratio(r.mb_per_s, disk)} disk MB/s)"
            out.append(line)
        out.append("  " + (cpu_line(small) or "").strip() + " (server: both loads)")
    if sink or disk or client:
        out.append("baseline:")
        for r in report.get("client_results", []):
            out.append("  " + phase_line(r, "CLIENT "))
        for r in report.get("sink_results", []):
            out.append("  " + phase_line(r, "SINK "))
            out.extend("  " + x for x in (cpu_line(r),) if x)
        if disk:
            out.append(f"  DISK sequential write {size_label(report['disk_bytes'])} + fsync "
                       f"({report['disk_dir']}): {disk:,.1f} MB/s")
    out.append("(MB = 2^20 bytes; latency per request, p50/p99 over all requests; CPU = user "
               "+ system time of the processes during the phase, divided by its requests)")
    return "\n".join(out)


def report_json(report: dict) -> str:
    """The report as JSON."""
    d = dict(report)
    d["results"] = [r.to_dict() for r in report["results"]]
    d["sink_results"] = [r.to_dict() for r in report.get("sink_results", [])]
    d["client_results"] = [r.to_dict() for r in report.get("client_results", [])]
    if "rounds" in report:
        d["rounds"] = [{"get": g.to_dict(), "client_get": c.to_dict()}
                       for _p, g, _cp, c in report["rounds"]]
        ratios = round_ratios(report)
        d["get_ratio_median"] = round(statistics.median(ratios), 3) if ratios else None
    if "mixed_results" in report:
        d["mixed_results"] = [r.to_dict() for r in report["mixed_results"]]
    sink = {r.name: r for r in report.get("sink_results", [])}
    d["ratios"] = {r.name: round(r.ops_per_s / sink[r.name].ops_per_s, 3)
                   for r in report["results"]
                   if r.name in sink and sink[r.name].ops_per_s > 0}
    return json.dumps(d, indent=2)


# --- command line -------------------------------------------------------------------------

class Parser(argparse.ArgumentParser):
    """argparse with a one-line error message."""

    def error(self, message: str):
        """Print 'speedy bench: error: ...' and exit 2."""
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """The bench's options."""
    p = Parser(
        prog="speedy bench",
        description="PUT N files of one size with C connections, GET them back in random "
                    "order; compare with a no-storage sink and the raw disk.")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--server", type=parse_address, metavar="HOST:PORT",
                       help="one chunkserver, raw protocol")
    where.add_argument("--master", type=parse_address, metavar="HOST:PORT",
                       help="a cluster, through speedy.client (put/get)")
    where.add_argument("--start-server", action="store_true",
                       help="start a temporary spy_server.py for this run")
    where.add_argument("--gateway", type=parse_address, metavar="HOST:PORT",
                       help="an HTTP gateway: POST /blobs and GET /<key> (keep-alive)")
    p.add_argument("--client-baseline", type=parse_address, metavar="MASTER",
                   help="with --gateway: also run the load through speedy.client against "
                        "this master, the gateway's, and compare")
    p.add_argument("--rounds", type=positive_int, default=1,
                   help="with --client-baseline: GET phases of the gateway and the client "
                        "library in turn, this many each; the median round is reported "
                        "(default 1)")
    p.add_argument("--group", type=group_id, default=1, help="group id of --server (default 1)")
    p.add_argument("--min-replicas", type=positive_int, default=None,
                   help="with --master: RW replicas a group needs to take writes "
                        "(default: the client's)")
    p.add_argument("-n", type=positive_int, default=10000, help="files (default 10000)")
    p.add_argument("-c", type=positive_int, default=16,
                   help="concurrent connections (default 16)")
    p.add_argument("--size", type=parse_size, default=4096,
                   help="file size: 4096, 4k, 64k, 1m... (default 4k)")
    p.add_argument("--fid-start", type=int, default=None,
                   help="first fid with --server (default: a random high base)")
    p.add_argument("--procs", type=positive_int, default=None,
                   help="load-generator processes (default: min(c, max(2, CPUs), 8))")
    p.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=True,
                   help="also run the sink and disk baseline (default: yes)")
    p.add_argument("--sink-procs", type=positive_int, default=2,
                   help="processes of the baseline sink (default 2)")
    p.add_argument("--disk-dir", default=".",
                   help="directory on the data disk (default: current dir)")
    p.add_argument("--disk-size", type=parse_size, default=256 * MiB,
                   help="bytes written to measure the disk (default 256m)")
    p.add_argument("--timeout", type=positive_float, default=30.0,
                   help="seconds before a silent request counts as an error (default 30)")
    p.add_argument("--server-pgid", type=positive_int, default=None, metavar="PGID",
                   help="count the CPU of this process group as the server's (the "
                        "gateway's, when bench/gateway.py started it)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.add_argument("--mixed", type=parse_size, default=None, metavar="SIZE",
                   help="after GET, PUT N more files of --size while --mixed-c connections "
                        "PUT files of SIZE (e.g. 1m): the small PUTs' latency under a large "
                        "upload")
    p.add_argument("--mixed-c", type=positive_int, default=4,
                   help="connections of the --mixed large PUTs (default 4)")
    s = p.add_argument_group("--start-server options (default: the server's own defaults)")
    s.add_argument("--workers", type=positive_int, default=None, help="server --workers")
    s.add_argument("--sync", type=int, choices=(0, 1), default=None, help="server --sync")
    s.add_argument("--chunks", type=positive_int, default=None, help="server --chunks")
    s.add_argument("--chunk-size", type=parse_size, default=None, help="server --chunk_size")
    s.add_argument("--mem-blocks", type=positive_int, default=None,
                   help="server --mem_blocks")
    s.add_argument("--start-timeout", type=positive_float, default=60.0,
                   help="seconds to wait for the server (default 60)")
    return p


def run(args: argparse.Namespace) -> dict:
    """Run the whole benchmark; the report as a dict."""
    procs = args.procs or min(args.c, max(2, min(8, os.cpu_count() or 2)))
    fid_start = args.fid_start if args.fid_start is not None else \
        random.randrange(1 << 40, 1 << 62)
    if not 0 <= fid_start <= (1 << 64) - 1 - args.n * 2 - MIXED_MAX:
        raise BenchError("--fid-start out of range (fids are u64)")
    disk_dir = os.path.abspath(args.disk_dir)
    if not os.path.isdir(disk_dir):
        raise BenchError(f"--disk-dir {disk_dir} is not a directory")
    server = None
    report: dict = {"n": args.n, "c": args.c, "size": args.size, "procs": procs,
                    "fid_start": fid_start}
    try:
        if args.start_server:
            server = spawn_server(args, disk_dir)
            target = Target("server", "127.0.0.1", server.port, args.group, args.timeout)
            report["server_command"] = server.command
            report["server_flags"] = {k: v for k, (v, _how) in server.flags.items()}
            report["server_flags_label"] = flags_label(server.flags)
        elif args.server:
            target = Target("server", args.server[0], args.server[1], args.group, args.timeout)
        elif args.gateway:
            target = Target("gateway", args.gateway[0], args.gateway[1], timeout=args.timeout)
        else:
            target = Target("master", args.master[0], args.master[1], timeout=args.timeout,
                            min_replicas=args.min_replicas)
        report["target"] = target.address
        report["mode"] = {"server": "raw protocol", "gateway": "HTTP gateway"}.get(
            target.kind, "speedy.client")
        preflight(target)
        pgid = server.proc.pid if server else args.server_pgid
        probe = (lambda: processes_cpu(pgid=pgid)) if pgid else None
        if args.gateway and args.client_baseline:
            base = Target("master", args.client_baseline[0], args.client_baseline[1],
                          timeout=args.timeout, min_replicas=args.min_replicas)
            preflight(base)
            rounds = run_alternated(target, base, args.n, args.c, args.size, procs,
                                    args.rounds, probe)
            report["rounds"] = rounds
            report["results"] = [rounds[0][0], median_rate([r[1] for r in rounds])]
            report["client_results"] = [rounds[0][2], median_rate([r[3] for r in rounds])]
        else:
            report["results"] = run_load(target, args.n, args.c, args.size, procs, fid_start,
                                         probe)
        if args.mixed:
            big_max = MIXED_MAX
            if server:  # at most half the server's room: the small PUTs must find some
                room = server.flags["chunks"][0] * server.flags["chunk_size"][0]
                big_max = max(1, min(big_max, room // 2 // (args.mixed + 64)))
            report["mixed_results"] = run_mixed(target, args.n, args.c, args.size, args.mixed,
                                                args.mixed_c, procs, fid_start + args.n,
                                                big_max, probe)
    finally:
        if server is not None:
            server.stop()
    if args.baseline:
        from speedy.bench.sink import start_sink
        with start_sink(args.size, args.sink_procs) as sink:
            st = Target("server", sink.host, sink.port, args.group, args.timeout)
            pids = [p.pid for p in sink.procs]
            report["sink_results"] = run_load(st, args.n, args.c, args.size, procs, fid_start,
                                              lambda: processes_cpu(pids))
        report["disk_dir"] = disk_dir
        report["disk_bytes"] = args.disk_size
        report["disk_mb_per_s"] = round(measure_disk(disk_dir, args.disk_size), 1)
    return report


def main(argv: list[str] | None = None) -> int:
    """``python -m speedy bench``: 0 when no request failed, 3 when some did or it could not
    run, 2 on a usage error."""
    p = build_parser()
    try:
        args = p.parse_args(argv)
    except SystemExit as e:
        return int(e.code or 0)
    if args.client_baseline and not args.gateway:
        print("speedy bench: --client-baseline applies to --gateway only", file=sys.stderr)
        return EXIT_USAGE
    if (args.master or args.gateway) and args.fid_start is not None:
        print("speedy bench: --fid-start applies to --server only", file=sys.stderr)
        return EXIT_USAGE
    try:
        report = run(args)
    except (BenchError, LoadError) as e:
        print(f"speedy bench: {e}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as e:  # e.g. --disk-dir not writable, disk full
        where = f"{e.filename}: " if e.filename else ""
        print(f"speedy bench: {where}{e.strerror or e}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        print("speedy bench: interrupted", file=sys.stderr)
        return 130
    print(report_json(report) if args.json else format_report(report), flush=True)
    failed = sum(r.errors for r in report["results"] + report.get("sink_results", [])
                 + report.get("mixed_results", []))
    return EXIT_ERRORS if failed else EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
