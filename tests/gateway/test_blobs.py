"""The blob routes over real HTTP: a real master, chunkservers and gateway processes."""
from __future__ import annotations

import json
import shutil
import subprocess
import uuid

import pytest

from speedy.wire.protocol import Err
from tests.support.cluster import blob, cluster_fixture
from tests.support.gateway import gateway_fixture

cluster = cluster_fixture(groups=1, per_group=2, chunks=4, chunk_size=32 << 20,
                          mem_blocks=32)
gateway = gateway_fixture(workers=2)
PNG = b"\x89PNG\r\n\x1a\n" + blob(3000, seed=7)
CURL = shutil.which("curl")


def upload(gw, body: bytes, ctype: str | None = "application/octet-stream") -> dict:
    status, headers, data = gw.request("POST", "/blobs", body,
                                       {"Content-Type": ctype} if ctype else {})
    assert status == 201, data
    obj = json.loads(data)
    assert headers["location"] == "/" + obj["key"]
    assert headers["etag"] == f'"{obj["etag"]}"'
    return obj


def test_upload_get_head_delete_round_trip(gateway, cluster):
    body = blob(50_000, seed=1)
    obj = upload(gateway, body, "image/jpeg")
    assert obj["size"] == len(body) and len(obj["etag"]) == 32
    status, h, data = gateway.request("GET", "/" + obj["key"])
    assert status == 200 and data == body
    assert h["content-type"] == "image/jpeg" and h["content-length"] == str(len(body))
    assert h["etag"] == f'"{obj["etag"]}"' and h["accept-ranges"] == "bytes"
    assert h["cache-control"] == "public, max-age=31536000, immutable"
    assert h["last-modified"].endswith(" GMT")
    r = cluster.cli("get", obj["key"])  # the stored bytes are exactly the upload
    assert r.returncode == 0 and r.stdout == body
    status, hh, data = gateway.request("HEAD", "/" + obj["key"])
    assert status == 200 and data == b"" and hh["content-length"] == str(len(body))
    assert hh["etag"] == h["etag"] and hh["content-type"] == "image/jpeg"
    assert gateway.request("DELETE", "/" + obj["key"])[0] == 204
    status, _, data = gateway.request("GET", "/" + obj["key"])
    assert status == 404 and data == f"{obj['key']} not found\n".encode()
    assert gateway.request("DELETE", "/" + obj["key"])[0] == 404
    g, fid = map(int, obj["key"].split(","))
    for d in cluster.servers:  # gone from every replica
        assert cluster.read_direct(d, g, fid).err == Err.FILE_NOT_FOUND


def test_large_upload_is_stored_in_parts_and_ranges_span_them(gateway, cluster):
    body = blob(9 << 20, seed=2)
    obj = upload(gateway, body, "video/mp4")
    assert obj["key"].endswith("m")
    status, h, data = gateway.request("GET", "/" + obj["key"])
    assert status == 200 and data == body and h["content-type"] == "video/mp4"
    lo, hi = (4 << 20) - 10, (8 << 20) + 10  # crosses two part boundaries
    status, h, data = gateway.request("GET", "/" + obj["key"],
                                      headers={"Range": f"bytes={lo}-{hi}"})
    assert status == 206 and data == body[lo:hi + 1]
    assert h["content-range"] == f"bytes {lo}-{hi}/{len(body)}"
    assert cluster.cli("get", obj["key"]).stdout == body
    assert gateway.request("DELETE", "/" + obj["key"])[0] == 204
    assert gateway.request("GET", "/" + obj["key"])[0] == 404


@pytest.mark.parametrize("spec,want", [
    ("bytes=0-9", (0, 10)), ("bytes=10-", (10, 3008)), ("bytes=-5", (3003, 3008)),
    ("bytes=3000-99999", (3000, 3008)), ("bytes=-99999", (0, 3008))])
def test_single_ranges(gateway, spec, want):
    key = upload(gateway, PNG, "image/png")["key"]
    status, h, data = gateway.request("GET", "/" + key, headers={"Range": spec})
    assert status == 206 and data == PNG[want[0]:want[1]]
    assert h["content-range"] == f"bytes {want[0]}-{want[1] - 1}/{len(PNG)}"


