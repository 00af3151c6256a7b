"""A failing disk under a real spy_server.py: failed commits, read-only, preallocation (issue 6).

Faults are injected with SPEEDY_FAULTS (speedy/chunkserver/faults.py) into the server's
writer process, at its real I/O calls (the diskio seam); a real spy_master.py receives the
server's reports. A rule counts start-up calls too: creating each of the 2 chunks writes
its superblock and fsyncs it. After a restart without
the fault every acknowledged write must read back byte for byte, and every write that
was not acknowledged must be absent or intact.
"""
from __future__ import annotations

import os
import resource
import signal
import subprocess
import threading
import time

import pytest

from tests.support import PYTHON, free_port
from tests.support import wait_for
from tests.support.server import SPY_SERVER, Client, make_server, payload
from speedy.wire.protocol import Err, Op
from speedy.chunkserver.shm.counters import StatsView

MiB = 1 << 20
RW, RO = 1, 2  # the master's status codes (MASTER-API.md); a report's Status 1 means RO
BURST = 24  # concurrent writes sent at once after the fault is armed


def read_all(port: int, fids: list[int]) -> dict[int, tuple[int, bytes]]:
    """fid -> (error, body) of a READ, over one connection."""
    with Client(port) as c:
        return {fid: c.read(fid) for fid in fids}


def burst(srv, fids: list[int], size: int) -> dict[int, int]:
    """WRITE every fid at once, one connection each, into one writer batch: the writer is
    stopped (SIGSTOP) until every worker holds its write, so one commit covers them all."""
    writer = [pid for pid, comm in srv.children().items() if comm == "spy_writer"]
    assert len(writer) == 1
    stats = StatsView.attach(f"speedy{srv.pid}_stats")
    clients = [srv.client() for _ in fids]
    answers: dict[int, int] = {}

    def one(c: Client, fid: int) -> None:
        try:
            answers[fid] = c.write(fid, payload(fid, size))
        except (OSError, EOFError) as e:
            answers[fid] = -1
            print(f"fid {fid}: {e}")

    threads = [threading.Thread(target=one, args=(c, fid)) for c, fid in zip(clients, fids)]
    os.kill(writer[0], signal.SIGSTOP)
    try:
        for t in threads:
            t.start()
        wait_for(lambda: stats.totals()["writing"] == len(fids), timeout=20)
        time.sleep(0.2)  # let the workers hand the writes over (a smaller batch is fine too)
    finally:
        os.kill(writer[0], signal.SIGCONT)
        stats.close()
    for t in threads:
        t.join(60)
    for c in clients:
        c.close()
    return answers


CREATED = 2  # chunks a server of make_server() creates: a superblock write + fsync each


@pytest.mark.parametrize("op", ["fsync", "superblock"])
def test_failed_commit_is_never_acknowledged(tmp_path, masters, op):
    """An I/O error on fsync (or the superblock write) of a commit: no write of that
    commit nor any later one is acknowledged; RO in GET_STATUS, the log and the reports."""
    master = masters(tmp_path)
    rule = f"{op}:chunk_1_*:after={CREATED + 2}"  # the chunks' creation, two commits
    srv = make_server(tmp_path, op, sync=1, workers=2, mem_blocks=64, master_port=master.port,
                      report_interval=0.2, env={"SPEEDY_FAULTS": rule})
    srv.port = 0
    try:
        srv.start()
        master.register(1, "127.0.0.1", srv.port)
        me = (1, "127.0.0.1", srv.port)
        wait_for(lambda: master.statuses().get(me) == RW, timeout=20)
        size = 3000
        with srv.client() as c:  # two commits (two fsyncs / superblock writes) go through
            assert c.write(1, payload(1, size)) == Err.SUCCESS
            assert c.write(2, payload(2, size)) == Err.SUCCESS
        fids = list(range(100, 100 + BURST))
        answers = burst(srv, fids, size)
        errors = sorted(answers.values())
        print(f"{op} fault: {BURST} concurrent writes answered "
              f"{errors.count(Err.WRITE_ERROR)} WRITE_ERROR (the failed commit), "
              f"{errors.count(Err.SERVER_READ_ONLY)} SERVER_READ_ONLY (after it)")
        assert set(errors) <= {Err.WRITE_ERROR, Err.SERVER_READ_ONLY}, answers
        assert Err.WRITE_ERROR in errors  # the first commit of the burst failed
        assert errors.count(Err.WRITE_ERROR) > 1  # ... and it covered several writes
        with srv.client() as c:
            assert c.write(3, payload(3, size)) == Err.SERVER_READ_ONLY
            assert c.delete(1) == Err.SERVER_READ_ONLY
            assert c.call(Op.GET_STATUS) == (Err.SUCCESS, b"\x01")
            assert c.read(1) == (Err.SUCCESS, payload(1, size))  # reads go on
            assert c.read(100) == (Err.FILE_NOT_FOUND, b"")  # a failed commit indexes nothing
        log = srv.log()
        assert "failed" in log and "read-only now" in log
        assert "disk I/O error: the server is read-only (Status 1)" in log
        # the reports to the (real) master carry Status 1: it routes the server RO
        wait_for(lambda: master.statuses().get(me) == RO, timeout=20)
        assert srv.stop() == 0
        # a restart without the fault: acknowledged writes all there, the others absent/intact
        srv.env = {}
        srv.start()
        got = read_all(srv.port, [1, 2] + fids)
        assert got[1] == (Err.SUCCESS, payload(1, size))
        assert got[2] == (Err.SUCCESS, payload(2, size))
        for fid in fids:
            assert got[fid] in ((Err.FILE_NOT_FOUND, b""), (Err.SUCCESS, payload(fid, size))), fid
        with srv.client() as c:  # writable again; an unacknowledged fid can be written again
            assert c.call(Op.GET_STATUS) == (Err.SUCCESS, b"\x00")
            for fid in fids[:4] + [3]:
                if got.get(fid, (Err.FILE_NOT_FOUND,))[0] == Err.FILE_NOT_FOUND:
                    assert c.write(fid, payload(fid, size + 1)) == Err.SUCCESS
                    assert c.read(fid) == (Err.SUCCESS, payload(fid, size + 1))
        wait_for(lambda: master.statuses().get(me) == RW, timeout=20)
        srv.kill9()  # a crash after the restart loses nothing either
        srv.start()
        assert read_all(srv.port, [1, 2])[2] == (Err.SUCCESS, payload(2, size))
    finally:
        srv.discard()


