"""A failed put leaves no readable file anywhere, or says which key may be stored (issue 11.3).

A WRITE answered with an "unknown" outcome (WRITE_ERROR, INTERNAL_ERROR, no answer) may
have stored the fid: the client deletes it there too before it reports the failure, and
names the key as "may be partially stored" when even that fails. Real processes: a
master and one group of two chunkservers; disk faults come from SPEEDY_FAULTS.
"""
from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from speedy.cli import local
from speedy.client import UploadError
from speedy.client.master import ClusterError
from speedy.wire import manifest as mf
from speedy.wire.protocol import Err, WriteOutcome, write_outcome
from tests.support.cluster import Cluster, blob

GROUP = 1


def start(tmp_path) -> Cluster:
    """A master and one group of two chunkservers (started by `with`)."""
    return Cluster(tmp_path, groups=1, per_group=2, heartbeat_timeout=30.0,
                   monitor_interval=0.3, report_interval=0.3, chunks=2,
                   chunk_size=8 << 20, mem_blocks=16)


def respawn(cluster: Cluster, d, env: dict[str, str], *flags: str) -> None:
    """Start a chunkserver again with extra environment and flags; wait until RW."""
    cluster.kill(d)
    d.cmd = [*d.cmd, *flags]
    d.proc = local.spawn(d.cmd, d.log, cwd=cluster.root, env={**os.environ, **env})
    d.expected = True
    cluster.wait(lambda: cluster.statuses().get(d.addr) == 1 and
                 local.listening(d.port), 60, d, f"{d.name} RW")


def readable_on(cluster: Cluster, key: str) -> list[str]:
    """The servers of the group on which key's blob reads back."""
    k = mf.parse_key(key)
    return [d.name_addr for d in cluster.group(GROUP)
            if cluster.read_direct(d, k.group_id, k.fid).err != Err.FILE_NOT_FOUND]


def writer_pid(d) -> int:
    """The pid of a chunkserver's writer process (comm spy_writer)."""
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat") as f:
                rest = f.read().rsplit(")", 1)[1].split()
            with open(f"/proc/{name}/comm") as f:
                comm = f.read().strip()
        except (OSError, IndexError):
            continue
        if comm == "spy_writer" and int(rest[1]) == d.proc.pid:
            return int(name)
    raise AssertionError(f"no writer process under {d.name}")


@pytest.mark.parametrize("err,outcome", [
    (Err.SUCCESS, WriteOutcome.STORED),
    (Err.FILE_EXISTS, WriteOutcome.NOT_STORED),
    (Err.REACH_MEMORY_LIMIT, WriteOutcome.NOT_STORED),
    (Err.SERVER_READ_ONLY, WriteOutcome.NOT_STORED),
    (Err.CHUNK_UNAVAILABLE, WriteOutcome.NOT_STORED),
    (Err.SERVER_ID_MISMATCH, WriteOutcome.NOT_STORED),
    (Err.KILLED, WriteOutcome.NOT_STORED),
    (Err.WRITE_ERROR, WriteOutcome.UNKNOWN),
    (Err.INTERNAL_ERROR, WriteOutcome.UNKNOWN),
    (200, WriteOutcome.UNKNOWN),
    (None, WriteOutcome.UNKNOWN),
])
def test_write_outcome_of_each_answer(err, outcome):
    assert write_outcome(err) is outcome


