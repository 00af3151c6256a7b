"""Replicas under faults (issue 6): a chunkserver killed in the middle of a replicated put,
then replaced by an empty disk and brought back to a full copy by `speedy admin repair`.

A real cluster (tests/cluster.py): a master and one group of three chunkservers. The
client must report failure unless every replica acknowledged, and no key it returned may
ever read back wrong.
"""
from __future__ import annotations

import os
import random
import re
import shutil
import signal
import threading
import time

import pytest

from tests.support.cluster import Cluster, blob, cluster_fixture
from speedy.wire import manifest as mf
from speedy.client.chunkconn import ChunkConn
from speedy.format.chunkfile import SUPERBLOCK_SIZE, Superblock, chunk_name
from speedy.client import UploadError
from speedy.wire.protocol import Err, Op
from speedy.client.master import ClusterError

MiB = 1 << 20
PART = 256 << 10
GROUP = 1

cluster = cluster_fixture(groups=1, per_group=3, heartbeat_timeout=2.0, monitor_interval=0.3,
                          report_interval=0.3, chunks=2, chunk_size=32 * MiB, mem_blocks=32)




def blobs_of(cluster: Cluster, key: str, data: bytes) -> dict[int, bytes]:
    """fid -> expected bytes of every blob behind a key (the manifest and its parts)."""
    k = mf.parse_key(key)
    if not k.multipart:
        return {k.fid: data}
    d = cluster.group(GROUP)[0]
    r = cluster.read_direct(d, k.group_id, k.fid)
    assert r.ok, f"manifest of {key} on {d.name}: {r.err_name}"
    m = mf.Manifest.decode(bytes(r.body))
    out, at = {k.fid: bytes(r.body)}, 0
    for p in m.parts:
        assert p.group_id == GROUP
        out[p.fid] = data[at:at + p.size]
        at += p.size
    assert at == len(data)
    return out


def check_replicas(cluster: Cluster, keys: dict[str, bytes], servers=None) -> int:
    """Every blob of every key on every (given) replica, byte for byte; the blob count."""
    n = 0
    for key, data in keys.items():
        for fid, want in blobs_of(cluster, key, data).items():
            for d in servers or cluster.group(GROUP):
                r = cluster.read_direct(d, GROUP, fid)
                assert r.ok, f"{key} (fid {fid}) on {d.name}: {r.err_name}"
                assert bytes(r.body) == want, f"{key} (fid {fid}) on {d.name}: WRONG BYTES"
                n += 1
    return n


def absent(cluster: Cluster, key: str, servers) -> None:
    k = mf.parse_key(key)
    for d in servers:
        r = cluster.read_direct(d, k.group_id, k.fid)
        assert r.err == Err.FILE_NOT_FOUND, f"{key} left on {d.name}: {r.err_name}"


def put_in_thread(c, data: bytes, **kw) -> tuple[threading.Thread, dict]:
    """c.put(data) in a thread; the outcome lands in the returned dict (key or error)."""
    out: dict = {}

    def run() -> None:
        try:
            out["key"] = c.put(data, **kw)
        except (UploadError, ClusterError) as e:
            out["error"] = e
    t = threading.Thread(target=run)
    t.start()
    return t, out


def replace_with_empty_disk(cluster: Cluster, d) -> None:
    """A new, empty disk for a (stopped) member; started again, RW in the master."""
    cluster.kill(d)
    data = os.path.join(cluster.root, d.name, "data")
    shutil.rmtree(data)
    os.makedirs(data)
    cluster.restart(d)


def repair(cluster: Cluster) -> tuple[str, float]:
    """`speedy admin repair 1`; its output and wall time."""
    t0 = time.monotonic()
    r = cluster.cli("admin", "repair", str(GROUP), timeout=600)
    seconds = time.monotonic() - t0
    out = r.stdout.decode()
    assert r.returncode == 0, out + r.stderr.decode()
    assert "0 failures" in out and "0 damaged on every replica" in out, out
    return out, seconds


