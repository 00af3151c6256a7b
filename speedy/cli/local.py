"""`speedy local up|down|status`: a master and one group of chunkservers on loopback.

Each daemon runs in its own session (process group), detached from the terminal, with
its output in <dir>/<name>/ and its pid in <dir>/local.json; `down` stops every process
of those groups (SIGTERM, then SIGKILL). The process helpers here are also what the test
suite's cluster fixture uses.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable

from speedy.client.client import RW, ClusterError, Master, MasterError
from speedy.common.config import MAX_CHUNKS, MAX_MEM_BLOCKS, int_range, positive_float
from speedy.format.chunkfile import MAX_CHUNK_SIZE, MIN_CHUNK_SIZE

MASTER_MODULE = ["-m", "speedy.master"]       # spy_master, from any directory
SERVER_MODULE = ["-m", "speedy.chunkserver"]  # spy_server
GATEWAY_MODULE = ["-m", "speedy", "gateway"]  # the HTTP gateway
STATE_FILE = "local.json"
DEFAULT_DIR = "./speedy-local"
DEFAULT_BASE_PORT = 8099
HOST = "127.0.0.1"
EXIT_OK, EXIT_NOT_RUNNING, EXIT_USAGE, EXIT_FAILED = 0, 1, 2, 3


class LocalError(Exception):
    """The local cluster could not be started or stopped."""


# -- processes --------------------------------------------------------------------------


def spawn(cmd: list[str], log_path: str, cwd: str | None = None,
          env: dict | None = None) -> subprocess.Popen:
    """Start cmd in a new session (its own process group), output appended to log_path."""
    with open(log_path, "ab") as log:
        return subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                                cwd=cwd, env=env, start_new_session=True, close_fds=True)


def proc_state(pid: int) -> str | None:
    """The /proc state letter of pid (None when gone; "?" without /proc)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read().decode(errors="replace")
        return stat.rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None
    except (OSError, IndexError):
        try:
            os.kill(pid, 0)
            return "?"
        except ProcessLookupError:
            return None
        except PermissionError:
            return "?"


def alive(pid: int) -> bool:
    """True when pid exists and is not a zombie."""
    return pid > 0 and proc_state(pid) not in (None, "Z")


def cmdline(pid: int) -> str:
    """The command line of pid ("" when unknown)."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def group_members(pgid: int, marker: str = "") -> list[int]:
    """Live (non-zombie) processes of process group pgid whose cmdline holds marker."""
    if not os.path.isdir("/proc"):
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except OSError:
            return []
    out = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                rest = f.read().decode(errors="replace").rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(rest) > 2 and rest[0] != "Z" and rest[2] == str(pgid) and \
                (not marker or marker in cmdline(int(name))):
            out.append(int(name))
    return out


def stop_group(pgid: int, marker: str = "", timeout: float = 10.0,
               proc: subprocess.Popen | None = None) -> int:
    """SIGTERM every process of group pgid, SIGKILL what is left after timeout.

    Only groups with a live member whose cmdline holds marker are touched (pids get
    reused). Returns how many processes were signalled.
    """
    members = group_members(pgid, marker)
    if not members:
        if proc is not None:
            reap(proc, 0.1)
        return 0
    for sig, wait in ((signal.SIGTERM, timeout), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except ProcessLookupError:
            break
        except PermissionError:
            for pid in group_members(pgid, marker):
                try:
                    os.kill(pid, sig)
                except OSError:
                    pass
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc is not None:
                reap(proc, 0)
            if not group_members(pgid, marker):
                if proc is not None:
                    reap(proc, 1.0)
                return len(members)
            time.sleep(0.05)
    if proc is not None:
        reap(proc, 1.0)
    return len(members)


def reap(proc: subprocess.Popen, timeout: float) -> None:
    """Collect a child's exit status so that it leaves no zombie."""
    try:
        proc.wait(timeout)
    except subprocess.TimeoutExpired:
        pass


