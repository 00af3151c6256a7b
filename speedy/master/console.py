"""The master's web console: GET / (and /ui/), GET /ui/state.json, GET /ui/static/<file>.

The page is server-rendered HTML (a plain table per group, readable without JavaScript);
master.js refreshes it in place from /ui/state.json every few seconds. Both come from one
model: a dict of cells (element id -> text and CSS class) and bars (element id -> percent),
so the HTML and the JSON cannot disagree. Whether a group can take writes, and why not,
is speedy.wire.placement's answer, the same as the client's.

Without --token the page offers one admin action, setting a server's status (POST
/ui/setstatus, a plain form); with --token it shows no action and refuses that POST.
"""
from __future__ import annotations

import json
import time
import urllib.parse
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from speedy import __version__
from speedy.common import web
from speedy.common.web import esc
from speedy.format.chunkfile import RECORD_HEADER_SIZE
from speedy.master import db as mdb
from speedy.master.app import HTTPError, origin_path
from speedy.wire import master as wm
from speedy.wire import placement
from speedy.wire.master import FieldError, Status

if TYPE_CHECKING:
    from speedy.master.app import MasterApp

REFRESH_SECONDS = 2.0
STATE_PATH = "/ui/state.json"
STATIC_PREFIX = "/ui/static/"
SETSTATUS_PATH = "/ui/setstatus"
PAGE_PATHS = ("/", "/ui", "/ui/")


@dataclass
class Model:
    """What the page shows: cell texts and classes, bar percentages, the layout's key."""

    layout: str
    cells: dict[str, tuple[str, str]] = field(default_factory=dict)
    bars: dict[str, float | None] = field(default_factory=dict)
    groups: list[tuple[int, list[mdb.Chunkserver]]] = field(default_factory=list)

    def cell(self, ident: str, tag: str = "span", extra: str = "") -> str:
        """The element of one cell, its text escaped."""
        text, cls = self.cells[ident]
        klass = f' class="{esc(cls)}"' if cls else ""
        return f'<{tag} id="{esc(ident)}"{klass}{extra}>{esc(text)}</{tag}>'

    def bar(self, ident: str, kind: str) -> str:
        """The <meter> of one bar."""
        return web.bar(self.bars[ident], kind, ident)

    def to_json(self) -> dict:
        """GET /ui/state.json."""
        return {"layout": self.layout,
                "cells": {k: list(v) for k, v in self.cells.items()},
                "bars": self.bars}


def garbage_of(cs: mdb.Chunkserver) -> int:
    """The server's GarbageBytes as last reported (deleted and damaged bytes of its chunks)."""
    return int(cs.garbage_bytes)


def group_problem(servers: list[mdb.Chunkserver]) -> str | None:
    """Why the group cannot take a write now (the client's reason), or None."""
    in_route = [s for s in servers if s.status != Status.ERR]
    return placement.group_problem(in_route, 0, placement.MIN_REPLICAS,
                                   overhead=RECORD_HEADER_SIZE)