def test_unsatisfiable_malformed_and_multiple_ranges(gateway):
    key = upload(gateway, PNG)["key"]
    status, h, data = gateway.request("GET", "/" + key, headers={"Range": "bytes=3008-"})
    assert status == 416 and h["content-range"] == f"bytes */{len(PNG)}"
    assert data.count(b"\n") == 1
    for bad in ("bytes=x-3", "bytes=5-2", "bytes=-", "bytes=1-2-3"):
        status, _, data = gateway.request("GET", "/" + key, headers={"Range": bad})
        assert status == 400 and b"Range" in data, bad
    status, _, data = gateway.request("GET", "/" + key, headers={"Range": "bytes=0-1,5-6"})
    assert status == 200 and data == PNG  # several ranges: the whole blob (RFC 9110)
    status, _, data = gateway.request("GET", "/" + key, headers={"Range": "items=0-1"})
    assert status == 200 and data == PNG


def test_conditional_requests_answer_304(gateway):
    obj = upload(gateway, PNG, "image/png")
    path, etag = "/" + obj["key"], f'"{obj["etag"]}"'
    _, h, _ = gateway.request("GET", path)
    for hdrs in ({"If-None-Match": etag}, {"If-None-Match": f'"x", W/{etag}'},
                 {"If-None-Match": "*"}, {"If-Modified-Since": h["last-modified"]}):
        status, hh, data = gateway.request("GET", path, headers=hdrs)
        assert status == 304 and data == b"" and hh["etag"] == etag, hdrs
    status, _, data = gateway.request("GET", path, headers={"If-None-Match": '"other"'})
    assert status == 200 and data == PNG
    status, _, _ = gateway.request("GET", path, headers={
        "If-Modified-Since": "Thu, 01 Jan 1970 00:00:00 GMT"})
    assert status == 200
    assert gateway.request("GET", path, headers={"If-None-Match": "nope"})[0] == 400
    assert gateway.request("GET", path, headers={"If-Modified-Since": "yesterday"})[0] == 400
    # If-Range with a stale validator: the whole blob instead of the range
    status, _, data = gateway.request("GET", path, headers={"Range": "bytes=0-1",
                                                            "If-Range": '"stale"'})
    assert status == 200 and data == PNG


def test_content_type_is_sniffed_when_none_was_given(gateway, cluster):
    obj = upload(gateway, PNG, None)
    assert gateway.request("GET", "/" + obj["key"])[1]["content-type"] == "image/png"
    obj = upload(gateway, b"\xff\xd8\xff\xe0" + blob(100), "application/x-www-form-urlencoded")
    assert gateway.request("GET", "/" + obj["key"])[1]["content-type"] == "image/jpeg"
    with cluster.client() as c:  # written without the gateway: no record
        key = c.put(b"GIF89a" + blob(500))
    status, h, data = gateway.request("GET", "/" + key)
    assert status == 200 and h["content-type"] == "image/gif" and h["etag"] == f'"{key}"'
    assert "last-modified" not in h
    assert gateway.request("GET", "/" + key, headers={"If-None-Match": f'"{key}"'})[0] == 304


def test_empty_blob(gateway):
    obj = upload(gateway, b"", "text/plain")
    status, h, data = gateway.request("GET", "/" + obj["key"])
    assert status == 200 and data == b"" and h["content-length"] == "0"
    assert gateway.request("GET", "/" + obj["key"], headers={"Range": "bytes=0-"})[0] == 416


def form_body(fields: list[tuple[str, str | None, str | None, bytes]]) -> tuple[str, bytes]:
    """(content type, body) of a multipart/form-data request."""
    boundary = uuid.uuid4().hex
    out = b""
    for name, filename, ctype, data in fields:
        disp = f'form-data; name="{name}"' + (f'; filename="{filename}"' if filename else "")
        out += f"--{boundary}\r\nContent-Disposition: {disp}\r\n".encode()
        if ctype:
            out += f"Content-Type: {ctype}\r\n".encode()
        out += b"\r\n" + data + b"\r\n"
    out += f"--{boundary}--\r\n".encode()
    return f"multipart/form-data; boundary={boundary}", out


def test_multipart_form_upload(gateway):
    data = blob(200_000, seed=3) + b"\r\n--not-the-boundary\r\n"
    ctype, body = form_body([("title", None, None, b"holiday"),
                             ("file", "photo.webp", "image/webp", data)])
    status, _, resp = gateway.request("POST", "/blobs", body, {"Content-Type": ctype})
    assert status == 201, resp
    key = json.loads(resp)["key"]
    status, h, got = gateway.request("GET", "/" + key)
    assert got == data and h["content-type"] == "image/webp"
    ctype, body = form_body([("title", None, None, b"no file")])
    status, _, resp = gateway.request("POST", "/blobs", body, {"Content-Type": ctype})
    assert status == 400 and b"file part" in resp
    status, _, resp = gateway.request("POST", "/blobs", body[:-30], {"Content-Type": ctype})
    assert status == 400
    status, _, resp = gateway.request("POST", "/blobs", b"x",
                                      {"Content-Type": "multipart/form-data"})
    assert status == 400 and b"boundary" in resp


