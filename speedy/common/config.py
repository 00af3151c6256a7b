"""Configuration of both daemons: flags over environment over config file over defaults."""
from __future__ import annotations

import argparse
import difflib
import io
import ipaddress
import os
import re
import sys
from typing import Callable, Sequence

import configargparse

from speedy import __version__
from speedy.format.chunkfile import DEFAULT_CHUNK_SIZE, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE

SERVER_ENV_PREFIX = "SPEEDY_SERVER_"
MASTER_ENV_PREFIX = "SPEEDY_MASTER_"
GATEWAY_ENV_PREFIX = "SPEEDY_GATEWAY_"
MAX_MEM_BLOCKS = 5120
MAX_CHUNKS = 200

SERVER_USAGE = """spy_server
===========================
[--port=<port>]
[--ip=<listen address>]
[--data_dir=<data directory>]
[--error_log=<error log file>]
[--mem_blocks=<memory blocks for stream buffer>]
[--chunks=<number of chunks>]
[--sync=<sync when write, 1 or 0>]
[--daemonize=<1 or 0>]
--master_ip=<chunkmaster ip addr>
--master_port=<chunkmaster port>
--group_id=<unique group id>"""
USAGE_HINT = "(see --help for every option)"
CLI_ONLY = frozenset({"help", "version", "config", "print_config"})  # no env, no file key
SECRETS = frozenset({"token", "signing_key"})  # and every option named *_key or *_token
EPILOG = ("Every option can also be set in the --config file (key = value, one a line) "
          "or in the environment variable shown; the command line wins over the "
          "environment, the environment over the file, the file over the defaults.")
CONFIG_LINE = re.compile(r"^\s*([^:=;#\s]+)")


def spellings(names: Sequence[str]) -> list[str]:
    """names plus the other spelling of each long option (--data_dir <-> --data-dir)."""
    out = list(names)
    for n in names:
        if n.startswith("--"):
            for alt in ("--" + n[2:].replace("_", "-"), "--" + n[2:].replace("-", "_")):
                if alt not in out:
                    out.append(alt)
    return out


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Defaults shown once and only when there is one; one spelling per option."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        d = action.default
        if action.required or d is None or d is False or d == "" or d == argparse.SUPPRESS \
                or "default" in text or not action.option_strings or action.dest in CLI_ONLY:
            return text
        return text + " (default: %(default)s)"

    def _format_action_invocation(self, action: argparse.Action) -> str:
        strings = action.option_strings
        names = [o for i, o in enumerate(strings)  # the first spelling of each
                 if not any(alt in strings[:i] for alt in spellings([o])[1:])]
        if not names:
            return super()._format_action_invocation(action)
        if action.nargs == 0:
            return ", ".join(names)
        return f"{', '.join(names)} {self._format_args(action, action.dest.upper())}"


class ConfigFileParser(configargparse.DefaultConfigFileParser):
    """key = value lines; an unknown key is an error naming the file and the line."""

    def __init__(self, parser: configargparse.ArgParser | None = None):
        super().__init__()
        self.parser = parser

    def parse(self, stream):
        """The items of a config file; ConfigFileParserException for an unknown key."""
        text = stream.read()
        name = getattr(stream, "name", "config file")
        known = self.known_keys()
        for number, line in enumerate(text.splitlines(), 1):
            m = CONFIG_LINE.match(line)
            if known is None or not m or line.strip()[:1] in ("#", ";", "[") \
                    or line.strip().startswith("---"):
                continue
            key = m.group(1)
            if key.lstrip("-") not in known:
                near = difflib.get_close_matches(key.lstrip("-"), sorted(known), 1)
                raise configargparse.ConfigFileParserException(
                    f"{name}, line {number}: unknown option {key!r}"
                    + (f" (did you mean {near[0]!r}?)" if near else ""))
        body = io.StringIO(text)
        body.name = name
        return super().parse(body)

    def known_keys(self) -> set[str] | None:
        """The keys a config file may set (None: no parser to ask)."""
        if self.parser is None:
            return None
        return {key.lstrip("-") for a in self.parser._actions if a.dest not in CLI_ONLY
                for key in self.parser.get_possible_config_keys(a)}


