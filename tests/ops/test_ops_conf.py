"""The example config files name every option with its default and are accepted as is."""
from __future__ import annotations

import argparse
import os
import re
import subprocess

import pytest

from tests.support import PYTHON, ROOT
from speedy.common import config

CLI_ONLY = {"help", "version", "config", "print_config"}
EXAMPLES = {
    "server": (os.path.join(ROOT, "conf", "spy_server.conf.example"), config.server_parser,
               config.load_server_config, "SPEEDY_SERVER_"),
    "master": (os.path.join(ROOT, "conf", "spy_master.conf.example"), config.master_parser,
               config.load_master_config, "SPEEDY_MASTER_"),
}


def print_config(which: str, argv: list[str], env: dict | None = None) -> str:
    """Run load_<which>_config(argv + --print_config) in a child process; its stdout."""
    code = (f"import sys; from speedy.common import config; "
            f"config.load_{which}_config(sys.argv[1:])")
    proc = subprocess.run([PYTHON, "-c", code, *argv, "--print_config"], cwd=ROOT,
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


def options(parser) -> list[argparse.Action]:
    """The parser's options that a config file can set."""
    return [a for a in parser._actions if a.dest not in CLI_ONLY]


def blocks(path: str) -> dict[str, tuple[str, str | None]]:
    """{key: (comment text before it, active value or None if commented out)}."""
    out: dict[str, tuple[str, str | None]] = {}
    comment: list[str] = []
    for line in open(path, encoding="utf-8").read().splitlines():
        mt = re.match(r"^(#?)([a-z_]+) =(?: (.*))?$", line)
        if mt:
            key = mt.group(2)
            assert key not in out, f"{key} twice in {path}"
            out[key] = (" ".join(comment), None if mt.group(1) else (mt.group(3) or ""))
            comment = []
        elif line.startswith("#"):
            comment.append(line.lstrip("# "))
        else:
            comment = []
    return out


def expected_default(action: argparse.Action) -> str | None:
    """The text the example must show for the default (None: not checked literally)."""
    if action.required:
        return "Required"
    if action.dest == "workers":
        return "Default: the number of CPUs"
    if action.default == "":
        return "Default: (empty"
    return f"Default: {action.default}"


@pytest.mark.parametrize("which", sorted(EXAMPLES))
def test_every_option_named_with_its_default(which):
    path, make_parser, _, _ = EXAMPLES[which]
    found = blocks(path)
    parser = make_parser()
    names = {a.dest for a in options(parser)}
    assert names - set(found) == set(), f"options missing from {path}"
    assert set(found) - names == set(), f"unknown keys in {path}"
    for action in options(parser):
        comment, _ = found[action.dest]
        assert f"--{action.dest}:" in comment, f"{action.dest}: no --flag in its comment"
        assert expected_default(action) in comment, (action.dest, comment)
    for action in options(parser):  # the required ones are set, so the file works alone
        if action.required:
            assert found[action.dest][1], f"required {action.dest} is commented out"


@pytest.mark.parametrize("which", sorted(EXAMPLES))
def test_example_is_accepted_and_print_config_names_the_file(which, tmp_path):
    path, make_parser, load, prefix = EXAMPLES[which]
    found = blocks(path)
    # the example points at /var/lib/speedy: run it against tmp_path instead
    override = ["--data_dir", str(tmp_path)] if which == "server" else \
        ["--db", str(tmp_path / "m.db")]
    out = print_config(which, ["--config", path, *override])
    lines = {ln.split(" = ", 1)[0]: ln for ln in out.splitlines()}
    for key, (_, active) in found.items():
        line = lines[key]
        assert f"env {prefix}{key.upper()}" in line
        if key in ("data_dir", "db"):
            assert "# from command_line" in line
        elif active is not None:
            assert "# from config_file" in line, line
            assert active.strip() in line, line
        else:
            assert "# from default" in line, line
    ns = load(["--config", path, *override])
    for key, (_, active) in found.items():
        if active is not None and key not in ("data_dir", "db", "error_log"):
            action = next(a for a in make_parser()._actions if a.dest == key)
            assert getattr(ns, key) == (action.type or str)(active), key


def test_precedence_flags_env_file_defaults(tmp_path, monkeypatch):
    conf = tmp_path / "s.conf"
    conf.write_text("master_ip = 10.1.1.1\nmaster_port = 9000\ngroup_id = 7\n"
                    "mem_blocks = 64\nchunks = 3\nsync = 1\n")
    monkeypatch.setenv("SPEEDY_SERVER_MEM_BLOCKS", "32")
    monkeypatch.setenv("SPEEDY_SERVER_CHUNKS", "4")
    ns = config.load_server_config(["--config", str(conf), "--data_dir", str(tmp_path),
                                    "--chunks", "2"])
    assert ns.chunks == 2          # flag beats environment and file
    assert ns.mem_blocks == 32     # environment beats file
    assert ns.sync == 1            # file beats default
    assert ns.port == 8000         # default
    out = print_config("server", ["--config", str(conf), "--data_dir", str(tmp_path),
                                  "--chunks", "2"])
    assert "chunks = 2  # from command_line" in out
    assert "mem_blocks = 32  # from environment_variables" in out
    assert "sync = 1  # from config_file" in out
    assert "port = 8000  # from defaults" in out


def test_bad_value_in_config_file_is_one_clear_line(tmp_path):
    conf = tmp_path / "bad.conf"
    conf.write_text("master_ip = 10.1.1.1\nmaster_port = 9000\ngroup_id = 7\nchunks = many\n")
    proc = subprocess.run([PYTHON, "-c", "import sys; from speedy.common import config; "
                           "config.load_server_config(sys.argv[1:])",
                           "--config", str(conf), "--data_dir", str(tmp_path)],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    assert "'many' is not an integer" in proc.stderr.strip().splitlines()[-1]
