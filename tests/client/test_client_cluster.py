"""The client library and the `speedy` command against a real cluster.

One module-scoped cluster: a master (token required on its write routes, a 4 s
heartbeat timeout) and two groups of three chunkservers, all real processes on loopback.
Tests that break something (a server set read-only, a killed server) put it back.
"""
from __future__ import annotations

import io
import json
import os
import pty
import shutil
import subprocess
import threading

import pytest

from tests.support.cluster import PYTHON, ROOT, Cluster, blob, cluster_fixture
from tests.support.store import records
from speedy.wire import manifest as mf
from speedy.client import RO, Client, IntegrityError, MasterError, NotFoundError, UploadError
from speedy.wire.protocol import Err

TOKEN = "s3cret-token"
PART = 256 << 10


cluster = cluster_fixture(groups=2, per_group=3, heartbeat_timeout=4.0, monitor_interval=0.5,
                          report_interval=0.5, chunks=3, chunk_size=8 << 20, mem_blocks=16,
                          token=TOKEN)


@pytest.fixture(scope="module")
def client(cluster):
    with cluster.client(part_size=PART) as c:
        yield c




def on_every_replica(cluster: Cluster, key: str) -> list[bytes]:
    """The blob of a plain key as READ from each server of its group."""
    k = mf.parse_key(key)
    out = []
    for d in cluster.group(k.group_id):
        r = cluster.read_direct(d, k.group_id, k.fid)
        assert r.ok, f"{d.name} answered {r.err_name} for {key}"
        out.append(bytes(r.body))
    return out


def absent_everywhere(cluster: Cluster, key: str) -> None:
    k = mf.parse_key(key)
    for d in cluster.group(k.group_id):
        if d.running():
            r = cluster.read_direct(d, k.group_id, k.fid)
            assert r.err == Err.FILE_NOT_FOUND, f"{key} still on {d.name}: {r.err_name}"


# -- put / get --------------------------------------------------------------------------

@pytest.mark.parametrize("size", [0, 1, 1000, PART - 1, PART])
def test_small_files_round_trip_on_every_replica(cluster, client, size):
    data = blob(size, size)
    key = client.put(data)
    k = mf.parse_key(key)
    assert not k.multipart and str(k) == key
    assert client.get(key) == data
    assert on_every_replica(cluster, key) == [data] * 3
    out = io.BytesIO()
    assert client.get_to(key, out) == size and out.getvalue() == data