def test_kill_during_replicated_puts_then_repair(cluster):
    keys: dict[str, bytes] = {}
    s1, s2, victim = cluster.group(GROUP)
    live = [s1, s2]
    with cluster.client(part_size=PART, write_attempts=1, parallel=4, route_ttl=0.2) as c:
        for i in range(40):
            data = blob(1000 + 97 * i, i)
            keys[c.put(data)] = data
        for i in range(2):
            data = blob(2 * MiB + 333 * i, 100 + i)
            keys[c.put(data)] = data

        # 1. a small put: the victim is stopped (SIGSTOP) with the write in flight to it,
        #    then killed (SIGKILL): the other two replicas answered, the victim never did.
        os.killpg(victim.proc.pid, signal.SIGSTOP)
        t, out = put_in_thread(c, blob(5000, 7))
        time.sleep(0.3)  # the write reaches the two live replicas and the victim's socket
        cluster.kill(victim)
        t.join(60)
        assert "error" in out, f"a put returned {out.get('key')} without the victim's answer"
        err = out["error"]
        assert len(err.cleaned) == 1 and "Connection reset" in str(err), str(err)
        absent(cluster, err.cleaned[0], live)  # what landed on the live replicas is deleted
        # the dead victim gave no answer: it may hold the blob, and is reported as such
        assert err.orphans == [f"{err.cleaned[0]}@{victim.name_addr}"]
        print(f"small put, victim killed mid-write: {err}")

        # 2. a multi-part put: the victim is killed after the first part was stored
        cluster.restart(victim)
        c.invalidate_route()
        big = blob(4 * MiB + 5, 200)
        done: list[int] = []

        def kill_after_first_part(n: int, total: int | None) -> None:
            done.append(n)
            if len(done) == 1:
                cluster.kill(victim)
        t, out = put_in_thread(c, big, progress=kill_after_first_part)
        t.join(120)
        assert "error" in out, f"a multi-part put returned {out.get('key')} with a dead replica"
        err = out["error"]
        assert len(done) >= 1 and len(err.cleaned) >= 2
        for key in err.cleaned:
            absent(cluster, key, live)
        # what could not be deleted is on the dead victim only (no key names it)
        assert {o.split("@")[1] for o in err.orphans} <= {victim.name_addr}
        print(f"multi-part put, victim killed after part 1: {len(err.cleaned)} blobs cleaned "
              f"up, {len(err.orphans)} orphans on the dead server")

        # 3. while the victim is down: every returned key still reads back right
        for key, data in keys.items():
            assert c.get(key) == data
        check_replicas(cluster, keys, live)
        # and a put now fails (the master has the victim RO: the group is not writable)
        cluster.wait_status(victim, 2, timeout=30)
        c.invalidate_route()
        with pytest.raises((UploadError, ClusterError)):
            c.put(b"no full group")

    # 4. the victim back with its disk: repair deletes what the failed puts left on it
    #    (the live replicas hold those fids as deleted records) and copies nothing back
    cluster.restart(victim)
    out, _ = repair(cluster)
    for key in err.cleaned:
        absent(cluster, key, cluster.group(GROUP))
    check_replicas(cluster, keys, live)
    print(f"repair after the victim came back: {out.strip().splitlines()[-1]}")

    # 5. a replacement with an empty disk; repair brings back three full copies
    replace_with_empty_disk(cluster, victim)
    out, seconds = repair(cluster)
    blobs = check_replicas(cluster, keys)
    copied = int(re.search(r"copied (\d+)", out).group(1))
    assert copied == blobs // 3
    print(f"repair: {out.strip().splitlines()[-1]} (wall {seconds:.2f} s)")
    out, _ = repair(cluster)  # nothing left to do
    assert "copied 0, rewrote 0 damaged, deleted 0" in out
    with cluster.client(part_size=PART) as c:
        for key, data in keys.items():
            assert c.get(key) == data


