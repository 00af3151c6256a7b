"""The master as a client sees it: its HTTP API, the route, group choice and fid ranges.

Also the error classes of the client library (re-exported by speedy.client).
"""
from __future__ import annotations

import http.client
import json
import random
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterable

from speedy.client.chunkconn import format_addr, parse_addr
from speedy.format.chunkfile import RECORD_HEADER_SIZE

DEFAULT_MASTER = "127.0.0.1:8099"
DEFAULT_MASTER_PORT = 8099
TOKEN_HEADER = "X-Speedy-Token"
INIT, RW, RO, ERR = 0, 1, 2, 3
STATUS_NAMES = {INIT: "INIT", RW: "RW", RO: "RO", ERR: "ERR"}
STATUS_CODES = {v.lower(): k for k, v in STATUS_NAMES.items()}
GLOBAL_TRANSFERRING = 8
LOAD_SLACK = 4
FID_LOW_WATER = 32


class SpeedyError(Exception):
    """Base of every error this library raises."""


class ClusterError(SpeedyError):
    """The cluster could not do it: master or chunkservers unreachable or failing."""


class NotFoundError(SpeedyError, KeyError):
    """No such key."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "not found"


class IntegrityError(ClusterError):
    """Stored bytes that do not match their checksum or manifest, on every replica."""


class MasterError(ClusterError):
    """The master answered an HTTP error."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


class UploadError(ClusterError):
    """A put failed; every fid it wrote was deleted again (see orphans for leftovers)."""

    def __init__(self, message: str, cleaned: list[str] | None = None,
                 orphans: list[str] | None = None):
        super().__init__(message)
        self.cleaned = cleaned or []    # keys written somewhere, then deleted
        self.orphans = orphans or []    # "key@host:port" that could not be deleted


