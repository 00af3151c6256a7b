"""Worker-side chunk reads: read-only descriptors, verified records, never asks the writer."""
from __future__ import annotations

import logging
import os
import random
import stat
import zlib
from dataclasses import dataclass

from speedy.chunkserver import diskio
from speedy.format.chunkfile import (MAX_CHUNK_SIZE, RECORD_HEADER, RECORD_HEADER_SIZE,
                                     REF_DELETED, SUPERBLOCK_SIZE, FormatError, Superblock,
                                     chunk_name, header_problem, length_ambiguous,
                                     parse_chunk_name)
from speedy.wire.protocol import Err

log = logging.getLogger("speedy.chunkserver.reader")

CHECK_BLOCK = 4096
FIRST_READ_MIN = 4096 - 30  # the first pread of a record: header + at least this much, or
# the smaller size of the last two records read (one pread when sizes repeat; a mix of big
# and small records costs a second pread for a big one, never a big read for a small one)
NEXT_CHECK_MAX = 64 << 10  # the record after a length-ambiguous one: its data is verified too
# when it is at most this big (else its header only)


@dataclass
class Record:
    """A verified record: where it is, its size and checksum, and header + data if read."""

    chunk_id: int
    offset: int
    size: int
    csum: int
    buf: bytearray | None


class NotFound(Exception):
    """No live file with that fid."""

    code = Err.FILE_NOT_FOUND


class ReadFailed(Exception):
    """The disk read failed or the record did not verify."""

    def __init__(self, message: str, code: int = Err.READ_ERROR) -> None:
        super().__init__(message)
        self.code = code


