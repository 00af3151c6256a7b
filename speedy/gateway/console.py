"""The gateway's web console: browse the stored paths, one file's page, upload, delete.

    GET  /ui/?prefix=P          the paths under P (folders and files, thumbnails of images)
    GET  /ui/file?path=P        one file: its keys, replicas (the client's stat), URL, preview
    POST /ui/upload?dir=P       a form's file (or ?path=P and a raw body, from gateway.js)
                                stored under P + its name; the key and URL (HTML, or JSON
                                for Accept: application/json)
    POST /ui/delete             path=P&confirm=yes deletes P (without confirm: asks first)
    GET  /ui/static/<file>      the console's CSS and JavaScript

Files are the path routes' metadata (speedy.gateway.meta, --metadb); an upload is stored
like POST /v1/file with one fragment, plus a blob record so GET /<key> answers its type.
With --signing_key the console is read-only: no upload, no delete, and no bytes shown
(blob URLs need a signature). POSTs from another site's page are refused (Origin check).
"""
from __future__ import annotations

import mimetypes
import time
import urllib.parse
from typing import TYPE_CHECKING

from speedy.client import NotFoundError, SpeedyError
from speedy.common import web
from speedy.common.web import esc
from speedy.gateway import blobs, garbage
from speedy.gateway.console_pages import (Entry, FileView, Listing, file_link, prefix_link,
                                          render_confirm, render_file, render_listing,
                                          render_message)
from speedy.gateway.form import FormFile
from speedy.gateway.http import HTTPError, Request, Response
from speedy.gateway.meta import MAX_PATH_BYTES, Fragment, MetaError
from speedy.gateway.records import BlobRecord, RecordError
from speedy.wire.manifest import parse_key

if TYPE_CHECKING:
    from speedy.gateway.app import GatewayApp

LIMIT = 300                  # files listed at most (with their fragments and records)
MAX_FORM = 64 << 10          # bytes of an urlencoded form


def wants(path: str) -> bool:
    """True for the paths the console answers."""
    return path == "/ui" or path.startswith("/ui/")


def html(body: bytes, status: int = 200) -> Response:
    """An HTML page with the console's security headers."""
    return Response.raw(status, body, web.HTML_TYPE, list(web.SECURITY_HEADERS))


def handle(app: "GatewayApp", req: Request) -> Response:
    """Answer one /ui request."""
    path, method = req.path, req.method
    if path.startswith("/ui/static/"):
        found = web.asset(path[len("/ui/static/"):]) if method in ("GET", "HEAD") else None
        if found is None:
            raise HTTPError(404, f"no such console file: {path[:100]}")
        return Response.raw(200, found[1], found[0], [("Cache-Control", "max-age=300")])
    posts = {"/ui/upload": upload, "/ui/delete": delete}
    if path in posts:
        if method != "POST":
            raise HTTPError(405, f"use POST for {path}", [("Allow", "POST")])
        check_writable(app, req)
        return posts[path](app, req)
    if method not in ("GET", "HEAD"):
        raise HTTPError(405, f"use GET for {path[:60]}", [("Allow", "GET, HEAD")])
    if app.meta is None:
        raise HTTPError(503, "the console lists the path routes' files: start the gateway "
                             "with --metadb")
    if path in ("/ui", "/ui/"):
        return html(render_listing(build_listing(app, req.query.get("prefix", "")),
                                   readonly(app)))
    if path == "/ui/file":
        return html(render_file(build_file(app, req.query.get("path", "")), base_url(req),
                                readonly(app)))
    raise HTTPError(404, f"no such console page: {path[:100]}")


def readonly(app: "GatewayApp") -> bool:
    """The console only looks (no upload, no delete, no bytes) when URLs must be signed."""
    return bool(app.signing_key)


