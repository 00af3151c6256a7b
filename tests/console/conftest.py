"""Browser fixtures: headless Chromium per test, screenshots kept under tmp_path.

The tests skip, with the reason printed at the end of the run, only where Chromium and
its driver cannot be installed (.ci/run installs them when it runs as root).
"""
from __future__ import annotations

import os

import pytest

from tests.support import browser

MISSING = browser.missing()


@pytest.fixture
def open_browser(tmp_path):
    """open_browser(js=True, size=(w, h)) -> a Selenium driver, quit at the end of the test."""
    if MISSING:
        pytest.skip(f"browser tests skipped: {MISSING}")
    drivers = []

    def make(js: bool = True, size: tuple[int, int] = (1280, 900)):
        d = browser.chrome(tmp_path / f"profile-{len(drivers)}", js=js, size=size)
        drivers.append(d)
        return d
    yield make
    for d in drivers:
        d.quit()


@pytest.fixture
def shot(tmp_path):
    """shot(driver, name): save a screenshot as tmp_path/screenshots/<name>.png; its path."""
    folder = tmp_path / "screenshots"
    folder.mkdir(exist_ok=True)

    def take(driver, name: str) -> str:
        path = os.fspath(folder / f"{name}.png")
        assert driver.save_screenshot(path), f"screenshot {name} not saved"
        return path
    return take


def pytest_terminal_summary(terminalreporter):
    if MISSING:
        terminalreporter.write_line(f"tests/console: browser tests skipped: {MISSING}",
                                    yellow=True)