@pytest.mark.slow
def test_kill_at_random_moments_during_puts(cluster):
    """Trials: puts from threads (small and multi-part), the victim kill -9'ed at a random
    moment; every returned key reads back right; then the victim is wiped and repaired."""
    rnd = random.Random(66)
    keys: dict[str, bytes] = {}
    failed = 0
    victim = cluster.group(GROUP)[2]
    for trial in range(10):
        cluster.wait_all_rw()
        stop = threading.Event()
        lock = threading.Lock()

        def putter(n: int) -> None:
            nonlocal failed
            with cluster.client(part_size=PART, write_attempts=1, route_ttl=0.2) as c:
                i = 0
                while not stop.is_set():
                    size = rnd.choice([100, 5000, PART + 1, 3 * PART + 7])
                    data = blob(size, trial * 100_000 + n * 1000 + i)
                    i += 1
                    try:
                        key = c.put(data)
                    except (UploadError, ClusterError):
                        with lock:
                            failed += 1
                        return  # the put that was in flight at the kill (or just after)
                    with lock:
                        keys[key] = data
        threads = [threading.Thread(target=putter, args=(n,)) for n in range(3)]
        for t in threads:
            t.start()
        time.sleep(rnd.uniform(0.2, 1.5))
        cluster.kill(victim)
        stop.set()
        for t in threads:
            t.join(120)
        check_replicas(cluster, keys, cluster.group(GROUP)[:2])
        cluster.restart(victim)
    replace_with_empty_disk(cluster, victim)
    out, seconds = repair(cluster)
    check_replicas(cluster, keys)
    print(f"10 trials: {len(keys)} keys returned, {failed} puts failed (in flight at a "
          f"kill), 0 wrong; "
          f"repair: {out.strip().splitlines()[-1]}")


def dump_speed(cluster: Cluster, d) -> tuple[int, float]:
    """(bytes, seconds) to stream every chunk of d up to current_offset with DUMP_CHUNK."""
    total, t0 = 0, time.monotonic()
    for cid, _avail in cluster.pool.detail_info(d.addr).chunks:
        conn = ChunkConn(d.addr, 30.0, 5.0)
        try:
            conn.send(Op.DUMP_CHUNK, [chunk_name(GROUP, cid).encode()])
            err, _size = conn.recv_header(Op.DUMP_CHUNK)
            assert err == Err.SUCCESS
            sb = Superblock.decode(bytes(conn.recv_exact(SUPERBLOCK_SIZE)))
            left = sb.current_offset - SUPERBLOCK_SIZE
            while left:
                left -= len(conn.recv_exact(min(left, MiB)))
            total += sb.current_offset
        finally:
            conn.close()
    return total, time.monotonic() - t0


@pytest.mark.slow
def test_repair_speed(tmp_path):
    """2,000 small files + 8 large ones; one member replaced by an empty disk; repair timed."""
    with Cluster(tmp_path, groups=1, per_group=3, heartbeat_timeout=5.0, chunks=2,
                 chunk_size=64 * MiB, mem_blocks=64, workers=2) as cl:
        keys: dict[str, bytes] = {}
        lock = threading.Lock()

        def put_many(lo: int, hi: int) -> None:
            with cl.client(part_size=4 * MiB) as c:
                for i in range(lo, hi):
                    data = blob(4096 + i % 1000, i) if i < 2000 else blob(3 * MiB + i, i)
                    key = c.put(data)
                    with lock:
                        keys[key] = data
        threads = [threading.Thread(target=put_many, args=(lo, lo + 502))
                   for lo in range(0, 2008, 502)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        assert len(keys) == 2008
        victim = cl.group(GROUP)[2]
        nbytes = sum(len(v) for v in keys.values())
        dumped, dump_s = dump_speed(cl, cl.group(GROUP)[0])
        replace_with_empty_disk(cl, victim)
        out, seconds = repair(cl)
        check_replicas(cl, keys)
        line = out.strip().splitlines()[-1]
        print(f"\nrepair of {len(keys)} files, {nbytes / MiB:.1f} MiB onto an empty member: "
              f"{seconds:.2f} s wall (CLI), {len(keys) / seconds:.0f} files/s, "
              f"{nbytes / MiB / seconds:.1f} MiB/s\n  {line}\n"
              f"DUMP_CHUNK of one member's chunks ({dumped / MiB:.1f} MiB up to "
              f"current_offset): {dump_s:.2f} s, {dumped / MiB / dump_s:.1f} MiB/s")
