"""The console's shared parts and its model, without a browser."""
from __future__ import annotations


from speedy.common import web
from speedy.master import db as mdb
from speedy.master.console import garbage_of


def test_escaping_and_assets():
    assert web.esc('<script>"x"&\'') == "&lt;script&gt;&quot;x&quot;&amp;&#x27;"
    assert web.asset("console.css")[0].startswith("text/css")
    assert web.asset("master.js")[0].startswith("text/javascript")
    for bad in ("layout.html", "../app.py", "__init__.py", ".css", "x/console.css"):
        assert web.asset(bad) is None, bad
    page = web.page("<t>", "<p>body</p>", script="gateway.js").decode()
    assert "<title>&lt;t&gt;</title>" in page and "<p>body</p>" in page
    assert 'name="viewport"' in page and 'src="/ui/static/gateway.js"' in page
    assert "http" not in page.replace('http-equiv', '')   # nothing fetched from elsewhere


def test_figures():
    assert [web.human_bytes(n) for n in (None, 0, 1023, 1536, 5 << 30)] == \
        ["n/a", "0 B", "1023 B", "1.5 KiB", "5.0 GiB"]
    assert [web.age(s) for s in (None, 3.25, 125, 7300)] == \
        ["never", "3.2 s", "2 min 5 s", "2 h 1 min"]
    assert web.percent(None, 10) is None and web.percent(5, 0) == 0.0
    assert web.percent(5, 10) == 50.0 and web.percent(20, 10) == 100.0


def test_foreign_origin():
    host = "127.0.0.1:8088"
    assert not web.foreign_origin(None, host, None)                 # curl, old browsers
    assert not web.foreign_origin("http://127.0.0.1:8088", host, "same-origin")
    assert web.foreign_origin("http://evil.example", host, None)
    assert web.foreign_origin("null", host, None)
    assert web.foreign_origin(None, host, "cross-site")


def test_garbage_is_what_the_server_reported():
    assert garbage_of(mdb.Chunkserver(1, "127.0.0.1", 8000)) == 0
    assert garbage_of(mdb.Chunkserver(1, "127.0.0.1", 8000, garbage_bytes=4096)) == 4096