class DaemonParser(configargparse.ArgParser):
    """The daemons' parser: env vars for settable options only, file:line errors."""

    def __init__(self, *args, env_prefix: str = "", **kw):
        kw.setdefault("formatter_class", HelpFormatter)
        kw.setdefault("epilog", EPILOG)
        kw.setdefault("add_config_file_help", False)
        self.env_prefix = env_prefix
        super().__init__(*args, **kw)
        self._config_file_parser = ConfigFileParser(self)

    def add_argument(self, *names: str, **kw):
        """Both spellings of every long option: --data_dir and --data-dir."""
        action = super().add_argument(*spellings(names), **kw)
        if self.env_prefix and action.dest not in CLI_ONLY and action.option_strings:
            action.env_var = self.env_prefix + action.dest.upper()
        return action

    def format_help(self) -> str:
        """argparse's help without configargparse's own precedence note (EPILOG has it)."""
        text = super().format_help()
        return re.sub(r"\s*In general, command-line values override.*?defaults\.\s*$", "\n",
                      text, flags=re.S)

    def error(self, message: str):
        """Usage, the --help hint, the message; exit 2."""
        self.print_usage(sys.stderr)
        if self.usage:
            print(USAGE_HINT, file=sys.stderr)
        message = re.sub(r"(--(\w+))/--[\w-]+", r"\1", message)  # one spelling per flag
        self.exit(2, f"{self.prog}: error: {message}\n")


def int_range(lo: int, hi: int | None = None) -> Callable[[str], int]:
    """An argparse type: an integer in lo..hi."""
    def parse(text: str) -> int:
        try:
            value = int(text, 10)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < lo or (hi is not None and value > hi):
            bound = f"{lo}..{hi}" if hi is not None else f">= {lo}"
            raise argparse.ArgumentTypeError(f"{value} is out of range ({bound})")
        return value
    parse.__name__ = "integer"
    return parse


SIZE_RE = re.compile(r"^\s*(\d+)\s*([kmg]?)(?:i?b)?\s*$", re.IGNORECASE)
SIZE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def byte_size(text: str) -> int:
    """An argparse type: a byte count such as 4096, 256K, 64KiB, 4M, 1MB (powers of 1024)."""
    m = SIZE_RE.match(text)
    if not m or int(m.group(1)) < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size (e.g. 4096, 256K, 4M)")
    return int(m.group(1)) * SIZE_UNITS[m.group(2).lower()]


def fraction(text: str) -> float:
    """An argparse type: a number in 0..1."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value <= 1:
        raise argparse.ArgumentTypeError(f"{value} is out of range (0..1)")
    return value


def positive_float(text: str) -> float:
    """An argparse type: a number of seconds > 0."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{value} must be > 0")
    return value


def parse_networks(text: str) -> tuple:
    """The addresses or networks of a comma-separated list (10.0.0.0/8, ::1); ValueError
    naming a malformed one."""
    out = []
    for item in filter(None, (x.strip() for x in text.split(","))):
        try:
            out.append(ipaddress.ip_network(item, strict=False))
        except ValueError:
            raise ValueError(f"{item!r} is not an address or network "
                             f"(e.g. 127.0.0.1, 10.0.0.0/8)") from None
    return tuple(out)


def networks(text: str) -> str:
    """An argparse type: a comma-separated list of addresses or networks, normalized."""
    try:
        return ",".join(str(n) for n in parse_networks(text))
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def flag01(text: str) -> int:
    """An argparse type: 0 or 1."""
    if text not in ("0", "1"):
        raise argparse.ArgumentTypeError(f"{text!r} must be 0 or 1")
    return int(text)


port = int_range(1, 65535)
port_or_zero = int_range(0, 65535)


def _common(p: configargparse.ArgParser, pid_help: str) -> None:
    """Options every daemon has."""
    p.add_argument("--config", is_config_file=True, help="config file (key = value lines)")
    p.add_argument("--error_log", default="", help="log file (default: stderr)")
    p.add_argument("--daemonize", type=flag01, default=0, help="detach as a daemon, 0 or 1")
    p.add_argument("--pidfile", default="", help=pid_help)
    p.add_argument("--log_level", default="INFO",
                   choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log level")
    p.add_argument("--print_config", "--print-config", action="store_true",
                   help="print the effective value and source of every option, then exit")
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}")