@dataclass
class ServerInfo:
    """A chunkserver as the master reports it."""

    group_id: int
    ip: str
    port: int
    status: int = INIT
    global_status: int = 0
    total_free: int = 0
    max_free: int = 0
    pending: int = 0
    writing: int = 0
    reading: int = 0
    total_chunks: int = 0
    conns: int = 0
    data_dir: str = ""
    garbage: int = 0
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    FIELDS = {"GroupId": "group_id", "Ip": "ip", "Port": "port", "Status": "status",
              "GlobalStatus": "global_status", "TotalFreeSpace": "total_free",
              "MaxFreeSpace": "max_free", "PendingWrites": "pending",
              "WritingCount": "writing", "ReadingCount": "reading",
              "TotalChunks": "total_chunks", "ConnectionsCount": "conns",
              "DataDir": "data_dir", "GarbageBytes": "garbage"}

    @classmethod
    def from_json(cls, obj: object) -> "ServerInfo":
        """Parse a chunkserver object (zero-valued fields may be missing)."""
        if not isinstance(obj, dict) or not obj.get("Ip") or not obj.get("Port"):
            raise ClusterError(f"master sent a malformed chunkserver object: {obj!r:.200}")
        kw = {}
        for name, attr in cls.FIELDS.items():
            value = obj.get(name)
            if value is None:
                continue
            if attr in ("ip", "data_dir"):
                kw[attr] = str(value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                kw[attr] = int(value)
            else:
                raise ClusterError(f"master sent {name}={value!r}: not a number")
        kw.setdefault("group_id", 0)
        return cls(raw=obj, **kw)

    @property
    def addr(self) -> tuple[str, int]:
        """(ip, port)."""
        return self.ip, self.port

    @property
    def name(self) -> str:
        """"ip:port"."""
        return format_addr(self.addr)

    @property
    def status_name(self) -> str:
        """INIT, RW, RO or ERR."""
        return STATUS_NAMES.get(self.status, str(self.status))


@dataclass
class Route:
    """The master's route: group id -> its chunkservers (ERR ones left out)."""

    groups: dict[int, list[ServerInfo]]
    fetched: float = 0.0

    @classmethod
    def from_json(cls, obj: object) -> "Route":
        """Parse GET /v1/chunkmaster/route."""
        if not isinstance(obj, dict):
            raise ClusterError("master sent a route that is not a JSON object")
        groups: dict[int, list[ServerInfo]] = {}
        for gid, servers in obj.items():
            if not str(gid).isdigit() or not isinstance(servers, list):
                raise ClusterError(f"master sent a malformed route entry {gid!r}")
            infos = [ServerInfo.from_json(s) for s in servers]
            for s in infos:
                s.group_id = s.group_id or int(gid)
            groups[int(gid)] = infos
        return cls(groups, time.monotonic())


def group_load(servers: list[ServerInfo]) -> int:
    """Pending plus in-flight writes reported by a group's servers."""
    return sum(s.pending + s.writing for s in servers)


def group_problem(servers: list[ServerInfo], size: int, min_replicas: int) -> str | None:
    """Why a group cannot take a write of size bytes now, or None when it can."""
    if not servers:
        return "no servers"
    bad = [s for s in servers if s.status in (INIT, RO)]
    if bad:
        return ", ".join(f"{s.name} is {s.status_name}" for s in bad)
    if any(s.global_status == GLOBAL_TRANSFERRING for s in servers):
        return "transferring"
    rw = [s for s in servers if s.status == RW]
    if len(rw) < min_replicas:
        return f"only {len(rw)} RW server(s), need {min_replicas}"
    if min(s.max_free for s in rw) <= size + RECORD_HEADER_SIZE:
        return f"no room for {size} bytes"
    return None


def choose_group(groups: dict[int, list[ServerInfo]], size: int, min_replicas: int = 2,
                 exclude: Iterable[int] = (), rng: random.Random | None = None) -> int | None:
    """The group for a write of size bytes (MASTER-API.md policy), or None.

    A candidate has no INIT or RO server, is not transferring, has at least min_replicas
    RW servers, and each RW server's MaxFreeSpace exceeds the record. Among candidates,
    the least loaded (pending + writing) win, within LOAD_SLACK; ties are broken at random.
    """
    skip = set(exclude)
    loads = {g: group_load(s) for g, s in groups.items()
             if g not in skip and group_problem(s, size, min_replicas) is None}
    if not loads:
        return None
    best = min(loads.values())
    return (rng or random).choice(sorted(g for g, l in loads.items() if l <= best + LOAD_SLACK))


def explain_no_group(groups: dict[int, list[ServerInfo]], size: int, min_replicas: int) -> str:
    """One line saying why no group can take a write."""
    if not groups:
        return "the master's route is empty (no chunkserver registered?)"
    why = "; ".join(f"group {g}: {group_problem(s, size, min_replicas) or 'failed'}"
                    for g, s in sorted(groups.items()))
    return f"no writable group for {size} bytes ({why})"


def read_order(servers: list[ServerInfo]) -> list[ServerInfo]:
    """RW servers first (shuffled), then the others as a last resort."""
    rw = [s for s in servers if s.status == RW]
    rest = [s for s in servers if s.status != RW]
    random.shuffle(rw)
    return rw + rest


class Master:
    """The master's HTTP API (no proxies, a timeout on every request)."""

    def __init__(self, addr: str = DEFAULT_MASTER, token: str | None = None,
                 timeout: float = 5.0):
        try:
            self.addr = parse_addr(addr, DEFAULT_MASTER_PORT)
        except ValueError as e:
            raise ClusterError(f"bad master address: {e}") from None
        self.name = format_addr(self.addr)
        self.base = f"http://{self.name}"
        self.token = token or ""
        self.timeout = timeout
        self._opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def request(self, method: str, path: str, body: object = None) -> bytes:
        """Send one request; MasterError on an HTTP error, ClusterError if unreachable."""
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header(TOKEN_HEADER, self.token)
        try:
            with self._opener.open(req, timeout=self.timeout) as resp:
                return resp.read()
        except urllib.error.HTTPError as e:
            try:
                reason = e.read(300).decode("utf-8", "replace").strip().splitlines()
            except OSError:
                reason = []
            text = reason[0] if reason else e.reason
            raise MasterError(f"master {self.name}: {method} {path}: HTTP {e.code}: {text}",
                              e.code) from None
        except http.client.HTTPException as e:
            raise ClusterError(f"master {self.name}: not an HTTP answer to {path} "
                               f"({type(e).__name__})") from None
        except (urllib.error.URLError, OSError) as e:
            why = getattr(e, "reason", None) or e
            why = getattr(why, "strerror", None) or str(why)
            raise ClusterError(f"master {self.name} unreachable: {why}") from None

    def get_json(self, path: str) -> object:
        """GET path, parsed as JSON."""
        raw = self.request("GET", path)
        try:
            return json.loads(raw)
        except ValueError:
            raise ClusterError(f"master {self.name}: {path} did not answer JSON") from None

    def route(self) -> Route:
        """GET /v1/chunkmaster/route."""
        return Route.from_json(self.get_json("/v1/chunkmaster/route"))

    def fid_range(self) -> tuple[int, int]:
        """GET /v1/chunkmaster/fid: (begin, end), end exclusive."""
        obj = self.get_json("/v1/chunkmaster/fid")
        try:
            begin, end = int(obj["FidBegin"]), int(obj["FidEnd"])
        except (TypeError, KeyError, ValueError):
            raise ClusterError(f"master {self.name}: malformed fid answer {obj!r:.100}") \
                from None
        if not 0 <= begin < end:
            raise ClusterError(f"master {self.name}: empty fid range {begin}..{end}")
        return begin, end

    def group_info(self, group_id: int) -> list[ServerInfo]:
        """GET /v1/chunkserver/{group}/groupinfo: every server of the group."""
        obj = self.get_json(f"/v1/chunkserver/{group_id}/groupinfo")
        if not isinstance(obj, list):
            raise ClusterError(f"master {self.name}: groupinfo is not a JSON array")
        return [ServerInfo.from_json(s) for s in obj]

    def all_servers(self) -> list[ServerInfo] | None:
        """GET /v1/chunkmaster/servers (speedy extension); None from a master without it."""
        try:
            obj = self.get_json("/v1/chunkmaster/servers")
        except MasterError as e:
            if e.status == 404:
                return None
            raise
        if not isinstance(obj, list):
            raise ClusterError(f"master {self.name}: servers is not a JSON array")
        return [ServerInfo.from_json(s) for s in obj]

    def init_server(self, group_id: int, ip: str, port: int) -> None:
        """POST /v1/chunkserver/initserver."""
        self.request("POST", "/v1/chunkserver/initserver",
                     {"GroupId": group_id, "Ip": ip, "Port": port})

    def set_status(self, ip: str, port: int, status: int) -> None:
        """POST /v1/chunkserver/setstatus (an extension of the speedy master)."""
        try:
            self.request("POST", "/v1/chunkserver/setstatus",
                         {"Ip": ip, "Port": port, "Status": status})
        except MasterError as e:
            text = str(e).lower()
            if e.status == 405 or (e.status == 404 and ("route" in text.split("404", 1)[1]
                                                        or "page not found" in text)):
                raise MasterError(f"master {self.name} has no /v1/chunkserver/setstatus "
                                  f"route (an older master?): set the status in its "
                                  f"database instead", e.status) from None
            raise


class FidAllocator:
    """Fids from the master's ranges, cached and refilled in the background."""

    def __init__(self, fetch: Callable[[], tuple[int, int]], low_water: int = FID_LOW_WATER):
        self._fetch = fetch
        self.low_water = low_water
        self._ranges: deque[list[int]] = deque()
        self._lock = threading.Lock()
        self._refilling = False

    def available(self) -> int:
        """Fids on hand."""
        with self._lock:
            return sum(e - b for b, e in self._ranges)

    def _add(self, rng: tuple[int, int]) -> None:
        with self._lock:
            self._ranges.append([rng[0], rng[1]])

    def _refill(self) -> None:
        try:
            self._add(self._fetch())
        except SpeedyError:
            pass  # take() fetches synchronously and reports the error
        finally:
            with self._lock:
                self._refilling = False

    def take(self) -> int:
        """A fresh fid (ClusterError when the master cannot give one)."""
        while True:
            with self._lock:
                if self._ranges:
                    r = self._ranges[0]
                    fid = r[0]
                    r[0] += 1
                    if r[0] >= r[1]:
                        self._ranges.popleft()
                    left = sum(e - b for b, e in self._ranges)
                    if left < self.low_water and not self._refilling:
                        self._refilling = True
                        threading.Thread(target=self._refill, name="speedy-fids",
                                         daemon=True).start()
                    return fid
            self._add(self._fetch())
