"""The speedy client library: put/get/delete/stat of blobs on a speedy cluster.

    from speedy.client import Client
    with Client("127.0.0.1:8099") as c:
        key = c.put(b"hello")            # "3,10452" (or "3,10452m" for a multi-part file)
        assert c.get(key) == b"hello"

Plain threads and sockets: importing it patches nothing (no gevent).
"""
from speedy.client.client import *  # noqa: F401,F403
from speedy.client.client import __all__  # noqa: F401