def server_parser() -> configargparse.ArgParser:
    """The chunkserver's option parser (the seed usage text plus the new flags)."""
    p = DaemonParser(
        prog="spy_server", usage=SERVER_USAGE, env_prefix=SERVER_ENV_PREFIX,
        description="speedy chunkserver: stores blobs in preallocated chunk files.")
    p.add_argument("--port", type=port, default=8000, help="listen port")
    p.add_argument("--ip", default="127.0.0.1", help="listen address")
    p.add_argument("--data_dir", default=".", help="folder of the chunk files")
    p.add_argument("--mem_blocks", type=int_range(1, MAX_MEM_BLOCKS), default=1024,
                   help="upload memory blocks of 1 MiB")
    p.add_argument("--chunks", type=int_range(1, MAX_CHUNKS), default=20,
                   help="number of chunk files")
    p.add_argument("--sync", type=flag01, default=0, help="fsync after writes, 0 or 1")
    p.add_argument("--master_ip", required=True, help="chunkmaster address")
    p.add_argument("--master_port", type=port, required=True, help="chunkmaster port")
    p.add_argument("--group_id", type=int_range(1, 65535), required=True,
                   help="group id (1..65535)")
    p.add_argument("--chunk_size", type=int_range(MIN_CHUNK_SIZE, MAX_CHUNK_SIZE),
                   default=DEFAULT_CHUNK_SIZE, help="bytes per chunk file")
    p.add_argument("--workers", type=int_range(1, 256), default=os.cpu_count() or 1,
                   help="gevent worker processes")
    p.add_argument("--report_interval", type=positive_float, default=10.0,
                   help="seconds between reports to the master")
    p.add_argument("--metrics_port", type=port_or_zero, default=0,
                   help="Prometheus metrics port (0: off)")
    p.add_argument("--admin_allow", default="",
                   help="addresses, CIDRs or host names allowed to send admin opcodes, "
                        "comma separated (default: loopback and the master's address)")
    p.add_argument("--token", default="", help="shared token sent to the master")
    p.add_argument("--max_conns", type=int_range(0, 1 << 20), default=0,
                   help="client connections per worker (0: 10000, within the open-files "
                        "limit); past it the oldest idle one is closed to make room")
    p.add_argument("--max_conns_per_ip", type=int_range(0, 1 << 20), default=0,
                   help="client connections per source address in one worker (0: 1000)")
    p.add_argument("--idle_timeout", type=positive_float, default=300.0,
                   help="seconds a connection may stay idle between requests")
    p.add_argument("--mem_blocks_per_ip", type=int_range(0, MAX_MEM_BLOCKS), default=0,
                   help="pool blocks one source address may hold in one worker "
                        "(0: three quarters of --mem_blocks)")
    p.add_argument("--compact_threshold", type=fraction, default=0.3,
                   help="compact a chunk once this fraction of its used bytes is garbage "
                        "(deleted records); 0 turns automatic compaction off")
    p.add_argument("--compact_rate", type=int_range(1 << 16), default=64 << 20,
                   help="bytes per second a compaction copies at most")
    p.add_argument("--compact_keep_deleted", type=int_range(0), default=7 * 86400,
                   help="seconds a compacted chunk keeps a tombstone of each deleted file "
                        "(so that `speedy admin repair` propagates the delete); 0: none")
    _common(p, "pid file of the supervisor (written at start, removed at exit)")
    return p


def master_parser() -> configargparse.ArgParser:
    """The chunkmaster's option parser."""
    p = DaemonParser(
        prog="spy_master", env_prefix=MASTER_ENV_PREFIX,
        description="speedy chunkmaster: group registry, heartbeats and fids in SQLite.")
    p.add_argument("--ip", default="127.0.0.1", help="listen address")
    p.add_argument("--port", type=port_or_zero, default=8099, help="listen port")
    p.add_argument("--db", default="./speedy_master.db", help="SQLite database file")
    p.add_argument("--heartbeat_timeout", type=positive_float, default=30.0,
                   help="seconds without a report before an RW server turns RO")
    p.add_argument("--monitor_interval", type=positive_float, default=5.0,
                   help="seconds between health checks")
    p.add_argument("--token", default="",
                   help="shared token required on write routes (empty: none)")
    master_limits(p)
    _common(p, "pid file of the master (written at start, removed at exit)")
    return p


