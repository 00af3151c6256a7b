"""Prometheus exposition: both daemons' families checked by a strict parser, the HTTP thread."""
from __future__ import annotations

import http.client
import math
import re
import threading

import pytest

from prometheus_client import generate_latest

from speedy import __version__
from speedy.chunkserver import metrics as cm
from speedy.common import metrics as m
from speedy.wire.protocol import Err, Op

SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$")
NAME = re.compile(r"^[a-zA-Z_:][a-zA-Z0-9_:]*$")
LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")


def parse_labels(text: str) -> dict[str, str]:
    """Parse name="value",... with the 0.0.4 escapes; raises on anything else."""
    labels: dict[str, str] = {}
    i = 0
    while i < len(text):
        mt = LABEL_NAME.match(text, i)
        assert mt, f"bad label name at {text[i:]!r}"
        name = mt.group(0)
        i = mt.end()
        assert text[i:i + 2] == '="', f"expected =\" after {name} in {text!r}"
        i += 2
        value = []
        while True:
            assert i < len(text), f"unterminated value in {text!r}"
            c = text[i]
            if c == "\\":
                nxt = text[i + 1]
                assert nxt in '\\"n', f"bad escape \\{nxt}"
                value.append({"\\": "\\", '"': '"', "n": "\n"}[nxt])
                i += 2
            elif c == '"':
                i += 1
                break
            else:
                assert c != "\n"
                value.append(c)
                i += 1
        assert name not in labels, f"label {name} twice"
        labels[name] = "".join(value)
        if i < len(text):
            assert text[i] == ",", f"expected , at {text[i:]!r}"
            i += 1
    return labels


def parse_value(text: str) -> float:
    """A sample value; only the spellings Prometheus accepts."""
    if text in ("+Inf", "-Inf", "NaN"):
        return float(text.replace("+", ""))
    assert re.match(r"^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$", text), text
    return float(text)


def parse_exposition(body: bytes) -> dict[str, dict]:
    """Strictly parse text format 0.0.4 into {family: {type, help, samples: [...]}}."""
    text = body.decode("utf-8")
    assert text.endswith("\n")
    families: dict[str, dict] = {}
    current = None
    for line in text[:-1].split("\n"):
        if line.startswith("# HELP "):
            name, _, help_text = line[7:].partition(" ")
            assert NAME.match(name) and name not in families, line
            assert "\\" not in help_text.replace("\\\\", "").replace("\\n", "")
            current = families[name] = {"help": help_text, "type": None, "samples": []}
            current["name"] = name
        elif line.startswith("# TYPE "):
            name, kind = line[7:].split(" ")
            assert current and current["name"] == name and current["type"] is None, line
            assert not current["samples"]
            assert kind in ("counter", "gauge", "histogram", "summary", "untyped")
            current["type"] = kind
        else:
            assert not line.startswith("#"), line
            mt = SAMPLE.match(line)
            assert mt, f"bad sample line {line!r}"
            name, labels, value = mt.group(1), parse_labels(mt.group(2) or ""), \
                parse_value(mt.group(3))
            assert current and current["type"], line
            fam = current["name"]
            allowed = {fam} if current["type"] != "histogram" else \
                {fam + "_bucket", fam + "_sum", fam + "_count"}
            assert name in allowed, f"{name} inside family {fam}"
            if current["type"] == "counter":
                assert fam.endswith("_total") and value >= 0
            current["samples"].append((name, labels, value))
    for fam in families.values():
        if fam["type"] == "histogram":
            check_histogram(fam)
    return families


