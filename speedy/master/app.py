"""The chunkmaster's WSGI app: routes of MASTER-API.md, validation, metrics, health monitor."""
from __future__ import annotations

import hmac
import json
import logging
import re
import sqlite3
import time
from typing import Any, Callable

import gevent
import sqlite_utils

from speedy.master import db as mdb
from speedy.master.deleter import Deleter
from speedy.master.metrics import CONTENT_TYPE, Counts, MasterMetrics, Snapshot
from speedy.wire import master as wm
from speedy.wire.master import FieldError, Status

log = logging.getLogger("speedy.master")

MAX_BODY = 1 << 20
MAX_PENDING_BATCH = 10000  # pending deletes in one POST


class BodyTimeout(Exception):
    """The request body did not arrive within the request's read deadline."""


class HTTPError(Exception):
    """An answer with a 4xx/5xx status and a plain-text reason."""

    def __init__(self, status: int, reason: str, headers: list | None = None) -> None:
        super().__init__(reason)
        self.status, self.reason, self.headers = status, reason, headers or []


STATUS_TEXT = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found",
               405: "Method Not Allowed", 408: "Request Timeout", 413: "Payload Too Large",
               500: "Internal Server Error", 503: "Service Unavailable"}
_ABSOLUTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://[^/?#]*")


def origin_path(path: str) -> str:
    """The path of an absolute-form target (RFC 9112 3.2.2: http://host:port/path)."""
    m = _ABSOLUTE.match(path)
    if m is None:
        return path
    return path[m.end():] or "/"