def gateway_parser() -> configargparse.ArgParser:
    """The HTTP gateway's option parser."""
    p = DaemonParser(
        prog="speedy gateway", env_prefix=GATEWAY_ENV_PREFIX,
        description="speedy HTTP gateway: blobs over HTTP and the original front end's API.")
    p.add_argument("--ip", default="127.0.0.1", help="listen address")
    p.add_argument("--port", type=port_or_zero, default=8088, help="listen port")
    p.add_argument("--master", default="127.0.0.1:8099", help="chunkmaster HOST:PORT")
    p.add_argument("--token", default="", help="shared token sent to the master")
    p.add_argument("--metadb", default="sqlite:///./speedy_gateway.db",
                   help="metadata database URL: sqlite:///path or postgresql://...")
    p.add_argument("--workers", type=int_range(1, 256), default=os.cpu_count() or 1,
                   help="gevent worker processes")
    p.add_argument("--signing_key", default="",
                   help="secret for signed URLs; when set, blob routes need ?expires=&sig=")
    p.add_argument("--max_body", type=int_range(0), default=5 << 30,
                   help="largest upload in bytes (413 above)")
    p.add_argument("--timeout", type=positive_float, default=10.0,
                   help="seconds for each chunkserver call")
    p.add_argument("--idle_timeout", type=positive_float, default=60.0,
                   help="seconds an HTTP connection may wait for its next request and take "
                        "to send its head (408), or stall in a body or an answer")
    p.add_argument("--metrics_port", type=port_or_zero, default=0,
                   help="Prometheus metrics port (0: off; GET /metrics is always served)")
    p.add_argument("--access_log", default="",
                   help="file of one line per request (Combined Log Format and seconds); "
                        "'-': standard output; empty: off")
    p.add_argument("--drain_seconds", type=int_range(0, 300), default=0,
                   help="seconds between SIGTERM and the stop during which /healthz answers "
                        "503 while requests are still served (load balancers go first)")
    p.add_argument("--trusted_proxies", type=networks, default="",
                   help="proxies (addresses, networks) whose X-Forwarded-For names the "
                        "client in the access log; empty: none")
    gateway_s3_options(p)
    _common(p, "pid file of the gateway's supervisor (written at start, removed at exit)")
    return p


def gateway_s3_options(p: configargparse.ArgParser) -> None:
    """The gateway's S3 API and maintenance options."""
    p.add_argument("--s3_access_key", default="",
                   help="S3 access key id (with --s3_secret_key; the S3 API is off without keys)")
    p.add_argument("--s3_secret_key", default="", help="S3 secret access key")
    p.add_argument("--s3_keys", default="",
                   help="more S3 key pairs, comma-separated ACCESS_KEY:SECRET (config file)")
    p.add_argument("--s3_region", default="us-east-1", help="the region S3 clients sign for")
    p.add_argument("--s3_upload_ttl", type=positive_float, default=7 * 24 * 3600.0,
                   help="seconds after which an unfinished multipart upload is aborted")
    p.add_argument("--part_size", type=byte_size, default=4 << 20,
                   help="uploads larger than this are stored in parts of this size (4M)")
    p.add_argument("--min_replicas", type=int_range(1, 64), default=2,
                   help="RW servers a group needs to take writes (1 for a one-server store)")
    p.add_argument("--maintenance_interval", type=positive_float, default=30.0,
                   help="seconds between retries of blob frees and clean-ups of abandoned "
                        "uploads (worker 0)")


def s3_key_pairs(ns: argparse.Namespace) -> dict[str, str]:
    """{access key: secret} from --s3_access_key/--s3_secret_key and --s3_keys."""
    pairs: dict[str, str] = {}
    if ns.s3_access_key or ns.s3_secret_key:
        pairs[ns.s3_access_key] = ns.s3_secret_key
    for item in filter(None, (x.strip() for x in ns.s3_keys.split(","))):
        key, sep, secret = item.partition(":")
        pairs[key.strip()] = secret.strip() if sep else ""
    return pairs


def master_limits(p: configargparse.ArgParser) -> None:
    """The master's database initialization and connection limits."""
    p.add_argument("--init_db", action="store_true",
                   help="initialize an existing empty (0-byte) database file")
    p.add_argument("--max_connections", type=int_range(16), default=4096,
                   help="open HTTP connections at most; at the limit a new one evicts "
                        "the longest idle")
    p.add_argument("--max_source_connections", type=int_range(1), default=1024,
                   help="open HTTP connections from one address at most (same rule)")
    p.add_argument("--read_timeout", type=positive_float, default=10.0,
                   help="seconds to receive a whole request after its first line; 408")
    p.add_argument("--idle_timeout", type=positive_float, default=60.0,
                   help="seconds a connection may wait for its next request")


def absolutize(ns: argparse.Namespace, names: Sequence[str]) -> None:
    """Resolve relative paths before any chdir (daemonizing changes directory)."""
    for name in names:
        value = getattr(ns, name, "")
        if value:
            setattr(ns, name, os.path.abspath(value))