def build_model(app: "MasterApp", now: float | None = None) -> Model:
    """Read the registry and compute every cell of the page."""
    now = time.time() if now is None else now
    servers = app._db(mdb.list_servers)
    groups: dict[int, list[mdb.Chunkserver]] = {}
    for cs in servers:
        groups.setdefault(cs.group_id, []).append(cs)
    ordered = sorted(groups.items())
    layout = ";".join(f"{g}:" + ",".join(f"{s.ip}:{s.port}" for s in ss) for g, ss in ordered)
    m = Model(layout, groups=ordered)
    c = m.cells
    c["uptime"] = (web.age(now - app.started), "")
    c["fids"] = (f"{app.fids.handed_out:,}", "")
    c["highwater"] = (f"{app._db(mdb.fid_high_water):,}", "")
    c["nservers"] = (str(len(servers)), "")
    c["nerr"] = (str(sum(s.status == Status.ERR for s in servers)), "")
    c["updated"] = (time.strftime("%H:%M:%S", time.localtime(now)), "")
    max_free = max((s.total_free_space for s in servers), default=0)
    max_garbage = max((garbage_of(s) for s in servers), default=0)
    group_free = {g: min((s.total_free_space for s in ss if s.status != Status.ERR), default=0)
                  for g, ss in ordered}
    group_garbage = {g: sum(garbage_of(s) for s in ss) for g, ss in ordered}
    max_group_free = max(group_free.values(), default=0)
    max_group_garbage = max(group_garbage.values(), default=0)
    for g, ss in ordered:
        why = group_problem(ss)
        c[f"g{g}-writes"] = ("accepts writes", "badge ok") if why is None else \
            ("takes no writes", "badge no")
        c[f"g{g}-why"] = (why or "", "why")
        c[f"g{g}-free"] = (web.human_bytes(group_free[g]), "")
        m.bars[f"g{g}-freebar"] = web.percent(group_free[g], max_group_free)
        c[f"g{g}-garbage"] = (web.human_bytes(group_garbage[g]), "")
        m.bars[f"g{g}-garbagebar"] = web.percent(group_garbage[g], max_group_garbage)
        for i, s in enumerate(ss):
            p = f"s{g}-{i}-"
            name = placement.status_name(s.status)
            age = now - s.update_time if s.report_count else None
            c[p + "status"] = (name, f"st st-{name}")
            c[p + "age"] = (web.age(age), "")
            c[p + "free"] = (web.human_bytes(s.total_free_space), "")
            m.bars[p + "freebar"] = web.percent(s.total_free_space, max_free)
            c[p + "maxfree"] = (web.human_bytes(s.max_free_space), "")
            c[p + "garbage"] = (web.human_bytes(garbage_of(s)), "")
            m.bars[p + "garbagebar"] = web.percent(garbage_of(s), max_garbage)
            c[p + "chunks"] = (str(s.total_chunks), "")
            c[p + "conns"] = (str(s.conn_count), "")
            c[p + "pending"] = (str(s.pending_writes), "")
            c[p + "deletes"] = (str(s.pending_deletes), "")
    return m


# -- HTML ---------------------------------------------------------------------------------

COLUMNS = [("Server", ""), ("Status", ""), ("Heartbeat", ""), ("Free", ""), ("Max free", "num"),
           ("Garbage", ""), ("Chunks", "num"), ("Conns", "num"), ("Pending writes", "num"),
           ("Pending deletes", "num")]


def render_page(app: "MasterApp", m: Model, notice: str = "", error: str = "") -> bytes:
    """The whole page."""
    admin = not app.token
    facts = (f'<ul class="facts"><li>version <b>{esc(__version__)}</b></li>'
             f'<li>up <b>{m.cell("uptime")}</b></li>'
             f'<li>fids handed out <b>{m.cell("fids")}</b></li>'
             f'<li>fid high water <b>{m.cell("highwater")}</b></li>'
             f'<li>servers <b>{m.cell("nservers")}</b> (ERR <b>{m.cell("nerr")}</b>)</li>'
             f'<li>token <b>{"required" if app.token else "off"}</b></li>'
             f'<li>as of {m.cell("updated")} <span id="live">(reload to refresh)</span>'
             f'</li></ul>')
    parts = [facts]
    if notice:
        parts.append(f'<p class="notice" role="status">{esc(notice)}</p>')
    if error:
        parts.append(f'<p class="error" role="alert">{esc(error)}</p>')
    if not m.groups:
        parts.append('<p class="muted">No chunkserver is registered '
                     '(speedy admin add-server, or POST /v1/chunkserver/initserver).</p>')
    for g, servers in m.groups:
        parts.append(render_group(m, g, servers, admin))
    body = (f'<div id="console" data-state="{STATE_PATH}" data-layout="{esc(m.layout)}" '
            f'data-refresh="{REFRESH_SECONDS:g}">' + "".join(parts) + "</div>"
            '<noscript><meta http-equiv="refresh" content="10"></noscript>')
    return web.page("speedy master", body, script="master.js")


def render_group(m: Model, g: int, servers: list[mdb.Chunkserver], admin: bool) -> str:
    """One group's card: its write state, sums and the table of its servers."""
    head = "".join(f'<th scope="col">{esc(name)}</th>' for name, _ in COLUMNS)
    if admin:
        head += '<th scope="col">Action</th>'
    rows = []
    for i, s in enumerate(servers):
        p = f"s{g}-{i}-"
        cells = [f'<th scope="row">{esc(placement.server_name(s))}</th>',
                 f'<td>{m.cell(p + "status")}</td>', f'<td>{m.cell(p + "age")}</td>',
                 f'<td>{m.bar(p + "freebar", "free")} {m.cell(p + "free")}</td>',
                 f'<td class="num">{m.cell(p + "maxfree")}</td>',
                 f'<td>{m.bar(p + "garbagebar", "garbage")} {m.cell(p + "garbage")}</td>']
        cells += [f'<td class="num">{m.cell(p + k)}</td>'
                  for k in ("chunks", "conns", "pending", "deletes")]
        if admin:
            cells.append(f"<td>{status_form(s)}</td>")
        rows.append(f'<tr data-server="{esc(placement.server_name(s))}">{"".join(cells)}</tr>')
    return (f'<section class="card" id="group-{g}"><h2>Group {g} {m.cell(f"g{g}-writes")}</h2>'
            f'{m.cell(f"g{g}-why", "p")}'
            f'<div class="sum"><span>free (fullest replica) {m.bar(f"g{g}-freebar", "free")} '
            f'{m.cell(f"g{g}-free")}</span><span>garbage '
            f'{m.bar(f"g{g}-garbagebar", "garbage")} {m.cell(f"g{g}-garbage")}</span></div>'
            f'<div class="scroll"><table><thead><tr>{head}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div></section>')