@pytest.mark.parametrize("size", [PART + 1, 2 * PART, 4 * PART + 12345])
def test_multipart_files_round_trip(cluster, client, size):
    data = blob(size, 7 + size)
    key = client.put(data)
    assert key.endswith("m")
    assert client.get(key) == data
    out = io.BytesIO()
    assert client.get_to(key, out) == size and out.getvalue() == data
    st = client.stat(key)
    assert st.multipart and st.size == size and st.parts == -(-size // PART)
    assert len(st.replicas) == 3 and st.missing == []
    for i, pk in enumerate(st.part_keys):  # every part on every replica of its group
        assert on_every_replica(cluster, pk) == [data[i * PART:(i + 1) * PART]] * 3
    # the manifest itself is a plain blob under the same fid
    m = mf.Manifest.decode(client.get(key[:-1]))
    assert m.total_size == size and [str(p.key) for p in m.parts] == st.part_keys


def test_file_objects_stream_in_parts(client, tmp_path):
    data = blob(3 * PART + 5, 3)
    progress: list[tuple[int, int | None]] = []
    key = client.put(io.BytesIO(data), progress=lambda d, t: progress.append((d, t)))
    assert key.endswith("m") and client.get(key) == data
    assert progress[-1][0] == len(data)
    path = tmp_path / "f"
    path.write_bytes(data[:PART])
    key = client.put_file(str(path))
    assert not key.endswith("m") and client.get(key) == data[:PART]
    with pytest.raises(TypeError):
        client.put("text is not bytes")  # type: ignore[arg-type]


def test_parts_go_to_several_groups(client):
    keys = [client.put(blob(6 * PART, 100 + i)) for i in range(3)]
    groups = {p.group_id for k in keys for p in mf.Manifest.decode(
        client.get(k[:-1])).parts}
    assert groups == {1, 2}


def test_concurrent_puts_from_threads(client):
    results: dict[int, str] = {}
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(8):
                results[t * 100 + i] = client.put(blob(2000 + i, t * 100 + i))
        except BaseException as e:  # reported below
            errors.append(e)
    threads = [threading.Thread(target=work, args=(t,)) for t in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(set(results.values())) == 48
    for n, key in results.items():
        assert client.get(key) == blob(2000 + n % 100, n)


# -- missing, damaged, deleted ----------------------------------------------------------

def test_unknown_keys_are_not_found(client):
    key = client.put(b"x")
    k = mf.parse_key(key)
    for missing in (f"{k.group_id},{k.fid + 1000000}", f"{k.group_id},{k.fid + 1000000}m",
                    "999,1"):
        with pytest.raises(NotFoundError):
            client.get(missing)
        with pytest.raises(NotFoundError):
            client.stat(missing)
        with pytest.raises(NotFoundError):
            client.delete(missing)


def test_a_part_that_does_not_match_its_checksum_is_never_returned(client):
    good = client.put(b"a" * 100)
    k = mf.parse_key(good)
    bad = mf.Manifest(100, 100, [mf.Part(k.group_id, k.fid, 100, mf.digest(b"b" * 100))])
    mkey = client._put_blob(bad.encode())
    with pytest.raises(IntegrityError, match="bad checksum"):
        client.get(f"{mkey}m")
    gone = mf.Manifest(100, 100, [mf.Part(k.group_id, k.fid + 10**9, 100,
                                          mf.digest(b"a" * 100))])
    mkey = client._put_blob(gone.encode())
    with pytest.raises(IntegrityError, match="missing"):
        client.get(f"{mkey}m")
    with pytest.raises(NotFoundError, match="is not a multi-part file"):  # a plain blob
        client.get(f"{good}m")


def test_delete_removes_every_copy(cluster, client):
    key = client.put(b"delete me")
    assert client.delete(key) == []
    absent_everywhere(cluster, key)
    with pytest.raises(NotFoundError):
        client.get(key)
    with pytest.raises(NotFoundError):
        client.delete(key)
    big = client.put(blob(3 * PART, 9))
    parts = client.stat(big).part_keys
    assert client.delete(big) == []
    for k in parts + [big[:-1]]:
        absent_everywhere(cluster, k)
    with pytest.raises(NotFoundError):
        client.get(big)


# -- failures ---------------------------------------------------------------------------

def set_ro_directly(cluster: Cluster, servers, status: int) -> None:
    """SET_STATUS over the wire (the chunkserver itself refuses writes when RO)."""
    for d in servers:
        assert cluster.pool.set_status(d.addr, status).ok


def test_failed_upload_leaves_no_key_behind(cluster):
    victims = [cluster.group(1)[1], cluster.group(2)[2]]
    with cluster.client(part_size=PART, route_ttl=3600, write_attempts=1,
                        parallel=1) as c:
        c.route()  # cache the route while everything is RW
        set_ro_directly(cluster, victims, 1)
        try:
            with pytest.raises(UploadError) as e:
                c.put(b"half-written?")
            assert len(e.value.cleaned) == 1 and e.value.orphans == []
            assert "SERVER_READ_ONLY" in str(e.value)
            absent_everywhere(cluster, e.value.cleaned[0])
            with pytest.raises(NotFoundError):
                c.get(e.value.cleaned[0])
        finally:
            set_ro_directly(cluster, victims, 0)
        # a multi-part upload that fails after some parts were stored deletes them all
        c.invalidate_route()
        c.route(force=True)
        cluster.wait_all_rw()
        c.route(force=True)
        done: list[int] = []

        def break_after_first_part(n: int, total: int | None) -> None:
            done.append(n)
            if len(done) == 1:
                set_ro_directly(cluster, victims, 1)
        try:
            with pytest.raises(UploadError) as e:
                c.put(blob(5 * PART, 5), progress=break_after_first_part)
        finally:
            set_ro_directly(cluster, victims, 0)
        assert len(done) == 1 and len(e.value.cleaned) >= 2  # a whole part + the failed one
        # A read-only server refuses DELETE too: what stays there is reported as an orphan
        # (no key was returned, so nothing can read it), and nothing else is left.
        orphans = {tuple(o.split("@")) for o in e.value.orphans}
        assert orphans and {a for _, a in orphans} <= {v.name_addr for v in victims}
        for key in e.value.cleaned:
            k = mf.parse_key(key)
            for d in cluster.group(k.group_id):
                r = cluster.read_direct(d, k.group_id, k.fid)
                assert r.err == Err.FILE_NOT_FOUND or (key, d.name_addr) in orphans
        for key in {k for k, _ in orphans}:  # once writable again, they can be deleted
            c.delete(key)
            absent_everywhere(cluster, key)
    cluster.wait_all_rw()


def test_killed_chunkserver_fails_no_read_and_puts_move_to_the_other_group(cluster, client):
    keys: dict[str, bytes] = {}
    while sum(k.startswith("1,") for k in keys) < 2 or \
            sum(k.startswith("2,") for k in keys) < 2 or len(keys) < 10:
        data = blob(500 + len(keys), 1000 + len(keys))
        keys[client.put(data)] = data
    big = blob(6 * PART, 77)
    keys[client.put(big)] = big
    victim = cluster.group(1)[0]
    cluster.kill(victim)
    try:
        with cluster.client(part_size=PART) as fresh:  # route still says RW: failover
            for key, data in keys.items():
                assert fresh.get(key) == data
            g1 = next(k for k in keys if k.startswith("1,") and not k.endswith("m"))
            st = fresh.stat(g1)
            assert victim.name_addr in st.missing and len(st.replicas) == 2
        cluster.wait_status(victim, RO, timeout=30)
        with cluster.client(part_size=PART) as c:
            new = [c.put(blob(100, 5000 + i)) for i in range(10)]
            assert {mf.parse_key(k).group_id for k in new} == {2}
            for key, data in keys.items():
                assert c.get(key) == data
            assert c.delete(g1) == [victim.name_addr]
        r = cluster.cli("rm", next(k for k in keys if k.startswith("1,") and k != g1
                                   and not k.endswith("m")))
        assert r.returncode == 3 and victim.name_addr.encode() in r.stderr
        r = cluster.cli("status", "--json")
        st = {s["server"]: s["status"] for s in json.loads(r.stdout)["servers"]}
        assert st[victim.name_addr] == "RO"
    finally:
        cluster.restart(victim)
    cluster.wait_all_rw()


# -- token and admin --------------------------------------------------------------------

def test_the_master_token_is_sent_and_needed(cluster):
    with Client(cluster.master_addr, token=None) as c:
        with pytest.raises(MasterError) as e:
            c.put(b"no token")
        assert e.value.status in (401, 403)
    r = cluster.cli("status", env={})  # reads need no token
    assert r.returncode == 0


def test_admin_commands(cluster):
    d = cluster.group(2)[1]
    r = cluster.cli("admin", "set-status", d.name_addr, "err")
    assert r.returncode == 0, r.stderr
    try:
        assert d.addr not in cluster.statuses()            # ERR servers leave the route
        r = cluster.cli("status", "--json")
        st = {s["server"]: s["status"] for s in json.loads(r.stdout)["servers"]}
        assert st[d.name_addr] == "ERR" and len(st) == 6
    finally:
        r = cluster.cli("admin", "set-status", d.name_addr, "rw")
        assert r.returncode == 0, r.stderr
    cluster.wait_all_rw()
    r = cluster.cli("admin", "set-status", "127.0.0.1:1", "ro")
    assert r.returncode == 3 and b"no chunkserver" in r.stderr
    # a new server: registered INIT, then removed again
    r = cluster.cli("admin", "add-server", "9", "127.0.0.1:9")
    assert r.returncode == 0, r.stderr
    r = cluster.cli("status", "--json")
    rows = {s["server"]: s for s in json.loads(r.stdout)["servers"]}
    assert rows["127.0.0.1:9"]["status"] == "INIT" and rows["127.0.0.1:9"]["group"] == 9
    r = cluster.cli("admin", "remove-server", "9", "127.0.0.1:9")
    assert r.returncode == 0, r.stderr
    assert "127.0.0.1:9" not in cluster.cli("status").stdout.decode()


# -- the command line -------------------------------------------------------------------

def test_cli_put_get_rm_stat(cluster, tmp_path):
    small, big = tmp_path / "small", tmp_path / "big"
    small.write_bytes(blob(1234, 1))
    big.write_bytes(blob(5 * PART + 3, 2))
    empty = tmp_path / "empty"
    empty.write_bytes(b"")
    r = cluster.cli("--part-size", "256K", "put", str(small), str(big), str(empty))
    assert r.returncode == 0 and r.stderr == b"", r.stderr
    keys = r.stdout.decode().split("\n")
    assert keys[-1] == "" and len(keys) == 4
    ks, kb, ke = keys[:3]
    assert kb.endswith("m") and not ks.endswith("m")
    r = cluster.cli("put", "-", input=b"from stdin")
    assert r.returncode == 0
    kin = r.stdout.decode().strip()
    for key, path in ((ks, small), (kb, big), (ke, empty)):
        r = cluster.cli("get", key)
        assert r.returncode == 0 and r.stdout == path.read_bytes()
        out = tmp_path / "out"
        r = cluster.cli("get", key, "-o", str(out))
        assert r.returncode == 0 and r.stdout == b"" and out.read_bytes() == path.read_bytes()
    assert cluster.cli("get", kin).stdout == b"from stdin"
    r = cluster.cli("stat", kb)
    assert r.returncode == 0 and b"parts     6 (multi-part)" in r.stdout
    st = json.loads(cluster.cli("stat", "--json", ks).stdout)
    assert st["size"] == 1234 and len(st["replicas"]) == 3
    r = cluster.cli("rm", ks, kb, kin)
    assert r.returncode == 0, r.stderr
    for key in (ks, kb):
        r = cluster.cli("get", key)
        assert r.returncode == 1 and r.stdout == b"" and b"not found" in r.stderr
        assert b"Traceback" not in r.stderr
    r = cluster.cli("rm", ks, ke)
    assert r.returncode == 1 and b"not found" in r.stderr
    assert cluster.cli("get", ke).returncode == 1
    # a failed get -o leaves no file
    out = tmp_path / "nothing"
    r = cluster.cli("get", ks, "-o", str(out))
    assert r.returncode == 1 and not out.exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".speedy-")] == []


