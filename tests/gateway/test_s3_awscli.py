"""The S3 API proven with the AWS CLI (aws s3 mb/cp/ls/rm/sync) against real daemons."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys

import pytest

from tests.support.cluster import blob, cluster_fixture
from tests.support.gateway import gateway_fixture

AKID, SECRET = "AKIASPEEDYCLI0000001", "speedy-cli-secret-000000000000000000000001"
cluster = cluster_fixture(groups=1, per_group=2, chunks=4, chunk_size=64 << 20, mem_blocks=64)
gateway = gateway_fixture(workers=1, extra=[f"--s3_access_key={AKID}", f"--s3_secret_key={SECRET}"])
AWS = os.path.join(os.path.dirname(sys.executable), "aws")


def aws(gw, *args: str, cwd=None) -> subprocess.CompletedProcess:
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(cwd or "/tmp"),
           "AWS_ACCESS_KEY_ID": AKID, "AWS_SECRET_ACCESS_KEY": SECRET,
           "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
    return subprocess.run([AWS, "--endpoint-url", f"http://{gw.addr}", *args], env=env,
                          cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def cli():
    if not os.path.exists(AWS):
        pytest.skip(f"the AWS CLI is not installed at {AWS} (pip install awscli)")
    return AWS


def test_mb_cp_ls_rm_sync(cli, gateway, tmp_path):
    r = aws(gateway, "s3", "mb", "s3://cli-bucket", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    src = tmp_path / "photo.jpg"
    src.write_bytes(blob(200_000, seed=1))
    r = aws(gateway, "s3", "cp", str(src), "s3://cli-bucket/pics/photo.jpg", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(12 * 1000 * 1000))    # over the CLI's 8 MB multipart threshold
    r = aws(gateway, "s3", "cp", str(big), "s3://cli-bucket/big.bin", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = aws(gateway, "s3", "ls", "s3://cli-bucket/", cwd=tmp_path)
    assert r.returncode == 0 and "PRE pics/" in r.stdout and "big.bin" in r.stdout, r.stdout
    r = aws(gateway, "s3", "ls", "s3://cli-bucket/pics/", cwd=tmp_path)
    assert "photo.jpg" in r.stdout and "200000" in r.stdout, r.stdout
    out = tmp_path / "back.bin"
    r = aws(gateway, "s3", "cp", "s3://cli-bucket/big.bin", str(out), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert out.read_bytes() == big.read_bytes()
    tree = tmp_path / "tree"
    for i in range(5):
        (tree / f"d{i % 2}").mkdir(parents=True, exist_ok=True)
        (tree / f"d{i % 2}" / f"f{i}.txt").write_bytes(f"file {i}".encode())
    r = aws(gateway, "s3", "sync", str(tree), "s3://cli-bucket/tree", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    back = tmp_path / "back"
    r = aws(gateway, "s3", "sync", "s3://cli-bucket/tree", str(back), cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    for i in range(5):
        assert (back / f"d{i % 2}" / f"f{i}.txt").read_bytes() == f"file {i}".encode()
    r = aws(gateway, "s3", "rm", "s3://cli-bucket/", "--recursive", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = aws(gateway, "s3", "ls", "s3://cli-bucket/", cwd=tmp_path)
    assert r.stdout.strip() == ""
    r = aws(gateway, "s3", "rb", "s3://cli-bucket", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    shutil.rmtree(tree)
