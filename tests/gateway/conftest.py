"""Gateway test fixtures: a private PostgreSQL server per session; metadata URLs per test."""
from __future__ import annotations

import http.client
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from socketserver import ThreadingMixIn
from typing import Iterator
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pytest

from tests.support.postgres import PostgresInstance, PostgresUnavailable


@pytest.fixture(scope="session")
def postgres():
    """A private PostgreSQL instance (skipped, with the reason, without its binaries)."""
    try:
        pg = PostgresInstance()
    except PostgresUnavailable as e:
        pytest.skip(str(e))
    with pg:
        yield pg


@pytest.fixture(params=["sqlite", "postgresql"])
def meta_url(request, tmp_path) -> str:
    """A fresh metadata database URL, once on SQLite and once on PostgreSQL."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/gateway.db"
    return request.getfixturevalue("postgres").new_database()


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, *args) -> None:  # no access log on stderr
        pass


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


@contextmanager
def serve_wsgi(app) -> Iterator[tuple[str, int]]:
    """Serve a WSGI app on 127.0.0.1:<free port> in background threads; yields the address.

    Stand-in for the gateway daemon until branch gateway lands (then tests start it)."""
    server = make_server("127.0.0.1", 0, app, server_class=_ThreadingWSGIServer,
                         handler_class=_QuietHandler)
    t = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                         daemon=True)
    t.start()
    try:
        yield server.server_address[:2]
    finally:
        server.shutdown()
        server.server_close()
        t.join(5)


@dataclass
class Answer:
    """An HTTP answer as the wire carried it."""

    status: int
    headers: dict[str, str]          # lower-case names
    body: bytes

    @property
    def text(self) -> str:
        return self.body.decode("utf-8", "replace")


def http_call(addr: tuple[str, int], method: str, path: str, headers: dict | None = None,
              body: bytes | None = None, timeout: float = 30.0) -> Answer:
    """One request over a fresh connection; the answer."""
    conn = http.client.HTTPConnection(*addr, timeout=timeout)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        r = conn.getresponse()
        data = r.read()
        return Answer(r.status, {k.lower(): v for k, v in r.getheaders()}, data)
    finally:
        conn.close()
