"""The chunkmaster's JSON (MASTER-API.md): route paths, statuses, every field, the token.

One definition of each shape, used by the master, the chunkserver's reporter and the
client. Pure: imports nothing else of speedy. Parsers raise FieldError with a one-line
reason (the master answers it as a 400, the client as a ClusterError).
"""
from __future__ import annotations

import enum
import ipaddress
import json
import re
from dataclasses import dataclass, fields
from typing import Any, ClassVar

TOKEN_HEADER = "X-Speedy-Token"
DEFAULT_PORT = 8099
INT64_MAX = 2 ** 63 - 1
MAX_DATA_DIR = 4096

# -- route paths ---------------------------------------------------------------------

INITSERVER = "/v1/chunkserver/initserver"
BATCHINITSERVER = "/v1/chunkserver/batchinitserver"
REPORTINFO = "/v1/chunkserver/reportinfo"
RELOADINFO = "/v1/chunkserver/reloadinfo"
SETSTATUS = "/v1/chunkserver/setstatus"          # speedy extension
REMOVESERVER = "/v1/chunkserver/removeserver"    # speedy extension
PENDINGDELETE = "/v1/chunkserver/pendingdelete"  # speedy extension
ROUTE = "/v1/chunkmaster/route"
FID = "/v1/chunkmaster/fid"
GROUPINFO = "/v1/chunkserver/{groupId}/groupinfo"
GROUPINFO_PATTERN = re.compile(r"^/v1/chunkserver/([^/]*)/groupinfo$")
CHECKERROR = "/v1/chunkserver/checkerror"
SERVERS = "/v1/chunkmaster/servers"              # speedy extension
METRICS = "/metrics"


def groupinfo_path(group_id: int) -> str:
    """GET path of one group's chunkservers."""
    return GROUPINFO.replace("{groupId}", str(group_id))


# -- statuses ------------------------------------------------------------------------


class Status(enum.IntEnum):
    """A chunkserver's status as the master keeps it."""

    INIT = 0
    RW = 1
    RO = 2
    ERR = 3


class GlobalStatus(enum.IntEnum):
    """A group's GlobalStatus."""

    NORMAL = 0
    TRANSFERRING = 8


REPORT_RW, REPORT_RO = 0, 1  # the chunkserver's own Status in a report


class FieldError(ValueError):
    """A JSON value that does not fit its shape; str() is the one-line reason."""


# -- field checks --------------------------------------------------------------------

_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")


def valid_host(text: str) -> bool:
    """An IPv4/IPv6 address or a DNS host name."""
    if not 1 <= len(text) <= 253:
        return False
    try:
        ipaddress.ip_address(text)
        return True
    except ValueError:
        pass
    if re.fullmatch(r"[0-9.]+", text):
        return False  # looks like a broken IPv4 address
    return all(_LABEL.match(label) for label in text.rstrip(".").split("."))


def get_object(value: Any, what: str = "body") -> dict:
    """value as a JSON object; FieldError if not."""
    if not isinstance(value, dict):
        raise FieldError(f"{what} must be a JSON object")
    return value


def get_int(obj: dict, name: str, lo: int, hi: int, default: int | None = None) -> int:
    """obj[name] as an integer in lo..hi (bool is not an integer); FieldError if not."""
    if obj.get(name) is None:
        if default is None:
            raise FieldError(f"missing field {name}")
        return default
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldError(f"field {name} must be an integer, got {json.dumps(value)[:40]}")
    if not lo <= value <= hi:
        raise FieldError(f"field {name} = {value} is out of range ({lo}..{hi})")
    return value


def get_host(obj: dict, name: str = "Ip") -> str:
    """obj[name] as an address or host name; FieldError if not."""
    if name not in obj:
        raise FieldError(f"missing field {name}")
    value = obj[name]
    if not isinstance(value, str):
        raise FieldError(f"field {name} must be a string")
    if not valid_host(value):
        raise FieldError(f"field {name} = {value[:60]!r} is not an address or host name")
    return value


