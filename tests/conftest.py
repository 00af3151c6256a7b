"""Fixtures shared by every test package: real daemons on loopback under tmp_path.

    servers(name, **flags) -> a started ServerProc        (tests/support/server.py)
    masters(tmp_path, *flags, **kw) -> a started MasterProc  (tests/support/master.py)
    clusters(name, **kw) -> a started Cluster              (tests/support/cluster.py)
    port -> a free TCP port on 127.0.0.1

Each factory kills every process it started, for sure, at the end of the test (one
spawn-and-wait helper for all of them: tests/support/daemon.py). Test modules use the
fixtures by name; they import helpers, never fixtures, from tests.support.
"""
from __future__ import annotations

import pytest

from tests.support import free_port
from tests.support.cluster import clusters  # noqa: F401 (fixture)
from tests.support.master import masters  # noqa: F401 (fixture)
from tests.support.server import servers  # noqa: F401 (fixture)


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running scenario (run with -m slow)")


@pytest.fixture
def port() -> int:
    """A free TCP port on 127.0.0.1."""
    return free_port()
