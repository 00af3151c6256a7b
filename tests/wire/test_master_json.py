"""speedy.wire.master: the master's JSON shapes, round trips and one-line refusals."""
from __future__ import annotations

import pytest

from speedy.wire import master as wm


def test_report_round_trips_in_the_originals_field_order():
    r = wm.Report(1, "10.0.0.5", 8000, status=wm.REPORT_RO, total_free_space=42949672960,
                  max_free_space=2147483593, data_dir="/data/speedy", total_chunks=20,
                  conn_count=3)
    obj = r.to_json()
    assert list(obj) == ["GroupId", "Ip", "Port", "Status", "TotalFreeSpace", "MaxFreeSpace",
                         "PendingWrites", "WritingCount", "ReadingCount", "DataDir",
                         "TotalChunks", "ConnectionsCount"]  # PROTOCOL.md's example
    assert wm.Report.from_json(obj) == r and r.read_only
    assert wm.Report.from_json({"GroupId": 1, "Ip": "h.example", "Port": 1}) == \
        wm.Report(1, "h.example", 1)  # zero-valued fields may be left out


@pytest.mark.parametrize("obj,why", [
    ([], "must be a JSON object"), ({"Ip": "a", "Port": 1}, "missing field GroupId"),
    ({"GroupId": 0, "Ip": "a", "Port": 1}, "out of range"),
    ({"GroupId": True, "Ip": "a", "Port": 1}, "must be an integer"),
    ({"GroupId": 1, "Ip": "1.2.3", "Port": 1}, "not an address"),
    ({"GroupId": 1, "Ip": "a", "Port": 1, "Status": 2}, "Status"),
    ({"GroupId": 1, "Ip": "a", "Port": 1, "DataDir": 5}, "DataDir"),
])
def test_bad_reports_are_refused_with_one_line(obj, why):
    with pytest.raises(wm.FieldError) as e:
        wm.Report.from_json(obj)
    assert why in str(e.value) and "\n" not in str(e.value)


def test_server_status_round_trips_and_pending_deletes_is_an_extension():
    s = wm.ServerStatus(2, "10.0.0.1", 8000, wm.Status.RW, total_free_space=9)
    obj = s.to_json()
    assert "PendingDeletes" not in obj and obj["Status"] == 1
    assert wm.ServerStatus.from_json(obj) == s
    s.pending_deletes = 4
    assert wm.ServerStatus.from_json(s.to_json()).pending_deletes == 4
    with pytest.raises(wm.FieldError):
        wm.ServerStatus.from_json({"Ip": "a", "Port": 1, "Status": "RW"})


def test_small_shapes():
    assert wm.FidRange.from_json({"FidBegin": 1, "FidEnd": 101}) == wm.FidRange(1, 101)
    with pytest.raises(wm.FieldError):
        wm.FidRange.from_json({"FidBegin": 5, "FidEnd": 5})
    ch = wm.StatusChange("10.0.0.1", 8000, wm.Status.ERR)
    assert ch.to_json() == {"Ip": "10.0.0.1", "Port": 8000, "Status": 3}
    assert wm.StatusChange.from_json(ch.to_json()) == ch
    p = wm.PendingDelete(1, "10.0.0.1", 8000, 2 ** 63 - 1)
    assert wm.PendingDelete.from_json(p.to_json()) == p
    assert wm.groupinfo_path(7) == "/v1/chunkserver/7/groupinfo"
    assert wm.GROUPINFO_PATTERN.match(wm.groupinfo_path(7)).group(1) == "7"