def get_text(obj: dict, name: str, limit: int = MAX_DATA_DIR) -> str:
    """obj[name] as a string of at most limit characters ('' when absent or null)."""
    value = obj.get(name)
    if value is None:
        return ""
    if not isinstance(value, str) or len(value) > limit:
        raise FieldError(f"field {name} must be a string of at most {limit} chars")
    return value


# -- shapes --------------------------------------------------------------------------


@dataclass
class ServerKey:
    """A chunkserver's identity: {"GroupId", "Ip", "Port"} (initserver, removeserver)."""

    group_id: int
    ip: str
    port: int

    def to_json(self) -> dict:
        """The registration object."""
        return {"GroupId": self.group_id, "Ip": self.ip, "Port": self.port}

    @classmethod
    def from_json(cls, obj: Any, what: str = "body") -> "ServerKey":
        """Parse and check a registration object."""
        obj = get_object(obj, what)
        return cls(get_int(obj, "GroupId", 1, 65535), get_host(obj),
                   get_int(obj, "Port", 1, 65535))

    def astuple(self) -> tuple[int, str, int]:
        """(group_id, ip, port)."""
        return self.group_id, self.ip, self.port


# The load figures a report carries and the master answers back: JSON name -> attribute.
COUNTERS: dict[str, str] = {
    "TotalFreeSpace": "total_free_space", "MaxFreeSpace": "max_free_space",
    "PendingWrites": "pending_writes", "WritingCount": "writing_count",
    "ReadingCount": "reading_count", "TotalChunks": "total_chunks",
    "ConnectionsCount": "conn_count", "GarbageBytes": "garbage_bytes"}  # Garbage: new


@dataclass
class Report:
    """A chunkserver's heartbeat body (PROTOCOL.md "Reporting to the master")."""

    group_id: int
    ip: str
    port: int
    status: int = REPORT_RW
    total_free_space: int = 0
    max_free_space: int = 0
    pending_writes: int = 0
    writing_count: int = 0
    reading_count: int = 0
    data_dir: str = ""
    total_chunks: int = 0
    conn_count: int = 0
    garbage_bytes: int = 0  # new (issue 13): bytes of deleted records in its chunks

    @property
    def read_only(self) -> bool:
        """The chunkserver says it is read-only."""
        return self.status == REPORT_RO

    def to_json(self) -> dict:
        """The body, in the original's field order (then GarbageBytes, when not 0)."""
        obj = {"GroupId": self.group_id, "Ip": self.ip, "Port": self.port,
               "Status": self.status, "TotalFreeSpace": self.total_free_space,
               "MaxFreeSpace": self.max_free_space, "PendingWrites": self.pending_writes,
               "WritingCount": self.writing_count, "ReadingCount": self.reading_count,
               "DataDir": self.data_dir, "TotalChunks": self.total_chunks,
               "ConnectionsCount": self.conn_count}
        if self.garbage_bytes:
            obj["GarbageBytes"] = self.garbage_bytes
        return obj

    @classmethod
    def from_json(cls, obj: Any) -> "Report":
        """Parse and check a body (zero-valued fields may be left out)."""
        key = ServerKey.from_json(obj)
        kw = {attr: get_int(obj, name, 0, INT64_MAX, 0) for name, attr in COUNTERS.items()}
        return cls(*key.astuple(), status=get_int(obj, "Status", 0, 1, 0),
                   data_dir=get_text(obj, "DataDir"), **kw)


