"""--admin_allow with a host name: the name is resolved (issue 11, item 12)."""
from __future__ import annotations

from tests.support.server import running_server
from tests.support.sources import client_from
from speedy.chunkserver.conn import AdminPolicy
from speedy.wire.protocol import Err, Op


def test_policy_resolves_host_names():
    policy = AdminPolicy(["localhost", "10.1.0.0/16", "no-such-host.invalid"])
    assert policy.allows("127.0.0.1")
    assert policy.allows("::ffff:127.0.0.1")
    assert policy.allows("10.1.2.3")
    assert not policy.allows("127.0.0.2")
    assert not policy.allows("no-such-host.invalid")
    assert not policy.allows("garbage")


def test_server_admin_allow_localhost(tmp_path):
    with running_server(tmp_path, admin_allow="localhost") as srv:
        with srv.client() as c:
            assert c.call(Op.SET_STATUS, b"\x01") == (Err.SUCCESS, b"")
            assert c.call(Op.GET_STATUS) == (Err.SUCCESS, b"\x01")
            assert c.call(Op.SET_STATUS, b"\x00") == (Err.SUCCESS, b"")
        with client_from(srv.port, "127.0.0.2") as c:
            assert c.call(Op.SET_STATUS, b"\x01") == (Err.INTERNAL_ERROR, b"")
            assert c.call(Op.GET_STATUS) == (Err.SUCCESS, b"\x00")
