"""Slow randomized trials: kill -9 of the whole server while it compacts under a load of
writes, deletes and reads, then restart. Every acknowledged write reads back byte for
byte, every acknowledged delete stays deleted; the one request in flight at the kill may
have happened or not. Run with `-m slow` (SPEEDY_TRIALS sets the number of kills)."""
from __future__ import annotations

import os
import random
import threading
import time

import pytest

from speedy.wire.protocol import Err, Op, decode_garbage
from tests.support.server import make_server, payload

pytestmark = pytest.mark.slow


def size_of(fid: int) -> int:
    return (fid * 7919) % 60_000 + 1


def compacting(srv) -> int:
    try:
        with srv.client(timeout=5) as c:
            err, body = c.call(Op.QUERY_GARBAGE)
        return decode_garbage(body)[0] if err == Err.SUCCESS else 0
    except (OSError, EOFError):
        return 0


class Load(threading.Thread):
    """Writes, deletes and reads until the server dies; what was acknowledged."""

    def __init__(self, srv, rng: random.Random, next_fid: int, live: dict, gone: set):
        super().__init__(daemon=True)
        self.srv, self.rng, self.fid = srv, rng, next_fid
        self.live, self.gone = live, gone
        self.inflight: tuple[str, int] | None = None
        self.bad: list[str] = []

    def run(self) -> None:
        try:
            with self.srv.client(timeout=10) as c:
                while True:
                    r = self.rng.random()
                    if r < 0.45 or len(self.live) < 20:
                        fid, self.fid = self.fid, self.fid + 1
                        self.inflight = ("w", fid)
                        if c.write(fid, payload(fid, size_of(fid))) == Err.SUCCESS:
                            self.live[fid] = True
                    elif r < 0.8:
                        fid = self.rng.choice(list(self.live))
                        self.inflight = ("d", fid)
                        if c.delete(fid) == Err.SUCCESS:
                            del self.live[fid]
                            self.gone.add(fid)
                    else:
                        fid = self.rng.choice(list(self.live))
                        self.inflight = ("r", fid)
                        err, _body = c.read(fid)
                        if err != Err.SUCCESS:
                            self.bad.append(f"read of live fid {fid}: error {err}")
                    self.inflight = None
        except (OSError, EOFError):
            return


def test_kill9_during_compaction_trials(tmp_path):
    rng = random.Random(int(os.environ.get("SPEEDY_SEED", "13")))
    trials = int(os.environ.get("SPEEDY_TRIALS", "12"))
    srv = make_server(tmp_path, "kt", chunks=3, chunk_size=4 << 20, compact_threshold=0.05,
                      compact_rate=2 << 20, workers=2)
    live: dict[int, bool] = {}
    gone: set[int] = set()
    next_fid = 1
    killed_during = 0
    try:
        srv.start()
        for trial in range(trials):
            load = Load(srv, rng, next_fid, live, gone)
            load.start()
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline and not compacting(srv):
                time.sleep(0.02)
            time.sleep(rng.random() * 0.4)
            killed_during += bool(compacting(srv))
            srv.kill9()
            load.join(30)
            assert not load.bad, load.bad
            next_fid = load.fid
            srv.start()
            doubt = load.inflight
            with srv.client(timeout=30) as c:
                for fid in list(live):
                    err, body = c.read(fid)
                    if doubt == ("d", fid) and err == Err.FILE_NOT_FOUND:
                        del live[fid]
                        continue
                    assert err == Err.SUCCESS, (trial, fid, err, srv.log()[-3000:])
                    assert body == payload(fid, size_of(fid)), (trial, fid)
                for fid in gone:
                    assert c.read(fid)[0] == Err.FILE_NOT_FOUND, (trial, fid)
                if doubt and doubt[0] == "w":
                    err, body = c.read(doubt[1])
                    if err == Err.SUCCESS:  # the write happened: it is a live file now
                        live[doubt[1]] = True
        print(f"{trials} kills, {killed_during} during a compaction; {len(live)} live, "
              f"{len(gone)} deleted files checked")
        assert killed_during >= trials // 2
    finally:
        srv.discard()