def port_free(port: int, host: str = HOST) -> bool:
    """True when nothing listens on host:port and it can be bound."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
            return True
        except OSError:
            return False


def wait_until(check: Callable[[], bool], timeout: float, what: str,
               dead: Callable[[], str | None] = lambda: None, step: float = 0.1) -> None:
    """Poll check() until true; LocalError on timeout or when dead() says why."""
    deadline = time.monotonic() + timeout
    while True:
        if check():
            return
        why = dead()
        if why:
            raise LocalError(why)
        if time.monotonic() > deadline:
            raise LocalError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(step)


def listening(port: int, host: str = HOST) -> bool:
    """True when host:port accepts a connection."""
    try:
        with socket.create_connection((host, port), timeout=0.5):
            return True
    except OSError:
        return False


def tail(path: str, lines: int = 5) -> str:
    """The last lines of a log file, joined with ' | '."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - 4096))
            text = f.read().decode(errors="replace")
    except OSError:
        return ""
    return " | ".join(line.strip() for line in text.splitlines()[-lines:] if line.strip())


def master_cmd(port: int, db: str, log: str, heartbeat_timeout: float = 30.0,
               monitor_interval: float = 1.0, python: str = sys.executable) -> list[str]:
    """The spy_master.py command line."""
    return [python, *MASTER_MODULE, f"--ip={HOST}", f"--port={port}", f"--db={db}",
            f"--error_log={log}", f"--heartbeat_timeout={heartbeat_timeout}",
            f"--monitor_interval={monitor_interval}"]


def server_cmd(port: int, group: int, data_dir: str, log: str, master_port: int,
               chunks: int = 4, chunk_size: int = 64 << 20, mem_blocks: int = 64,
               workers: int = 1, report_interval: float = 1.0,
               python: str = sys.executable) -> list[str]:
    """The spy_server.py command line."""
    return [python, *SERVER_MODULE, f"--ip={HOST}", f"--port={port}", f"--data_dir={data_dir}",
            f"--group_id={group}", f"--master_ip={HOST}", f"--master_port={master_port}",
            f"--chunks={chunks}", f"--chunk_size={chunk_size}", f"--mem_blocks={mem_blocks}",
            f"--workers={workers}", f"--report_interval={report_interval}",
            f"--error_log={log}"]


def gateway_cmd(port: int, master_port: int, metadb: str, log: str, workers: int = 1,
                python: str = sys.executable, min_replicas: int = 2,
                access_log: str = "") -> list[str]:
    """The `speedy gateway` command line (one worker: a local cluster is for trying)."""
    return [python, *GATEWAY_MODULE, f"--ip={HOST}", f"--port={port}",
            f"--master={HOST}:{master_port}", f"--metadb=sqlite:///{metadb}",
            f"--workers={workers}", f"--error_log={log}", f"--min_replicas={min_replicas}",
            f"--access_log={access_log}"]


def route_statuses(master: Master) -> dict[tuple[str, int], int]:
    """(ip, port) -> master status of every server in the route ({} if unreachable)."""
    try:
        route = master.route()
    except ClusterError:
        return {}
    return {s.addr: s.status for servers in route.groups.values() for s in servers}


def all_rw(master: Master, addrs: list[tuple[str, int]]) -> bool:
    """True when every addr is RW in the master's route."""
    st = route_statuses(master)
    return all(st.get(a) == RW for a in addrs)


# -- the local cluster ------------------------------------------------------------------


@dataclass
class Daemon:
    """One process of the local cluster."""

    name: str
    port: int
    pid: int = 0
    group: int = 0

    def log(self, root: str) -> str:
        """Its log file."""
        return os.path.join(root, self.name, f"{self.name}.log")


