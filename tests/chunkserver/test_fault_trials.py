"""Issue 11's trials against a real spy_server.py: damage at rest, kill -9 under load.

Damage trials: a server holds files (some deleted), is stopped cleanly; each trial
copies its data dir, damages one to three random ranges before current_offset (a flipped
byte, zeroed bytes, random bytes), drops the index snapshot half the time, starts the
server, reads every fid, writes and deletes some, is killed with kill -9 and started
again (half the time with a full scan). kill -9 trials: connections write and one deletes
concurrently with --sync=1; the whole server is killed at a random moment and started
again (a third of the time without its snapshot: a full scan). Counted over all trials:

  lost         an acknowledged file the damage did not touch that does not read back
  wrong        a READ answered SUCCESS with other bytes than were written
  resurrected  a file whose DELETE was acknowledged that reads back

The default run does a few trials of each; the `slow` runs do 60 each and print totals.
"""
from __future__ import annotations

import hashlib
import os
import random
import shutil
import threading
import time

import pytest

from speedy.format.chunkfile import (RECORD_HEADER, RECORD_HEADER_SIZE, SUPERBLOCK_SIZE,
                                     Superblock, length_ambiguous)
from speedy.wire.protocol import Err
from tests.support.server import Client, ServerProc

MiB = 1 << 20
DAMAGE_FLAGS = {"workers": 1, "chunks": 2, "chunk_size": 2 * MiB, "mem_blocks": 16}
CRASH_FLAGS = {"sync": 1, "workers": 2, "chunks": 4, "chunk_size": 64 * MiB, "mem_blocks": 32}


