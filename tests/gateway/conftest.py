"""Gateway test fixtures: a private PostgreSQL server per session; metadata URLs per test."""
from __future__ import annotations

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