def check_writable(app: "GatewayApp", req: Request) -> None:
    """403 for a read-only console or a POST from another site; 503 without --metadb."""
    if readonly(app):
        raise HTTPError(403, "the console is read-only on a gateway with --signing_key")
    if web.foreign_origin(req.header("origin"), req.header("host"),
                          req.header("sec-fetch-site")):
        raise HTTPError(403, "cross-site console request refused")
    if app.meta is None:
        raise HTTPError(503, "the console stores paths: start the gateway with --metadb")


def base_url(req: Request) -> str:
    """The gateway's URL as the browser reached it."""
    host = req.header("host") or "127.0.0.1"
    return f"http://{host}"


# -- reading ------------------------------------------------------------------------------


def content_type(app: "GatewayApp", key: str | None, path: str) -> str:
    """The type recorded at upload, else the one the path's extension suggests."""
    if key and app.records is not None:
        try:
            rec = app.records.get(key)
        except RecordError:
            rec = None
        if rec is not None and rec.content_type:
            return rec.content_type
    return mimetypes.guess_type(path, strict=False)[0] or ""


def build_entry(app: "GatewayApp", path: str) -> Entry | None:
    """A stored path's size, date, type and keys; None when it has no fragment."""
    frags = sorted(app.meta.fragments(path), key=lambda f: f.index)
    if not frags:
        return None
    keys = [str(f.blob) for f in frags if f.blob is not None]
    return Entry(path, sum(f.size for f in frags), max(f.mtime for f in frags),
                 content_type(app, keys[0] if keys else None, path), keys, len(frags))


def build_listing(app: "GatewayApp", prefix: str) -> Listing:
    """The folders (next path component) and files directly under prefix."""
    found = list(dict.fromkeys(app.meta.list_descendants(prefix)))
    listing = Listing(prefix, total=len(found))
    folders: dict[str, int] = {}
    names = []
    for p in found:
        rest = p[len(prefix):]
        cut = rest.find("/")
        if 0 <= cut < len(rest) - 1:
            sub = prefix + rest[:cut + 1]
            folders[sub] = folders.get(sub, 0) + 1
        else:
            names.append(p)
    listing.folders = sorted(folders.items())
    for p in names[:LIMIT]:
        e = build_entry(app, p)
        if e is not None:
            listing.files.append(e)
    listing.shown = len(folders) + len(listing.files)
    listing.total = len(folders) + len(names)
    return listing


def build_file(app: "GatewayApp", path: str) -> FileView:
    """One file with its fragments' keys and where their replicas are."""
    e = build_entry(app, path) if path else None
    if e is None:
        raise HTTPError(404, f"no stored path {path[:200]!r}")
    rows = []
    for f in sorted(app.meta.fragments(path), key=lambda f: f.index):
        key = str(f.blob) if f.blob is not None else ""
        rows.append((f.index, f.start, f.end, key, replicas(app, key)))
    return FileView(e, rows)


def replicas(app: "GatewayApp", key: str) -> str:
    """"host:port, host:port" holding key (the client's stat), and the ones missing it."""
    if not key:
        return "no bytes stored"
    try:
        st = app.client.stat(key)
    except NotFoundError:
        return "not found on any replica"
    except SpeedyError as e:
        return f"cannot stat: {e}"
    text = ", ".join(st.replicas)
    if st.missing:
        text += f" (missing on {', '.join(st.missing)})"
    return text


# -- writing ------------------------------------------------------------------------------


def checked_path(path: str) -> str:
    """A path to store under: 1 to 255 bytes of UTF-8, no control characters; else 400."""
    if not path:
        raise HTTPError(400, "no file name: choose a file to upload")
    if len(path.encode("utf-8")) > MAX_PATH_BYTES:
        raise HTTPError(400, f"path is longer than {MAX_PATH_BYTES} bytes")
    if any(ord(c) < 32 or ord(c) == 127 for c in path):
        raise HTTPError(400, "path contains control characters")
    return path


