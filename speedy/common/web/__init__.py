"""The web console's shared parts: the page layout, static files, escaping and formatting.

    web.page("speedy master", body_html, script="master.js")  -> bytes of a whole page
    web.asset("console.css")                                  -> (content type, bytes) or None
    web.esc(text), web.human_bytes(n), web.bar(percent, kind), web.age(seconds)

Everything is served from this package (no CDN, no build step). Every piece of text that
goes into HTML passes through esc(); the pages' JavaScript only sets textContent.
"""
from __future__ import annotations

import functools
import html
import string
from importlib import resources

ASSET_TYPES = {".css": "text/css; charset=utf-8", ".js": "text/javascript; charset=utf-8"}
HTML_TYPE = "text/html; charset=utf-8"
# The pages load only their own files; images may come from the same origin only.
SECURITY_HEADERS = [
    ("Content-Security-Policy", "default-src 'self'; img-src 'self'; media-src 'self'; "
                                "object-src 'none'; base-uri 'none'; frame-ancestors 'none'"),
    ("X-Content-Type-Options", "nosniff"),
    ("Referrer-Policy", "same-origin"),
]


def esc(value: object) -> str:
    """value as HTML text (quotes escaped too: safe in attributes)."""
    return html.escape(str(value), quote=True)


@functools.lru_cache(maxsize=None)
def _read(name: str) -> bytes:
    return resources.files(__package__).joinpath(name).read_bytes()


def asset(name: str) -> tuple[str, bytes] | None:
    """(content type, bytes) of a static file of this package (.css or .js), or None."""
    dot = name.rfind(".")
    ctype = ASSET_TYPES.get(name[dot:]) if dot > 0 else None
    if ctype is None or "/" in name or "\\" in name or name.startswith("."):
        return None
    try:
        return ctype, _read(name)
    except (FileNotFoundError, IsADirectoryError):
        return None


@functools.lru_cache(maxsize=None)
def template(name: str) -> string.Template:
    """A page template of this package (string.Template, $names substituted)."""
    return string.Template(_read(name).decode("utf-8"))


def page(title: str, body: str, *, script: str = "", heading: str = "",
         base: str = "/ui/") -> bytes:
    """A whole HTML page around body (already escaped HTML); script: a .js of this package."""
    tag = f'<script src="{esc(base)}static/{esc(script)}" defer></script>' if script else ""
    return template("layout.html").substitute(
        title=esc(title), heading=esc(heading or title), body=body, script=tag,
        css=f"{esc(base)}static/console.css").encode("utf-8")


def human_bytes(n: int | None) -> str:
    """1536 -> "1.5 KiB"; None -> "n/a"."""
    if n is None:
        return "n/a"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{int(value)} B" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"


def age(seconds: float | None) -> str:
    """3.25 -> "3.2 s", 125 -> "2 min 5 s"; None -> "never"."""
    if seconds is None:
        return "never"
    seconds = max(0.0, seconds)
    if seconds < 60:
        return f"{seconds:.1f} s"
    m, s = divmod(int(seconds), 60)
    if m < 60:
        return f"{m} min {s} s"
    h, m = divmod(m, 60)
    if h < 48:
        return f"{h} h {m} min"
    return f"{h // 24} d {h % 24} h"


def percent(part: int | None, whole: int | None) -> float | None:
    """part / whole as a percentage in 0..100 (None when unknown)."""
    if part is None or not whole:
        return None if part is None else 0.0
    return round(max(0.0, min(100.0, 100.0 * part / whole)), 1)


def bar(pct: float | None, kind: str, bar_id: str = "") -> str:
    """A <meter> filled to pct percent (kind: free or garbage; empty when None)."""
    ident = f' id="{esc(bar_id)}"' if bar_id else ""
    value = 0.0 if pct is None else pct
    return (f'<meter{ident} class="bar bar-{esc(kind)}" min="0" max="100" '
            f'value="{value:.1f}"></meter>')


def foreign_origin(origin: str | None, host: str | None, fetch_site: str | None) -> bool:
    """True when a POST comes from another site's page (Origin or Sec-Fetch-Site say so)."""
    if fetch_site and fetch_site.lower() not in ("same-origin", "none"):
        return True
    if not origin:
        return False
    if origin == "null" or not host:
        return True
    return origin.lower() not in (f"http://{host}".lower(), f"https://{host}".lower())