@dataclass
class State:
    """What <dir>/local.json remembers."""

    dir: str
    master: Daemon
    servers: list[Daemon] = field(default_factory=list)
    gateway: Daemon | None = None

    def daemons(self) -> list[Daemon]:
        """Master first, the gateway last."""
        return [self.master] + self.servers + ([self.gateway] if self.gateway else [])

    def save(self) -> None:
        """Write local.json atomically."""
        path = os.path.join(self.dir, STATE_FILE)
        with open(path + ".tmp", "w") as f:
            json.dump({"dir": self.dir, "master": asdict(self.master),
                       "servers": [asdict(s) for s in self.servers],
                       "gateway": asdict(self.gateway) if self.gateway else None}, f, indent=1)
        os.replace(path + ".tmp", path)

    @classmethod
    def load(cls, root: str) -> "State | None":
        """The saved state, or None."""
        try:
            with open(os.path.join(root, STATE_FILE)) as f:
                obj = json.load(f)
            gw = obj.get("gateway")
            return cls(root, Daemon(**obj["master"]), [Daemon(**s) for s in obj["servers"]],
                       Daemon(**gw) if gw else None)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise LocalError(f"{os.path.join(root, STATE_FILE)} is damaged ({e}); "
                             f"stop the processes by hand and remove it") from None


def running(d: Daemon, root: str) -> bool:
    """True when d's process group still has a live process of this cluster."""
    return d.pid > 0 and bool(group_members(d.pid, root))


def fresh_state(root: str, base_port: int, n_servers: int) -> State:
    """Ports: the master on base_port, the servers on the ports after it."""
    if not 1 <= base_port <= 65535 - n_servers:
        raise LocalError(f"--base-port {base_port} leaves no room for {n_servers} servers")
    gw_port = base_port - 11 if base_port > 11 else base_port + n_servers + 1  # 8088
    return State(root, Daemon("master", base_port),
                 [Daemon(f"cs{i + 1}", base_port + 1 + i, group=1) for i in range(n_servers)],
                 Daemon("gateway", gw_port))


def describe(state: State) -> str:
    """"master on port P, servers on ports A, B"."""
    return (f"master on port {state.master.port}, servers on ports "
            f"{', '.join(str(s.port) for s in state.servers)}" +
            (f", gateway on port {state.gateway.port}" if state.gateway else ""))


def chosen_state(ns: argparse.Namespace, root: str) -> State:
    """The saved cluster, or a new layout when none runs and the options differ."""
    base = DEFAULT_BASE_PORT if ns.base_port is None else ns.base_port
    servers = 3 if ns.servers is None else ns.servers
    state = State.load(root)
    if state is None:
        return fresh_state(root, base, servers)
    other_port = ns.base_port is not None and ns.base_port != state.master.port
    other_count = ns.servers is not None and ns.servers != len(state.servers)
    if not (other_port or other_count):
        return state
    if any(running(d, root) for d in state.daemons()):
        raise LocalError(f"a local cluster already runs in {root}: {describe(state)}; "
                         f"stop it first (speedy local down --dir {root}) or use another "
                         f"--dir")
    return fresh_state(root, base if ns.base_port is not None else state.master.port,
                       servers if ns.servers is not None else len(state.servers))


def drop_stale(master: Master, state: State) -> list[str]:
    """Remove the master's registrations of servers this cluster no longer has (a run
    with another --base-port or --servers); the "host:port" of each one removed."""
    want = {(s.group, HOST, s.port) for s in state.servers}
    try:
        listed = master.all_servers() or []
    except ClusterError:
        return []
    dropped = []
    for s in listed:
        if (s.group_id, s.ip, s.port) in want:
            continue
        try:
            master.request("POST", "/v1/chunkserver/removeserver",
                           {"GroupId": s.group_id, "Ip": s.ip, "Port": s.port})
        except MasterError:
            continue
        dropped.append(f"{s.ip}:{s.port}")
    return dropped


def up(ns: argparse.Namespace) -> int:
    """Start what is not running, register, wait until every server is RW."""
    root = os.path.abspath(ns.dir)
    os.makedirs(root, exist_ok=True)
    state = chosen_state(ns, root)
    todo = [d for d in state.daemons() if not running(d, root)]
    busy = [d.port for d in todo if not port_free(d.port)]
    if busy:
        raise LocalError(f"port(s) {', '.join(map(str, busy))} already in use; "
                         f"choose others with --base-port")
    procs: dict[str, subprocess.Popen] = {}
    try:
        start(ns, state, todo, procs)
    except BaseException:
        for d in todo:  # leave nothing half-started behind
            if d.name in procs:
                stop_group(d.pid, root, timeout=5.0, proc=procs[d.name])
                d.pid = 0
        state.save()
        raise
    print_usage(state, already=not todo)
    return EXIT_OK


