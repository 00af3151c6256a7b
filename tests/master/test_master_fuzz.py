"""Fuzz of the master's JSON handling (hypothesis), through the real WSGI app and database.

The default run is short; SPEEDY_FUZZ_EXAMPLES=N makes it longer (a measured run).
"""
from __future__ import annotations

import io
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from speedy.master import db as mdb
from speedy.master.app import MasterApp

EXAMPLES = int(os.environ.get("SPEEDY_FUZZ_EXAMPLES", "300"))
POST_ROUTES = ["/v1/chunkserver/initserver", "/v1/chunkserver/batchinitserver",
               "/v1/chunkserver/reportinfo", "/v1/chunkserver/setstatus",
               "/v1/chunkserver/removeserver", "/v1/chunkserver/reloadinfo"]
FIELDS = ["GroupId", "Ip", "Port", "Status", "GlobalStatus", "TotalFreeSpace",
          "MaxFreeSpace", "PendingWrites", "WritingCount", "ReadingCount", "TotalChunks",
          "ConnectionsCount", "DataDir"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(min_value=-2, max_value=70000),
    st.integers(), st.floats(allow_nan=False), st.text(max_size=20),
    st.sampled_from(["127.0.0.1", "10.0.0.1", "::1", "host-a.example", "1.2.3.999", ""]))
values = st.recursive(scalars, lambda inner: st.one_of(
    st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=8), inner, max_size=4)),
    max_leaves=12)
server_objects = st.dictionaries(st.sampled_from(FIELDS), values, max_size=len(FIELDS))
bodies = st.one_of(
    server_objects.map(lambda o: json.dumps(o).encode()),
    st.lists(server_objects, max_size=4).map(lambda o: json.dumps(o).encode()),
    values.map(lambda o: json.dumps(o).encode()),
    st.binary(max_size=200))


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    db = mdb.connect(str(tmp_path_factory.mktemp("fuzz") / "m.db"))
    mdb.add_server(db, 1, "127.0.0.1", 8000)
    yield MasterApp(db, heartbeat_timeout=30, monitor_interval=5)
    db.conn.close()


def call(app: MasterApp, method: str, path: str, body: bytes = b"") -> tuple[int, bytes]:
    """Run one request through the WSGI app."""
    got = {}

    def start_response(status, headers):
        got["status"] = int(status.split()[0])
        got["headers"] = dict(headers)

    environ = {"REQUEST_METHOD": method, "PATH_INFO": path, "CONTENT_LENGTH": str(len(body)),
               "wsgi.input": io.BytesIO(body), "REMOTE_ADDR": "127.0.0.1"}
    out = b"".join(app(environ, start_response))
    return got["status"], out


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(path=st.sampled_from(POST_ROUTES), body=bodies)
def test_post_routes_answer_200_or_a_4xx_never_500(app, path, body):
    status, out = call(app, "POST", path, body)
    assert status in (200, 400, 404), (status, out)
    if status != 200:
        assert out.strip() and len(out) < 400
    assert call(app, "GET", "/v1/chunkmaster/route")[0] == 200


@settings(max_examples=EXAMPLES, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.text(max_size=40).map(lambda t: "/" + t),
       method=st.sampled_from(["GET", "POST", "HEAD", "PUT", "DELETE", "OPTIONS", "X"]))
def test_any_path_and_method_is_answered_without_500(app, path, method):
    status, _ = call(app, method, path, b"")
    assert status in (200, 400, 404, 405)


def test_every_200_left_a_consistent_database(app):
    assert app.counts.requests.get(("other", 500), 0) == 0
    assert not [k for k in app.counts.requests if k[1] == 500]
    for cs in mdb.list_servers(app.db):
        assert 1 <= cs.group_id <= 65535 and 1 <= cs.port <= 65535
        assert cs.status in (0, 1, 2, 3)
