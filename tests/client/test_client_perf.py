"""Figures for the README (marker `slow`): put/get throughput and repair speed.

    python -m pytest -m slow -s tests/test_client_perf.py
"""
from __future__ import annotations

import io
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.support.cluster import Cluster
from speedy.client import repair

pytestmark = pytest.mark.slow


def test_measure_throughput_and_repair(tmp_path):
    n, size = 3000, 10 << 10
    with Cluster(tmp_path, groups=1, per_group=3, chunks=4, chunk_size=64 << 20,
                 mem_blocks=64) as c, c.client() as cl:
        big = os.urandom(100_000_000)
        t = time.monotonic()
        key = cl.put(big)
        t_put = time.monotonic() - t
        out = io.BytesIO()
        t = time.monotonic()
        cl.get_to(key, out)
        t_get = time.monotonic() - t
        assert out.getvalue() == big
        print(f"\nput 100 MB in parts: {t_put:.2f} s ({100 / t_put:.0f} MB/s); "
              f"get: {t_get:.2f} s ({100 / t_get:.0f} MB/s)")
        payload = os.urandom(size)
        t = time.monotonic()
        with ThreadPoolExecutor(8) as ex:
            keys = list(ex.map(lambda _i: cl.put(payload), range(n)))
        dt = time.monotonic() - t
        print(f"{n} puts of {size} B from 8 threads: {dt:.2f} s ({n / dt:.0f} puts/s)")
        victim = c.group(1)[2]
        c.kill(victim)
        data = os.path.join(c.root, victim.name, "data")
        shutil.rmtree(data)
        os.makedirs(data)
        c.restart(victim)
        servers = cl.master.group_info(1)
        t = time.monotonic()
        invs = [repair.take_inventory(cl.pool, s, 1) for s in servers]
        dt = time.monotonic() - t
        print(f"inventory of 3 servers by DUMP_CHUNK: {dt:.2f} s, "
              f"{sum(i.bytes_read for i in invs)} bytes")
        rep = repair.repair_group(cl.pool, servers, 1, out=io.StringIO())
        assert not rep.failed and rep.copied == n + len(cl.stat(key).part_keys) + 1
        print(f"repair of a wiped replica: {rep.copied} files in {rep.seconds:.2f} s "
              f"({rep.copied / rep.seconds:.0f} files/s)")
        assert cl.get(keys[-1]) == payload