def status_form(s: mdb.Chunkserver) -> str:
    """The admin form that sets one server's status (only without --token)."""
    options = "".join(f'<option value="{int(st)}"{" selected" if st == s.status else ""}>'
                      f'{st.name}</option>' for st in Status)
    return (f'<form class="inline" method="post" action="{SETSTATUS_PATH}">'
            f'<input type="hidden" name="GroupId" value="{s.group_id}">'
            f'<input type="hidden" name="Ip" value="{esc(s.ip)}">'
            f'<input type="hidden" name="Port" value="{s.port}">'
            f'<select name="Status" aria-label="status">{options}</select> '
            f'<button type="submit">set</button></form>')


# -- routes -------------------------------------------------------------------------------


class Console:
    """The console's routes on a MasterApp (dispatched for / and /ui/...)."""

    def __init__(self, app: "MasterApp") -> None:
        self.app = app

    @staticmethod
    def wants(path: str) -> bool:
        """True for the paths the console answers."""
        return path in PAGE_PATHS or path.startswith("/ui/")

    def handle(self, environ: dict, body: bytes, _m: Any) -> tuple[int, str, bytes]:
        """Answer one console request (a MasterApp handler)."""
        method = environ.get("REQUEST_METHOD", "GET")
        path = origin_path(environ.get("PATH_INFO", "") or "/")
        if path == SETSTATUS_PATH:
            if method != "POST":
                raise HTTPError(405, f"use POST for {SETSTATUS_PATH}", [("Allow", "POST")])
            return self.setstatus(environ, body)
        if method not in ("GET", "HEAD"):
            raise HTTPError(405, f"use GET for {path[:60]}", [("Allow", "GET, HEAD")])
        if path in PAGE_PATHS:
            return 200, web.HTML_TYPE, render_page(self.app, build_model(self.app))
        if path == STATE_PATH:
            return 200, "application/json", json.dumps(build_model(self.app).to_json(),
                                                       separators=(",", ":")).encode()
        if path.startswith(STATIC_PREFIX):
            found = web.asset(path[len(STATIC_PREFIX):])
            if found is not None:
                return 200, found[0], found[1]
        raise HTTPError(404, f"no such console page: {path[:100]}")

    def setstatus(self, environ: dict, body: bytes) -> tuple[int, str, bytes]:
        """POST /ui/setstatus (a form): set a server's status; the page with a notice."""
        if self.app.token:
            raise HTTPError(403, "the console has no admin actions when --token is set")
        if web.foreign_origin(environ.get("HTTP_ORIGIN"), environ.get("HTTP_HOST"),
                              environ.get("HTTP_SEC_FETCH_SITE")):
            raise HTTPError(403, "cross-site console request refused")
        try:
            form = urllib.parse.parse_qs(body.decode("utf-8"), strict_parsing=True)
            obj = {"Ip": form["Ip"][0], **{k: int(form[k][0])
                                          for k in ("GroupId", "Port", "Status")}}
            change = wm.StatusChange.from_json(obj)
        except (UnicodeDecodeError, KeyError, ValueError, FieldError) as e:
            raise HTTPError(400, f"malformed status form: {e}") from None
        rows = self.app._db(mdb.set_status, change.ip, change.port, change.status,
                            change.group_id or None)
        where = f"{change.group_id}:{change.ip}:{change.port}"
        if not rows:
            error, notice = f"no chunkserver {where} is registered", ""
        else:
            error, notice = "", f"{where} set to {placement.status_name(change.status)}"
        return 200, web.HTML_TYPE, render_page(self.app, build_model(self.app), notice, error)
