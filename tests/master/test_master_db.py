"""speedy.master.db without HTTP: schema, registry, reports, health, fids, bad files."""
from __future__ import annotations

import os
import sqlite3
import time

import pytest

from speedy.master import db as mdb
from speedy.wire.master import REPORT_RO, REPORT_RW, PendingDelete, Report, Status

DOCUMENTED_COLUMNS = {
    "group_id", "ip", "port", "status", "global_status", "total_free_space",
    "max_free_space", "pending_writes", "writing_count", "reading_count", "total_chunks",
    "conn_count", "data_dir", "create_time", "update_time"}


@pytest.fixture
def db(tmp_path):
    d = mdb.connect(str(tmp_path / "m.db"))
    yield d
    d.conn.close()


def test_schema_is_the_documented_interface(db, tmp_path):
    assert db.conn.execute("PRAGMA user_version").fetchone()[0] == mdb.SCHEMA_VERSION == 3
    assert db.conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert db.conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    cols = {r[1] for r in db.conn.execute("PRAGMA table_info(chunkserver)")}
    assert DOCUMENTED_COLUMNS <= cols
    assert {"high_water", "update_time"} <= {r[1] for r in
                                             db.conn.execute("PRAGMA table_info(fid_state)")}
    assert mdb.fid_high_water(db) == 1
    # Opening again is not a migration and keeps the data.
    mdb.add_server(db, 1, "10.0.0.1", 8000)
    again = mdb.connect(str(tmp_path / "m.db"))
    assert mdb.migrate(again) == 3 and len(mdb.list_servers(again)) == 1
    again.conn.close()


def test_registration_is_unique_and_idempotent(db):
    assert mdb.add_server(db, 1, "10.0.0.1", 8000) is True
    assert mdb.add_server(db, 1, "10.0.0.1", 8000) is False
    assert mdb.add_servers(db, [(1, "10.0.0.1", 8000), (1, "10.0.0.2", 8000),
                                (2, "10.0.0.1", 8000)]) == 2
    rows = mdb.list_servers(db)
    assert [(r.group_id, r.ip, r.port, r.status) for r in rows] == [
        (1, "10.0.0.1", 8000, 0), (1, "10.0.0.2", 8000, 0), (2, "10.0.0.1", 8000, 0)]
    with pytest.raises(sqlite3.IntegrityError):
        db.conn.execute("INSERT INTO chunkserver (group_id, ip, port, create_time, "
                        "update_time, status_time) VALUES (1, '10.0.0.1', 8000, 0, 0, 0)")


def test_reports_drive_status_but_never_lift_err(db):
    assert mdb.record_report(db, Report(1, "10.0.0.9", 8000)) is None
    mdb.add_server(db, 1, "10.0.0.1", 8000)
    r = Report(1, "10.0.0.1", 8000, total_free_space=123, max_free_space=45,
                   total_chunks=2, conn_count=3, data_dir="/d")
    assert mdb.record_report(db, r, now=100.0) == (Status.INIT, Status.RW)
    cs = mdb.get_server(db, 1, "10.0.0.1", 8000)
    assert (cs.total_free_space, cs.max_free_space, cs.total_chunks, cs.conn_count,
            cs.data_dir, cs.update_time, cs.report_count) == (123, 45, 2, 3, "/d", 100.0, 1)
    r.status = REPORT_RO
    assert mdb.record_report(db, r) == (Status.RW, Status.RO)
    r.status = REPORT_RW
    assert mdb.record_report(db, r) == (Status.RO, Status.RW)
    assert [c.status for c in mdb.set_status(db, "10.0.0.1", 8000, Status.ERR)] == [Status.ERR]
    r.total_free_space = 7
    assert mdb.record_report(db, r) == (Status.ERR, Status.ERR)
    cs = mdb.get_server(db, 1, "10.0.0.1", 8000)
    assert cs.status == Status.ERR and cs.total_free_space == 7
    assert mdb.any_error(db) and mdb.route(db) == {}
    assert mdb.set_status(db, "10.0.0.7", 1, Status.RW) == []


