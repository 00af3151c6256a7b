"""Worker-side chunk reads: read-only descriptors, verified records, never asks the writer."""
from __future__ import annotations

import logging
import os
import random
import stat
import time
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
RETIRE_SECONDS = 60.0  # a replaced chunk file's descriptor stays open this long (big reads)
LOCATE_TRIES = 50  # a compaction swapping the chunk file under a read: look again
OLD_PREFIX = ".speedy/tmp.old."  # a compacted chunk's old file while its entries move
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
    fd: int = -1  # the descriptor of the chunk file generation the record was read from


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
        self._fds: dict[int, int] = {}  # the current file of each chunk (CHECK_DISK)
        self._files: dict[int, dict[int, int]] = {}  # chunk_id -> {file generation: fd}
        self._retired: list[tuple[float, int]] = []
        self._fd_gens: dict[int, int] = {}
        self._hints = (0, 0)  # sizes of the last two records read: the smaller is the guess
        self._ends: dict[int, int] = {}  # fd -> current_offset its superblock last said

    def _fd(self, chunk_id: int) -> int:
        """The read-only descriptor of a chunk's current file, opened on first use."""
        fd = self._fds.get(chunk_id)
        gen = self.index.chunk_state(chunk_id).gen if hasattr(self.index, "chunk_state") else 0
        if fd is not None and self._fd_gens.get(chunk_id) != gen:
            self._retired.append((time.monotonic(), self._fds.pop(chunk_id)))
            fd = None
        if fd is None:
            self._fd_gens[chunk_id] = gen
            path = os.path.join(self.data_dir, chunk_name(self.group_id, chunk_id))
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                raise ReadFailed(f"cannot open {path}: {e.strerror}") from None
            self._fds[chunk_id] = fd
        return fd

    def _locate(self, fid: int) -> tuple[int, int, int]:
        """(chunk_id, offset, fd): fid's location and a descriptor of the chunk file
        generation that location belongs to (store/compact.py swaps chunk files)."""
        if not hasattr(self.index, "locate"):  # a plain fid -> (chunk_id, offset) map
            loc2 = self.index.get(fid)
            if loc2 is None:
                raise NotFound(f"fid {fid} not found")
            return loc2[0], loc2[1], self._fd(loc2[0])
        for _ in range(LOCATE_TRIES):
            loc = self.index.locate(fid)
            if loc is None:
                raise NotFound(f"fid {fid} not found")
            chunk_id, offset, state = loc
            gen = state.file_of(offset)
            fd = self._files.get(chunk_id, {}).get(gen)
            if fd is None:
                fd = self._open_generation(chunk_id, state, gen)
            if fd is not None:
                return chunk_id, offset, fd
            time.sleep(0.001)
        raise ReadFailed(f"fid {fid}: its chunk file kept changing")

    def _open_generation(self, chunk_id: int, state, gen: int) -> int | None:
        """A descriptor of file generation gen of a chunk, or None when the chunk's state
        changed meanwhile (look again)."""
        name = chunk_name(self.group_id, chunk_id)
        old = state.moving and gen == state.gen  # the old file, under its temporary name
        path = os.path.join(self.data_dir, OLD_PREFIX + name if old else name)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            if self.index.chunk_state(chunk_id) != state:
                return None
            raise ReadFailed(f"cannot open {path}: not found") from None
        except OSError as e:
            raise ReadFailed(f"cannot open {path}: {e.strerror}") from None
        if self.index.chunk_state(chunk_id) != state:  # renamed meanwhile: which file is it?
            os.close(fd)
            return None
        files = self._files.setdefault(chunk_id, {})
        keep = {state.gen, state.next} if state.moving else {state.gen}
        now = time.monotonic()
        for g in [g for g in files if g not in keep]:
            self._retired.append((now, files.pop(g)))
        while self._retired and now - self._retired[0][0] > RETIRE_SECONDS:
            old = self._retired.pop(0)[1]
            self._ends.pop(old, None)  # the number may name another file next
            os.close(old)
        files[gen] = fd
        return fd

    def _verify_header(self, fid: int, chunk_id: int, offset: int,
                       raw: bytes | bytearray, fd: int = -1) -> tuple[int, int, int, int]:
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
        fd = self._fd(chunk_id) if fd < 0 else fd  # the file the record was read from
        current = self._current_offset(fd, end)
        room = (MAX_CHUNK_SIZE if current is None else current) - offset - RECORD_HEADER_SIZE
        problem = header_problem(hfid, ref, size, csum, ts, room)
        if problem:
            raise ReadFailed(f"fid {fid}: damaged header at {where}: {problem}"
                             + ("" if current is None else f" (current_offset {current})"))
        if length_ambiguous(csum) and end != current:
            self._check_follows(fid, chunk_id, end, current, fd)
        return chunk_id, offset, size, csum

    def _current_offset(self, fd: int, want: int) -> int | None:
        """The chunk's current_offset, read again from its superblock when want lies past the
        one known (a record written since); None when the superblock does not verify."""
        known = self._ends.get(fd, 0)
        if want <= known:
            return known
        for _ in range(2):  # a read racing the writer's rewrite may see it torn: once more
            try:  # metadata, past the diskio seam: not one of the record reads it counts
                current = Superblock.decode(os.pread(fd, SUPERBLOCK_SIZE, 0)).current_offset
            except (OSError, FormatError):
                continue
            self._ends[fd] = current
            return current
        return None

    def _check_follows(self, fid: int, chunk_id: int, end: int, current: int | None,
                       fd: int) -> None:
        """ReadFailed unless a sound record starts at end (fid's record, whose checksum
        does not vouch for its size, claims to end there): a zeroed or damaged size field
        must not pass for an empty or shorter file."""
        raw = self.read_at(chunk_id, end, RECORD_HEADER_SIZE, fd)
        nfid, nref, nsize, ncsum, nts = RECORD_HEADER.unpack_from(raw)
        limit = MAX_CHUNK_SIZE if current is None else current
        problem = header_problem(nfid, nref, nsize, ncsum, nts,
                                 limit - end - RECORD_HEADER_SIZE)
        if not problem and nsize <= NEXT_CHECK_MAX:
            data = self.read_at(chunk_id, end + RECORD_HEADER_SIZE, nsize, fd)
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
        chunk_id, offset, fd = self._locate(fid)
        first = min(max(min(self._hints), FIRST_READ_MIN), limit)
        buf = bytearray(RECORD_HEADER_SIZE + first)
        got = self._read_into(chunk_id, offset, memoryview(buf), fd)
        _, _, size, csum = self._verify_header(fid, chunk_id, offset, buf, fd)
        self._hints = (self._hints[1], size)
        if size > limit:
            return Record(chunk_id, offset, size, csum, None, fd)
        end = RECORD_HEADER_SIZE + size
        if end <= len(buf):
            del buf[end:]
        else:  # a bigger record than the guess: read the rest into a buffer of its size
            at = len(buf)
            whole = bytearray(end)
            whole[:at] = buf
            buf = whole
            if got == at:  # else the file ended before the data, which reads as zeros
                self._read_into(chunk_id, offset + at, memoryview(buf)[at:], fd)
        if zlib.adler32(memoryview(buf)[RECORD_HEADER_SIZE:], 0) != csum:
            raise ReadFailed(f"fid {fid}: checksum mismatch in chunk {chunk_id} at {offset}")
        return Record(chunk_id, offset, size, csum, buf, fd)

    def _read_into(self, chunk_id: int, offset: int, view: memoryview, fd: int = -1) -> int:
        """Fill view from a chunk (through fd, by default its current file) at offset;
        returns the bytes read (fewer at end of file, the rest of view is left as it was)."""
        if fd < 0:
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

    def read_at(self, chunk_id: int, offset: int, size: int, fd: int = -1) -> bytearray:
        """size bytes of a chunk (through fd, a Record's, by default its current file) at
        offset; past the end of a short file they are zeros."""
        buf = bytearray(size)
        self._read_into(chunk_id, offset, memoryview(buf), fd)
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
        fds = list(self._fds.values()) + [fd for _, fd in self._retired]
        fds += [fd for files in self._files.values() for fd in files.values()]
        for fd in fds:
            try:
                os.close(fd)
            except OSError:
                pass
        self._fds.clear()
        self._files.clear()
        self._retired.clear()
        self._ends.clear()