def test_data_write_error_inside_a_batch(tmp_path):
    """An I/O error on the pwritev of a chunk's commit: no write of that commit is
    acknowledged, nothing after it is accepted; writes committed in other chunks at the
    same time (in parallel, fsynced) may be acknowledged and then survive a crash."""
    size = 40_000  # small records: they share chunk 1 and its commit
    srv = make_server(tmp_path, "wr", sync=1, workers=2, mem_blocks=256,
                      env={"SPEEDY_FAULTS": "write:chunk_1_1.chunk:after=5"})
    try:
        srv.start()
        with srv.client() as c:  # one pwritev each
            for fid in range(1, 6):
                assert c.write(fid, payload(fid, 100 + fid)) == Err.SUCCESS
        fids = list(range(200, 200 + BURST))
        answers = burst(srv, fids, size)  # the first pwritev of chunk 1 fails
        errors = list(answers.values())
        assert set(errors) <= {Err.SUCCESS, Err.WRITE_ERROR, Err.SERVER_READ_ONLY}, answers
        assert errors.count(Err.WRITE_ERROR) > 1  # the failed commit's writes
        acked = [fid for fid, err in answers.items() if err == Err.SUCCESS]
        print(f"write fault: {len(acked)} of {BURST} batched writes acknowledged (other "
              f"chunks), {errors.count(Err.WRITE_ERROR)} WRITE_ERROR (the failed commit), "
              f"{errors.count(Err.SERVER_READ_ONLY)} SERVER_READ_ONLY")
        with srv.client() as c:  # read-only from now on
            assert c.write(999, payload(999, 100)) == Err.SERVER_READ_ONLY
        srv.kill9()
        srv.env = {}
        srv.start()
        got = read_all(srv.port, list(range(1, 6)) + fids)
        for fid in range(1, 6):
            assert got[fid] == (Err.SUCCESS, payload(fid, 100 + fid))
        for fid in fids:
            if fid in acked:
                assert got[fid] == (Err.SUCCESS, payload(fid, size)), fid
            else:
                assert got[fid] in ((Err.FILE_NOT_FOUND, b""),
                                    (Err.SUCCESS, payload(fid, size))), fid
    finally:
        srv.discard()


def test_failed_delete_fsync(tmp_path):
    """fsync of a DELETE fails: WRITE_ERROR, read-only; after a restart the other files are
    intact and the fid is either still there, intact, or gone (the delete was not answered)."""
    rule = f"fsync:*:after={CREATED + 2}"  # the chunks' creation, the two writes
    srv = make_server(tmp_path, "del", sync=1, env={"SPEEDY_FAULTS": rule})
    try:
        srv.start()
        with srv.client() as c:
            assert c.write(1, payload(1, 7000)) == Err.SUCCESS
            assert c.write(2, payload(2, 7000)) == Err.SUCCESS
            assert c.delete(1) == Err.WRITE_ERROR
            assert c.call(Op.GET_STATUS) == (Err.SUCCESS, b"\x01")
            assert c.write(3, b"x") == Err.SERVER_READ_ONLY
            assert c.read(2) == (Err.SUCCESS, payload(2, 7000))
        assert "deleting fid 1 failed" in srv.log()
        srv.kill9()
        srv.env = {}
        srv.start()
        got = read_all(srv.port, [1, 2, 3])
        assert got[2] == (Err.SUCCESS, payload(2, 7000))
        assert got[1] in ((Err.FILE_NOT_FOUND, b""), (Err.SUCCESS, payload(1, 7000)))
        assert got[3] == (Err.FILE_NOT_FOUND, b"")
        print(f"fid 1 after a DELETE whose fsync failed, and a restart: {Err(got[1][0]).name}")
    finally:
        srv.discard()


