"""The chunkmaster's WSGI app: routes of MASTER-API.md, validation, metrics, health monitor."""
from __future__ import annotations

import hmac
import ipaddress
import json
import logging
import re
import sqlite3
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import gevent
import sqlite_utils

from speedy.master import db as mdb
from speedy.common import metrics
from speedy.master.db import Status

log = logging.getLogger("speedy.master")

MAX_BODY = 1 << 20
TOKEN_HEADER = "X-Speedy-Token"
INT64_MAX = 2 ** 63 - 1
MAX_DATA_DIR = 4096
_LABEL = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?$")
_GROUPINFO = re.compile(r"^/v1/chunkserver/([^/]*)/groupinfo$")


class HTTPError(Exception):
    """An answer with a 4xx/5xx status and a plain-text reason."""

    def __init__(self, status: int, reason: str, headers: list | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.headers = status, reason, headers or []


STATUS_TEXT = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
               405: "Method Not Allowed", 413: "Payload Too Large",
               500: "Internal Server Error", 503: "Service Unavailable"}


# -- validation ----------------------------------------------------------------------


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


def get_int(obj: dict, name: str, lo: int, hi: int, default: int | None = None) -> int:
    """obj[name] as an integer in lo..hi (bool is not an integer); HTTPError 400 if not."""
    if name not in obj or obj[name] is None:
        if default is None:
            raise HTTPError(400, f"missing field {name}")
        return default
    value = obj[name]
    if isinstance(value, bool) or not isinstance(value, int):
        raise HTTPError(400, f"field {name} must be an integer, got {json.dumps(value)[:40]}")
    if not lo <= value <= hi:
        raise HTTPError(400, f"field {name} = {value} is out of range ({lo}..{hi})")
    return value


def get_host(obj: dict, name: str = "Ip") -> str:
    """obj[name] as an address or host name; HTTPError 400 if not."""
    if name not in obj:
        raise HTTPError(400, f"missing field {name}")
    value = obj[name]
    if not isinstance(value, str):
        raise HTTPError(400, f"field {name} must be a string")
    if not valid_host(value):
        raise HTTPError(400, f"field {name} = {value[:60]!r} is not an address or host name")
    return value


def get_object(value: Any, what: str = "body") -> dict:
    """value as a JSON object; HTTPError 400 if not."""
    if not isinstance(value, dict):
        raise HTTPError(400, f"{what} must be a JSON object")
    return value


def parse_key(obj: Any, what: str = "body") -> tuple[int, str, int]:
    """(GroupId, Ip, Port) of a registration object."""
    obj = get_object(obj, what)
    return (get_int(obj, "GroupId", 1, 65535), get_host(obj), get_int(obj, "Port", 1, 65535))


def parse_report(obj: Any) -> mdb.Report:
    """A heartbeat body as a Report (zero-valued fields may be left out)."""
    obj = get_object(obj)
    group_id, ip, port = parse_key(obj)
    data_dir = obj.get("DataDir", "")
    if data_dir is None:
        data_dir = ""
    if not isinstance(data_dir, str) or len(data_dir) > MAX_DATA_DIR:
        raise HTTPError(400, f"field DataDir must be a string of at most {MAX_DATA_DIR} chars")
    n = {name: get_int(obj, name, 0, INT64_MAX, 0) for name in (
        "TotalFreeSpace", "MaxFreeSpace", "PendingWrites", "WritingCount", "ReadingCount",
        "TotalChunks", "ConnectionsCount", "GarbageBytes")}
    status = get_int(obj, "Status", 0, 1, 0)
    return mdb.Report(group_id, ip, port, read_only=status == 1,
                      total_free_space=n["TotalFreeSpace"], max_free_space=n["MaxFreeSpace"],
                      pending_writes=n["PendingWrites"], writing_count=n["WritingCount"],
                      reading_count=n["ReadingCount"], total_chunks=n["TotalChunks"],
                      conn_count=n["ConnectionsCount"], data_dir=data_dir,
                      garbage_bytes=n["GarbageBytes"])


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def parse_json(body: bytes) -> Any:
    """The body as JSON; HTTPError 400 with the reason if it is not."""
    if not body.strip():
        raise HTTPError(400, "empty body: expected JSON")
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except UnicodeDecodeError:
        raise HTTPError(400, "malformed JSON: body is not UTF-8") from None
    except RecursionError:
        raise HTTPError(400, "malformed JSON: nested too deeply") from None
    except ValueError as e:
        raise HTTPError(400, f"malformed JSON: {e}") from None