def upload(app: "GatewayApp", req: Request) -> Response:
    """POST /ui/upload: store a file under a path; its key and URL."""
    if req.content_length is None and not req.chunked:
        raise HTTPError(411, "Content-Length required (or Transfer-Encoding: chunked)")
    ctype = req.content_type.strip()
    source: Request | FormFile = req
    if ctype.lower().startswith("multipart/form-data"):
        form = FormFile(req)
        name = form.filename.replace("\\", "/").rsplit("/", 1)[-1]
        path = checked_path(req.query.get("dir", "") + name if name else "")
        source, ctype = form, form.content_type
    else:
        path = checked_path(req.query.get("path", ""))
    ctype = "" if ctype.lower() in blobs.NO_TYPE else blobs.valid_content_type(ctype)
    body = blobs.HashingReader(source, app.stats)
    key = app.client.put(body)
    rec = BlobRecord(key, ctype or blobs.sniff(body.head), body.size,
                     body.sha.hexdigest()[:32], int(time.time()))
    if app.records is not None:
        try:
            app.records.put(rec)
        except RecordError:
            pass  # GET /<key> sniffs the type instead
    blob = parse_key(key)
    try:
        freed = app.meta.put_fragment(Fragment(path, 0, 0, body.size, blob, True))
    except MetaError as e:
        garbage.free_blobs(app, [blob], queued=False)
        raise HTTPError(500, f"upload undone: {e}") from None
    forget_records(app, [str(b) for b in freed])
    garbage.free_blobs(app, freed)
    url = f"{base_url(req)}/{key}"
    if "application/json" in (req.header("accept") or ""):
        return Response.json(201, {"path": path, "key": key, "url": url, "size": body.size,
                                   "page": file_link(path)})
    cut = path.rfind("/")
    return html(render_message("Uploaded", [
        ("Path", f'<a href="{esc(file_link(path))}">{esc(path)}</a>'),
        ("Key", f'<code id="key">{esc(key)}</code>'),
        ("URL", f'<a id="url" href="/{esc(key)}">{esc(url)}</a>'),
        ("Size", esc(f"{body.size:,} bytes"))], prefix_link(path[:cut + 1])), 201)


def read_form(req: Request) -> dict[str, str]:
    """An application/x-www-form-urlencoded body as a dict; 400 when malformed or large."""
    if req.content_length is not None and req.content_length > MAX_FORM:
        raise HTTPError(413, f"form larger than {MAX_FORM} bytes")
    raw = b"".join(req.iter_body())[:MAX_FORM + 1]
    if len(raw) > MAX_FORM:
        raise HTTPError(413, f"form larger than {MAX_FORM} bytes")
    try:
        return dict(urllib.parse.parse_qsl(raw.decode("utf-8"), keep_blank_values=True,
                                           errors="strict"))
    except (UnicodeDecodeError, ValueError):
        raise HTTPError(400, "malformed form body") from None


def delete(app: "GatewayApp", req: Request) -> Response:
    """POST /ui/delete: path=P asks first; path=P&confirm=yes deletes P and its bytes."""
    form = read_form(req)
    path = form.get("path", "")
    if not path:
        raise HTTPError(400, "missing path")
    if form.get("confirm") != "yes":
        return html(render_confirm(path))
    try:
        freed = app.meta.delete_path(path)
    except MetaError as e:
        raise HTTPError(500, str(e)) from None
    forget_records(app, [str(b) for b in freed])
    garbage.free_blobs(app, freed)
    cut = path.rfind("/")
    return html(render_message("Deleted", [("Path", f"<code>{esc(path)}</code>"),
                                           ("Bytes freed", str(len(freed)) + " blob(s)")],
                               prefix_link(path[:cut + 1])))


def forget_records(app: "GatewayApp", keys: list[str]) -> None:
    """Drop the blob records of keys no path refers to any more."""
    if app.records is None:
        return
    for k in keys:
        try:
            app.records.delete(k)
        except RecordError:
            pass
