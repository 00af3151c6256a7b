"""Headless Chromium through Selenium, for the web console tests and docs/screenshots.py.

    driver = chrome(tmp_path / "profile", js=True, size=(1280, 900))   # quit() it after
    missing()                 # why the browser cannot run here, or None
    png(40, 30)               # the bytes of a real PNG image (zlib + struct)

Uses Debian's `chromium` and `chromium-driver` (apt-get install -y chromium chromium-driver).
"""
from __future__ import annotations

import os
import shutil
import struct
import zlib

CHROME_ARGS = ["--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--disable-background-networking", "--disable-component-update",
               "--disable-sync", "--no-first-run", "--disable-extensions",
               "--no-default-browser-check", "--hide-scrollbars"]


def binaries() -> tuple[str | None, str | None]:
    """(chromium, chromedriver) paths, None where not installed."""
    browser = next((p for p in (shutil.which(n) for n in
                                ("chromium", "chromium-browser", "google-chrome")) if p), None)
    return browser, shutil.which("chromedriver")


def missing() -> str | None:
    """Why the browser tests cannot run here (None when they can)."""
    try:
        import selenium  # noqa: F401
    except ImportError:
        return "selenium is not installed (pip install -r requirements.txt)"
    browser, driver = binaries()
    if browser is None or driver is None:
        return ("chromium and chromium-driver are not installed "
                "(apt-get install -y chromium chromium-driver)")
    return None


def chrome(profile_dir: str | os.PathLike, js: bool = True, size: tuple[int, int] = (1280, 900)):
    """A headless Chromium with a fresh profile in profile_dir (JavaScript on or off)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service

    browser, driver = binaries()
    os.makedirs(profile_dir, exist_ok=True)
    opts = webdriver.ChromeOptions()
    opts.binary_location = browser
    for arg in CHROME_ARGS:
        opts.add_argument(arg)
    opts.add_argument(f"--user-data-dir={os.fspath(profile_dir)}")
    opts.add_argument(f"--window-size={size[0]},{size[1]}")
    if not js:
        opts.add_experimental_option("prefs", {
            "profile.managed_default_content_settings.javascript": 2})
    service = Service(executable_path=driver, log_output=os.path.join(profile_dir,
                                                                       "chromedriver.log"))
    d = webdriver.Chrome(options=opts, service=service)
    d.set_page_load_timeout(30)
    return d


def png(width: int, height: int, seed: int = 0) -> bytes:
    """A real RGB PNG: a colour gradient (zlib-compressed scanlines, CRC'd chunks)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    rows = b"".join(
        b"\x00" + bytes(v for x in range(width)
                        for v in ((x * 255 // max(1, width - 1) + seed) % 256,
                                  (y * 255 // max(1, height - 1)) % 256, (96 + seed * 40) % 256))
        for y in range(height))
    return (b"\x89PNG\r\n\x1a\n"
            + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows, 9)) + chunk(b"IEND", b""))


def wait_for(driver, check, timeout: float, what: str):
    """Poll check(driver) until truthy; elements that a refresh replaced are looked up again."""
    from selenium.common.exceptions import NoSuchElementException, StaleElementReferenceException
    from selenium.webdriver.support.ui import WebDriverWait
    return WebDriverWait(driver, timeout, poll_frequency=0.2, ignored_exceptions=(
        StaleElementReferenceException, NoSuchElementException)).until(check, what)


def submit(driver, element, timeout: float = 30.0) -> None:
    """Click an element that loads a new page; return once the old page is gone and the
    new one loaded (the old one's going alone leaves the new one half parsed)."""
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import WebDriverWait
    old = driver.find_element(By.TAG_NAME, "html")
    element.click()
    wait = WebDriverWait(driver, timeout, poll_frequency=0.1)
    wait.until(lambda d: gone(old), "the old page to go")
    wait.until(lambda d: d.execute_script("return document.readyState") == "complete")


def gone(element) -> bool:
    """True once element's page was replaced. Selenium's staleness_of knows only the
    stale-reference error; mid-navigation chromedriver may instead answer "Node with
    given id does not belong to the document", which says the same."""
    from selenium.common.exceptions import StaleElementReferenceException, WebDriverException
    try:
        element.is_enabled()
    except StaleElementReferenceException:
        return True
    except WebDriverException as e:
        if "does not belong to the document" in str(e):
            return True
        raise
    return False
