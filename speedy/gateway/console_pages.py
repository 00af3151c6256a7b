"""The gateway console's HTML: the listing, one file's page, upload results, confirmations.

Pure rendering over records the routes in speedy.gateway.console gather; every piece of
user text (paths, names, types) goes through web.esc, and links carry their values URL-
encoded. Images are shown by the browser from the gateway's own blob URL (/<key>).
"""
from __future__ import annotations

import time
import urllib.parse
from dataclasses import dataclass, field

from speedy.common import web
from speedy.common.web import esc

UI = "/ui/"


@dataclass
class Entry:
    """One stored path as the listing shows it."""

    path: str
    size: int
    mtime: float
    content_type: str
    keys: list[str]              # its fragments' blob keys, in index order (empty ones left out)
    fragments: int

    @property
    def image_key(self) -> str | None:
        """The key whose bytes are the whole image, when the file is one image blob."""
        if self.content_type.startswith("image/") and self.fragments == 1 and self.keys:
            return self.keys[0]
        return None


@dataclass
class Listing:
    """A prefix's folders and files (the files under the prefix with no further "/")."""

    prefix: str
    folders: list[tuple[str, int]] = field(default_factory=list)   # (prefix, paths under it)
    files: list[Entry] = field(default_factory=list)
    total: int = 0
    shown: int = 0


def file_link(path: str) -> str:
    """The URL of one file's page."""
    return f"{UI}file?path={urllib.parse.quote(path, safe='')}"


def prefix_link(prefix: str) -> str:
    """The URL of the listing of a prefix."""
    return f"{UI}?prefix={urllib.parse.quote(prefix, safe='')}" if prefix else UI


def when(t: float) -> str:
    """Unix seconds as "2026-12-04 22:23:38 UTC"."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(t)) if t else ""


def crumbs(prefix: str) -> str:
    """Links to the prefix and each of its parent folders."""
    out = [f'<a href="{UI}">all paths</a>']
    at = 0
    while True:
        cut = prefix.find("/", at)
        if cut < 0:
            break
        out.append(f'<a href="{esc(prefix_link(prefix[:cut + 1]))}">'
                   f'{esc(prefix[at:cut + 1])}</a>')
        at = cut + 1
    if prefix[at:]:
        out.append(f"<span>{esc(prefix[at:])}</span>")
    return f'<p class="crumbs">{" ".join(out)}</p>'


def thumbnail(e: Entry, readonly: bool) -> str:
    """The image's thumbnail (the browser scales the original), or nothing."""
    key = e.image_key
    if key is None or readonly:
        return ""
    return (f'<img class="thumb" src="/{esc(key)}" alt="{esc(e.path)}" loading="lazy" '
            f'width="64" height="48">')


def render_listing(listing: Listing, readonly: bool) -> bytes:
    """GET /ui/: the prefix form, its folders and files, and the upload form."""
    p = listing.prefix
    parts = [crumbs(p),
             f'<form class="filter" method="get" action="{UI}"><label>Prefix '
             f'<input type="search" name="prefix" value="{esc(p)}" size="30"></label> '
             f'<button type="submit">list</button></form>']
    if not readonly:
        parts.append(upload_form(p))
    rows = []
    for sub, n in listing.folders:
        rows.append(f'<tr class="folder"><td></td><td><a href="{esc(prefix_link(sub))}">'
                    f'{esc(sub[len(p):])}</a></td><td class="num">{n} path(s)</td>'
                    f'<td class="hide-narrow">folder</td><td class="hide-narrow"></td></tr>')
    for e in listing.files:
        rows.append(f'<tr class="file" data-path="{esc(e.path)}"><td>{thumbnail(e, readonly)}</td>'
                    f'<td><a class="name" href="{esc(file_link(e.path))}">'
                    f'{esc(e.path[len(p):])}</a></td>'
                    f'<td class="num">{esc(web.human_bytes(e.size))}</td>'
                    f'<td class="hide-narrow">{esc(e.content_type or "?")}</td>'
                    f'<td class="hide-narrow">{esc(when(e.mtime))}</td></tr>')
    if not rows:
        rows.append('<tr><td></td><td colspan="4" class="muted">no stored path starts with '
                    'this prefix</td></tr>')
    more = ""
    if listing.shown < listing.total:
        more = (f'<p class="muted">showing the first {listing.shown} of {listing.total} '
                f'paths: narrow the prefix</p>')
    parts.append(f'<section class="card"><div class="scroll"><table id="listing"><thead><tr>'
                 f'<th></th><th>Path</th><th>Size</th><th class="hide-narrow">Type</th>'
                 f'<th class="hide-narrow">Date</th></tr></thead><tbody>{"".join(rows)}'
                 f'</tbody></table></div>{more}</section>')
    if readonly:
        parts.append(READONLY_NOTE)
    return web.page("speedy gateway", "".join(parts), script="gateway.js")


READONLY_NOTE = ('<p class="muted">This gateway has --signing_key set: the console is '
                 'read-only and shows no bytes (blob URLs need a signature: '
                 '<code>speedy url KEY</code>).</p>')