def test_cli_status(cluster):
    r = cluster.cli("status")
    assert r.returncode == 0, r.stderr
    lines = r.stdout.decode().splitlines()
    assert lines[0].split()[:3] == ["GROUP", "SERVER", "STATUS"]
    assert len(lines) == 7 and all(" RW " in line for line in lines[1:])
    rows = json.loads(cluster.cli("status", "--json").stdout)["servers"]
    assert sorted((s["group"], s["server"]) for s in rows) == \
        sorted((d.group, d.name_addr) for d in cluster.servers)
    assert all(s["free"] > 0 for s in rows)
    assert all(0 <= s["heartbeat_age"] < 30 for s in rows)
    assert all(line.endswith("s ago") for line in lines[1:])


def test_cli_bad_keys_and_usage(cluster):
    for args, code in ((["get", "1,"], 2), (["get", "x"], 2), (["rm", "1,5", "5"], 2),
                       (["stat", "1,5mm"], 2), (["get", "1,999999999"], 1),
                       (["get", "77,1"], 1)):
        r = cluster.cli(*args)
        assert r.returncode == code, (args, r.stderr)
        assert len(r.stderr.decode().strip().splitlines()) == 1
        assert b"Traceback" not in r.stderr and r.stdout == b""


def test_progress_only_on_a_terminal(cluster, tmp_path):
    big = tmp_path / "big"
    big.write_bytes(blob((4 << 20) + PART, 11))
    master_fd, slave_fd = pty.openpty()
    try:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SPEEDY_")}
        r = subprocess.run([PYTHON, "-m", "speedy", "--master", cluster.master_addr,
                            "--token", TOKEN, "--part-size", "256K", "put", str(big)],
                           stdout=subprocess.PIPE, stderr=slave_fd, cwd=ROOT, env=env,
                           timeout=60)
        os.close(slave_fd)
        shown = b""
        while True:
            try:
                chunk = os.read(master_fd, 4096)
            except OSError:
                break
            if not chunk:
                break
            shown += chunk
    finally:
        os.close(master_fd)
    assert r.returncode == 0 and r.stdout.decode().strip().endswith("m")
    assert b"\r" in shown and b"100%" in shown and b"MiB" in shown
    key = r.stdout.decode().strip()
    r = cluster.cli("get", key)          # stderr is a pipe here: no progress
    assert r.returncode == 0 and r.stderr == b"" and r.stdout == big.read_bytes()


