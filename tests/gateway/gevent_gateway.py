"""A gevent WSGI server for GatewayApp in its own process, as the gateway daemon's workers run it.

    python -m tests.gateway.gevent_gateway MASTER METADB PORT PART_SIZE

Stand-in for `speedy gateway` until branch gateway lands (then tests start the daemon).
"""
from gevent import monkey

monkey.patch_all()

import socket  # noqa: E402
import sys  # noqa: E402

from gevent.pywsgi import WSGIHandler, WSGIServer  # noqa: E402

from speedy.client import Client  # noqa: E402
from speedy.gateway.app import GatewayApp  # noqa: E402
from speedy.gateway.meta import open_meta  # noqa: E402


class NoDelayHandler(WSGIHandler):
    """TCP_NODELAY on every connection, as the daemon (no 40 ms delayed-ACK stalls)."""

    def __init__(self, sock, *args, **kw):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        super().__init__(sock, *args, **kw)


def main() -> None:
    master, metadb, port, part = sys.argv[1:5]
    app = GatewayApp(Client(master, part_size=int(part)), open_meta(metadb))
    WSGIServer(("127.0.0.1", int(port)), app, log=None,
               handler_class=NoDelayHandler).serve_forever()


if __name__ == "__main__":
    main()