# -- preallocation ---------------------------------------------------------------------

def run_server(data_dir, *flags: str, env: dict | None = None,
               preexec=None) -> subprocess.CompletedProcess:
    """spy_server.py run to completion (a start that must fail); 30 s bound."""
    argv = [PYTHON, SPY_SERVER, "--master_ip=127.0.0.1", "--master_port=1", "--group_id=1",
            f"--data_dir={data_dir}", f"--port={free_port()}", "--workers=1", "--mem_blocks=4",
            *flags]
    return subprocess.run(argv, capture_output=True, text=True, timeout=30,
                          env={**os.environ, **(env or {})}, preexec_fn=preexec)


def chunk_files(data_dir) -> list[str]:
    return sorted(n for n in os.listdir(data_dir) if n.endswith(".chunk"))


def leftovers(data_dir) -> list[str]:
    meta = os.path.join(str(data_dir), ".speedy")
    return sorted(n for n in os.listdir(meta) if n.startswith("tmp.")) if os.path.isdir(meta) \
        else []


def error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if " ERROR " in line]


def small_file_limit() -> None:
    """In the child: files may not grow past 6 MiB (a real EFBIG from the kernel)."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (6 * MiB, 6 * MiB))


@pytest.mark.parametrize("how", ["injected", "rlimit"])
def test_preallocation_failure_is_clean(tmp_path, how):
    """A chunk that cannot be preallocated: exit 1, one clear line, nothing half made."""
    data = tmp_path / "data"
    data.mkdir()
    if how == "injected":  # the 3rd chunk finds the disk full
        r = run_server(data, "--chunks=4", f"--chunk_size={4 * MiB}",
                       env={"SPEEDY_FAULTS": "fallocate:chunk_1_3.chunk"})
        why = "No space left on device"
    else:  # the kernel refuses a file larger than RLIMIT_FSIZE
        r = run_server(data, "--chunks=2", f"--chunk_size={8 * MiB}", preexec=small_file_limit)
        why = "File too large"
    assert r.returncode == 1, r.stderr
    errors = error_lines(r.stderr)
    assert len(errors) == 1, r.stderr
    assert "cannot preallocate" in errors[0] and why in errors[0], errors
    assert "Traceback" not in r.stderr
    print(f"{how}: {errors[0]}")
    assert chunk_files(data) == [] and leftovers(data) == []
    assert not [n for n in os.listdir("/dev/shm") if n.startswith("speedy") and
                not os.path.exists(f"/proc/{n[6:].split('_')[0]}")]
    # the next start without the fault succeeds
    srv = make_server(tmp_path, "again", chunks=4, chunk_size=4 * MiB)
    srv.data_dir = str(data)
    try:
        srv.start()
        with srv.client() as c:
            assert c.write(1, b"after") == Err.SUCCESS
    finally:
        srv.discard()
    assert chunk_files(data) == [f"chunk_1_{i}.chunk" for i in range(1, 5)]


def test_growing_chunks_failure_keeps_the_old_ones(tmp_path):
    """--chunks raised from 2 to 4 and the 3rd cannot be made: old chunks and files stay."""
    srv = make_server(tmp_path, "grow", chunks=2, chunk_size=4 * MiB)
    try:
        srv.start()
        with srv.client() as c:
            for fid in range(1, 11):
                assert c.write(fid, payload(fid, 50_000)) == Err.SUCCESS
        assert srv.stop() == 0
    finally:
        srv.discard()
    before = {n: os.path.getsize(os.path.join(srv.data_dir, n)) for n in chunk_files(srv.data_dir)}
    r = run_server(srv.data_dir, "--chunks=4", f"--chunk_size={4 * MiB}",
                   env={"SPEEDY_FAULTS": "fallocate:chunk_1_3.chunk"})
    assert r.returncode == 1 and len(error_lines(r.stderr)) == 1, r.stderr
    assert "chunk_1_3.chunk" in error_lines(r.stderr)[0]
    assert {n: os.path.getsize(os.path.join(srv.data_dir, n))
            for n in chunk_files(srv.data_dir)} == before
    assert leftovers(srv.data_dir) == []
    srv.flags["chunks"] = 4
    srv.port = 0
    try:
        srv.start()
        got = read_all(srv.port, list(range(1, 11)))
        assert all(got[f] == (Err.SUCCESS, payload(f, 50_000)) for f in range(1, 11))
    finally:
        srv.discard()
    assert len(chunk_files(srv.data_dir)) == 4