def test_silent_servers_turn_ro_after_a_grace_period(db):
    mdb.add_servers(db, [(1, "a", 1), (1, "b", 2), (1, "c", 3)])
    for key in [(1, "a", 1), (1, "b", 2)]:
        mdb.record_report(db, Report(*key), now=1000.0)
    mdb.set_status(db, "b", 2, Status.ERR)
    # Master started at 1005: silence counts from there (fresh grace period).
    assert mdb.mark_silent(db, timeout=30, started=1005.0, now=1030.0) == []
    changed = mdb.mark_silent(db, timeout=30, started=1005.0, now=1036.0)
    assert [c.key for c in changed] == ["1:a:1"]
    assert {c.ip: c.status for c in mdb.list_servers(db)} == {
        "a": Status.RO, "b": Status.ERR, "c": Status.INIT}
    assert mdb.status_counts(db) == {Status.INIT: 1, Status.RW: 0, Status.RO: 1,
                                     Status.ERR: 1}


def test_fid_ranges_continue_above_every_reservation(db, tmp_path):
    alloc = mdb.FidReserver(db)
    first = [alloc.next_range() for _ in range(150)]
    assert first[0] == (1, 101)
    assert all(e - b == 100 for b, e in first)
    assert all(a[1] <= b[0] for a, b in zip(first, first[1:]))
    assert mdb.fid_high_water(db) == 1 + 2 * mdb.FID_BLOCK
    other = mdb.connect(str(tmp_path / "m.db"))  # a restarted master
    b, e = mdb.FidReserver(other).next_range()
    assert b == 1 + 2 * mdb.FID_BLOCK and e == b + 100
    assert mdb.fid_high_water(db) == 1 + 3 * mdb.FID_BLOCK
    other.conn.close()
    with pytest.raises(ValueError):
        mdb.FidReserver(db, block=150)


def test_remove_server(db):
    mdb.add_server(db, 3, "h", 9)
    assert mdb.add_pending_deletes(db, [PendingDelete(3, "h", 9, 7), PendingDelete(3, "h", 9, 7),
                                        PendingDelete(3, "h", 9, 8)]) == 2
    assert mdb.remove_server(db, 3, "h", 9) is True
    assert mdb.pending_deletes(db, 3, "h", 9) == []   # none left to resurface
    assert mdb.remove_server(db, 3, "h", 9) is False
    assert mdb.list_servers(db) == []


def test_garbage_file_is_reported_corrupt_and_left_alone(tmp_path):
    path = tmp_path / "bad.db"
    junk = os.urandom(8192)
    path.write_bytes(junk)
    with pytest.raises(mdb.MasterDBError, match="corrupt"):
        mdb.connect(str(path))
    assert path.read_bytes() == junk


def test_damaged_database_is_reported_corrupt(tmp_path):
    path = str(tmp_path / "m.db")
    db = mdb.connect(path)
    mdb.add_servers(db, [(g, f"10.0.{g}.1", 8000) for g in range(1, 400)])
    mdb.close(db)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:  # overwrite the pages after the first with garbage
        f.seek(4096)
        f.write(b"\xa5" * (size - 4096))
    with pytest.raises(mdb.MasterDBError, match="corrupt|malformed"):
        mdb.connect(path)


def test_foreign_and_newer_databases_are_refused(tmp_path):
    foreign = str(tmp_path / "f.db")
    c = sqlite3.connect(foreign)
    c.execute("CREATE TABLE photos (x)")
    c.commit()
    c.close()
    with pytest.raises(mdb.MasterDBError, match="not a speedy master database"):
        mdb.connect(foreign)
    newer = str(tmp_path / "n.db")
    mdb.connect(newer).conn.execute("PRAGMA user_version = 99")
    with pytest.raises(mdb.MasterDBError, match="newer"):
        mdb.connect(newer)


def test_locked_database_is_a_clear_error(tmp_path):
    path = str(tmp_path / "m.db")
    mdb.connect(path).conn.close()
    holder = sqlite3.connect(path, isolation_level=None)
    holder.execute("BEGIN EXCLUSIVE")
    t0 = time.monotonic()
    with pytest.raises(mdb.MasterDBError, match="locked"):
        mdb.connect(path, busy_timeout=0.3)
    assert time.monotonic() - t0 < 5
    holder.execute("ROLLBACK")
    holder.close()


def test_second_master_lock(tmp_path):
    path = str(tmp_path / "m.db")
    mdb.connect(path).conn.close()
    fd = mdb.lock_single_master(path)
    try:
        with pytest.raises(mdb.MasterDBError, match="another spy_master"):
            mdb.lock_single_master(path)
    finally:
        os.close(fd)
    os.close(mdb.lock_single_master(path))