# -- repair (issue 6) -------------------------------------------------------------------

def find_record(data_dir: str, fid: int) -> tuple[str, int]:
    """(chunk file, offset of the record's data) of a live fid in a data dir."""
    rec = records(data_dir).get(fid)
    assert rec is not None, f"fid {fid} not found in {data_dir}"
    return rec.path, rec.data_offset


def test_repair_brings_a_wiped_replica_back(cluster, client):
    keys: dict[str, bytes] = {}
    while sum(k.startswith("2,") for k in keys) < 6:
        data = blob(3000 + len(keys), 9000 + len(keys))
        keys[client.put(data)] = data
    group2 = [k for k in keys if k.startswith("2,")]
    s1, s2, s3 = cluster.group(2)
    # a delete that reached one replica only
    half_deleted = mf.parse_key(group2[0])
    assert cluster.pool.delete(s1.addr, 2, half_deleted.fid).ok
    # a damaged record on another replica
    damaged = mf.parse_key(group2[1])
    path, offset = find_record(os.path.join(cluster.root, s2.name, "data"), damaged.fid)
    with open(path, "r+b") as f:
        f.seek(offset + 7)
        byte = f.read(1)
        f.seek(offset + 7)
        f.write(bytes([byte[0] ^ 0xFF]))
    assert cluster.read_direct(s2, 2, damaged.fid).err == Err.READ_ERROR
    # a replacement with an empty disk
    cluster.kill(s3)
    shutil.rmtree(os.path.join(cluster.root, s3.name, "data"))
    os.makedirs(os.path.join(cluster.root, s3.name, "data"))
    cluster.restart(s3)
    assert cluster.read_direct(s3, 2, mf.parse_key(group2[2]).fid).err == Err.FILE_NOT_FOUND

    r = cluster.cli("admin", "repair", "2", "--dry-run")
    assert r.returncode == 0, r.stderr
    assert b"would copy" in r.stdout
    r = cluster.cli("admin", "repair", "2", timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    out = r.stdout.decode()
    assert "rewrote 1 damaged, deleted 1;" in out and "0 failures" in out, out
    for key in group2[1:]:
        assert on_every_replica(cluster, key) == [keys[key]] * 3
    absent_everywhere(cluster, group2[0])
    r = cluster.cli("admin", "repair", "2")
    assert r.returncode == 0 and "copied 0, rewrote 0 damaged, deleted 0" in r.stdout.decode()
    r = cluster.cli("admin", "repair", "77")
    assert r.returncode == 3 and b"no registered chunkserver" in r.stdout + r.stderr
