"""The architecture's rules (ARCHITECTURE.md), checked: import contracts and process facts."""
from __future__ import annotations

import os
import subprocess

from tests.support import PYTHON, ROOT
from speedy.wire.protocol import Err
from tests.support.server import Client, children_of, running_server


def test_import_contracts_hold():
    """lint-imports checks every contract of pyproject.toml; a broken one fails here."""
    lint = os.path.join(os.path.dirname(PYTHON), "lint-imports")
    r = subprocess.run([lint, "--config", os.path.join(ROOT, "pyproject.toml"), "--no-cache"],
                       cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-2000:]
    assert " kept, 0 broken." in r.stdout, r.stdout[-2000:]


def loaded_after_import(module: str) -> set[str]:
    """The top-level modules a fresh interpreter holds after importing module."""
    code = (f"import sys, {module}\n"
            "print(' '.join(sorted({m.split('.')[0] for m in sys.modules})))")
    r = subprocess.run([PYTHON, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return set(r.stdout.split())


def test_supervisor_and_writer_leave_gevent_unloaded():
    for module in ("speedy.chunkserver.supervisor", "speedy.chunkserver.writer"):
        assert "gevent" not in loaded_after_import(module), module


def test_client_leaves_gevent_unloaded():
    assert "gevent" not in loaded_after_import("speedy.client")


def test_worker_leaves_gevent_unloaded_until_it_runs():
    """gevent is imported and patched only inside run_worker, after the fork."""
    assert "gevent" not in loaded_after_import("speedy.chunkserver.worker")


def test_gateway_supervisor_leaves_gevent_unloaded():
    """The gateway's workers patch gevent after the fork; the supervisor never loads it."""
    assert "gevent" not in loaded_after_import("speedy.gateway.daemon")


def chunk_fds(pid: int) -> list[tuple[str, int]]:
    """(chunk file path, open flags) of every chunk file pid holds open."""
    out = []
    fd_dir = f"/proc/{pid}/fd"
    for fd in os.listdir(fd_dir):
        try:
            target = os.readlink(f"{fd_dir}/{fd}")
            if not target.endswith(".chunk"):
                continue
            with open(f"/proc/{pid}/fdinfo/{fd}") as f:
                flags = next(int(line.split()[1], 8) for line in f if line.startswith("flags:"))
        except (OSError, StopIteration):
            continue
        out.append((target, flags))
    return out


def test_only_the_writer_opens_chunk_files_for_writing(tmp_path):
    with running_server(tmp_path, workers=1) as srv:
        with Client(srv.port) as c:  # the worker opens its read-only descriptors on a READ
            assert c.write(7, b"x" * 100) == Err.SUCCESS
            assert c.read(7) == (Err.SUCCESS, b"x" * 100)
            procs = {srv.pid: "supervisor", **children_of(srv.pid)}
            writers, readers = set(), set()
            for pid, comm in procs.items():
                for path, flags in chunk_fds(pid):
                    if flags & (os.O_WRONLY | os.O_RDWR):
                        writers.add(comm)
                    else:
                        readers.add(comm)
        assert writers == {"spy_writer"}, procs
        assert any(c.startswith("spy_worker") for c in readers), readers