@dataclass
class ServerStatus:
    """A chunkserver object as the master answers it (route, groupinfo, servers)."""

    group_id: int
    ip: str
    port: int
    status: int = Status.INIT
    global_status: int = GlobalStatus.NORMAL
    total_free_space: int = 0
    max_free_space: int = 0
    pending_writes: int = 0
    writing_count: int = 0
    reading_count: int = 0
    total_chunks: int = 0
    conn_count: int = 0
    data_dir: str = ""
    pending_deletes: int = 0  # speedy extension: deletes the master still has to finish
    garbage_bytes: int = 0  # speedy extension (issue 13): as the chunkserver last reported

    FIELDS: ClassVar[dict[str, str]] = {
        "GroupId": "group_id", "Ip": "ip", "Port": "port", "Status": "status",
        "GlobalStatus": "global_status", **COUNTERS, "DataDir": "data_dir",
        "PendingDeletes": "pending_deletes"}
    TEXT: ClassVar[frozenset[str]] = frozenset({"ip", "data_dir"})

    def to_json(self) -> dict:
        """Every field, zeros included (PendingDeletes and GarbageBytes only when non-zero)."""
        obj = {name: getattr(self, attr) for name, attr in self.FIELDS.items()}
        obj["Status"] = int(self.status)
        obj["GlobalStatus"] = int(self.global_status)
        if not self.pending_deletes:
            del obj["PendingDeletes"]
        if not self.garbage_bytes:
            del obj["GarbageBytes"]
        return obj

    @classmethod
    def from_json(cls, obj: Any) -> "ServerStatus":
        """Parse a chunkserver object (zero-valued fields may be missing)."""
        if not isinstance(obj, dict) or not obj.get("Ip") or not obj.get("Port"):
            raise FieldError(f"malformed chunkserver object: {obj!r:.200}")
        kw: dict[str, Any] = {}
        for name, attr in cls.FIELDS.items():
            value = obj.get(name)
            if value is None:
                continue
            if attr in cls.TEXT:
                kw[attr] = str(value)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                kw[attr] = int(value)
            else:
                raise FieldError(f"{name}={value!r:.40}: not a number")
        kw.setdefault("group_id", 0)
        return cls(**kw)


SERVER_COLUMNS = [f.name for f in fields(ServerStatus)]


@dataclass
class FidRange:
    """GET /v1/chunkmaster/fid: the fids begin <= fid < end."""

    begin: int
    end: int

    def to_json(self) -> dict:
        """{"FidBegin", "FidEnd"}."""
        return {"FidBegin": self.begin, "FidEnd": self.end}

    @classmethod
    def from_json(cls, obj: Any) -> "FidRange":
        """Parse and check an answer (a non-empty range of non-negative fids)."""
        try:
            begin, end = int(obj["FidBegin"]), int(obj["FidEnd"])
        except (TypeError, KeyError, ValueError):
            raise FieldError(f"malformed fid answer {obj!r:.100}") from None
        if not 0 <= begin < end:
            raise FieldError(f"empty fid range {begin}..{end}")
        return cls(begin, end)


@dataclass
class StatusChange:
    """POST setstatus body (speedy extension): {"Ip", "Port", "Status"[, "GroupId"]}."""

    ip: str
    port: int
    status: int
    group_id: int = 0  # 0: every group

    def to_json(self) -> dict:
        """The body (GroupId only when set)."""
        obj = {"Ip": self.ip, "Port": self.port, "Status": int(self.status)}
        if self.group_id:
            obj["GroupId"] = self.group_id
        return obj

    @classmethod
    def from_json(cls, obj: Any) -> "StatusChange":
        """Parse and check a body."""
        obj = get_object(obj)
        return cls(get_host(obj), get_int(obj, "Port", 1, 65535), get_int(obj, "Status", 0, 3),
                   get_int(obj, "GroupId", 1, 65535, 0))


@dataclass
class PendingDelete:
    """POST pendingdelete body (speedy extension): a delete a client could not finish on
    one chunkserver; the master finishes it when that server reports again."""

    group_id: int
    ip: str
    port: int
    fid: int

    def to_json(self) -> dict:
        """{"GroupId", "Ip", "Port", "Fid"}."""
        return {"GroupId": self.group_id, "Ip": self.ip, "Port": self.port, "Fid": self.fid}

    @classmethod
    def from_json(cls, obj: Any, what: str = "body") -> "PendingDelete":
        """Parse and check one object."""
        key = ServerKey.from_json(obj, what)
        return cls(*key.astuple(), get_int(obj, "Fid", 0, INT64_MAX))
