"""File keys and the multi-part manifest format: pure encode/decode.

Keys (text, decimal)::

    "<group_id>,<fid>"     a plain blob: the bytes stored under fid in group_id
                           (the format of the original front-ends, e.g. "3,10452")
    "<group_id>,<fid>m"    a multi-part file: fid in group_id holds a manifest blob
                           (below) that lists the parts, each a plain blob

group_id is 1..65535 (u16), fid 0..2**64-1 (u64). Surrounding white space is ignored;
nothing else is accepted (no signs, no hex, no other suffix).

Manifest blob (all integers unsigned big-endian)::

    offset 0    magic "SPDYMANI" (8 bytes)
    offset 8    version u8 (1) | digest u8 (1 = sha256) | reserved u16 (0)
    offset 12   total_size u64          sum of the part sizes
    offset 20   part_size u64           the size of every part but the last
    offset 28   n_parts u32
    offset 32   n_parts entries of 50 bytes, in file order:
                    group_id u16 | fid u64 | size u64 | sha256(part data) 32 bytes
    offset 32 + 50 * n_parts
                sha256 of every byte before it (32 bytes)

A manifest of n parts is 64 + 50 * n bytes: 100 parts of 4 MiB (400 MiB) take 5064 bytes.
"""
from __future__ import annotations

import functools
import hashlib
import re
import struct
from dataclasses import dataclass, field

MAGIC = b"SPDYMANI"
VERSION = 1
DIGEST_SHA256 = 1
HEADER = struct.Struct(">8sBBHQQI")
ENTRY = struct.Struct(">HQQ32s")
DIGEST_SIZE = 32
HEADER_SIZE = HEADER.size  # 32
ENTRY_SIZE = ENTRY.size  # 50
MAX_GROUP_ID = 65535
MAX_FID = (1 << 64) - 1
MULTIPART_SUFFIX = "m"
KEY_RE = re.compile(r"^([0-9]{1,5}),([0-9]{1,20})(m?)$")
KEY_TEXT_MAX = 40       # parse_key remembers texts up to this long ...
KEY_CACHE = 1 << 16     # ... this many (about 10 MB at most)


class KeyFormatError(ValueError):
    """Text that is not a speedy key."""


class ManifestError(ValueError):
    """Bytes that are not a valid manifest."""


@dataclass(frozen=True)
class Key:
    """A parsed key: the blob fid in group_id, a manifest when multipart."""

    group_id: int
    fid: int
    multipart: bool = False

    def __str__(self) -> str:
        return f"{self.group_id},{self.fid}{MULTIPART_SUFFIX if self.multipart else ''}"

    def blob(self) -> "Key":
        """The plain key of the blob that stores this key's bytes (the manifest's)."""
        return Key(self.group_id, self.fid, False)


def parse_key(text: str) -> Key:
    """Parse "<group_id>,<fid>" or "<group_id>,<fid>m"; KeyFormatError otherwise."""
    if not isinstance(text, str):
        raise KeyFormatError(f"a key must be text, not {type(text).__name__}")
    if len(text) <= KEY_TEXT_MAX:
        return _parse_short_key(text)
    return _parse_key(text)


@functools.lru_cache(maxsize=KEY_CACHE)
def _parse_short_key(text: str) -> Key:
    """parse_key of a text short enough to remember (a server reading hot keys parses
    each once; a Key is immutable, so the one object serves every caller)."""
    return _parse_key(text)


def _parse_key(text: str) -> Key:
    m = KEY_RE.match(text.strip())
    if not m:
        raise KeyFormatError(f"bad key {text!r}: expected <group_id>,<fid> "
                             f"or <group_id>,<fid>m (decimal)")
    group_id, fid = int(m.group(1)), int(m.group(2))
    if not 1 <= group_id <= MAX_GROUP_ID:
        raise KeyFormatError(f"bad key {text!r}: group id must be 1..{MAX_GROUP_ID}")
    if fid > MAX_FID:
        raise KeyFormatError(f"bad key {text!r}: fid does not fit 64 bits")
    return Key(group_id, fid, bool(m.group(3)))


def as_key(key: "str | Key") -> Key:
    """A Key from a Key or its text."""
    return key if isinstance(key, Key) else parse_key(key)


@dataclass(frozen=True)
class Part:
    """One part of a multi-part file: where it is, its size and sha256."""

    group_id: int
    fid: int
    size: int
    sha256: bytes

    @property
    def key(self) -> Key:
        """The part's plain key."""
        return Key(self.group_id, self.fid)


@dataclass
class Manifest:
    """The list of parts of a multi-part file."""

    total_size: int
    part_size: int
    parts: list[Part] = field(default_factory=list)

    def encode(self) -> bytes:
        """The manifest blob, trailing digest included."""
        check(self)
        out = [HEADER.pack(MAGIC, VERSION, DIGEST_SHA256, 0, self.total_size,
                           self.part_size, len(self.parts))]
        out += [ENTRY.pack(p.group_id, p.fid, p.size, p.sha256) for p in self.parts]
        body = b"".join(out)
        return body + hashlib.sha256(body).digest()

    @classmethod
    def decode(cls, blob: bytes) -> "Manifest":
        """Parse and verify a manifest blob; ManifestError when it is not one."""
        blob = bytes(blob)
        if len(blob) < HEADER_SIZE + DIGEST_SIZE:
            raise ManifestError("manifest shorter than 64 bytes")
        magic, version, digest, _res, total, part_size, n = HEADER.unpack_from(blob)
        if magic != MAGIC:
            raise ManifestError("not a manifest (bad magic)")
        if version != VERSION:
            raise ManifestError(f"unsupported manifest version {version}")
        if digest != DIGEST_SHA256:
            raise ManifestError(f"unsupported manifest digest {digest}")
        if len(blob) != HEADER_SIZE + ENTRY_SIZE * n + DIGEST_SIZE:
            raise ManifestError("manifest length disagrees with its part count")
        if hashlib.sha256(blob[:-DIGEST_SIZE]).digest() != blob[-DIGEST_SIZE:]:
            raise ManifestError("manifest checksum mismatch")
        parts = [Part(*ENTRY.unpack_from(blob, HEADER_SIZE + ENTRY_SIZE * i))
                 for i in range(n)]
        manifest = cls(total, part_size, parts)
        check(manifest)
        return manifest


def check(m: Manifest) -> None:
    """Raise ManifestError unless the parts add up and every field fits its type."""
    if not 0 < m.part_size <= MAX_FID or not 0 <= m.total_size <= MAX_FID:
        raise ManifestError("manifest sizes out of range")
    if len(m.parts) > 0xFFFFFFFF:
        raise ManifestError("too many parts")
    for i, p in enumerate(m.parts):
        if not 1 <= p.group_id <= MAX_GROUP_ID or not 0 <= p.fid <= MAX_FID:
            raise ManifestError(f"part {i}: bad key {p.group_id},{p.fid}")
        if not 0 < p.size <= m.part_size:
            raise ManifestError(f"part {i}: size {p.size} not in 1..{m.part_size}")
        if len(p.sha256) != DIGEST_SIZE:
            raise ManifestError(f"part {i}: digest must be {DIGEST_SIZE} bytes")
    if sum(p.size for p in m.parts) != m.total_size:
        raise ManifestError("part sizes do not add up to the total size")


def manifest_size(n_parts: int) -> int:
    """Bytes of the manifest of n_parts parts."""
    return HEADER_SIZE + ENTRY_SIZE * n_parts + DIGEST_SIZE


def digest(data) -> bytes:
    """The part digest (sha256)."""
    return hashlib.sha256(data).digest()
