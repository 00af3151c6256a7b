"""Logging: one line per event with timestamp, level and process; reopen on SIGHUP."""
from __future__ import annotations

import logging
import sys

FORMAT = "%(asctime)s %(levelname)s %(name)s[%(process)d]: %(message)s"


class ReopenableFileHandler(logging.FileHandler):
    """A FileHandler whose file can be reopened after logrotate moved it."""

    def reopen(self) -> None:
        """Close and reopen the file at the same path."""
        self.acquire()
        try:
            if self.stream is not None:
                self.stream.flush()
                self.stream.close()
            self.stream = self._open()
        finally:
            self.release()


def setup_logging(path: str = "", level: str = "INFO") -> logging.Handler:
    """Send every log line to path (append) or to stderr; returns the handler."""
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    handler: logging.Handler
    if path:
        handler = ReopenableFileHandler(path, mode="a", encoding="utf-8", delay=False)
    else:
        handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(FORMAT))
    root.addHandler(handler)
    root.setLevel(level)
    return handler


def reopen_logs() -> None:
    """Reopen every file handler of the root logger (SIGHUP, logrotate)."""
    for h in logging.getLogger().handlers:
        if isinstance(h, ReopenableFileHandler):
            h.reopen()


def log_files() -> list:
    """Open log streams, to keep across a python-daemon detach."""
    return [h.stream for h in logging.getLogger().handlers
            if isinstance(h, logging.FileHandler) and h.stream is not None]