def check_histogram(fam: dict) -> None:
    """Cumulative buckets, ending in +Inf equal to _count, per label set."""
    series: dict[tuple, dict] = {}
    for name, labels, value in fam["samples"]:
        key = tuple(sorted((k, v) for k, v in labels.items() if k != "le"))
        s = series.setdefault(key, {"buckets": [], "sum": None, "count": None})
        if name.endswith("_bucket"):
            s["buckets"].append((parse_value(labels["le"]), value))
        elif name.endswith("_sum"):
            s["sum"] = value
        else:
            s["count"] = value
    for key, s in series.items():
        bounds = [b for b, _ in s["buckets"]]
        counts = [c for _, c in s["buckets"]]
        assert bounds == sorted(bounds) and math.isinf(bounds[-1]), key
        assert counts == sorted(counts), f"not cumulative: {key}"
        assert counts[-1] == s["count"] and s["sum"] is not None, key


def value_of(fams: dict, family: str, sample: str | None = None, **labels) -> float:
    """The value of the one sample of family with exactly these labels."""
    hits = [v for n, lab, v in fams[family]["samples"]
            if n == (sample or family) and lab == {k: str(x) for k, x in labels.items()}]
    assert len(hits) == 1, (family, labels, fams[family]["samples"])
    return hits[0]








def test_bucket_index_is_inclusive():
    """le is inclusive: 0.0005 s counts in the 0.0005 bucket; above them all is the last."""
    idx = [m.bucket_index(m.LATENCY_BUCKETS, s) for s in (0.0001, 0.0005, 0.0007, 0.3, 99.0)]
    assert idx == [0, 0, 1, 9, len(m.LATENCY_BUCKETS)]


def chunkserver_totals() -> dict:
    """A totals dict as the supervisor would sum it from its processes."""
    n = len(m.LATENCY_BUCKETS) + 1
    lat_write = [0] * n
    lat_write[3] = 4
    lat_write[-1] = 1
    return {
        "requests": {Op.WRITE: 5, int(Op.READ): 7, "PING": 2, 99: 1, 200: 2},
        "errors": {(Op.READ, Err.FILE_NOT_FOUND): 2, (0, 4): 1, (99, 7): 1, (98, 7): 2},
        "read_bytes": 7000, "write_bytes": 2**40,
        "latency": {Op.WRITE: {"counts": lat_write, "sum": 12.01},
                    Op.READ: {"counts": [7] + [0] * (n - 1), "sum": 0.0021}},
        "pool_blocks_in_use": 3, "pool_blocks_total": 16, "pending_writes": 1,
        "reads_in_flight": 2, "writes_in_flight": 1,
        "chunk_free_bytes": {"chunk_2_1": 1000, "chunk_1_1": 5},
        "files": 12, "recovery_seconds": 0.25, "connections": 4, "workers": 2, "read_only": 0,
    }


def chunkserver_exposition(totals: dict) -> bytes:
    """The chunkserver's registry (prometheus_client) over fixed totals, rendered as served."""
    return generate_latest(cm.registry(lambda: totals))


def test_chunkserver_families():
    fams = parse_exposition(chunkserver_exposition(chunkserver_totals()))
    assert {"process_cpu_seconds_total", "process_resident_memory_bytes"} <= set(fams)
    fams = {name: fam for name, fam in fams.items() if name.startswith("speedy_")}
    assert set(fams) == {*README_NAMES, "speedy_build_info", "speedy_requests_in_flight"}
    assert value_of(fams, "speedy_build_info", version=__version__) == 1
    assert value_of(fams, "speedy_requests_total", op="write") == 5
    assert value_of(fams, "speedy_requests_total", op="read") == 7
    assert value_of(fams, "speedy_requests_total", op="ping") == 2
    assert value_of(fams, "speedy_requests_total", op="unknown") == 3  # bounded labels
    assert value_of(fams, "speedy_request_errors_total", op="read", code="file_not_found") == 2
    assert value_of(fams, "speedy_request_errors_total", op="write", code="file_exists") == 1
    assert value_of(fams, "speedy_request_errors_total", op="unknown", code="internal_error") == 3
    assert value_of(fams, "speedy_read_bytes_total") == 7000
    assert value_of(fams, "speedy_write_bytes_total") == 2**40
    lat = "speedy_request_duration_seconds"
    assert fams[lat]["type"] == "histogram"
    assert value_of(fams, lat, lat + "_count", op="write") == 5
    assert value_of(fams, lat, lat + "_bucket", op="write", le="0.005") == 4
    assert value_of(fams, lat, lat + "_bucket", op="write", le="10.0") == 4
    assert value_of(fams, lat, lat + "_sum", op="read") == pytest.approx(0.0021)
    assert value_of(fams, "speedy_pool_blocks_in_use") == 3
    assert value_of(fams, "speedy_pool_blocks") == 16
    assert value_of(fams, "speedy_pending_writes") == 1
    assert value_of(fams, "speedy_requests_in_flight", kind="read") == 2
    assert value_of(fams, "speedy_chunk_free_bytes", chunk="chunk_1_1") == 5
    assert value_of(fams, "speedy_files") == 12
    assert value_of(fams, "speedy_recovery_seconds") == 0.25
    assert value_of(fams, "speedy_connections") == 4
    assert value_of(fams, "speedy_workers") == 2
    assert value_of(fams, "speedy_read_only") == 0
    for fam in fams.values():  # no per-fid labels anywhere
        for _, labels, _ in fam["samples"]:
            assert "fid" not in labels