class ChunkReader:
    """Reads records of this server's chunk files through lazily opened O_RDONLY descriptors."""

    def __init__(self, data_dir: str, group_id: int, index) -> None:
        self.data_dir = os.path.abspath(data_dir)
        self.group_id = group_id
        self.index = index
        self._fds: dict[int, int] = {}
        self._hints = (0, 0)  # sizes of the last two records read: the smaller is the guess
        self._ends: dict[int, int] = {}  # chunk_id -> current_offset its superblock last said

    def _fd(self, chunk_id: int) -> int:
        """The read-only descriptor of a chunk, opened on first use."""
        fd = self._fds.get(chunk_id)
        if fd is None:
            path = os.path.join(self.data_dir, chunk_name(self.group_id, chunk_id))
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise ReadFailed(f"cannot open {path}: {e.strerror}") from None
            self._fds[chunk_id] = fd
        return fd

    def _verify_header(self, fid: int, chunk_id: int, offset: int,
                       raw: bytes | bytearray) -> tuple[int, int, int, int]:
        """(chunk_id, offset, size, checksum) of fid's live record from its header: what the
        start-up scan checks (CHUNKFILE.md) holds, the record ends by current_offset, and a
        record whose checksum does not vouch for its size is followed by a record or
        current_offset. NotFound for a deleted record, else ReadFailed."""
        hfid, ref, size, csum, ts = RECORD_HEADER.unpack_from(raw)
        where = f"chunk {chunk_id} offset {offset}"
        if hfid != fid:
            raise ReadFailed(f"fid {fid}: the record at {where} holds fid {hfid}")
        if ref == REF_DELETED:
            raise NotFound(f"fid {fid} deleted")
        end = offset + RECORD_HEADER_SIZE + size
        current = self._current_offset(chunk_id, end)
        room = (MAX_CHUNK_SIZE if current is None else current) - offset - RECORD_HEADER_SIZE
        problem = header_problem(hfid, ref, size, csum, ts, room)
        if problem:
            raise ReadFailed(f"fid {fid}: damaged header at {where}: {problem}"
                             + ("" if current is None else f" (current_offset {current})"))
        if length_ambiguous(csum) and end != current:
            self._check_follows(fid, chunk_id, end, current)
        return chunk_id, offset, size, csum

    def _current_offset(self, chunk_id: int, want: int) -> int | None:
        """The chunk's current_offset, read again from its superblock when want lies past the
        one known (a record written since); None when the superblock does not verify."""
        known = self._ends.get(chunk_id, 0)
        if want <= known:
            return known
        fd = self._fd(chunk_id)
        for _ in range(2):  # a read racing the writer's rewrite may see it torn: once more
            try:  # metadata, past the diskio seam: not one of the record reads it counts
                current = Superblock.decode(os.pread(fd, SUPERBLOCK_SIZE, 0)).current_offset
            except (OSError, FormatError):
                continue
            self._ends[chunk_id] = current
            return current
        return None

    def _check_follows(self, fid: int, chunk_id: int, end: int, current: int | None) -> None:
        """ReadFailed unless a sound record starts at end (fid's record, whose checksum
        does not vouch for its size, claims to end there): a zeroed or damaged size field
        must not pass for an empty or shorter file."""
        raw = self.read_at(chunk_id, end, RECORD_HEADER_SIZE)
        nfid, nref, nsize, ncsum, nts = RECORD_HEADER.unpack_from(raw)
        limit = MAX_CHUNK_SIZE if current is None else current
        problem = header_problem(nfid, nref, nsize, ncsum, nts,
                                 limit - end - RECORD_HEADER_SIZE)
        if not problem and nsize <= NEXT_CHECK_MAX:
            data = self.read_at(chunk_id, end + RECORD_HEADER_SIZE, nsize)
            if zlib.adler32(data, 0) != ncsum:
                problem = "its checksum does not match"
        if problem:
            raise ReadFailed(f"fid {fid}: its size cannot be trusted (its checksum holds for "
                             f"any number of zeros): no record follows it at chunk {chunk_id} "
                             f"offset {end} ({problem})")

    def read(self, fid: int) -> bytes:
        """fid's data: stored fid, ref 1, size bounds and adler32 verified."""
        rec = self.fetch(fid, MAX_CHUNK_SIZE)
        return bytes(memoryview(rec.buf)[RECORD_HEADER_SIZE:])  # type: ignore[arg-type]

    def fetch(self, fid: int, limit: int) -> Record:
        """fid's record, verified; its data in memory when its size is at most limit.

        One pread of header and data when the size is what the last reads suggest (the
        index holds no sizes), a second one for the rest otherwise. Record.buf is exactly
        the header (30 bytes, free for the caller to overwrite) followed by the data.
        """
        loc = self.index.get(fid)
        if loc is None:
            raise NotFound(f"fid {fid} not found")
        chunk_id, offset = loc
        first = min(max(min(self._hints), FIRST_READ_MIN), limit)
        buf = bytearray(RECORD_HEADER_SIZE + first)
        got = self._read_into(chunk_id, offset, memoryview(buf))
        _, _, size, csum = self._verify_header(fid, chunk_id, offset, buf)
        self._hints = (self._hints[1], size)
        if size > limit:
            return Record(chunk_id, offset, size, csum, None)
        end = RECORD_HEADER_SIZE + size
        if end <= len(buf):
            del buf[end:]
        else:  # a bigger record than the guess: read the rest into a buffer of its size
            at = len(buf)
            whole = bytearray(end)
            whole[:at] = buf
            buf = whole
            if got == at:  # else the file ended before the data, which reads as zeros
                self._read_into(chunk_id, offset + at, memoryview(buf)[at:])
        if zlib.adler32(memoryview(buf)[RECORD_HEADER_SIZE:], 0) != csum:
            raise ReadFailed(f"fid {fid}: checksum mismatch in chunk {chunk_id} at {offset}")
        return Record(chunk_id, offset, size, csum, buf)

    def _read_into(self, chunk_id: int, offset: int, view: memoryview) -> int:
        """Fill view from a chunk at offset; returns the bytes read (fewer at end of file,
        the rest of view is left as it was)."""
        fd = self._fd(chunk_id)
        total = len(view)
        got = 0
        try:
            while got < total:
                n = diskio.preadv(fd, [view[got:]], offset + got)
                if not n:
                    break
                got += n
        except OSError as e:
            raise ReadFailed(f"reading chunk {chunk_id} at {offset}: {e.strerror}") from None
        return got

    def read_at(self, chunk_id: int, offset: int, size: int) -> bytearray:
        """size bytes of a chunk at offset; past the end of a short file they are zeros."""
        buf = bytearray(size)
        self._read_into(chunk_id, offset, memoryview(buf))
        return buf

    def _own_chunks(self) -> list[int]:
        """Ids of this group's chunk files in the data dir."""
        ids = []
        for name in os.listdir(self.data_dir):
            parsed = parse_chunk_name(name)
            if parsed and parsed[0] == self.group_id and self.chunk_path(name):
                ids.append(parsed[1])
        return ids

    def check_disk(self) -> None:
        """Read a random 4 KiB block of a random chunk (past the page cache when it can)."""
        try:
            ids = self._own_chunks()
            if not ids:
                raise ReadFailed("no chunk file to check", Err.CHUNK_CHECK_ERROR)
            chunk_id = random.choice(ids)
            fd = self._fd(chunk_id)
            size = os.fstat(fd).st_size
            offset = random.randrange(max(1, size // CHECK_BLOCK)) * CHECK_BLOCK
            if hasattr(os, "posix_fadvise"):
                os.posix_fadvise(fd, offset, CHECK_BLOCK, os.POSIX_FADV_DONTNEED)
            diskio.pread(fd, CHECK_BLOCK, offset)
        except OSError as e:
            raise ReadFailed(f"disk check failed: {e.strerror}", Err.CHUNK_CHECK_ERROR) from None
        except ReadFailed as e:
            raise ReadFailed(str(e), Err.CHUNK_CHECK_ERROR) from None

    def chunk_path(self, name: str) -> str | None:
        """The path of this server's chunk file of exactly that name, or None."""
        if not isinstance(name, str) or "/" in name or "\0" in name:
            return None
        parsed = parse_chunk_name(name)
        if not parsed or parsed[0] != self.group_id or parsed[1] < 1:
            return None
        if name != chunk_name(*parsed):
            return None
        path = os.path.join(self.data_dir, name)
        try:
            st = os.lstat(path)
        except OSError:
            return None
        return path if stat.S_ISREG(st.st_mode) else None

    def close(self) -> None:
        """Close every descriptor."""
        for fd in self._fds.values():
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
