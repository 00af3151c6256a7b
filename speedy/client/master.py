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
from typing import TYPE_CHECKING, Callable, Iterable

from speedy.client.chunkconn import format_addr, parse_addr
from speedy.format.chunkfile import RECORD_HEADER_SIZE
from speedy.wire import master as wm
from speedy.wire import placement
from speedy.wire.master import FieldError, Status

if TYPE_CHECKING:
    from speedy.wire.manifest import Key

DEFAULT_MASTER_PORT = wm.DEFAULT_PORT
DEFAULT_MASTER = f"127.0.0.1:{DEFAULT_MASTER_PORT}"
INIT, RW, RO, ERR = Status.INIT, Status.RW, Status.RO, Status.ERR
STATUS_NAMES = {s: s.name for s in Status}
STATUS_CODES = {s.name.lower(): s for s in Status}
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


def not_multipart(key: Key) -> NotFoundError:
    """The error for a multi-part key whose blob is a plain file."""
    return NotFoundError(f"{key} is not a multi-part file ({key.blob()} is a plain file: "
                         f"use the key without the m)")


def upload_error(message: str, cleaned: list[str], orphans: dict[str, str]) -> UploadError:
    """The UploadError of a failed put; names the keys that may be partially stored.

    orphans: {"key@host:port": why its DELETE failed}.
    """
    text = message
    if orphans:
        keys = sorted({o.split("@", 1)[0] for o in orphans})
        text += (f"; {'key' if len(keys) == 1 else 'keys'} {', '.join(keys)} may be "
                 f"partially stored: could not delete "
                 + "; ".join(f"{o} ({why})" for o, why in orphans.items())
                 + " (remove it later with `speedy rm KEY`)")
    err = UploadError(text, cleaned, list(orphans))
    err.message, err.reasons = message, dict(orphans)  # type: ignore[attr-defined]
    return err


def master_address(text: str) -> str:
    """"host:port" of the master from HOST[:PORT] or http://HOST[:PORT][/]; ValueError."""
    t = text.strip()
    low = t.lower()
    if low.startswith(("http://", "https://")):
        if low.startswith("https://"):
            raise ValueError(f"{text!r}: the master speaks plain HTTP (http://)")
        t = t[len("http://"):].rstrip("/")
        if "/" in t:
            raise ValueError(f"{text!r}: give the master's address, not a path")
    return format_addr(parse_addr(t, DEFAULT_MASTER_PORT))


def _alias(name: str) -> property:
    """A read-write property that is another name of field name."""
    return property(lambda s: getattr(s, name), lambda s, v: setattr(s, name, v))


@dataclass
class ServerInfo(wm.ServerStatus):
    """A chunkserver as the master reports it (the JSON object it came from in raw)."""

    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_json(cls, obj: object) -> "ServerInfo":
        """Parse a chunkserver object (zero-valued fields may be missing)."""
        try:
            info = super().from_json(obj)
        except FieldError as e:
            raise ClusterError(f"master sent a malformed chunkserver: {e}") from None
        info.raw = obj  # type: ignore[assignment]
        return info

    # Short names kept for speedy.cli (its owner moves it to the field names).
    total_free = _alias("total_free_space")
    max_free = _alias("max_free_space")
    pending = _alias("pending_writes")
    writing = _alias("writing_count")
    reading = _alias("reading_count")
    conns = _alias("conn_count")

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


def choose_group(groups: dict[int, list[ServerInfo]], size: int,
                 min_replicas: int = placement.MIN_REPLICAS, exclude: Iterable[int] = (),
                 rng: random.Random | None = None) -> int | None:
    """speedy.wire.placement.choose_group for this chunk format's records."""
    return placement.choose_group(groups, size, min_replicas, exclude, rng,
                                  overhead=RECORD_HEADER_SIZE)


def explain_no_group(groups: dict[int, list[ServerInfo]], size: int, min_replicas: int) -> str:
    """speedy.wire.placement.explain_no_group for this chunk format's records."""
    return placement.explain_no_group(groups, size, min_replicas, overhead=RECORD_HEADER_SIZE)


def read_order(servers: list[ServerInfo]) -> list[ServerInfo]:
    """RW servers first (shuffled), then the others as a last resort; never a server
    with pending deletes (it may still hold a file whose delete was acknowledged)."""
    rw = [s for s in servers if s.status == RW and not s.pending_deletes]
    rest = [] if len(rw) == len(servers) else \
        [s for s in servers if s.status != RW and not s.pending_deletes]
    if len(rw) == 2:          # the usual group: a coin, not shuffle()'s Python loop
        if random.getrandbits(1):
            rw.reverse()
    elif len(rw) > 2:
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
            req.add_header(wm.TOKEN_HEADER, self.token)
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
        return Route.from_json(self.get_json(wm.ROUTE))

    def fid_range(self) -> tuple[int, int]:
        """GET /v1/chunkmaster/fid: (begin, end), end exclusive."""
        try:
            r = wm.FidRange.from_json(self.get_json(wm.FID))
        except FieldError as e:
            raise ClusterError(f"master {self.name}: {e}") from None
        return r.begin, r.end

    def group_info(self, group_id: int) -> list[ServerInfo]:
        """GET /v1/chunkserver/{group}/groupinfo: every server of the group."""
        obj = self.get_json(wm.groupinfo_path(group_id))
        if not isinstance(obj, list):
            raise ClusterError(f"master {self.name}: groupinfo is not a JSON array")
        return [ServerInfo.from_json(s) for s in obj]

    def all_servers(self) -> list[ServerInfo] | None:
        """GET /v1/chunkmaster/servers (speedy extension); None from a master without it."""
        try:
            obj = self.get_json(wm.SERVERS)
        except MasterError as e:
            if e.status == 404:
                return None
            raise
        if not isinstance(obj, list):
            raise ClusterError(f"master {self.name}: servers is not a JSON array")
        return [ServerInfo.from_json(s) for s in obj]

    def init_server(self, group_id: int, ip: str, port: int) -> None:
        """POST /v1/chunkserver/initserver."""
        self.request("POST", wm.INITSERVER, wm.ServerKey(group_id, ip, port).to_json())

    def set_status(self, ip: str, port: int, status: int) -> None:
        """POST /v1/chunkserver/setstatus (an extension of the speedy master)."""
        try:
            self.request("POST", wm.SETSTATUS, wm.StatusChange(ip, port, status).to_json())
        except MasterError as e:
            text = str(e).lower()
            if e.status == 405 or (e.status == 404 and ("route" in text.split("404", 1)[1]
                                                        or "page not found" in text)):
                raise MasterError(f"master {self.name} has no {wm.SETSTATUS} "
                                  f"route (an older master?): set the status in its "
                                  f"database instead", e.status) from None
            raise


    def record_pending_deletes(self, group_id: int, fid: int,
                               servers: Iterable[ServerInfo]) -> None:
        """POST pendingdelete (speedy extension): the master finishes a delete on servers
        that did not take it, and clients do not read from them until it has."""
        body = [wm.PendingDelete(group_id, s.ip, s.port, fid).to_json() for s in servers]
        if body:
            self.request("POST", wm.PENDINGDELETE, body)


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
