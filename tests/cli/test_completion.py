"""`speedy completion bash|zsh`: generated from the parser, and it completes in bash."""
from __future__ import annotations

import shutil
import subprocess

import pytest

from speedy.cli.main import build_parser
from speedy.cli.completion import bash_script
from tests.support.cluster import run_cli


def complete(script: str, words: list[str], cwd: str = "/") -> list[str]:
    """What bash offers for the last of words (COMP_WORDS), with script loaded."""
    arr = " ".join(f"'{w}'" for w in words)
    code = (f'{script}\nCOMP_WORDS=({arr}); COMP_CWORD={len(words) - 1}; _speedy; '
            f'printf "%s\\n" "${{COMPREPLY[@]}}"')
    r = subprocess.run(["bash", "--norc", "-c", code], capture_output=True, text=True,
                       timeout=30, cwd=cwd)
    assert r.returncode == 0, r.stderr
    return [w for w in r.stdout.splitlines() if w]


@pytest.fixture(scope="module")
def script() -> str:
    r = run_cli("completion", "bash")
    assert r.returncode == 0, r.stderr
    return r.stdout.decode()


def test_script_is_generated_from_the_parser(script):
    assert script == bash_script(build_parser())
    zsh = run_cli("completion", "zsh")
    assert zsh.returncode == 0 and b"bashcompinit" in zsh.stdout and b"_speedy()" in zsh.stdout
    assert run_cli("completion", "fish").returncode == 2


@pytest.mark.skipif(shutil.which("bash") is None, reason="no bash")
def test_bash_completes_commands_options_and_choices(script, tmp_path):
    assert complete(script, ["speedy", "ad"]) == ["admin"]
    assert set(complete(script, ["speedy", "admin", ""])) >= {
        "add-server", "set-status", "remove-server", "repair"}
    assert complete(script, ["speedy", "admin", "set-status", "h:1", "r"]) == ["rw", "ro"]
    assert complete(script, ["speedy", "--master", "h:1", "--min-r"]) == ["--min-replicas"]
    assert complete(script, ["speedy", "--part_size", "1M", "lo"]) == ["local"]
    assert complete(script, ["speedy", "local", "d"]) == ["down"]
    assert complete(script, ["speedy", "completion", "z"]) == ["zsh"]
    assert complete(script, ["speedy", "get", "1,2", "--o"]) == ["--output"]
    (tmp_path / "photo.jpg").write_bytes(b"x")
    assert complete(script, ["speedy", "put", "pho"], cwd=str(tmp_path)) == ["photo.jpg"]
    assert complete(script, ["speedy", "get", "1,2", "-o", "ph"], cwd=str(tmp_path)) == \
        ["photo.jpg"]
    assert complete(script, ["speedy", "--master", ""]) == []