def body_of(fid: int, size: int) -> bytes:
    """Deterministic bytes for fid (all zeros for fids divisible by 13: a checksum that
    does not vouch for the size)."""
    if fid % 13 == 0:
        return bytes(size)
    seed = hashlib.sha256(fid.to_bytes(8, "big")).digest()
    return (seed * (size // 32 + 1))[:size]


def snapshot_path(data_dir: str) -> str:
    return os.path.join(data_dir, ".speedy", "index.snap")


def drop_snapshot(data_dir: str) -> None:
    try:
        os.unlink(snapshot_path(data_dir))
    except FileNotFoundError:
        pass


def check_reads(port: int, sizes: dict[int, int], deleted: set[int], maybe: set[int],
                totals: dict[str, int], exempt: set[int] = frozenset()) -> set[int]:
    """Read every fid of sizes and deleted; count lost/wrong/resurrected; the fids that
    read back. maybe: fids whose write or delete was in flight (either outcome is fine);
    exempt: fids the damage touched (an error is fine, other bytes never)."""
    ok = set()
    with Client(port, timeout=30) as c:
        for fid in sorted(set(sizes) | deleted):
            err, got = c.read(fid)
            if err == Err.SUCCESS:
                if fid in deleted and fid not in maybe:
                    totals["resurrected"] += 1
                elif fid in sizes and got == body_of(fid, sizes[fid]):
                    ok.add(fid)
                else:
                    totals["wrong"] += 1
            elif fid in sizes and fid not in deleted and fid not in maybe | exempt:
                totals["lost"] += 1
            elif err not in (Err.FILE_NOT_FOUND, Err.READ_ERROR):
                totals["wrong"] += 1
    return ok


# ---------------------------------------------------------------- damage at rest
def chunk_records(data_dir: str) -> dict[str, list[tuple[int, int, int, bool]]]:
    """{chunk path: [(offset, end, fid, length-ambiguous)]} of every record, in order."""
    out = {}
    for name in sorted(os.listdir(data_dir)):
        if not name.endswith(".chunk"):
            continue
        path = os.path.join(data_dir, name)
        with open(path, "rb") as f:
            raw = f.read()
        sb = Superblock.decode(raw[:SUPERBLOCK_SIZE])
        recs, pos = [], SUPERBLOCK_SIZE
        while pos + RECORD_HEADER_SIZE <= sb.current_offset:
            fid, _ref, size, csum, _ts = RECORD_HEADER.unpack_from(raw, pos)
            end = pos + RECORD_HEADER_SIZE + size
            recs.append((pos, end, fid, length_ambiguous(csum)))
            pos = end
        out[path] = recs
    return out


def damage(rng: random.Random, layout, count: int) -> tuple[list[tuple[str, int, int]], set[int]]:
    """Damage count random ranges before current_offset; (the ranges, the fids touched)."""
    hurt, touched = [], set()
    for _ in range(count):
        path = rng.choice(sorted(p for p, recs in layout.items() if recs))
        recs = layout[path]
        start = rng.randrange(SUPERBLOCK_SIZE, recs[-1][1])
        kind = rng.choice(["flip", "zeros", "random"])
        n = 1 if kind == "flip" else rng.randint(1, 64)
        with open(path, "r+b") as f:
            f.seek(start)
            old = f.read(n)
            new = {"flip": lambda: bytes([old[0] ^ rng.randint(1, 255)]),
                   "zeros": lambda: bytes(len(old)),
                   "random": lambda: rng.randbytes(len(old))}[kind]()
            f.seek(start)
            f.write(new)
        hurt.append((path, start, start + n))
    for path, recs in layout.items():
        for i, (a, b, fid, _amb) in enumerate(recs):
            near = [(s, e) for p, s, e in hurt if p == path]
            if any(s < b and a < e for s, e in near):
                touched.add(fid)
            elif recs[i][3] and i + 1 < len(recs):  # goes with damage to the next record
                na, nb = recs[i + 1][:2]
                if any(s < nb and na < e for s, e in near):
                    touched.add(fid)
    return hurt, touched


def make_damage_base(tmp_path, rng: random.Random) -> tuple[str, dict[int, int], set[int]]:
    """A stopped server's data dir with ~150 files, 20 of them deleted."""
    data_dir = str(tmp_path / "base")
    srv = ServerProc(data_dir, str(tmp_path / "base.log"), flags=dict(DAMAGE_FLAGS)).start()
    sizes: dict[int, int] = {}
    deleted: set[int] = set()
    try:
        with srv.client() as c:
            for fid in range(1, 151):
                size = rng.choice((0, 1, 30, 100, 1000, 4096, 20000))
                assert c.write(fid, body_of(fid, size)) == Err.SUCCESS
                sizes[fid] = size
            for fid in rng.sample(sorted(sizes), 20):
                assert c.delete(fid) == Err.SUCCESS
                deleted.add(fid)
        assert srv.stop() == 0
    finally:
        srv.discard()
    return data_dir, {f: s for f, s in sizes.items() if f not in deleted}, deleted


def run_damage_trials(tmp_path, trials: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    base, sizes, deleted = make_damage_base(tmp_path, rng)
    totals = {"trials": 0, "damaged_ranges": 0, "touched": 0, "read_ok": 0, "lost": 0,
              "wrong": 0, "resurrected": 0}
    for trial in range(trials):
        data_dir = str(tmp_path / "trial")
        shutil.rmtree(data_dir, ignore_errors=True)
        shutil.copytree(base, data_dir)
        layout = chunk_records(data_dir)
        hurt, touched = damage(rng, layout, rng.randint(1, 3))
        if rng.random() < 0.5:
            drop_snapshot(data_dir)
        log = str(tmp_path / "trial.log")
        srv = ServerProc(data_dir, log, flags=dict(DAMAGE_FLAGS)).start()
        live, gone = dict(sizes), set(deleted)
        try:
            ok = check_reads(srv.port, live, gone, set(), totals, exempt=touched)
            new = {10_000 * (trial + 1) + i: rng.choice((0, 10, 3000)) for i in range(20)}
            with srv.client() as c:
                for fid, size in new.items():
                    assert c.write(fid, body_of(fid, size)) == Err.SUCCESS
                for fid in rng.sample(sorted(ok), min(5, len(ok))):
                    assert c.delete(fid) == Err.SUCCESS
                    gone.add(fid)
                    del live[fid]
            live.update(new)
        finally:
            srv.discard()
        if rng.random() < 0.5:
            drop_snapshot(data_dir)
        srv = ServerProc(data_dir, log, flags=dict(DAMAGE_FLAGS)).start()
        try:
            check_reads(srv.port, live, gone, set(), totals, exempt=touched)
            assert srv.stop() == 0
        finally:
            srv.discard()
        totals["trials"] += 1
        totals["damaged_ranges"] += len(hurt)
        totals["touched"] += len(touched)
        totals["read_ok"] += len(ok)
    return totals


def report(what: str, totals: dict[str, int]) -> None:
    """Print the counts; none lost, wrong or resurrected."""
    print(f"\n{what} trials: {totals['trials']}, {totals['lost']} lost, {totals['wrong']} "
          f"wrong, {totals['resurrected']} resurrected ({totals})")
    assert totals["lost"] == totals["wrong"] == totals["resurrected"] == 0, totals


def test_damage_trials(tmp_path):
    report("damage", run_damage_trials(tmp_path, trials=3, seed=11))


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_damage_sixty_trials(tmp_path):
    totals = run_damage_trials(tmp_path, trials=60, seed=12)
    report("damage", totals)
    assert totals["trials"] == 60


# ---------------------------------------------------------------- kill -9 under load
class Load:
    """Writers on several connections and one deleter, until the server dies."""

    def __init__(self, port: int, fids: list[int], sizes: dict[int, int]) -> None:
        self.port, self.sizes = port, sizes
        self.acked: list[int] = []
        self.deleted: set[int] = set()  # acknowledged deletes
        self.inflight: set[int] = set()  # writes and deletes that got no answer
        self.stop = threading.Event()
        conns = 4
        self.threads = [threading.Thread(target=self.write, args=(fids[i::conns],), daemon=True)
                        for i in range(conns)]
        self.threads.append(threading.Thread(target=self.delete, daemon=True))

    def start(self) -> None:
        for t in self.threads:
            t.start()

    def join(self) -> None:
        self.stop.set()
        for t in self.threads:
            t.join(20)

    def write(self, fids: list[int]) -> None:
        try:
            with Client(self.port, timeout=10) as c:
                for fid in fids:
                    if self.stop.is_set():
                        return
                    self.inflight.add(fid)
                    if c.write(fid, body_of(fid, self.sizes[fid])) == Err.SUCCESS:
                        self.acked.append(fid)
                    self.inflight.discard(fid)
        except (OSError, EOFError):
            return

    def delete(self) -> None:
        rng = random.Random(len(self.sizes))
        try:
            with Client(self.port, timeout=10) as c:
                while not self.stop.is_set():
                    if len(self.acked) < 10:
                        time.sleep(0.005)
                        continue
                    fid = self.acked[rng.randrange(len(self.acked))]
                    if fid in self.deleted:
                        continue
                    self.inflight.add(fid)
                    if c.delete(fid) == Err.SUCCESS:
                        self.deleted.add(fid)
                    self.inflight.discard(fid)
        except (OSError, EOFError):
            return


def run_kill_trials(tmp_path, trials: int, seed: int) -> dict[str, int]:
    rng = random.Random(seed)
    data_dir = str(tmp_path / "data")
    log = str(tmp_path / "server.log")
    totals = {"trials": 0, "acked": 0, "deletes": 0, "inflight": 0, "scans": 0, "lost": 0,
              "wrong": 0, "resurrected": 0}
    sizes: dict[int, int] = {}
    live: dict[int, int] = {}  # acknowledged, not deleted: must read back
    gone: set[int] = set()  # acknowledged deletes: must stay gone
    next_fid = 1
    for _trial in range(trials):
        fids = list(range(next_fid, next_fid + 4000))
        next_fid += 4000
        sizes.update({f: rng.choice((0, 1, 100, 4096, 20000, 70000)) for f in fids})
        srv = ServerProc(data_dir, log, flags=dict(CRASH_FLAGS)).start()
        try:
            load = Load(srv.port, fids, sizes)
            load.start()
            time.sleep(rng.uniform(0.1, 0.7))
            srv.kill9()
            load.join()
        finally:
            srv.discard()
        maybe = set(load.inflight)
        for fid in load.acked:
            live[fid] = sizes[fid]
        for fid in load.deleted:
            live.pop(fid, None)
            gone.add(fid)
        scan = rng.random() < 1 / 3
        if scan:
            drop_snapshot(data_dir)
        srv = ServerProc(data_dir, log, flags=dict(CRASH_FLAGS)).start()
        try:
            check_reads(srv.port, {**live, **{f: sizes[f] for f in maybe}}, gone, maybe, totals)
            assert srv.stop() == 0
        finally:
            srv.discard()
        for fid in maybe:  # either outcome was fine: they are read no more
            live.pop(fid, None)
            gone.discard(fid)
        totals["trials"] += 1
        totals["acked"] += len(load.acked)
        totals["deletes"] += len(load.deleted)
        totals["inflight"] += len(maybe)
        totals["scans"] += scan
    return totals


def test_kill9_trials_with_deletes(tmp_path):
    totals = run_kill_trials(tmp_path, trials=3, seed=21)
    report("kill -9", totals)
    assert totals["acked"] > 0


@pytest.mark.slow
@pytest.mark.timeout(1800)
def test_kill9_sixty_trials_with_deletes(tmp_path):
    totals = run_kill_trials(tmp_path, trials=60, seed=22)
    report("kill -9", totals)
    assert totals["trials"] == 60 and totals["acked"] > 1000 and totals["deletes"] > 100