def test_write_error_is_deleted_or_named(tmp_path):
    """A disk that fails a record write (WRITE_ERROR): the put fails, its fid is deleted
    on the healthy replica, and on the failing one (read-only now, so the DELETE is
    refused) the error names the key as possibly stored."""
    with start(tmp_path) as cluster:
        bad, good = cluster.group(GROUP)
        respawn(cluster, bad, {"SPEEDY_FAULTS": "write:*:after=1"})
        with cluster.client(write_attempts=1, undo_attempts=2) as c:
            key = c.put(b"first write works" * 10)
            with pytest.raises(UploadError) as e:
                c.put(b"second write fails on one disk" * 10)
        err = e.value
        assert len(err.cleaned) == 1
        failed = err.cleaned[0]
        assert f"{bad.name_addr}: WRITE_ERROR" in str(err)
        assert f"key {failed} may be partially stored" in str(err), str(err)
        assert f"{failed}@{bad.name_addr} (SERVER_READ_ONLY)" in str(err), str(err)
        assert err.orphans == [f"{failed}@{bad.name_addr}"]
        assert readable_on(cluster, failed) == [bad.name_addr] or \
            readable_on(cluster, failed) == []
        assert cluster.read_direct(good, GROUP, mf.parse_key(failed).fid).err == \
            Err.FILE_NOT_FOUND
        # the CLI prints the same one line, the address once per server
        r = cluster.cli("put", "-", input=b"x" * 100)
        line = r.stderr.decode().strip()
        assert r.returncode == 3 and len(line.splitlines()) == 1, line
        assert f"{bad.name_addr}: {bad.name_addr}" not in line
        respawn(cluster, bad, {})
        assert readable_on(cluster, failed) == []
        assert readable_on(cluster, key) == [d.name_addr for d in cluster.group(GROUP)]


def test_server_killed_mid_put_is_named(tmp_path):
    """A chunkserver stopped with the write in flight, then killed: no answer is an
    unknown outcome; the DELETE cannot reach it either, so the error names key and
    server (and the replica that answered SUCCESS has it deleted)."""
    with start(tmp_path) as cluster:
        victim, live = cluster.group(GROUP)
        with cluster.client(write_attempts=1, undo_attempts=3, timeout=5.0) as c:
            c.put(b"warm up" * 10)
            os.killpg(victim.proc.pid, signal.SIGSTOP)
            out: dict = {}

            def put() -> None:
                try:
                    out["key"] = c.put(blob(5000, 1))
                except ClusterError as e:
                    out["error"] = e
            t = threading.Thread(target=put)
            t.start()
            time.sleep(0.5)
            cluster.kill(victim)
            t.join(60)
        err = out["error"]
        failed = err.cleaned[0]
        assert f"key {failed} may be partially stored" in str(err), str(err)
        assert err.orphans == [f"{failed}@{victim.name_addr}"]
        assert str(err).count(f"{victim.name_addr}:") == 1, str(err)  # "addr: cannot..."
        assert cluster.read_direct(live, GROUP, mf.parse_key(failed).fid).err == \
            Err.FILE_NOT_FOUND


def test_writer_killed_leaves_no_unreported_file(tmp_path):
    """The writer of one replica is killed under concurrent puts: workers answer
    INTERNAL_ERROR for the writes it had queued, some of which it had written. After
    the replica comes back, every failed put's key reads nowhere, unless the put's
    error named it as possibly stored."""
    with start(tmp_path) as cluster:
        victim, live = cluster.group(GROUP)
        respawn(cluster, victim, {}, "--sync=1")  # fsync: a wide window before the answer
        failures: list[UploadError] = []
        stop = threading.Event()
        lock = threading.Lock()
        with cluster.client(write_attempts=1, undo_attempts=2, timeout=5.0) as c:
            def writer_loop(n: int) -> None:
                i = 0
                while not stop.is_set():
                    try:
                        c.put(blob(2000 + n, n * 1000 + i))
                    except UploadError as e:
                        with lock:
                            failures.append(e)
                    except ClusterError:
                        pass
                    i += 1
            threads = [threading.Thread(target=writer_loop, args=(n,)) for n in range(8)]
            for t in threads:
                t.start()
            time.sleep(1.0)
            # stopped first, so that writes are surely waiting on it when it dies (killed
            # at once, it sometimes died between batches with none: no put failed)
            pid = writer_pid(victim)
            os.kill(pid, signal.SIGSTOP)
            time.sleep(0.3)
            os.kill(pid, signal.SIGKILL)
            time.sleep(1.0)
            stop.set()
            for t in threads:
                t.join(60)
        assert failures, "no put failed after the writer was killed"
        cluster.restart(victim)
        unreported = []
        for e in failures:
            for key in e.cleaned:
                named = {o.split("@", 1)[1] for o in e.orphans if o.startswith(key + "@")}
                left = set(readable_on(cluster, key)) - named
                if left:
                    unreported.append(f"{key} on {sorted(left)}: {e}")
        print(f"{len(failures)} failed puts after the writer's death")
        assert unreported == []