README_NAMES = {  # the chunkserver's metrics as the README lists them (test_readme.py)
    "speedy_requests_total", "speedy_request_errors_total", "speedy_read_bytes_total",
    "speedy_write_bytes_total", "speedy_request_duration_seconds", "speedy_pool_blocks_in_use",
    "speedy_pool_blocks", "speedy_pending_writes", "speedy_files", "speedy_chunk_free_bytes",
    "speedy_recovery_seconds", "speedy_connections", "speedy_workers", "speedy_read_only"}


def test_chunkserver_families_missing_keys_and_bad_histogram():
    fams = parse_exposition(chunkserver_exposition({"files": 0}))
    assert {n for n in fams if n.startswith("speedy_")} == {"speedy_build_info", "speedy_files"}
    with pytest.raises(ValueError):
        cm.families({"latency": {0: {"counts": [1, 2], "sum": 1.0}}})








def get(port: int, path: str, method: str = "GET") -> tuple[int, dict, bytes]:
    """One HTTP request to 127.0.0.1:port."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path)
        r = conn.getresponse()
        return r.status, dict(r.getheaders()), r.read()
    finally:
        conn.close()


@pytest.fixture
def served():
    """The chunkserver's metrics server on a free port, over totals the test moves."""
    state = {"files": 0, "fail": False}
    calls = []

    def totals():
        calls.append(threading.current_thread().name)
        if state["fail"]:
            raise RuntimeError("stats segment unreadable")
        return {"files": state["files"]}

    server = cm.serve_metrics("127.0.0.1", 0, totals)
    yield server.server_address[1], state, calls
    server.shutdown()
    server.server_close()


def test_serve_metrics_real_get(served):
    port, state, calls = served
    status, headers, body = get(port, "/metrics")
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain; version=")
    assert value_of(parse_exposition(body), "speedy_files") == 0
    state["files"] = 41
    status, _, body = get(port, "/metrics?x=1")
    assert status == 200 and value_of(parse_exposition(body), "speedy_files") == 41
    assert calls and all(name != threading.main_thread().name for name in calls)


def test_serve_metrics_errors(served, caplog):
    port, state, _ = served
    status, headers, _ = get(port, "/metrics", "POST")
    assert status == 405 and "GET" in headers["Allow"]
    state["fail"] = True  # the server's figures are missing, its process_* figures are not
    status, _, body = get(port, "/metrics")
    fams = parse_exposition(body)
    assert status == 200 and "speedy_files" not in fams and "process_max_fds" in fams
    assert "metrics collection failed: stats segment unreadable" in caplog.text
    state["fail"] = False  # the server survived the failing collector
    assert value_of(parse_exposition(get(port, "/metrics")[2]), "speedy_files") == 0


def test_serve_metrics_port_in_use(served):
    port = served[0]
    with pytest.raises(OSError):
        cm.serve_metrics("127.0.0.1", port, dict)
