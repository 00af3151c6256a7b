"""The access log (--access_log): one line per answered request, the Combined Log Format
(nginx's and Apache's default) followed by the seconds the request took.

    127.0.0.1 - - [05/Dec/2026:07:46:39 +0000] "GET /1,10452 HTTP/1.1" 200 4096 "-" "curl/8.5.0" 0.000412
    └ client    │ │ └ when the answer ended (UTC)  └ request line as sent      │   │    │    │            └ seconds, head
                │ └ user (always -)                                        status │ Referer  User-Agent      read to answer sent
                └ identity (always -)                                    body bytes sent

Behind proxies listed in --trusted_proxies the client is taken from X-Forwarded-For: the
rightmost address in it that is not a trusted proxy (nginx's real_ip_recursive), or the
proxy itself when that entry is malformed.

Quotes, backslashes and bytes outside printable ASCII in the quoted fields are written
as \\xHH, so that a line never breaks or forges another. A request refused before it
could be parsed (400, 408, 431) is logged with what arrived of its first line.

Each worker buffers its lines and appends them with one write() to a file opened with
O_APPEND, so lines of several workers never interleave: at least once a second, when
64 KiB are waiting, before the file is reopened (SIGHUP, after logrotate moved it) and
when the worker stops. "-" writes to standard output. A failing write (a full disk)
drops those lines with a warning in the error log once a minute: requests never wait
for the log.
"""
from __future__ import annotations

import ipaddress
import logging
import os
import re
import time

log = logging.getLogger("speedy.gateway.access")

FLUSH_BYTES = 64 << 10
WARN_EVERY = 60.0
REQUEST_LINE_MAX = 2000       # characters of a request line kept
MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")
UNSAFE = re.compile(r'[^\x20-\x7e]|["\\]')
STDOUT = "-"


def escape(text: str) -> str:
    """text with quotes, backslashes and non-printable or non-ASCII characters as \\xHH."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return text
    return UNSAFE.sub(lambda m: "\\x%02X" % (ord(m.group()) & 0xFF), text)


def clf_time(seconds: int) -> str:
    """[day/Mon/year:HH:MM:SS +0000] for unix seconds (UTC, English month names)."""
    t = time.gmtime(seconds)
    return (f"[{t.tm_mday:02d}/{MONTHS[t.tm_mon - 1]}/{t.tm_year}:{t.tm_hour:02d}:"
            f"{t.tm_min:02d}:{t.tm_sec:02d} +0000]")


def request_line(head: bytes) -> str:
    """The first line of a request head, as text for the log (cut at 2000 characters)."""
    line = head.split(b"\r\n", 1)[0].split(b"\n", 1)[0][:REQUEST_LINE_MAX]
    return escape(line.decode("latin-1"))


def client_address(peer: str, forwarded: str, trusted: tuple) -> str:
    """The client's address: peer, or, when peer is a trusted proxy, the rightmost address
    of X-Forwarded-For that is not one (a malformed entry stops the walk there)."""
    addr = peer
    hops = [h.strip() for h in forwarded.split(",")] if forwarded else []
    while is_trusted(addr, trusted) and hops:
        hop = hops.pop()
        try:
            addr = str(ipaddress.ip_address(hop))
        except ValueError:
            break
    return addr


def is_trusted(addr: str, trusted: tuple) -> bool:
    """True when addr lies in one of the trusted networks."""
    try:
        ip = ipaddress.ip_address(addr)
    except ValueError:
        return False
    return any(ip in net for net in trusted)


def open_log(path: str) -> int:
    """A file descriptor appending to path (created 0644), or standard output for "-"."""
    if path == STDOUT:
        return os.dup(1)
    return os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)


class AccessLog:
    """One worker's access log: lines buffered, appended in whole-line writes."""

    def __init__(self, path: str, trusted_proxies: tuple = ()):
        self.path = path
        self.trusted = trusted_proxies   # networks whose X-Forwarded-For is believed
        self.fd = open_log(path)
        self.lines: list[str] = []
        self.size = 0
        self.dropped = 0
        self._warned = 0.0
        self._stamp = (0, "")

    def record(self, addr: str, head: bytes, status: int, sent: int, referer: str,
               agent: str, seconds: float, forwarded: str = "") -> None:
        """Add the line of one answered request (written by the next flush); forwarded:
        its X-Forwarded-For header."""
        if self.trusted:
            addr = client_address(addr, forwarded, self.trusted)   # a parsed address
        now = int(time.time())
        if self._stamp[0] != now:
            self._stamp = (now, clf_time(now))
        line = (f'{addr or "-"} - - {self._stamp[1]} "{request_line(head)}" {status:03d} {sent} '
                f'"{escape(referer) if referer else "-"}" '
                f'"{escape(agent) if agent else "-"}" {seconds:.6f}\n')
        self.lines.append(line)
        self.size += len(line)
        if self.size >= FLUSH_BYTES:
            self.flush()

    def flush(self) -> None:
        """Append the buffered lines with one write (whole lines only; dropped on error)."""
        if not self.lines:
            return
        data = "".join(self.lines).encode("ascii", "replace")
        self.lines, self.size = [], 0
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(self.fd, view):]
        except OSError as e:
            self.dropped += data.count(b"\n")
            now = time.monotonic()
            if now - self._warned >= WARN_EVERY:
                self._warned = now
                log.warning("access log %s: %s; %d lines dropped so far", self.path,
                            e.strerror or e, self.dropped)

    def reopen(self) -> None:
        """Flush, then reopen the file at the same path (after logrotate moved it)."""
        self.flush()
        try:
            fd = open_log(self.path)
        except OSError as e:
            log.warning("cannot reopen access log %s: %s (still writing the old file)",
                        self.path, e.strerror or e)
            return
        os.close(self.fd)
        self.fd = fd

    def close(self) -> None:
        """Flush and close."""
        self.flush()
        os.close(self.fd)
        self.fd = -1
