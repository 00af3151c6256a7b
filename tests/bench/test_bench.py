"""Smoke tests of `speedy bench` and its sink: every phase and figure, zero errors.

Never asserts on speed: the machine is shared.
"""
from __future__ import annotations

import json
import os
import re
import signal
import subprocess

import pytest

from tests.support import PYTHON, ROOT, free_port
from tests.support.daemon import exited, listening, spawn, stop_session, wait_ready
from speedy.bench.runner import parse_size, size_label
from speedy.bench.load import percentile

ENV = dict(os.environ, PYTHONPATH=ROOT)
SMALL = ["-n", "300", "-c", "4", "--procs", "2", "--disk-size", "8m"]
FIGURES = re.compile(r"^(SINK )?(PUT|GET) (\S+) c=(\d+): ([\d,]+) ops/s ([\d,.]+) MB/s "
                     r"p50 ([\d.]+) ms p99 ([\d.]+) ms errors (\d+)")


def bench(*args: str, cwd: str, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run `python -m speedy.bench.runner args` and capture its output."""
    return subprocess.run([PYTHON, "-m", "speedy.bench.runner", *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=timeout)


@pytest.fixture
def sink_4k(tmp_path_factory):
    """A `python -m speedy.bench.sink` answering 4 KiB READs; its port."""
    port = free_port()
    out = str(tmp_path_factory.mktemp("sink") / "sink.out")
    proc = spawn([PYTHON, "-m", "speedy.bench.sink", f"--port={port}", "--size=4k"], out,
                 cwd=ROOT, env=ENV)
    try:
        wait_ready(lambda: listening(port), 20, "the sink", exited(proc, "the sink", out))
        yield port
    finally:
        stop_session(proc, signal.SIGTERM)


def figures(stdout: str) -> dict[str, tuple]:
    """{'PUT': (...), 'SINK GET': (...)} from the text report."""
    found = {}
    for line in stdout.splitlines():
        m = FIGURES.match(line.strip())
        if m:
            found[(m.group(1) or "") + m.group(2)] = m.groups()
    return found


def check_report(stdout: str, size: str, conns: str, baseline: bool = True) -> None:
    """Every phase with every figure, no errors, ratios to the baseline."""
    got = figures(stdout)
    want = {"PUT", "GET"} | ({"SINK PUT", "SINK GET"} if baseline else set())
    assert set(got) == want, stdout
    for name, (_s, _op, label, c, ops, mbs, p50, p99, errors) in got.items():
        assert (label, c, errors) == (size, conns, "0"), (name, stdout)
        assert float(ops.replace(",", "")) > 0 and float(mbs.replace(",", "")) > 0, stdout
        assert 0 < float(p50) <= float(p99), stdout
    if baseline:
        assert re.search(r"^PUT .*\(\d+\.\d\dx sink, \d+\.\d\dx disk MB/s\)$", stdout, re.M)
        assert re.search(r"^GET .*\(\d+\.\d\dx sink\)$", stdout, re.M)
        assert re.search(r"DISK sequential write 8MiB \+ fsync .*: [\d,.]+ MB/s", stdout)
    cpu = re.findall(r"^ +CPU per request: load generator [\d,]+ us(, server [\d,]+ us)?$",
                     stdout, re.M)
    assert len(cpu) == len(want), stdout
    if baseline:  # the sink's processes are always measured
        assert all(c for c in cpu[-2:]), stdout


def test_parse_size_and_labels():
    assert [parse_size(t) for t in ("4096", "4k", "64KiB", "1m", "1MB", "2g")] == \
        [4096, 4096, 65536, 1 << 20, 1 << 20, 2 << 30]
    for bad in ("", "x", "4t", "-1", "1.5m", "8g"):
        with pytest.raises(Exception):
            parse_size(bad)
    assert [size_label(n) for n in (4096, 1 << 20, 1000, 0)] == ["4KiB", "1MiB", "1000B", "0B"]
    assert percentile([1.0, 2.0, 3.0, 4.0], 50) == 2.0
    assert percentile(list(range(1, 101)), 99) == 99
    assert percentile([], 99) == 0.0


def test_bench_against_sink(sink_4k, tmp_path):
    r = bench("--server", f"127.0.0.1:{sink_4k}", "--size", "4k", *SMALL,
              "--disk-dir", str(tmp_path), cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    check_report(r.stdout, "4KiB", "4")
    assert os.listdir(tmp_path) == []  # the disk probe file is gone


def test_bench_json(sink_4k, tmp_path):
    """The --json report: both phases for the target and the sink, ratios, disk."""
    r = bench("--server", f"127.0.0.1:{sink_4k}", "--size", "4k", "-n", "50", "-c", "3",
              "--json", "--disk-size", "8m", "--disk-dir", str(tmp_path), cwd=str(tmp_path))
    assert r.returncode == 0, r.stderr
    report = json.loads(r.stdout)
    assert [p["name"] for p in report["results"]] == ["PUT", "GET"]
    assert [p["name"] for p in report["sink_results"]] == ["PUT", "GET"]
    for p in report["results"] + report["sink_results"]:
        assert p["errors"] == 0 and p["ops"] == 50 and p["conns"] == 3
        assert p["ops_per_s"] > 0 and p["mb_per_s"] > 0 and p["p99_ms"] >= p["p50_ms"] > 0
    assert set(report["ratios"]) == {"PUT", "GET"} and report["disk_mb_per_s"] > 0


def test_bench_counts_wrong_answers(sink_4k, tmp_path):
    """A GET answered with the wrong size is an error, and the exit code says so."""
    r = bench("--server", f"127.0.0.1:{sink_4k}", "--size", "1m", "-n", "20", "-c", "2",
              "--no-baseline", cwd=str(tmp_path))
    assert r.returncode == 3, r.stdout + r.stderr
    got = figures(r.stdout)
    assert got["PUT"][-1] == "0" and got["GET"][-1] == "20", r.stdout
    assert "wrong size: 20" in r.stdout


def test_bench_bad_input(tmp_path):
    port = free_port()
    r = bench("--server", f"127.0.0.1:{port}", "-n", "5", cwd=str(tmp_path))
    assert r.returncode == 3 and r.stdout == ""
    assert r.stderr.strip().count("\n") == 0 and "cannot reach" in r.stderr
    for args in (["--server", "nohostport"], ["--server", "h:1", "--size", "4t"], []):
        r = bench(*args, cwd=str(tmp_path))
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert r.stderr.strip().count("\n") == 0, r.stderr


def test_bench_start_server(tmp_path):
    """The whole run against a temporary real spy_server.py, cleaned up afterwards; the
    server gets only the flags given (the rest are its defaults, printed), and a --mixed
    phase reports the small PUTs under large ones."""
    if not os.path.exists(os.path.join(ROOT, "spy_server.py")):
        pytest.skip("spy_server.py does not exist yet")
    r = bench("--start-server", "--workers", "1", "--size", "4k", *SMALL, "--chunks", "2",
              "--chunk-size", "16m", "--mixed", "64k", "--mixed-c", "2",
              "--disk-dir", str(tmp_path), cwd=str(tmp_path), timeout=150)
    if r.returncode == 3 and "spy_server.py" in r.stderr and not r.stdout:
        pytest.skip(f"spy_server.py does not start: {r.stderr[-500:]}")
    assert r.returncode == 0, r.stdout + r.stderr
    check_report(r.stdout, "4KiB", "4")
    server = re.search(r"^server: (.*)$", r.stdout, re.M).group(1)
    assert "--chunks=2 " in server + " " and "--workers=1" in server
    assert "--mem_blocks" not in server and "--sync" not in server
    assert re.search(r"^server flags: chunks=2 \(given\), chunk_size=16MiB \(given\), "
                     r"mem_blocks=\d+ \(default\), workers=1 \(given\), sync=0 \(default\)$",
                     r.stdout, re.M), r.stdout
    assert re.search(r"^mixed: PUT 4KiB c=4 while PUT 64KiB c=2 run:$", r.stdout, re.M)
    small, big = re.findall(r"^  MIXED PUT (\S+) c=(\d+): ([\d,]+) ops/s .* errors (\d+)",
                            r.stdout, re.M)
    assert small[:2] == ("4KiB", "4") and small[3] == "0", r.stdout
    assert big[:2] == ("64KiB", "2") and big[3] == "0" and big[2] != "0", r.stdout
    assert len(re.findall(r"CPU per request: .*, server \d+", r.stdout)) == 5, r.stdout
    assert os.listdir(tmp_path) == []  # data dir and disk probe removed


def test_bench_start_server_needs_room(tmp_path):
    """Chunks that would not fit on the disk: a one-line error before anything starts."""
    r = bench("--start-server", "--chunks", "200", "--chunk-size", "4000m", *SMALL,
              "--disk-dir", str(tmp_path), cwd=str(tmp_path))
    assert r.returncode == 3 and r.stdout == "", r.stdout + r.stderr
    assert "do not fit" in r.stderr and r.stderr.strip().count("\n") == 0, r.stderr
    assert os.listdir(tmp_path) == []


def test_bench_through_speedy_command_and_master(tmp_path):
    """`python -m speedy bench --master` against a one-server local cluster."""
    for _ in range(5):   # the gateway's port is below the base port: it may be taken
        local = [PYTHON, "-m", "speedy", "local", "--dir", str(tmp_path / "local"),
                 "--base-port", str(free_port()), "--servers", "1", "--chunks", "2",
                 "--chunk-size", str(4 << 20), "--mem-blocks", "16"]
        up = subprocess.run(local + ["up"], cwd=str(tmp_path), env=ENV, capture_output=True,
                            text=True, timeout=90)
        if "already in use" not in up.stderr:
            break
    try:
        if up.returncode != 0:
            pytest.skip(f"no local cluster: {up.stderr[-500:]}")
        master = re.search(r"--master (\S+:\d+)", up.stdout)
        assert master, up.stdout
        r = subprocess.run([PYTHON, "-m", "speedy", "bench", "--master", master.group(1),
                            "--min-replicas", "1", "--size", "4k", *SMALL, "--disk-dir",
                            str(tmp_path)], cwd=str(tmp_path), env=ENV, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        assert "(speedy.client)" in r.stdout
        check_report(r.stdout, "4KiB", "4")
        # the gateway against the client library, GET phases alternated in 3 rounds
        gateway = re.search(r"http://(\S+:\d+)/blobs", up.stdout)
        assert gateway, up.stdout
        r = subprocess.run([PYTHON, "-m", "speedy", "bench", "--gateway", gateway.group(1),
                            "--client-baseline", master.group(1), "--min-replicas", "1",
                            "--rounds", "3", "--size", "4k", *SMALL, "--no-baseline",
                            "--json"], cwd=str(tmp_path), env=ENV, capture_output=True,
                           text=True, timeout=120)
        assert r.returncode == 0, r.stdout + r.stderr
        report = json.loads(r.stdout)
        rounds = report["rounds"]
        assert len(rounds) == 3 and all(x["get"]["errors"] == 0 and x["client_get"]["errors"]
                                        == 0 and x["get"]["ops"] > 0 for x in rounds)
        ratios = sorted(x["get"]["ops_per_s"] / x["client_get"]["ops_per_s"] for x in rounds)
        assert report["get_ratio_median"] == round(ratios[1], 3)
        # the reported GET is the median round's
        assert report["results"][1]["ops_per_s"] == sorted(
            x["get"]["ops_per_s"] for x in rounds)[1]
    finally:
        subprocess.run(local + ["down"], cwd=str(tmp_path), env=ENV, capture_output=True,
                       timeout=90)
