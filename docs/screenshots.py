"""Take the README's screenshots of the web console: docs/screenshots/*.png.

    .venv/bin/python docs/screenshots.py [--base-port 18099]

Starts a small local cluster (`speedy local up`: a master, three chunkservers and a
gateway) in a temporary directory, stores a few generated images through the gateway's
console, photographs the master's page and the gateway's pages in headless Chromium
(tests.support.browser), and stops the cluster again.
"""
from __future__ import annotations

import argparse
import http.client
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.support.browser import chrome, missing, png  # noqa: E402

OUT = os.path.join(ROOT, "docs", "screenshots")
IMAGES = [("holiday/beach.png", (160, 120, 1)), ("holiday/harbour.png", (120, 160, 2)),
          ("holiday/sunset.png", (200, 120, 4)), ("holiday/notes.txt", None),
          ("avatars/ada.png", (96, 96, 5)), ("avatars/linus.png", (96, 96, 6))]


def speedy(*args: str) -> None:
    """Run `python -m speedy args...`; exit on failure."""
    subprocess.run([sys.executable, "-m", "speedy", *args], check=True, cwd=ROOT)


def put(port: int, path: str, data: bytes, ctype: str) -> None:
    """Store data under path through the console's upload route."""
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        c.request("POST", "/ui/upload?path=" + urllib.parse.quote(path, safe=""), data,
                  {"Content-Type": ctype, "Accept": "application/json"})
        r = c.getresponse()
        body = r.read()
        if r.status != 201:
            sys.exit(f"upload of {path} failed: {r.status} {body[:200]!r}")
    finally:
        c.close()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--base-port", type=int, default=18099, help="the local master's port")
    ns = p.parse_args()
    why = missing()
    if why:
        sys.exit(f"cannot take screenshots: {why}")
    os.makedirs(OUT, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="speedy-shots-")
    master, gateway = ns.base_port, ns.base_port - 11
    speedy("local", "up", "--dir", tmp, "--base-port", str(master), "--chunks", "2",
           "--chunk-size", str(16 << 20), "--mem-blocks", "8")
    driver = None
    try:
        for path, spec in IMAGES:
            if spec is None:
                put(gateway, path, b"packing list: towel, sunscreen\n", "text/plain")
            else:
                put(gateway, path, png(*spec), "image/png")
        driver = chrome(os.path.join(tmp, "profile"), size=(1200, 760))
        shots = [("master", f"http://127.0.0.1:{master}/"),
                 ("gateway-listing", f"http://127.0.0.1:{gateway}/ui/?prefix=holiday/"),
                 ("gateway-file", f"http://127.0.0.1:{gateway}/ui/file?path=holiday%2Fbeach.png")]
        for name, url in shots:
            driver.get(url)
            time.sleep(1.0)   # images decoded, the master page's first refresh done
            target = os.path.join(OUT, f"{name}.png")
            driver.save_screenshot(target)
            print(f"wrote {os.path.relpath(target, ROOT)}")
    finally:
        if driver is not None:
            driver.quit()
        speedy("local", "down", "--dir", tmp)
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
