"""Fixtures shared by every test package: real daemons on loopback under tmp_path."""
from __future__ import annotations

import pytest

from tests.support import free_port


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: long-running scenario (run with -m slow)")


@pytest.fixture
def port() -> int:
    """A free TCP port on 127.0.0.1."""
    return free_port()
