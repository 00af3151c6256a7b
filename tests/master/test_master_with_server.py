"""A real spy_server.py reporting to a real spy_master.py: it appears in the route."""
from __future__ import annotations

import os

import pytest

from tests.support import wait_for
from tests.support import free_port


try:
    from tests.support.server import SPY_SERVER, ServerProc
except ImportError:  # the chunkserver's helpers are not there
    SPY_SERVER, ServerProc = "", None

pytestmark = pytest.mark.skipif(not SPY_SERVER or not os.path.exists(SPY_SERVER),
                                reason="spy_server.py is not available")

CHUNK = 4 << 20


def _in_route(master, port: int):
    servers = master.route().get("5", [])
    mine = [cs for cs in servers if cs["Port"] == port]
    return mine[0] if mine and mine[0]["Status"] == 1 else None


@pytest.mark.parametrize("token", ["", "tok"])
def test_a_real_chunkserver_appears_in_the_route(masters, tmp_path, token):
    m = masters(tmp_path, heartbeat_timeout=2.0, monitor_interval=0.2, token=token)
    port = free_port()
    m.register(5, "127.0.0.1", port)
    s = None
    try:
        s = _start_server_on(tmp_path, m, port, token)
        cs = wait_for(lambda: _in_route(m, port), timeout=20, what="the chunkserver RW")
        assert cs["Ip"] == "127.0.0.1" and cs["GroupId"] == 5
        assert cs["TotalChunks"] == 2
        assert 0 < cs["MaxFreeSpace"] <= cs["TotalFreeSpace"] <= 2 * CHUNK
        assert cs["DataDir"] == str(tmp_path / "data")
        s.kill9()
        wait_for(lambda: m.statuses()[(5, "127.0.0.1", port)] == 2, timeout=20,
                 what="RO after the chunkserver died")
    finally:
        if s is not None:
            s.discard()


def _start_server_on(tmp_path, master, port: int, token: str) -> "ServerProc":
    flags = {"master_port": master.port, "group_id": 5, "report_interval": 0.3,
             "chunks": 2, "chunk_size": CHUNK}
    if token:
        flags["token"] = token
    s = ServerProc(str(tmp_path / "data"), str(tmp_path / "server.log"), flags, port=port)
    try:
        s.start()
    except (RuntimeError, TimeoutError) as e:
        s.kill9()
        pytest.skip(f"spy_server.py does not start: {e}")
    return s
