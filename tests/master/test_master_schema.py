"""The master's schema: migration from version 1, pending deletes, the sqlite-utils command."""
from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys

import pytest

from speedy.master import db as mdb
from speedy.wire.master import PendingDelete


SQLITE_UTILS = os.path.join(os.path.dirname(sys.executable), "sqlite-utils")


def make_v1(path: str) -> None:
    """A database as a version-1 master left it: one server, fids reserved up to 20001."""
    c = sqlite3.connect(path, isolation_level=None)
    c.execute(mdb.CHUNKSERVER_V1)
    c.execute("CREATE INDEX chunkserver_ip_port ON chunkserver (ip, port)")
    c.execute(mdb.FID_STATE_V1)
    c.execute("INSERT INTO fid_state VALUES (1, 20001, 5.0)")
    c.execute("INSERT INTO chunkserver (group_id, ip, port, status, create_time, "
              "update_time, status_time, report_count) VALUES (3, '10.0.0.1', 8000, 1, 1, "
              "2, 3, 7)")
    c.execute("PRAGMA user_version = 1")
    c.close()


def test_version_1_is_migrated_to_the_last_keeping_its_data(tmp_path):
    path = str(tmp_path / "v1.db")
    make_v1(path)
    db = mdb.connect(path)
    try:
        assert mdb.schema_version(db) == mdb.SCHEMA_VERSION == 3
        assert "pending_delete" in db.table_names()
        cs = mdb.get_server(db, 3, "10.0.0.1", 8000)
        assert (cs.status, cs.report_count, cs.pending_deletes) == (1, 7, 0)
        assert mdb.fid_high_water(db) == 20001
        assert mdb.migrate(db) == 3  # opening again is no migration
    finally:
        db.conn.close()


def test_a_failed_migration_leaves_version_1(tmp_path, monkeypatch):
    path = str(tmp_path / "v1.db")
    make_v1(path)

    def broken(db):
        mdb._create_v2(db)
        raise sqlite3.OperationalError("disk I/O error (injected)")
    monkeypatch.setitem(mdb.MIGRATIONS, 2, broken)
    with pytest.raises(mdb.MasterDBError):
        mdb.connect(path)
    c = sqlite3.connect(path)
    assert c.execute("PRAGMA user_version").fetchone()[0] == 1
    assert "pending_delete" not in {r[0] for r in c.execute(
        "SELECT name FROM sqlite_master WHERE type = 'table'")}
    c.close()


def test_pending_deletes_are_counted_per_server_and_finished(tmp_path):
    db = mdb.connect(str(tmp_path / "m.db"))
    try:
        mdb.add_servers(db, [(1, "10.0.0.1", 8000), (1, "10.0.0.2", 8000)])
        items = [PendingDelete(1, "10.0.0.2", 8000, fid) for fid in (5, 6, 7)]
        assert mdb.add_pending_deletes(db, items) == 3
        assert mdb.add_pending_deletes(db, items[:1]) == 0  # recorded twice: once
        counts = {cs.ip: cs.pending_deletes for cs in mdb.route(db)[1]}
        assert counts == {"10.0.0.1": 0, "10.0.0.2": 3}
        assert mdb.pending_deletes(db, 1, "10.0.0.2", 8000) == [5, 6, 7]
        mdb.finish_pending_deletes(db, 1, "10.0.0.2", 8000, [5, 6], {7: "NO_SPACE"})
        assert mdb.pending_deletes(db, 1, "10.0.0.2", 8000) == [7]
        row = db["pending_delete"].get((1, "10.0.0.2", 8000, 7))
        assert (row["attempts"], row["last_error"]) == (1, "NO_SPACE")
        assert mdb.count_pending_deletes(db) == 1
    finally:
        db.conn.close()


@pytest.mark.skipif(not os.path.exists(SQLITE_UTILS), reason="no sqlite-utils command")
def test_the_sqlite_utils_command_reads_a_running_masters_database(masters, tmp_path):
    m = masters(tmp_path, heartbeat_timeout=30)
    m.register(1, "10.0.0.1", 8000)
    m.register(1, "10.0.0.2", 8000)
    m.report(1, "10.0.0.2", 8000, Status=1)
    # the README's example, as written there
    r = subprocess.run([SQLITE_UTILS, "query", m.db,
                        "SELECT group_id, ip, port FROM chunkserver WHERE status = 2"],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr
    assert json.loads(r.stdout) == [{"group_id": 1, "ip": "10.0.0.2", "port": 8000}]
    r = subprocess.run([SQLITE_UTILS, "rows", m.db, "chunkserver", "--csv", "-c", "ip",
                        "-c", "status"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0 and r.stdout.split() == ["ip,status", "10.0.0.1,0",
                                                      "10.0.0.2,2"], r.stdout
    assert m.get("/v1/chunkmaster/route").status == 200  # the master is unharmed


def test_version_3_stores_the_reported_garbage(tmp_path):
    from speedy.wire.master import Report
    path = str(tmp_path / "v1.db")
    make_v1(path)
    db = mdb.connect(path)  # 1 -> 2 -> 3
    try:
        assert "garbage_bytes" in {r[1] for r in db.conn.execute(
            "PRAGMA table_info(chunkserver)")}
        assert mdb.get_server(db, 3, "10.0.0.1", 8000).garbage_bytes == 0
        assert "GarbageBytes" not in mdb.get_server(db, 3, "10.0.0.1", 8000).to_json()
        report = Report.from_json({"GroupId": 3, "Ip": "10.0.0.1", "Port": 8000,
                                   "GarbageBytes": 12345})
        mdb.record_report(db, report)
        cs = mdb.get_server(db, 3, "10.0.0.1", 8000)
        assert cs.garbage_bytes == 12345 and cs.to_json()["GarbageBytes"] == 12345
        assert report.to_json()["GarbageBytes"] == 12345
    finally:
        db.conn.close()
