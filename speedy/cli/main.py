"""The `speedy` command: put/get/rm/stat/status/admin/bench/local/gateway/url over the client.

Exit codes: 0 success, 1 not found (a key or a local file), 2 usage error, 3 cluster
error. Errors are one line on stderr, never a traceback.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from typing import Callable, Sequence

import configargparse

from speedy import __version__
from speedy.client.chunkconn import format_addr, parse_addr
from speedy.common.config import (ConfigFileParser, HelpFormatter, byte_size, int_range,
                                  spellings)
from speedy.common.config import positive_float as positive
from speedy.client.client import (DEFAULT_MASTER, DEFAULT_PART_SIZE, Client, NotFoundError,
                                  ServerInfo, SpeedyError)
from speedy.client.master import master_address
from speedy.wire.manifest import KeyFormatError, parse_key

EXIT_OK, EXIT_NOT_FOUND, EXIT_USAGE, EXIT_CLUSTER = 0, 1, 2, 3
EXIT_INTERRUPTED, EXIT_PIPE = 130, 141
PROGRESS_MIN = 4 << 20


def config_files() -> list[str]:
    """Default client config files, least specific first."""
    xdg = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return ["/etc/speedy/client.conf", os.path.join(xdg, "speedy", "client.conf")]


class UsageError(Exception):
    """Bad command-line usage (exit 2)."""

    def __init__(self, message: str, prog: str = "speedy"):
        super().__init__(message)
        self.prog = prog


class Parser(configargparse.ArgParser):
    """An ArgParser whose errors are exceptions (one line, exit 2), not usage dumps;
    both spellings of each long option (--part-size, --part_size); config-file keys
    checked (an unknown one names the file and the line)."""

    def __init__(self, *args, **kw):
        kw.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kw)
        self._config_file_parser = ConfigFileParser(self)

    def add_argument(self, *names: str, **kw):
        """add_argument with the other spelling of each long option as an alias."""
        return super().add_argument(*spellings(names), **kw)

    def error(self, message: str) -> None:
        where = self.prog.split(" ", 1)[1] if " " in self.prog else ""
        raise UsageError(f"{where}: {message}" if where else message, self.prog)


def master_addr(text: str) -> str:
    """An argparse type: HOST:PORT (or http://HOST:PORT/) of the master."""
    try:
        return master_address(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def server_addr(text: str) -> tuple[str, int]:
    """An argparse type: HOST:PORT of a chunkserver (the port is required)."""
    try:
        host, port = parse_addr(text, 0)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    if not port:
        raise argparse.ArgumentTypeError(f"{text!r}: expected HOST:PORT")
    return host, port


def group_id(text: str) -> int:
    """An argparse type: a group id 1..65535."""
    if not text.isdigit() or not 1 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"group id {text!r} must be 1..65535")
    return int(text)


def count(text: str) -> int:
    """An argparse type: an integer 1..64."""
    if not text.isdigit() or not 1 <= int(text) <= 64:
        raise argparse.ArgumentTypeError(f"{text!r} must be an integer 1..64")
    return int(text)


def human(n: int | float) -> str:
    """1.5 GiB style."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def duration(seconds: float) -> str:
    """1m05s / 12.3s style."""
    if seconds >= 60:
        return f"{int(seconds // 60)}m{int(seconds % 60):02d}s"
    return f"{seconds:.1f}s"


class ProgressLine:
    """A progress line on stderr (bytes, %, rate, ETA), only on a terminal and only past
    PROGRESS_MIN bytes; finish() ends it with the total, the time and the mean rate."""

    def __init__(self, label: str, total: int | None = None, stream=None):
        self.label = label
        self.total = total
        self.stream = stream or sys.stderr
        self.enabled = self.stream.isatty()
        self.shown = False
        self.last = 0.0
        self.start = time.monotonic()
        self.done = 0

    def __call__(self, done: int, total: int | None = None) -> None:
        total = total or self.total
        self.done = done
        if not self.enabled or max(done, total or 0) < PROGRESS_MIN:
            return
        now = time.monotonic()
        if now - self.last < 0.1 and (total is None or done < total):
            return
        self.last = now
        elapsed = max(now - self.start, 1e-6)
        rate = done / elapsed
        pct = f" {100 * done // total:3d}%" if total else ""
        of = f"/{human(total)}" if total else ""
        eta = f" ETA {duration((total - done) / rate)}" if total and rate and done < total \
            else ""
        self.stream.write(f"\r{self.label}: {human(done)}{of}{pct} {human(rate)}/s{eta}  ")
        self.stream.flush()
        self.shown = True

    def finish(self, ok: bool = True) -> None:
        """End the line: the total, the time and the mean rate (after a success)."""
        if not self.enabled:
            return
        if ok and max(self.done, self.total or 0) >= PROGRESS_MIN:
            elapsed = max(time.monotonic() - self.start, 1e-6)
            self.stream.write(f"\r{self.label}: {human(self.done)} in {duration(elapsed)}, "
                              f"{human(self.done / elapsed)}/s" + " " * 12 + "\n")
        elif self.shown:
            self.stream.write("\n")
        self.stream.flush()


def make_client(ns: argparse.Namespace) -> Client:
    """A Client from the global options."""
    return Client(ns.master, token=ns.token or None, timeout=ns.timeout,
                  part_size=ns.part_size, parallel=ns.parallel, min_replicas=ns.min_replicas)


# -- commands ---------------------------------------------------------------------------


def cmd_put(ns: argparse.Namespace) -> int:
    """put FILE...: one key per line on stdout."""
    if ns.files.count("-") > 1:
        raise UsageError("put: '-' (stdin) may be given only once")
    for path in ns.files:
        if path == "-":
            continue
        if not os.path.exists(path):
            raise FileNotFoundError(f"put: {path}: no such file")
        if os.path.isdir(path):
            raise UsageError(f"put: {path}: is a directory")
        if not os.access(path, os.R_OK):
            raise PermissionError(f"put: {path}: permission denied")
    with make_client(ns) as client:
        for path in ns.files:
            if path == "-":
                bar = ProgressLine("put stdin")
                ok = False
                try:
                    key = client.put(sys.stdin.buffer, progress=bar)
                    ok = True
                finally:
                    bar.finish(ok)
            else:
                bar = ProgressLine(f"put {path}", os.path.getsize(path))
                ok = False
                try:
                    key = client.put_file(path, progress=bar)
                    ok = True
                finally:
                    bar.finish(ok)
            sys.stdout.write(key + "\n")
            sys.stdout.flush()
    return EXIT_OK


def cmd_get(ns: argparse.Namespace) -> int:
    """get KEY [-o FILE]: the bytes to stdout or FILE (written whole, or not at all)."""
    key = parse_key(ns.key)
    if not ns.output and sys.stdout.isatty():
        raise UsageError(f"get: refusing to write the bytes of {key} to a terminal; "
                         f"use -o FILE, a pipe, or -o - to force it")
    with make_client(ns) as client:
        bar = ProgressLine(f"get {key}")
        ok = False
        try:
            if not ns.output or ns.output == "-":
                client.get_to(key, sys.stdout.buffer, progress=bar)
                sys.stdout.buffer.flush()
                ok = True
                return EXIT_OK
            target = os.path.abspath(ns.output)
            if os.path.isdir(target):
                raise UsageError(f"get: {ns.output} is a directory")
            if not os.path.isdir(os.path.dirname(target)):
                raise FileNotFoundError(f"get: {os.path.dirname(target)}: no such directory")
            try:
                fd, tmp = tempfile.mkstemp(prefix=".speedy-", dir=os.path.dirname(target))
            except OSError as e:
                raise type(e)(f"get: cannot write in {os.path.dirname(target)}: "
                              f"{e.strerror or e}") from None
            try:
                with os.fdopen(fd, "wb") as out:
                    client.get_to(key, out, progress=bar)
                os.chmod(tmp, 0o666 & ~umask())
                os.replace(tmp, target)
                ok = True
            except BaseException:
                os.unlink(tmp)
                raise
        finally:
            bar.finish(ok)
    return EXIT_OK


def umask() -> int:
    """The process umask."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


def cmd_rm(ns: argparse.Namespace) -> int:
    """rm KEY...: delete from every replica; warn about the ones it could not reach."""
    keys = [parse_key(k) for k in ns.keys]
    code = EXIT_OK
    with make_client(ns) as client:
        for key in keys:
            try:
                missed = client.delete(key)
            except NotFoundError as e:
                warn(str(e))
                code = max(code, EXIT_NOT_FOUND)
                continue
            except SpeedyError as e:
                warn(str(e))
                code = EXIT_CLUSTER
                continue
            if missed:
                warn(f"rm {key}: deleted, but could not reach {', '.join(missed)} "
                     f"(it may still hold the file)")
                code = EXIT_CLUSTER
    return code


def cmd_stat(ns: argparse.Namespace) -> int:
    """stat KEY: size, parts, replicas."""
    with make_client(ns) as client:
        st = client.stat(parse_key(ns.key))
    if ns.json:
        print(json.dumps({"key": st.key, "size": st.size, "multipart": st.multipart,
                          "parts": st.parts, "replicas": st.replicas,
                          "missing": st.missing, "part_keys": st.part_keys}))
        return EXIT_OK
    print(f"key       {st.key}")
    print(f"size      {st.size}")
    print(f"parts     {st.parts}{' (multi-part)' if st.multipart else ''}")
    print(f"replicas  {' '.join(st.replicas)}")
    print(f"missing   {' '.join(st.missing) or '-'}")
    return EXIT_OK


def heartbeat_age(s: ServerInfo, now: float | None = None) -> float | None:
    """Seconds since the server's last heartbeat, when the master says."""
    now = time.time() if now is None else now
    for name in ("HeartbeatAge", "LastHeartbeatAge"):
        if isinstance(s.raw.get(name), (int, float)):
            return float(s.raw[name])
    for name in ("LastHeartbeat", "UpdateTime", "LastReport"):
        if isinstance(s.raw.get(name), (int, float)) and s.raw[name] > 0:
            return max(0.0, now - float(s.raw[name]))
    return None


def cmd_status(ns: argparse.Namespace) -> int:
    """status: every chunkserver, as a table or JSON."""
    with make_client(ns) as client:
        servers = client.servers()
    rows = [{"group": s.group_id, "server": s.name, "status": s.status_name,
             "free": s.total_free, "max_free": s.max_free, "pending": s.pending,
             "writing": s.writing, "reading": s.reading, "chunks": s.total_chunks,
             "connections": s.conns, "heartbeat_age": heartbeat_age(s),
             "garbage": s.garbage_bytes} for s in servers]
    if ns.json:
        print(json.dumps({"master": ns.master, "servers": rows}, indent=1))
        return EXIT_OK
    if not rows:
        print(f"master {ns.master}: no chunkserver registered")
        return EXIT_OK
    head = ["GROUP", "SERVER", "STATUS", "FREE", "MAXFREE", "PENDING", "WRITING",
            "READING", "CHUNKS", "GARBAGE", "HEARTBEAT"]
    table = [head] + [[str(r["group"]), r["server"], r["status"], human(r["free"]),
                       human(r["max_free"]), str(r["pending"]), str(r["writing"]),
                       str(r["reading"]), str(r["chunks"]), human(r["garbage"]),
                       "-" if r["heartbeat_age"] is None else f"{r['heartbeat_age']:.0f}s ago"]
                      for r in rows]
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return EXIT_OK


def cmd_add_server(ns: argparse.Namespace) -> int:
    """admin add-server GROUP HOST:PORT."""
    host, port = ns.server
    with make_client(ns) as client:
        client.add_server(ns.group, host, port)
    print(f"registered {format_addr((host, port))} in group {ns.group} (INIT until it reports)",
          file=sys.stderr)
    return EXIT_OK


def cmd_set_status(ns: argparse.Namespace) -> int:
    """admin set-status HOST:PORT rw|ro|err."""
    host, port = ns.server
    with make_client(ns) as client:
        client.set_server_status(host, port, ns.status)
    print(f"{format_addr((host, port))} is now {ns.status.upper()}", file=sys.stderr)
    return EXIT_OK


def cmd_remove_server(ns: argparse.Namespace) -> int:
    """admin remove-server GROUP HOST:PORT."""
    host, port = ns.server
    with make_client(ns) as client:
        client.remove_server(ns.group, host, port)
    print(f"removed {format_addr((host, port))} from group {ns.group}", file=sys.stderr)
    return EXIT_OK


def cmd_repair(ns: argparse.Namespace) -> int:
    """admin repair GROUP: copy missing or damaged files between a group's replicas."""
    from speedy.client import repair
    with make_client(ns) as client:
        return repair.run(client, ns.group, dry_run=ns.dry_run, out=sys.stdout)


def cmd_bench(ns: argparse.Namespace) -> int:
    """bench ...: speedy.bench.runner.main(argv)."""
    try:
        from speedy.bench import runner as bench
    except ImportError:
        raise UsageError("bench: speedy.bench.runner is not installed") from None
    return int(bench.main(list(ns.args)) or 0)


def cmd_gateway(ns: argparse.Namespace) -> int:
    """gateway ...: the HTTP gateway daemon (speedy.gateway.daemon.main(argv))."""
    from speedy.gateway.daemon import main as gateway_main
    return gateway_main(list(ns.args))


def cmd_url(ns: argparse.Namespace) -> int:
    """url KEY: a signed gateway URL for KEY (or /blobs), valid --expires seconds."""
    from speedy.gateway import signing
    if not ns.signing_key:
        raise UsageError("url: --signing_key (or SPEEDY_GATEWAY_SIGNING_KEY) is required")
    path = "/" + ns.key.lstrip("/")
    if path != "/blobs":
        parse_key(ns.key)
    query = signing.signed_query(ns.signing_key, ns.method, path, ns.expires)
    print(f"{ns.gateway.rstrip('/')}{path}?{query}")
    return EXIT_OK


def cmd_completion(ns: argparse.Namespace) -> int:
    """completion bash|zsh: the completion script, generated from this parser."""
    from speedy.cli.completion import SHELLS
    sys.stdout.write(SHELLS[ns.shell](build_parser()))
    return EXIT_OK


def cmd_local(ns: argparse.Namespace) -> int:
    """local up|down|status."""
    from speedy.cli import local
    return local.run(ns)


# -- parsing ----------------------------------------------------------------------------


def build_parser() -> Parser:
    """The whole command line."""
    p = Parser(prog="speedy", default_config_files=config_files(),
               description="speedy blob store client. Exit codes: 0 ok, 1 not found, "
                           "2 usage error, 3 cluster error.")
    p.add_argument("-c", "--config", is_config_file=True,
                   help="config file (key = value lines; default ~/.config/speedy/client.conf)")
    p.add_argument("--master", type=master_addr, default=DEFAULT_MASTER,
                   env_var="SPEEDY_MASTER",
                   help="master HOST:PORT or http://HOST:PORT (default %(default)s)")
    p.add_argument("--token", default="", env_var="SPEEDY_TOKEN",
                   help="token for the master's write routes (X-Speedy-Token)")
    p.add_argument("--timeout", type=positive, default=10.0, env_var="SPEEDY_TIMEOUT",
                   help="seconds per socket operation (default %(default)s)")
    p.add_argument("--part-size", type=byte_size, default=DEFAULT_PART_SIZE,
                   env_var="SPEEDY_PART_SIZE",
                   help="files larger than this are stored in parts (default 4M)")
    p.add_argument("--parallel", type=count, default=4, env_var="SPEEDY_PARALLEL",
                   help="parts uploaded at once (default %(default)s)")
    p.add_argument("--min-replicas", type=count, default=2, env_var="SPEEDY_MIN_REPLICAS",
                   help="a put needs a group with at least this many RW servers "
                        "(default %(default)s; 1 for a one-server cluster)")
    p.add_argument("--version", action="version", version=f"speedy {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    def cmd(name: str, fn: Callable[[argparse.Namespace], int], help: str,
            parent=sub) -> argparse.ArgumentParser:
        sp = parent.add_parser(name, help=help, description=help)
        sp.set_defaults(func=fn)
        return sp

    sp = cmd("put", cmd_put, "store files ('-' for stdin); prints one key per file")
    sp.add_argument("files", nargs="+", metavar="FILE")
    sp = cmd("get", cmd_get, "write a key's bytes to stdout or a file")
    sp.add_argument("key", metavar="KEY")
    sp.add_argument("-o", "--output", metavar="FILE",
                    help="write to FILE instead of stdout (- : stdout, even a terminal)")
    sp = cmd("rm", cmd_rm, "delete keys from every replica")
    sp.add_argument("keys", nargs="+", metavar="KEY")
    sp = cmd("stat", cmd_stat, "size, parts and replicas of a key")
    sp.add_argument("key", metavar="KEY")
    sp.add_argument("--json", action="store_true", help="print JSON")
    sp = cmd("status", cmd_status, "the cluster's chunkservers")
    sp.add_argument("--json", action="store_true", help="print JSON")

    admin = sub.add_parser("admin", help="operator commands", description="operator commands")
    asub = admin.add_subparsers(dest="admin_command", metavar="ADMIN_COMMAND")
    asub.required = True
    sp = cmd("add-server", cmd_add_server, "register a chunkserver in a group", asub)
    sp.add_argument("group", type=group_id, metavar="GROUP")
    sp.add_argument("server", type=server_addr, metavar="HOST:PORT")
    sp = cmd("set-status", cmd_set_status, "set a chunkserver's status in the master", asub)
    sp.add_argument("server", type=server_addr, metavar="HOST:PORT")
    sp.add_argument("status", type=str.lower, choices=["rw", "ro", "err"])
    sp = cmd("remove-server", cmd_remove_server, "remove a chunkserver from the registry",
             asub)
    sp.add_argument("group", type=group_id, metavar="GROUP")
    sp.add_argument("server", type=server_addr, metavar="HOST:PORT")
    sp = cmd("repair", cmd_repair, "copy missing or damaged files between the replicas "
             "of a group", asub)
    sp.add_argument("group", type=group_id, metavar="GROUP")
    sp.add_argument("--dry-run", action="store_true", help="only report what is missing")
    from speedy.cli import compact
    compact.add_commands(cmd, asub)

    sp = cmd("bench", cmd_bench, "benchmark (speedy bench --help for its options)")
    sp.add_argument("args", nargs=argparse.REMAINDER)
    sp = cmd("gateway", cmd_gateway, "the HTTP gateway daemon (speedy gateway --help)")
    sp.add_argument("args", nargs=argparse.REMAINDER)
    sp = cmd("url", cmd_url, "print a signed gateway URL for a key")
    sp.add_argument("key", metavar="KEY", help="a key, or /blobs for an upload URL")
    sp.add_argument("--expires", type=int_range(1, 10 ** 9), default=3600,
                    help="seconds the URL stays valid (default %(default)s)")
    sp.add_argument("--method", type=str.upper, choices=["GET", "DELETE", "POST"],
                    default="GET", help="the request the URL allows (default GET)")
    sp.add_argument("--gateway", default="http://127.0.0.1:8088",
                    env_var="SPEEDY_GATEWAY_URL", help="the gateway's base URL")
    sp.add_argument("--signing_key", "--signing-key", default="",
                    env_var="SPEEDY_GATEWAY_SIGNING_KEY", help="the gateway's --signing_key")
    from speedy.cli import local
    sp = cmd("local", cmd_local, "a local cluster: up, down or status")
    local.add_arguments(sp)
    sp = cmd("completion", cmd_completion, "print a shell completion script: "
             "eval \"$(speedy completion bash)\"")
    sp.add_argument("shell", choices=["bash", "zsh"])
    return p


def warn(message: str) -> None:
    """One line on stderr."""
    print(f"speedy: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """Run the command line; returns the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        return run(lambda: cmd_bench(argparse.Namespace(args=argv[1:])))
    if argv[:1] == ["gateway"]:
        return run(lambda: cmd_gateway(argparse.Namespace(args=argv[1:])))
    try:
        ns = build_parser().parse_args(argv)
    except UsageError as e:
        warn(f"{e} (see {e.prog} --help)")
        return EXIT_USAGE
    return run(lambda: ns.func(ns))


def run(fn: Callable[[], int]) -> int:
    """Call fn, turning every exception into one line on stderr and an exit code."""
    try:
        return fn()
    except UsageError as e:
        warn(str(e))
        return EXIT_USAGE
    except KeyFormatError as e:
        warn(str(e))
        return EXIT_USAGE
    except NotFoundError as e:
        warn(str(e))
        return EXIT_NOT_FOUND
    except SpeedyError as e:
        warn(str(e))
        return EXIT_CLUSTER
    except BrokenPipeError:
        try:  # the reader went away (speedy get KEY | head): stop quietly
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except OSError:
            pass
        return EXIT_PIPE
    except (FileNotFoundError, IsADirectoryError, NotADirectoryError) as e:
        warn(e.strerror and e.filename and f"{e.filename}: {e.strerror}" or str(e))
        return EXIT_NOT_FOUND
    except OSError as e:
        warn(e.strerror and e.filename and f"{e.filename}: {e.strerror}" or str(e))
        return EXIT_USAGE
    except KeyboardInterrupt:
        warn("interrupted")
        return EXIT_INTERRUPTED
    except Exception as e:  # a bug: still one line, never a traceback
        warn(f"internal error: {type(e).__name__}: {e}")
        return EXIT_CLUSTER


if __name__ == "__main__":
    sys.exit(main())
