"""The aws-chunked body of S3 streaming uploads, decoded and checked while it flows.

    STREAMING-AWS4-HMAC-SHA256-PAYLOAD (each chunk signed, chained from the seed signature):
        <hex size>;chunk-signature=<64 hex>\\r\\n <size bytes> \\r\\n ... 0;chunk-signature=<sig>\\r\\n \\r\\n
    STREAMING-UNSIGNED-PAYLOAD-TRAILER (no signatures; a checksum trailer at the end):
        <hex size>\\r\\n <size bytes> \\r\\n ... 0\\r\\n x-amz-checksum-crc32:<base64>\\r\\n \\r\\n
    STREAMING-AWS4-HMAC-SHA256-PAYLOAD-TRAILER: signed chunks, then the trailer and
        x-amz-trailer-signature:<sig>\\r\\n

Checksums named in a trailer or an x-amz-checksum-* header are checked at the end
(crc32, sha1, sha256; crc32c and crc64nvme are accepted unchecked: no stdlib codec).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import zlib
from typing import Callable

from speedy.gateway.http import chunk_size
from speedy.gateway.s3.sigv4 import (STREAMING_SIGNED, STREAMING_SIGNED_TRAILER, AuthError,
                                     Verified, chunk_string_to_sign, sign, trailer_string_to_sign)

MAX_LINE = 4096            # a chunk header or trailer line
MAX_CHUNK = 64 << 20       # one chunk's size (S3 clients send 64 KiB - 8 MiB)


class BodyError(Exception):
    """A malformed or mismatching body: an S3 error code, a message, an HTTP status."""

    def __init__(self, code: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.code, self.message, self.status = code, message, status


class Checksum:
    """A running x-amz-checksum-<algorithm> of the decoded bytes."""

    def __init__(self, algorithm: str, expected: str | None = None) -> None:
        self.algorithm, self.expected = algorithm, expected
        self.crc = 0
        self.hash = {"sha1": hashlib.sha1, "sha256": hashlib.sha256}.get(algorithm, lambda: None)()

    def update(self, data: bytes) -> None:
        if self.algorithm == "crc32":
            self.crc = zlib.crc32(data, self.crc)
        elif self.hash is not None:
            self.hash.update(data)

    def value(self) -> str | None:
        """The base64 checksum, or None for an algorithm checked by nobody here."""
        if self.algorithm == "crc32":
            return base64.b64encode(self.crc.to_bytes(4, "big")).decode()
        if self.hash is not None:
            return base64.b64encode(self.hash.digest()).decode()
        return None

    def check(self) -> None:
        """BadDigest unless the expected value (when known and checkable) matches."""
        got = self.value()
        if self.expected is not None and got is not None and got != self.expected:
            raise BodyError("BadDigest", f"The {self.algorithm.upper()} you specified did not "
                            f"match the calculated checksum.")


def header_checksum(headers: dict[str, str]) -> Checksum | None:
    """The checksum an x-amz-checksum-<algorithm> header asks for, if any."""
    for name, value in headers.items():
        if name.startswith("x-amz-checksum-") and name != "x-amz-checksum-type":
            return Checksum(name[len("x-amz-checksum-"):], value.strip())
    return None


class AwsChunkedReader:
    """read(n) of the decoded body of an aws-chunked request; raises BodyError/AuthError."""

    def __init__(self, read: Callable[[int], bytes], mode: str, verified: Verified | None,
                 trailer: str = "", decoded_length: int | None = None) -> None:
        self._read = read
        self._buf = b""
        self.signed = mode in (STREAMING_SIGNED, STREAMING_SIGNED_TRAILER)
        self.verified = verified
        self.previous = verified.signature if verified else ""
        self.trailer_name = trailer.strip().lower()
        self.checksum = Checksum(self.trailer_name[len("x-amz-checksum-"):]) \
            if self.trailer_name.startswith("x-amz-checksum-") else None
        self.decoded_length = decoded_length
        self.left = 0           # bytes left in the current chunk
        self.chunk_hash = None  # sha256 of the current chunk, for its signature
        self.chunk_sig = ""
        self.total = 0
        self.done = False

    def _fill(self, n: int) -> None:
        while len(self._buf) < n:
            data = self._read(max(n - len(self._buf), 65536))
            if not data:
                raise BodyError("IncompleteBody", "The request body ended before its last chunk.")
            self._buf += data

    def _take(self, n: int) -> bytes:
        self._fill(n)
        out, self._buf = self._buf[:n], self._buf[n:]
        return out

    def _line(self) -> bytes:
        while b"\r\n" not in self._buf:
            if len(self._buf) > MAX_LINE:
                raise BodyError("InvalidChunkSizeError", "an aws-chunked header line is too long")
            self._fill(len(self._buf) + 1)
        line, _, self._buf = self._buf.partition(b"\r\n")
        return line

    def _start_chunk(self) -> None:
        line = self._line().decode("latin-1")
        size_text, _, ext = line.partition(";")
        size = chunk_size(size_text.strip().encode("latin-1"))
        if size is None:
            raise BodyError("InvalidChunkSizeError", f"bad aws-chunked size line '{line[:80]}'")
        if size > MAX_CHUNK:
            raise BodyError("InvalidChunkSizeError", f"an aws-chunked chunk of {size} bytes")
        if self.signed:
            key, _, sig = ext.partition("=")
            if key.strip() != "chunk-signature" or not sig:
                raise AuthError("SignatureDoesNotMatch", "an aws-chunked chunk has no chunk-signature")
            self.chunk_sig = sig.strip()
            self.chunk_hash = hashlib.sha256()
        self.left = size
        if size == 0:
            self._end_chunk()
            self._finish()

    def _end_chunk(self) -> None:
        if self.signed:
            expect = sign(self.verified.signing_key, chunk_string_to_sign(
                self.verified, self.previous, self.chunk_hash.hexdigest()))
            if not hmac.compare_digest(expect, self.chunk_sig):
                raise AuthError("SignatureDoesNotMatch", "an aws-chunked chunk's signature does not match")
            self.previous = self.chunk_sig

    def _finish(self) -> None:
        trailer_lines = []
        while True:
            line = self._line()
            if not line:
                break
            trailer_lines.append(line)
        fields = {}
        for line in trailer_lines:
            name, _, value = line.decode("latin-1").partition(":")
            fields[name.strip().lower()] = value.strip()
        if self.checksum is not None:
            if self.trailer_name not in fields:
                raise BodyError("MalformedTrailerError", f"the trailer {self.trailer_name} is missing")
            self.checksum.expected = fields[self.trailer_name]
            self.checksum.check()
        if self.signed and "x-amz-trailer-signature" in fields:
            body = b"".join(l + b"\n" for l in trailer_lines
                            if not l.lower().startswith(b"x-amz-trailer-signature"))
            expect = sign(self.verified.signing_key,
                          trailer_string_to_sign(self.verified, self.previous, body))
            if not hmac.compare_digest(expect, fields["x-amz-trailer-signature"]):
                raise AuthError("SignatureDoesNotMatch", "the trailer signature does not match")
        if self.decoded_length is not None and self.total != self.decoded_length:
            raise BodyError("IncompleteBody", f"x-amz-decoded-content-length says "
                            f"{self.decoded_length} bytes, the chunks held {self.total}")
        self.done = True

    def read(self, n: int = -1) -> bytes:
        """Up to n decoded bytes (all that is left for n < 0); b'' at the end."""
        out = []
        want = n if n >= 0 else 1 << 62
        while want > 0 and not self.done:
            if self.left == 0:
                self._start_chunk()
                continue
            take = min(want, self.left, 1 << 20)
            data = self._take(take)
            self.left -= take
            want -= take
            self.total += take
            if self.chunk_hash is not None:
                self.chunk_hash.update(data)
            if self.checksum is not None:
                self.checksum.update(data)
            out.append(data)
            if self.left == 0:
                if self._take(2) != b"\r\n":
                    raise BodyError("IncompleteBody", "an aws-chunked chunk is not followed by CRLF")
                self._end_chunk()
            if n < 0:
                continue
        return b"".join(out)