def start(ns: argparse.Namespace, state: State, todo: list[Daemon],
          procs: dict[str, subprocess.Popen]) -> None:
    """Start the daemons in todo (master first), then wait until every server is RW."""
    root = state.dir
    m = state.master
    master = Master(f"{HOST}:{m.port}", timeout=2.0)
    for d in todo:
        os.makedirs(os.path.join(root, d.name), exist_ok=True)
        if d is m:
            cmd = master_cmd(m.port, os.path.join(root, "master", "master.db"), d.log(root))
        elif d is state.gateway:
            cmd = gateway_cmd(d.port, m.port, os.path.join(root, d.name, "gateway.db"),
                              d.log(root), min_replicas=min(2, len(state.servers)),
                              access_log=os.path.join(root, d.name, "access.log"))
        else:
            data = os.path.join(root, d.name, "data")
            os.makedirs(data, exist_ok=True)
            cmd = server_cmd(d.port, d.group, data, d.log(root), m.port, chunks=ns.chunks,
                             chunk_size=ns.chunk_size, mem_blocks=ns.mem_blocks,
                             report_interval=1.0)
            master.init_server(d.group, HOST, d.port)
        procs[d.name] = spawn(cmd, os.path.join(root, d.name, "stdout.log"), cwd=root)
        d.pid = procs[d.name].pid
        state.save()
        if d is m or d is state.gateway:
            wait_until(lambda: listening(d.port), ns.wait, f"the {d.name} on port {d.port}",
                       died(procs[d.name], d, root))
        if d is m:
            dropped = drop_stale(master, state)
            if dropped:
                print(f"dropped the registrations of servers this cluster no longer runs: "
                      f"{', '.join(dropped)}", file=sys.stderr)
    addrs = [(HOST, s.port) for s in state.servers]

    def any_died() -> str | None:
        for d in state.servers:
            if d.name in procs:
                why = died(procs[d.name], d, root)()
                if why:
                    return why
        return None
    wait_until(lambda: all_rw(master, addrs), ns.wait, "the chunkservers to turn RW",
               any_died, step=0.2)


def died(proc: subprocess.Popen, d: Daemon, root: str) -> Callable[[], str | None]:
    """A check saying why proc exited, if it did."""
    def check() -> str | None:
        if proc.poll() is None:
            return None
        return (f"{d.name} (port {d.port}) exited with status {proc.returncode}: "
                f"{tail(d.log(root)) or tail(os.path.join(root, d.name, 'stdout.log'))}")
    return check


def print_usage(state: State, already: bool) -> None:
    """How to use the cluster."""
    m = f"{HOST}:{state.master.port}"
    servers = " ".join(f"{HOST}:{s.port}" for s in state.servers)
    flag = "" if state.master.port == DEFAULT_BASE_PORT else f" --master {m}"
    if len(state.servers) < 2:  # the client's default needs 2 RW servers per group
        flag += f" --min-replicas {len(state.servers)}"
    print(f"speedy local cluster {'is already' if already else 'is'} up: master {m}, "
          f"group 1 = {servers}\ndata and logs in {state.dir}\n\n"
          f"  key=$(python -m speedy{flag} put FILE)\n"
          f"  python -m speedy{flag} get \"$key\" -o COPY\n"
          f"  python -m speedy{flag} status\n" +
          (f"  curl -F file=@FILE http://{HOST}:{state.gateway.port}/blobs    "
           f"(the HTTP gateway)\n"
           f"  web console: http://{m}/ (cluster), "
           f"http://{HOST}:{state.gateway.port}/ui/ (files)\n" if state.gateway else "") +
          "  python -m speedy local down" +
          ("" if state.dir == os.path.abspath(DEFAULT_DIR) else f" --dir {state.dir}"))