# -- metrics -------------------------------------------------------------------------


@dataclass
class Metrics:
    """Counters kept by the app (gauges are read from the database at scrape time)."""

    requests: dict[tuple[str, int], int] = field(default_factory=dict)
    latency: dict[str, metrics.HistogramData] = field(default_factory=dict)
    heartbeats: int = 0
    silent_to_ro: int = 0
    monitor_errors: int = 0

    def observe(self, route: str, status: int, seconds: float) -> None:
        """Count one request."""
        key = (route, status)
        self.requests[key] = self.requests.get(key, 0) + 1
        self.latency.setdefault(route, metrics.HistogramData()).observe(seconds)


# -- the app -------------------------------------------------------------------------


Handler = Callable[[dict, bytes, re.Match | None], tuple[int, str, bytes]]


class MasterApp:
    """WSGI app of the chunkmaster over one master database."""

    def __init__(self, db: sqlite_utils.Database, token: str = "",
                 heartbeat_timeout: float = 30.0, monitor_interval: float = 5.0,
                 max_body: int = MAX_BODY) -> None:
        self.db, self.token = db, token
        self.heartbeat_timeout, self.monitor_interval = heartbeat_timeout, monitor_interval
        self.max_body = max_body
        self.started = time.time()
        self.fids = mdb.FidAllocator(db)
        self.metrics = Metrics()
        self._monitor: gevent.Greenlet | None = None
        # (method, path) -> (handler, needs token); groupinfo is matched by regex.
        self.routes: dict[str, dict[str, tuple[Handler, bool]]] = {
            "/v1/chunkserver/initserver": {"POST": (self.initserver, True)},
            "/v1/chunkserver/batchinitserver": {"POST": (self.batchinitserver, True)},
            "/v1/chunkserver/reportinfo": {"POST": (self.reportinfo, True)},
            "/v1/chunkserver/reloadinfo": {"POST": (self.reloadinfo, True)},
            "/v1/chunkserver/setstatus": {"POST": (self.setstatus, True)},
            "/v1/chunkserver/removeserver": {"POST": (self.removeserver, True)},
            "/v1/chunkmaster/route": {"GET": (self.route, False)},
            "/v1/chunkmaster/fid": {"GET": (self.fid, True)},
            "/v1/chunkserver/{groupId}/groupinfo": {"GET": (self.groupinfo, False)},
            "/v1/chunkserver/checkerror": {"GET": (self.checkerror, False)},
            "/v1/chunkmaster/servers": {"GET": (self.servers, False)},
            "/metrics": {"GET": (self.metrics_text, False)},
        }

    # -- WSGI ------------------------------------------------------------------------

    def __call__(self, environ: dict, start_response: Callable) -> list[bytes]:
        t0 = time.monotonic()
        method = environ.get("REQUEST_METHOD", "GET")
        path = environ.get("PATH_INFO", "") or "/"
        route_name = "other"
        headers: list[tuple[str, str]] = []
        try:
            route_name, handler, match = self._dispatch(method, path, environ)
            body = self._read_body(environ) if method == "POST" else b""
            status, ctype, payload = handler(environ, body, match)
        except HTTPError as e:
            status, ctype, payload = e.status, "text/plain; charset=utf-8", \
                (e.reason + "\n").encode()
            headers = e.headers + self._unread_body(environ)
            if status >= 500:
                log.error("%s %s: %d %s", method, printable(path), status, e.reason)
            else:
                log.info("%s %s from %s: %d %s", printable(method), printable(path),
                         environ.get("REMOTE_ADDR", "?"), status, e.reason)
        except Exception:  # a real bug: log it, answer 500, keep serving
            log.exception("%s %s: internal error", printable(method), printable(path))
            status, ctype, payload = 500, "text/plain; charset=utf-8", b"internal error\n"
        headers = [("Content-Type", ctype), ("Content-Length", str(len(payload)))] + headers
        start_response(f"{status} {STATUS_TEXT.get(status, 'Error')}", headers)
        self.metrics.observe(route_name, status, time.monotonic() - t0)
        return [b"" if method == "HEAD" else payload]

    def _dispatch(self, method: str, path: str, environ: dict) -> \
            tuple[str, Handler, re.Match | None]:
        """(route name, handler, groupinfo match) or HTTPError 404/405/403."""
        match = _GROUPINFO.match(path)
        name = "/v1/chunkserver/{groupId}/groupinfo" if match else path
        methods = self.routes.get(name)
        if methods is None:
            raise HTTPError(404, f"no such route: {printable(path)}")
        if method == "HEAD" and "GET" in methods:
            method = "GET"
        if method not in methods:
            allow = ", ".join(sorted(methods))
            raise HTTPError(405, f"method {printable(method, 20)} not allowed on {name} "
                                 f"(allowed: {allow})", [("Allow", allow)])
        handler, needs_token = methods[method]
        if needs_token:
            self._check_token(environ)
        return name, handler, match

    def _check_token(self, environ: dict) -> None:
        """HTTPError 403 unless the request carries the right token (when one is set)."""
        if not self.token:
            return
        given = environ.get("HTTP_" + TOKEN_HEADER.upper().replace("-", "_"))
        if given is None:
            raise HTTPError(403, f"missing {TOKEN_HEADER} header")
        if not hmac.compare_digest(given.encode("utf-8", "replace"), self.token.encode()):
            raise HTTPError(403, f"wrong {TOKEN_HEADER}")

    def _unread_body(self, environ: dict) -> list[tuple[str, str]]:
        """After an early error: close rather than read a large or chunked body we skipped."""
        inp = environ.get("wsgi.input")
        if inp is None or environ.get("speedy.body_read"):
            return []
        length = environ.get("CONTENT_LENGTH") or "0"
        chunked = "chunked" in environ.get("HTTP_TRANSFER_ENCODING", "").lower()
        if chunked or not length.isdigit() or int(length) > self.max_body:
            _abandon_input(inp)
            environ["speedy.linger"] = True  # the server drains a little before closing
            return [("Connection", "close")]
        return []

    def _read_body(self, environ: dict) -> bytes:
        """The request body, at most max_body bytes; HTTPError 413 when larger."""
        inp = environ["wsgi.input"]
        length = environ.get("CONTENT_LENGTH") or ""
        if length:
            try:
                n = int(length)
            except ValueError:
                raise HTTPError(400, "bad Content-Length") from None
            if n > self.max_body:
                raise HTTPError(413, f"body of {n} bytes is larger than the limit of "
                                     f"{self.max_body} bytes")
        try:
            body = inp.read(self.max_body + 1)
        except OSError as e:  # the client vanished or sent a broken chunked body
            _abandon_input(inp)
            raise HTTPError(400, f"incomplete body: {e}", [("Connection", "close")]) from None
        if len(body) > self.max_body:
            raise HTTPError(413, f"body is larger than the limit of {self.max_body} bytes")
        environ["speedy.body_read"] = True
        return body

    # -- routes ----------------------------------------------------------------------

    def initserver(self, environ: dict, body: bytes, _m: Any) -> tuple[int, str, bytes]:
        """Register one chunkserver (INIT); registering again is harmless."""
        key = parse_key(parse_json(body))
        if self._db(mdb.add_servers, [key]):
            log.info("chunkserver %d:%s:%d registered", *key)
        return _ok()

    def batchinitserver(self, environ: dict, body: bytes, _m: Any) -> tuple[int, str, bytes]:
        """Register a JSON array of chunkservers, all or none."""
        items = parse_json(body)
        if not isinstance(items, list):
            raise HTTPError(400, "body must be a JSON array of {GroupId, Ip, Port} objects")
        keys = []
        for i, item in enumerate(items):
            try:
                keys.append(parse_key(item, "each element"))
            except HTTPError as e:
                raise HTTPError(400, f"element {i}: {e.reason}") from None
        added = self._db(mdb.add_servers, keys)
        log.info("batch registration: %d chunkservers, %d new", len(keys), added)
        return _ok()

    def reportinfo(self, environ: dict, body: bytes, _m: Any) -> tuple[int, str, bytes]:
        """A heartbeat: store the report, INIT/RO -> RW (RO if the server is read-only)."""
        report = parse_report(parse_json(body))
        result = self._db(mdb.record_report, report)
        key = f"{report.group_id}:{report.ip}:{report.port}"
        if result is None:
            raise HTTPError(400, f"chunkserver {key} is not registered (initserver first)")
        self.metrics.heartbeats += 1
        old, new = result
        if old != new:
            log.info("chunkserver %s: %s -> %s (heartbeat%s)", key, old.name, new.name,
                     ", server says read-only" if report.read_only else "")
        elif old == Status.ERR:
            log.debug("chunkserver %s reports but stays ERR", key)
        return _ok()

    def reloadinfo(self, environ: dict, body: bytes, _m: Any) -> tuple[int, str, bytes]:
        """Re-read the registry (every answer reads the database; this logs what it holds)."""
        counts = self._db(mdb.status_counts)
        log.info("registry reloaded: %s", ", ".join(f"{s.name} {n}" for s, n in counts.items()))
        return _ok()

    def setstatus(self, environ: dict, body: bytes, _m: Any) -> tuple[int, str, bytes]:
        """speedy extension: set a chunkserver's status ({"Ip","Port","Status"[,"GroupId"]})."""
        obj = get_object(parse_json(body))
        ip, port = get_host(obj), get_int(obj, "Port", 1, 65535)
        status = get_int(obj, "Status", 0, 3)
        group_id = get_int(obj, "GroupId", 1, 65535, 0) or None
        rows = self._db(mdb.set_status, ip, port, status, group_id)
        if not rows:
            raise HTTPError(404, f"no chunkserver {ip}:{port} is registered")
        return 200, "application/json", _json([r.to_json() for r in rows])

    def removeserver(self, environ: dict, body: bytes, _m: Any) -> tuple[int, str, bytes]:
        """speedy extension: delete a chunkserver from the registry."""
        key = parse_key(parse_json(body))
        if not self._db(mdb.remove_server, *key):
            raise HTTPError(404, "no chunkserver %d:%s:%d is registered" % key)
        log.warning("chunkserver %d:%s:%d removed from the registry", *key)
        return _ok()

    def route(self, environ: dict, body: bytes, _m: Any) -> tuple[int, str, bytes]:
        """{"<group_id>": [chunkserver, ...]} without ERR servers."""
        groups = self._db(mdb.route)
        return 200, "application/json", _json(
            {str(g): [cs.to_json() for cs in servers] for g, servers in groups.items()})

    def fid(self, environ: dict, body: bytes, _m: Any) -> tuple[int, str, bytes]:
        """A fresh range of 100 fids."""
        begin, end = self._guarded(self.fids.next_range)
        return 200, "application/json", _json({"FidBegin": begin, "FidEnd": end})

    def servers(self, environ: dict, body: bytes, _m: Any) -> tuple[int, str, bytes]:
        """Speedy extension: every chunkserver (ERR too) with its times and heartbeat age."""
        now = time.time()
        rows = []
        for cs in self._db(mdb.list_servers):
            obj = cs.to_json()
            obj.update(CreateTime=cs.create_time, UpdateTime=cs.update_time,
                       HeartbeatAge=round(now - cs.update_time, 3) if cs.report_count else None)
            rows.append(obj)
        return 200, "application/json", _json(rows)

    def groupinfo(self, environ: dict, body: bytes, m: re.Match | None) -> \
            tuple[int, str, bytes]:
        """The chunkservers of one group (ERR included), a JSON array."""
        text = m.group(1) if m else ""
        if not re.fullmatch(r"[0-9]{1,5}", text) or not 1 <= int(text) <= 65535:
            raise HTTPError(400, f"group id {text[:20]!r} is not an integer in 1..65535")
        servers = self._db(mdb.list_servers, int(text))
        return 200, "application/json", _json([cs.to_json() for cs in servers])

    def checkerror(self, environ: dict, body: bytes, _m: Any) -> tuple[int, str, bytes]:
        """Body 1 if any chunkserver is ERR, else 0."""
        return 200, "text/plain; charset=utf-8", b"1" if self._db(mdb.any_error) else b"0"

    def metrics_text(self, environ: dict, body: bytes, _m: Any) -> tuple[int, str, bytes]:
        """Prometheus text exposition."""
        return 200, metrics.CONTENT_TYPE, self.render_metrics()

    # -- helpers ---------------------------------------------------------------------

    def _db(self, fn: Callable, *args: Any) -> Any:
        """fn(db, *args) through _guarded."""
        return self._guarded(fn, self.db, *args)

    @staticmethod
    def _guarded(fn: Callable, *args: Any) -> Any:
        """Call a database function; a busy or failing database is a 503, not a 500."""
        try:
            return fn(*args)
        except sqlite3.OperationalError as e:
            if "locked" in str(e) or "busy" in str(e):
                raise HTTPError(503, f"database busy, try again ({e})") from None
            raise HTTPError(503, f"database error: {e}") from None
        except mdb.MasterDBError as e:
            raise HTTPError(503, str(e)) from None

    def render_metrics(self) -> bytes:
        """Every metric in the Prometheus text format."""
        m, now = self.metrics, time.time()
        servers = self._db(mdb.list_servers)
        fams = metrics.master_families({
            "servers_by_status": {s.name: sum(1 for cs in servers if cs.status == s)
                                  for s in Status},
            "heartbeat_age_seconds": {(cs.group_id, f"{cs.ip}:{cs.port}"):
                                      round(max(0.0, now - cs.update_time), 3)
                                      for cs in servers},
            "groups": len({cs.group_id for cs in servers}),
            "fids_issued": self.fids.handed_out,
            "requests": dict(m.requests),
            "latency": {route: {"counts": h.counts, "sum": h.total}
                        for route, h in m.latency.items()},
        })
        per_server = [
            ("speedy_master_server_status", "Status of each chunkserver (0 INIT, 1 RW, 2 RO, "
             "3 ERR).", lambda cs: int(cs.status)),
            ("speedy_master_server_free_bytes", "Free bytes each chunkserver reported "
             "(TotalFreeSpace).", lambda cs: cs.total_free_space),
            ("speedy_master_server_max_free_bytes", "Largest free bytes in one chunk each "
             "chunkserver reported (MaxFreeSpace).", lambda cs: cs.max_free_space),
        ]
        for name, text, value in per_server:
            f = metrics.gauge(name, text)
            for cs in servers:
                f.add(value(cs), {"group": cs.group_id, "server": f"{cs.ip}:{cs.port}"})
            fams.append(f)
        fams += [
            metrics.gauge("speedy_master_fid_high_water",
                          "First fid never reserved in the database.")
            .add(self._db(mdb.fid_high_water)),
            metrics.counter("speedy_master_heartbeats_total", "Heartbeats accepted.")
            .add(m.heartbeats),
            metrics.counter("speedy_master_silent_to_ro_total",
                            "RW chunkservers turned RO for lack of heartbeats.")
            .add(m.silent_to_ro),
            metrics.counter("speedy_master_monitor_errors_total", "Failed health checks.")
            .add(m.monitor_errors),
            metrics.gauge("speedy_master_start_time_seconds",
                          "Unix time the master started.").add(round(self.started, 3)),
        ]
        return metrics.render(fams)

    # -- health monitor ----------------------------------------------------------------

    def monitor_once(self, now: float | None = None) -> list[mdb.Chunkserver]:
        """Turn RO every RW server silent for longer than heartbeat_timeout."""
        changed = mdb.mark_silent(self.db, self.heartbeat_timeout, self.started, now)
        for cs in changed:
            log.warning("chunkserver %s: RW -> RO (no heartbeat for %.1f s)", cs.key,
                        (now or time.time()) - cs.update_time)
        self.metrics.silent_to_ro += len(changed)
        return changed

    def _monitor_loop(self) -> None:
        """Run monitor_once every monitor_interval seconds, forever."""
        while True:
            gevent.sleep(self.monitor_interval)
            try:
                self.monitor_once()
            except (sqlite3.Error, mdb.MasterDBError) as e:
                self.metrics.monitor_errors += 1
                log.error("health check failed, retrying in %.1f s: %s",
                          self.monitor_interval, e)
            except Exception:
                self.metrics.monitor_errors += 1
                log.exception("health check failed")

    def start_monitor(self) -> gevent.Greenlet:
        """Spawn the health monitor greenlet."""
        self._monitor = gevent.spawn(self._monitor_loop)
        return self._monitor

    def stop_monitor(self) -> None:
        """Kill the health monitor greenlet."""
        if self._monitor is not None:
            self._monitor.kill()
            self._monitor = None


def printable(text: str, limit: int = 200) -> str:
    """text cut to limit characters, control characters escaped (safe in a log line)."""
    text = text[:limit]
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)


def _ok() -> tuple[int, str, bytes]:
    return 200, "text/plain; charset=utf-8", b"ok\n"


def _json(obj: Any) -> bytes:
    return json.dumps(obj, separators=(",", ":")).encode()


def _abandon_input(inp: Any) -> None:
    """Tell gevent's input not to read the rest of an oversized body (we close instead)."""
    try:
        if getattr(inp, "content_length", None) is not None:
            inp.content_length = inp.position
        if getattr(inp, "chunked_input", False):
            inp._chunked_input_error = True
    except AttributeError:
        pass
