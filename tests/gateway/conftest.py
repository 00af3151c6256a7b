"""Gateway test fixtures: a private PostgreSQL server per session; metadata URLs per test."""
from __future__ import annotations

import http.client
from dataclasses import dataclass

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