def checked(parse: Callable[..., Any], *args: Any) -> Any:
    """parse(*args), its FieldError answered as a 400."""
    try:
        return parse(*args)
    except FieldError as e:
        raise HTTPError(400, str(e)) from None


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
        self.fids = mdb.FidReserver(db)
        self.counts = Counts()
        self.connections = 0  # open HTTP connections, kept by the daemon
        self.metrics = MasterMetrics(self.snapshot, self.counts)
        self.deleter = Deleter(db, self.counts)
        self._monitor: gevent.Greenlet | None = None
        from speedy.master.console import Console  # the web console (GET /, /ui/...)
        self.console = Console(self)
        # path -> method -> (handler, needs token); groupinfo is matched by pattern.
        self.routes: dict[str, dict[str, tuple[Handler, bool]]] = {
            wm.INITSERVER: {"POST": (self.initserver, True)},
            wm.BATCHINITSERVER: {"POST": (self.batchinitserver, True)},
            wm.REPORTINFO: {"POST": (self.reportinfo, True)},
            wm.RELOADINFO: {"POST": (self.reloadinfo, True)},
            wm.SETSTATUS: {"POST": (self.setstatus, True)},
            wm.REMOVESERVER: {"POST": (self.removeserver, True)},
            wm.PENDINGDELETE: {"POST": (self.pendingdelete, True)},
            wm.ROUTE: {"GET": (self.route, False)},
            wm.FID: {"GET": (self.fid, True)},
            wm.GROUPINFO: {"GET": (self.groupinfo, False)},
            wm.CHECKERROR: {"GET": (self.checkerror, False)},
            wm.SERVERS: {"GET": (self.servers, False)},
            wm.METRICS: {"GET": (self.metrics_text, False)},
        }

    # -- WSGI ------------------------------------------------------------------------

    def __call__(self, environ: dict, start_response: Callable) -> list[bytes]:
        t0 = time.monotonic()
        method = environ.get("REQUEST_METHOD", "GET")
        path = origin_path(environ.get("PATH_INFO", "") or "/")
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
        self.counts.observe(route_name, status, time.monotonic() - t0)
        return [b"" if method == "HEAD" else payload]

    def _dispatch(self, method: str, path: str, environ: dict) -> \
            tuple[str, Handler, re.Match | None]:
        """(route name, handler, groupinfo match) or HTTPError 404/405/403."""
        if self.console.wants(path):
            return "console", self.console.handle, None
        match = wm.GROUPINFO_PATTERN.match(path)
        name = wm.GROUPINFO if match else path
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
        given = environ.get("HTTP_" + wm.TOKEN_HEADER.upper().replace("-", "_"))
        if given is None:
            raise HTTPError(403, f"missing {wm.TOKEN_HEADER} header")
        if not hmac.compare_digest(given.encode("utf-8", "replace"), self.token.encode()):
            raise HTTPError(403, f"wrong {wm.TOKEN_HEADER}")

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
        deadline = environ.get("speedy.read_deadline")
        left = None if deadline is None else max(0.01, deadline - time.monotonic())
        try:
            with gevent.Timeout(left, BodyTimeout):
                body = inp.read(self.max_body + 1)
        except (BodyTimeout, TimeoutError):
            _abandon_input(inp)
            raise HTTPError(408, "request body not received whole in time",
                            [("Connection", "close")]) from None
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
        key = checked(wm.ServerKey.from_json, parse_json(body)).astuple()
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
                keys.append(wm.ServerKey.from_json(item, "each element").astuple())
            except FieldError as e:
                raise HTTPError(400, f"element {i}: {e}") from None
        added = self._db(mdb.add_servers, keys)
        log.info("batch registration: %d chunkservers, %d new", len(keys), added)
        return _ok()

    def reportinfo(self, environ: dict, body: bytes, _m: Any) -> tuple[int, str, bytes]:
        """A heartbeat: store the report, INIT/RO -> RW (RO if the server is read-only);
        then finish the deletes pending on that server, in the background."""
        report = checked(wm.Report.from_json, parse_json(body))
        result = self._db(mdb.record_report, report)
        key = f"{report.group_id}:{report.ip}:{report.port}"
        if result is None:
            raise HTTPError(400, f"chunkserver {key} is not registered (initserver first)")
        self.counts.heartbeats += 1
        old, new = result
        if old != new:
            log.info("chunkserver %s: %s -> %s (heartbeat%s)", key, old.name, new.name,
                     ", server says read-only" if report.read_only else "")
        elif old == Status.ERR:
            log.debug("chunkserver %s reports but stays ERR", key)
        self.deleter.kick(report.group_id, report.ip, report.port)
        return _ok()

    def reloadinfo(self, environ: dict, body: bytes, _m: Any) -> tuple[int, str, bytes]:
        """Re-read the registry (every answer reads the database; this logs what it holds)."""
        counts = self._db(mdb.status_counts)
        log.info("registry reloaded: %s", ", ".join(f"{s.name} {n}" for s, n in counts.items()))
        return _ok()

    def setstatus(self, environ: dict, body: bytes, _m: Any) -> tuple[int, str, bytes]:
        """speedy extension: set a chunkserver's status ({"Ip","Port","Status"[,"GroupId"]})."""
        ch = checked(wm.StatusChange.from_json, parse_json(body))
        rows = self._db(mdb.set_status, ch.ip, ch.port, ch.status, ch.group_id or None)
        if not rows:
            raise HTTPError(404, f"no chunkserver {ch.ip}:{ch.port} is registered")
        return 200, "application/json", _json([r.to_json() for r in rows])

    def removeserver(self, environ: dict, body: bytes, _m: Any) -> tuple[int, str, bytes]:
        """speedy extension: delete a chunkserver from the registry."""
        key = checked(wm.ServerKey.from_json, parse_json(body)).astuple()
        if not self._db(mdb.remove_server, *key):
            raise HTTPError(404, "no chunkserver %d:%s:%d is registered" % key)
        log.warning("chunkserver %d:%s:%d removed from the registry", *key)
        return _ok()

    def pendingdelete(self, environ: dict, body: bytes, _m: Any) -> tuple[int, str, bytes]:
        """speedy extension: record deletes a client could not finish on a server (a JSON
        array of {"GroupId","Ip","Port","Fid"}); the master finishes them."""
        items = parse_json(body)
        if not isinstance(items, list) or len(items) > MAX_PENDING_BATCH:
            raise HTTPError(400, "body must be a JSON array of at most "
                                 f"{MAX_PENDING_BATCH} {{GroupId, Ip, Port, Fid}} objects")
        pending = []
        for i, item in enumerate(items):
            try:
                pending.append(wm.PendingDelete.from_json(item, "each element"))
            except FieldError as e:
                raise HTTPError(400, f"element {i}: {e}") from None
        added = self._db(mdb.add_pending_deletes, pending)
        for p in pending:
            log.info("delete of %d,%d on %s:%d pending", p.group_id, p.fid, p.ip, p.port)
            self.deleter.kick(p.group_id, p.ip, p.port)
        return 200, "application/json", _json({"Added": added})

    def route(self, environ: dict, body: bytes, _m: Any) -> tuple[int, str, bytes]:
        """{"<group_id>": [chunkserver, ...]} without ERR servers."""
        groups = self._db(mdb.route)
        return 200, "application/json", _json(
            {str(g): [cs.to_json() for cs in servers] for g, servers in groups.items()})

    def fid(self, environ: dict, body: bytes, _m: Any) -> tuple[int, str, bytes]:
        """A fresh range of 100 fids."""
        begin, end = self._guarded(self.fids.next_range)
        return 200, "application/json", _json(wm.FidRange(begin, end).to_json())

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
        return 200, CONTENT_TYPE, self.metrics.render()

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

    def snapshot(self) -> Snapshot:
        """The state the metrics show, read now."""
        return Snapshot(servers=self._db(mdb.list_servers),
                        fid_high_water=self._db(mdb.fid_high_water),
                        fids_issued=self.fids.handed_out,
                        pending_deletes=self._db(mdb.count_pending_deletes),
                        started=self.started, open_connections=self.connections)

    # -- health monitor ----------------------------------------------------------------

    def monitor_once(self, now: float | None = None) -> list[mdb.Chunkserver]:
        """Turn RO every RW server silent for longer than heartbeat_timeout."""
        changed = mdb.mark_silent(self.db, self.heartbeat_timeout, self.started, now)
        for cs in changed:
            log.warning("chunkserver %s: RW -> RO (no heartbeat for %.1f s)", cs.key,
                        (now or time.time()) - cs.update_time)
        self.counts.silent_to_ro += len(changed)
        return changed

    def _monitor_loop(self) -> None:
        """Run monitor_once every monitor_interval seconds, forever."""
        while True:
            gevent.sleep(self.monitor_interval)
            try:
                self.monitor_once()
            except (sqlite3.Error, mdb.MasterDBError) as e:
                self.counts.monitor_errors += 1
                log.error("health check failed, retrying in %.1f s: %s",
                          self.monitor_interval, e)
            except Exception:
                self.counts.monitor_errors += 1
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