def upload_form(prefix: str) -> str:
    """The upload form: a plain multipart form, which gateway.js turns into drag and drop."""
    action = f"{UI}upload?dir={urllib.parse.quote(prefix, safe='')}"
    return (f'<section class="card"><form id="upload" class="drop" method="post" '
            f'enctype="multipart/form-data" action="{esc(action)}" data-dir="{esc(prefix)}">'
            f'<p>Drop files here, or choose one: '
            f'<input id="file" type="file" name="file"> '
            f'<button type="submit">Upload</button></p>'
            f'<p class="muted">stored under the prefix <code>{esc(prefix or "(none)")}'
            f'</code></p></form><ul id="results"></ul></section>')


@dataclass
class FileView:
    """One file's page: its fragments with their keys and replicas."""

    entry: Entry
    rows: list[tuple[int, int, int, str, str]]   # (index, start, end, key, replicas text)


def render_file(v: FileView, base_url: str, readonly: bool) -> bytes:
    """GET /ui/file?path=P."""
    e = v.entry
    cut = e.path.rfind("/")
    back = prefix_link(e.path[:cut + 1]) if cut >= 0 else UI
    facts = [("Path", esc(e.path)), ("Size", esc(f"{web.human_bytes(e.size)} ({e.size:,} bytes)")),
             ("Type", esc(e.content_type or "?")), ("Date", esc(when(e.mtime))),
             ("Fragments", str(e.fragments))]
    if len(e.keys) == 1 and not readonly:
        url = f"{base_url}/{e.keys[0]}"
        facts.append(("URL", f'<a id="url" href="/{esc(e.keys[0])}">{esc(url)}</a>'))
    dl = "".join(f"<dt>{k}</dt><dd>{v_}</dd>" for k, v_ in facts)
    frag_rows = "".join(
        f'<tr><td class="num">{i}</td><td class="num">{s:,}-{end:,}</td>'
        f'<td><code class="key">{esc(key or "(empty)")}</code></td><td>{esc(rep)}</td></tr>'
        for i, s, end, key, rep in v.rows)
    parts = [f'<p class="crumbs"><a href="{esc(back)}">&larr; back to the listing</a></p>',
             f'<section class="card"><h2 id="name">{esc(e.path)}</h2><dl class="kv">{dl}</dl>'
             f'</section>',
             f'<section class="card"><h2>Keys and replicas</h2><div class="scroll"><table>'
             f'<thead><tr><th>Index</th><th>Bytes</th><th>Key</th><th>Replicas</th></tr>'
             f'</thead><tbody>{frag_rows}</tbody></table></div></section>']
    preview = render_preview(e, readonly)
    if preview:
        parts.append(f'<section class="card"><h2>Preview</h2>{preview}</section>')
    if readonly:
        parts.append(READONLY_NOTE)
    else:
        parts.append(delete_form(e.path, confirm_first=True))
    return web.page(f"{e.path} - speedy gateway", "".join(parts), heading="speedy gateway",
                    script="gateway.js")


def render_preview(e: Entry, readonly: bool) -> str:
    """An image or a link to the bytes, when the file is one blob."""
    if readonly or len(e.keys) != 1:
        return ""
    key = esc(e.keys[0])
    if e.image_key:
        return f'<img id="preview" class="preview" src="/{key}" alt="{esc(e.path)}">'
    if e.content_type.startswith("video/"):
        return f'<video class="preview" src="/{key}" controls preload="metadata"></video>'
    return f'<p><a href="/{key}">open the bytes</a> ({esc(e.content_type or "?")})</p>'


def delete_form(path: str, confirm_first: bool) -> str:
    """The delete button: gateway.js asks first; without JavaScript a page asks."""
    value = "" if confirm_first else "yes"
    label = "Delete" if confirm_first else "Yes, delete it"
    return (f'<section class="card"><form id="delete" method="post" action="{UI}delete" '
            f'data-path="{esc(path)}"><input type="hidden" name="path" value="{esc(path)}">'
            f'<input type="hidden" name="confirm" value="{value}">'
            f'<button class="danger" type="submit">{label}</button></form></section>')


def render_confirm(path: str) -> bytes:
    """The confirmation page of a delete (no JavaScript)."""
    body = (f'<section class="card"><h2>Delete this file?</h2><p><code>{esc(path)}</code></p>'
            f'<p><a href="{esc(file_link(path))}">No, keep it</a></p></section>'
            + delete_form(path, confirm_first=False))
    return web.page("Delete? - speedy gateway", body, heading="speedy gateway")


def render_message(title: str, lines: list[tuple[str, str]], back: str) -> bytes:
    """A result page: (label, html) lines and a link back."""
    dl = "".join(f"<dt>{esc(k)}</dt><dd>{v}</dd>" for k, v in lines)
    body = (f'<section class="card"><h2>{esc(title)}</h2><dl class="kv">{dl}</dl></section>'
            f'<p><a href="{esc(back)}">&larr; back to the listing</a></p>')
    return web.page(f"{title} - speedy gateway", body, heading="speedy gateway")