def secret(dest: str) -> bool:
    """True for an option whose value print_config must not show."""
    return dest in SECRETS or dest.endswith(("_key", "_token"))


def masked(dest: str, value: object) -> object:
    """The value to show for an option: secrets as '***' (or '' when unset)."""
    return ("***" if value else "") if secret(dest) else value


def print_config(p: configargparse.ArgParser, ns: argparse.Namespace, out=None) -> None:
    """Every option's effective value and where it came from, as ConfigArgParse's
    format_values() tells (secrets masked; the config files read come first)."""
    out = out or sys.stdout
    actions = [a for a in p._actions if a.dest not in CLI_ONLY and a.dest != argparse.SUPPRESS]
    dest_of = {name: a.dest for a in actions for name in a.option_strings + [a.env_var or ""]
               if name}
    heads = {"Command Line Args": "command_line", "Environment Variables":
             "environment_variables", "Defaults": "defaults"}
    sources: dict[str, str] = {}
    files: list[str] = []
    section = ""
    for line in p.format_values().splitlines():
        if not line.startswith("  "):
            head, _, rest = line.partition(":")
            section = heads.get(head, "")
            if head.startswith("Config File ("):
                section = "config_file"
                files.append(line[len("Config File ("):line.rindex(")")])
            for token in rest.split() if section == "command_line" else ():
                dest = dest_of.get(token.split("=", 1)[0])
                if dest:
                    sources.setdefault(dest, section)
            continue
        key = line.strip().split(":", 1)[0]
        sources.setdefault(dest_of.get(key, key.replace("-", "_")), section)
    print(f"# config file: {', '.join(files) if files else 'none'}", file=out)
    for action in actions:
        value = masked(action.dest, getattr(ns, action.dest, None))
        origin = sources.get(action.dest, "defaults")
        print(f"{action.dest} = {value!r}  # from {origin}; env {action.env_var or ''}",
              file=out)


def parse(p: configargparse.ArgParser, argv: Sequence[str] | None,
          paths: Sequence[str]) -> argparse.Namespace:
    """Parse argv, resolve paths, handle --print_config."""
    ns = p.parse_args(argv)
    absolutize(ns, paths)
    if ns.print_config:
        print_config(p, ns)
        sys.exit(0)
    return ns


def load_server_config(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The chunkserver's configuration, checked; exits 2 with a message when invalid."""
    p = server_parser()
    ns = parse(p, argv, ("data_dir", "error_log", "pidfile"))
    if not os.path.isdir(ns.data_dir):
        p.error(f"argument --data_dir: {ns.data_dir} is not a directory")
    ns.admin_allow = [a.strip() for a in ns.admin_allow.split(",") if a.strip()] or \
        ["127.0.0.1", "::1", ns.master_ip]
    return ns


def load_master_config(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The chunkmaster's configuration, checked; exits 2 with a message when invalid."""
    p = master_parser()
    ns = parse(p, argv, ("db", "error_log", "pidfile"))
    parent = os.path.dirname(ns.db) or "."
    if not os.path.isdir(parent):
        p.error(f"argument --db: directory {parent} does not exist")
    return ns


def load_gateway_config(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """The gateway's configuration, checked; exits 2 with a message when invalid."""
    p = gateway_parser()
    ns = parse(p, argv, ("error_log", "pidfile"))
    if ns.access_log == "-" and ns.daemonize:
        p.error("argument --access_log: '-' (standard output) is lost with --daemonize=1: "
                "name a file")
    if ns.access_log not in ("", "-"):
        ns.access_log = os.path.abspath(ns.access_log)
        if not os.path.isdir(os.path.dirname(ns.access_log)):
            p.error(f"argument --access_log: directory {os.path.dirname(ns.access_log)} "
                    f"does not exist")
    if ns.metadb.startswith("sqlite:///"):
        path = os.path.abspath(ns.metadb[len("sqlite:///"):])
        if not os.path.isdir(os.path.dirname(path)):
            p.error(f"argument --metadb: directory {os.path.dirname(path)} does not exist")
        ns.metadb = "sqlite:///" + path
    elif not ns.metadb.startswith(("postgresql://", "postgres://")):
        p.error("argument --metadb: expected sqlite:///path or postgresql://...")
    for key, secret in s3_key_pairs(ns).items():
        if not key or not secret or not key.isprintable() or " " in key:
            p.error("argument --s3_access_key/--s3_secret_key/--s3_keys: every S3 key pair "
                    "needs an access key (no spaces) and a secret")
    return ns