def down(ns: argparse.Namespace) -> int:
    """Stop every process of the local cluster (servers first, then the master)."""
    root = os.path.abspath(ns.dir)
    state = State.load(root)
    if state is None:
        print(f"no local cluster in {root}: nothing to stop")
        return EXIT_OK
    stopped = 0
    for d in ([state.gateway] if state.gateway else []) + state.servers + [state.master]:
        if d.pid > 0:
            stopped += stop_group(d.pid, root, timeout=ns.wait)
            d.pid = 0
    left = [d.name for d in state.daemons() if running(d, root)]
    if left:
        raise LocalError(f"could not stop {', '.join(left)}")
    os.unlink(os.path.join(root, STATE_FILE))
    print(f"stopped the local cluster in {root} ({stopped} processes); data kept"
          if stopped else f"the local cluster in {root} was not running")
    return EXIT_OK


def status(ns: argparse.Namespace) -> int:
    """Which processes run, and what the master says about the servers."""
    root = os.path.abspath(ns.dir)
    state = State.load(root)
    if state is None:
        print(f"no local cluster in {root}")
        return EXIT_NOT_RUNNING
    master = Master(f"{HOST}:{state.master.port}", timeout=2.0)
    st = route_statuses(master) if running(state.master, root) else {}
    names = {0: "INIT", 1: "RW", 2: "RO", 3: "ERR"}
    up_count = 0
    for d in state.daemons():
        ok = running(d, root)
        up_count += ok
        extra = "" if d is state.master or d is state.gateway else \
            f"  master says {names.get(st.get((HOST, d.port)), 'nothing')}"
        print(f"{d.name:7} {HOST}:{d.port:<5} pid {d.pid:<7} "
              f"{'running' if ok else 'stopped'}{extra}")
    if up_count == len(state.daemons()):
        return EXIT_OK
    return EXIT_NOT_RUNNING if up_count == 0 else EXIT_FAILED


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The options of `speedy local`."""
    p.add_argument("action", choices=["up", "down", "status"])
    p.add_argument("--dir", default=os.environ.get("SPEEDY_LOCAL_DIR", DEFAULT_DIR),
                   help="where data, logs and pids go (default %(default)s)")
    p.add_argument("--base-port", type=int_range(1, 65535), default=None,
                   help=f"the master's port; chunkservers use the next ones "
                        f"(default {DEFAULT_BASE_PORT}, or the running cluster's)")
    p.add_argument("--servers", type=int_range(1, 9), default=None, metavar="N",
                   help="chunkservers in the group, 1..9 (default 3, or the running "
                        "cluster's); with 1, print commands use --min-replicas 1")
    p.add_argument("--chunks", type=int_range(1, MAX_CHUNKS), default=4,
                   help=f"chunk files per server, 1..{MAX_CHUNKS} (default 4)")
    p.add_argument("--chunk-size", type=int_range(MIN_CHUNK_SIZE, MAX_CHUNK_SIZE),
                   default=64 << 20, help="bytes per chunk file (default 64 MiB)")
    p.add_argument("--mem-blocks", type=int_range(1, MAX_MEM_BLOCKS), default=64,
                   help="upload memory blocks of 1 MiB per server (default 64)")
    p.add_argument("--wait", type=positive_float, default=60.0,
                   help="seconds to wait for start or stop (default %(default)s)")


def run(ns: argparse.Namespace) -> int:
    """Dispatch an action; errors are one line on stderr."""
    try:
        return {"up": up, "down": down, "status": status}[ns.action](ns)
    except (LocalError, ClusterError) as e:
        print(f"speedy local {ns.action}: {e}", file=sys.stderr)
        return EXIT_FAILED


def main(argv: list[str] | None = None) -> int:
    """`python -m speedy.cli.local ACTION [options]`."""
    p = argparse.ArgumentParser(prog="speedy local")
    add_arguments(p)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
