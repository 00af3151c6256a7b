"""Reporting to the master: a JSON POST every report_interval seconds, from a thread.

The body is the one of PROTOCOL.md "Reporting to the master". A master that is down or
answers an error never stops the chunkserver: the reporter logs the failure once, keeps
trying, and logs again when the reports get through.
"""
from __future__ import annotations

import http.client
import json
import logging
import threading
from argparse import Namespace
from typing import Callable

from speedy.wire import master as wm

log = logging.getLogger("speedy.chunkserver.reporter")

MAX_TIMEOUT = 5.0


def build_report(cfg: Namespace, totals: dict) -> wm.Report:
    """The report from the config and StatsView.totals()."""
    avail = [a for _cid, a in totals["chunks"]]
    return wm.Report(
        cfg.group_id, cfg.ip, cfg.port, status=totals["status"],
        total_free_space=sum(avail), max_free_space=max(avail, default=0),
        pending_writes=totals["pending_writes"], writing_count=totals["writing"],
        reading_count=totals["reading"], data_dir=cfg.data_dir, total_chunks=len(avail),
        conn_count=totals["conn_count"],
        garbage_bytes=sum(totals.get("chunk_garbage_bytes", {}).values()))


class Reporter(threading.Thread):
    """Posts build_report() to the master every interval until stop()."""

    def __init__(self, cfg: Namespace, totals: Callable[[], dict]) -> None:
        super().__init__(name="reporter", daemon=True)
        self.cfg = cfg
        self.totals = totals
        self.interval = cfg.report_interval
        self.timeout = min(MAX_TIMEOUT, max(0.5, cfg.report_interval))
        self._stop_event = threading.Event()
        self._failure: str | None = None  # None: last report went through
        self.sent = 0

    def run(self) -> None:
        """Report at once, then every interval."""
        while True:
            try:
                self.report_once()
            except Exception as e:  # never let the thread die
                log.exception("report to master failed unexpectedly: %s", e)
            if self._stop_event.wait(self.interval):
                return

    def stop(self) -> None:
        """Ask the thread to finish (it does within one timeout)."""
        self._stop_event.set()

    def report_once(self) -> bool:
        """One POST; True if the master answered 2xx."""
        body = json.dumps(build_report(self.cfg, self.totals()).to_json()).encode()
        headers = {"Content-Type": "application/json"}
        if self.cfg.token:
            headers[wm.TOKEN_HEADER] = self.cfg.token
        target = f"{self.cfg.master_ip}:{self.cfg.master_port}"
        conn = http.client.HTTPConnection(self.cfg.master_ip, self.cfg.master_port,
                                          timeout=self.timeout)
        try:
            conn.request("POST", wm.REPORTINFO, body=body, headers=headers)
            resp = conn.getresponse()
            text = resp.read(200).decode("utf-8", "replace").strip()
            if 200 <= resp.status < 300:
                self._succeeded(target)
                return True
            self._failed(target, f"HTTP {resp.status} {text}".strip())
        except (OSError, http.client.HTTPException) as e:
            self._failed(target, str(e) or type(e).__name__)
        finally:
            conn.close()
        return False

    def _succeeded(self, target: str) -> None:
        self.sent += 1
        if self._failure is not None or self.sent == 1:
            log.info("reporting to master %s", target)
        self._failure = None

    def _failed(self, target: str, reason: str) -> None:
        if reason != self._failure:
            how = (f"; register it with: speedy --master {target} admin add-server "
                   f"{self.cfg.group_id} {self.cfg.ip}:{self.cfg.port}"
                   if "not registered" in reason else "")  # logged once, like the failure
            log.warning("cannot report to master %s: %s%s (still serving; will keep trying "
                        "every %gs)", target, reason, how, self.interval)
        self._failure = reason