@pytest.mark.skipif(CURL is None, reason="no curl binary")
def test_curl_put_get_range_delete(gateway, tmp_path):
    src = tmp_path / "photo.png"
    src.write_bytes(PNG)
    base = f"http://{gateway.addr}"

    def curl(*args: str) -> bytes:
        r = subprocess.run([CURL, "-sS", "--fail", *args], capture_output=True, timeout=30)
        assert r.returncode == 0, r.stderr
        return r.stdout
    key = json.loads(curl("-F", f"file=@{src}", f"{base}/blobs"))["key"]
    assert curl(f"{base}/{key}") == PNG
    assert curl("-r", "8-15", f"{base}/{key}") == PNG[8:16]
    head = curl("-I", f"{base}/{key}").decode().lower()
    assert "content-type: image/png" in head and f"content-length: {len(PNG)}" in head
    key2 = json.loads(curl("--data-binary", f"@{src}", f"{base}/blobs"))["key"]
    assert curl(f"{base}/{key2}") == PNG
    curl("-X", "DELETE", f"{base}/{key}")
    r = subprocess.run([CURL, "-s", "-o", "/dev/null", "-w", "%{http_code}", f"{base}/{key}"],
                       capture_output=True, timeout=30)
    assert r.stdout == b"404"


def test_chunked_upload(gateway):
    body = blob(100_000, seed=4)
    chunks = b"".join(b"%x\r\n" % len(body[i:i + 30000]) + body[i:i + 30000] + b"\r\n"
                      for i in range(0, len(body), 30000)) + b"0\r\n\r\n"
    answer = gateway.exchange(b"POST /blobs HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                          b"Transfer-Encoding: chunked\r\nContent-Type: text/csv\r\n\r\n"
                          + chunks)
    assert answer.startswith(b"HTTP/1.1 201"), answer[:200]
    key = json.loads(answer.split(b"\r\n\r\n", 1)[1])["key"]
    status, h, data = gateway.request("GET", "/" + key)
    assert data == body and h["content-type"] == "text/csv"


def test_bad_requests_get_one_line_4xx(gateway):
    cases = [("GET", "/nowhere", 404), ("GET", "/0,5", 400), ("GET", "/70000,5", 400),
             ("GET", "/1,x", 404), ("PUT", "/1,5", 405), ("GET", "/blobs", 405),
             ("POST", "/1,5", 405), ("GET", "/1,99999999", 404), ("PATCH", "/blobs", 405)]
    for method, path, want in cases:
        status, h, data = gateway.request(method, path)
        assert status == want, (method, path, status, data)
        assert h["content-type"].startswith("text/plain") and data.count(b"\n") == 1, data
    answer = gateway.exchange(b"POST /blobs HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                          b"\r\n")
    assert answer.startswith(b"HTTP/1.1 411"), answer[:100]
    answer = gateway.exchange(b"POST /blobs HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Type: a\x01b/c\r\nContent-Length: 1\r\n\r\nx")
    assert answer.startswith(b"HTTP/1.1 400"), answer[:100]
    answer = gateway.exchange(b"POST /blobs HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Length: 12x\r\n\r\nx")
    assert answer.startswith(b"HTTP/1.1 400"), answer[:100]


@pytest.mark.parametrize("ctype,sandboxed", [("text/html", True), ("image/svg+xml", True),
                                             ("application/xhtml+xml", True),
                                             ("image/png", False), ("text/plain", False)])
def test_uploaded_pages_cannot_run_as_the_gateway(gateway, ctype, sandboxed):
    """Stored XSS: HTML/SVG/XML blobs are served sandboxed, every blob with nosniff."""
    obj = upload(gateway, b"<script>parent.alert(1)</script>", ctype)
    status, h, _ = gateway.request("GET", "/" + obj["key"])
    assert status == 200 and h["x-content-type-options"] == "nosniff"
    assert (h.get("content-security-policy") == "sandbox") == sandboxed
