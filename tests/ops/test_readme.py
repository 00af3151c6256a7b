"""The README matches the system (issue 15): its SQL runs on the SQLite we support against
a live master's database, its tables and lists match the code, its install snippets work."""
from __future__ import annotations

import os
import re
import shutil
import sqlite3
import subprocess
import time

import pytest

from speedy.cli.main import build_parser
from speedy.common import config
from tests.support import ROOT
from tests.support.cluster import Cluster

README = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()


def section(title: str) -> str:
    """The README text from a heading to the next heading of the same or a higher level."""
    m = re.search(rf"^(#+) {re.escape(title)}.*$", README, re.M)
    assert m, title
    level = len(m.group(1))
    end = re.compile(rf"^#{{1,{level}}} ", re.M).search(README, m.end())
    return README[m.end():end.start() if end else len(README)]


def table_options(text: str) -> set[str]:
    """The long options named in the first column of the tables of text."""
    return {o for line in text.splitlines() if line.startswith("| `-")
            for o in re.findall(r"`(--[a-z_-]+)`", line.split("|")[1])}


def parser_options(p) -> set[str]:
    """The first long spelling of each option of an argparse parser, but --help."""
    return {next(o for o in a.option_strings if o.startswith("--"))
            for a in p._actions if a.option_strings and a.dest != "help"}


# -- SQL ---------------------------------------------------------------------------------


def readme_sql() -> list[str]:
    """Every `sqlite3 [-readonly] speedy_master.db "..."` statement of the README."""
    found = re.findall(r'sqlite3 (?:-readonly )?speedy_master\.db "(.*?)"', README, re.S)
    assert len(found) >= 5, found
    return [" ".join(q.split()) for q in found]


def run_sql(db: str, query: str) -> list[str]:
    """Rows as text lines: the sqlite3 shell when present, Python's sqlite3 otherwise."""
    if shutil.which("sqlite3"):
        r = subprocess.run(["sqlite3", db, query], capture_output=True, text=True, timeout=30)
        assert r.returncode == 0 and not r.stderr, f"{query}: {r.stderr}"
        return r.stdout.splitlines()
    with sqlite3.connect(db) as c:
        return ["|".join(map(str, row)) for row in c.execute(query)]


def test_every_readme_query_runs_on_a_live_master_database(tmp_path):
    with Cluster(tmp_path, groups=1, per_group=1) as cluster:
        db = os.path.join(cluster.root, "master", "master.db")
        server = cluster.servers[0]
        for q in readme_sql():
            run_sql(db, q)  # each as written: no error
        queries = readme_sql()
        silent = next(q for q in queries if "silent_s" in q)
        # the same query with "silent for more than -1 hour": every server, a number
        rows = run_sql(db, silent.replace("- 60", "- -3600"))
        assert len(rows) == 1 and rows[0].startswith(f"1|127.0.0.1|{server.port}|"), rows
        assert re.fullmatch(r"-?\d+\.0", rows[0].split("|")[3]), rows
        free = next(q for q in queries if "free_bytes" in q)
        assert run_sql(db, free)[0].startswith("1|1|")
        assert int(run_sql(db, next(q for q in queries if "high_water" in q))[0]) >= 0
        update = next(q for q in queries if q.startswith("UPDATE"))
        run_sql(db, update.replace("'10.0.0.5'", "'127.0.0.1'")
                .replace("8000", str(server.port)))
        status, when = run_sql(db, "SELECT status, status_time FROM chunkserver")[0].split("|")
        assert status == "3" and abs(float(when) - time.time()) < 60
    print(f"sqlite3 {'shell' if shutil.which('sqlite3') else 'module'} "
          f"{sqlite3.sqlite_version}: {len(queries)} queries ran")


# -- tables and lists --------------------------------------------------------------------


def test_metric_lists_match_the_code():
    names: set[str] = set()
    for folder, _, files in os.walk(os.path.join(ROOT, "speedy")):
        for f in files:
            if f.endswith(".py"):
                text = open(os.path.join(folder, f), encoding="utf-8").read()
                names |= set(re.findall(r'"(speedy_[a-z_]+)"', text))
    text = section("Operations")
    text = text[text.index("**Metrics**"):]
    text = text[:text.index("\n- **", 1) if "\n- **" in text else len(text)]
    listed = set(re.findall(r"`(speedy_[a-z_]+)", text))
    assert names - listed == set(), "metrics missing from the README"
    assert listed - names == set(), "metrics in the README that the code does not have"


def test_routes_table_matches_the_master(tmp_path):
    from speedy.master import db as mdb
    from speedy.master.app import MasterApp
    app = MasterApp(mdb.connect(str(tmp_path / "m.db")), token="t")
    code = {(method, path): needs for path, methods in app.routes.items()
            for method, (_, needs) in methods.items()}
    rows = re.findall(r"^\| (GET|POST|PUT|DELETE) \| `([^`]+)` \| (token)? *\|", README, re.M)
    listed = {(method, path): bool(token) for method, path, token in rows}
    assert listed == code


def test_chunkserver_options_match_the_parser():
    text = section("The chunkserver: `spy_server.py`")
    text = text[:text.index("### Processes")]
    usage = {o for o in re.findall(r"(--[a-z_]+)=<", text)}
    assert usage | table_options(text) == parser_options(config.server_parser())


def test_master_options_match_the_parser():
    text = section("The chunkmaster: `spy_master.py`")
    assert table_options(text) == parser_options(config.master_parser())


def test_client_options_match_the_parser():
    text = section("Client library and the `speedy` command")
    assert table_options(text) == parser_options(build_parser()) - {"--version"}
    commands = set(re.findall(r"^\| `([a-z-]+)", text, re.M)) - {"admin"}
    sub = next(a for a in build_parser()._actions if a.dest == "command")
    assert set(sub.choices) - {"admin"} <= commands | {"local"}


# -- install -----------------------------------------------------------------------------


def test_install_steps_and_registration_are_documented():
    ops = section("Operations")
    for snippet in ("init/sysusers.d/speedy.conf", "init/tmpfiles.d/speedy.conf",
                    "systemd-sysusers", "systemd-tmpfiles --create"):
        assert snippet in ops, snippet
    systemd = ops[ops.index("- **systemd**"):ops.index("- **SysV/LSB**")]
    lsb = ops[ops.index("- **SysV/LSB**"):ops.index("- **Logs**")]
    assert "speedy admin add-server" in systemd and "speedy admin add-server" in lsb


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None
                    or shutil.which("systemd-tmpfiles") is None, reason="no systemd tools")
def test_sysusers_and_tmpfiles_snippets_work(tmp_path):
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    users = os.path.join(ROOT, "init", "sysusers.d", "speedy.conf")
    dirs = os.path.join(ROOT, "init", "tmpfiles.d", "speedy.conf")
    r = subprocess.run(["systemd-sysusers", f"--root={root}", users], capture_output=True,
                       text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    passwd = (root / "etc" / "passwd").read_text()
    entry = next(line for line in passwd.splitlines() if line.startswith("speedy:"))
    assert entry.split(":")[5:] == ["/var/lib/speedy", "/usr/sbin/nologin"]
    if os.geteuid() != 0:
        pytest.skip("systemd-tmpfiles needs root to chown")
    r = subprocess.run(["systemd-tmpfiles", f"--root={root}", "--create", dirs],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    uid = int(entry.split(":")[2])
    for d in ("var/lib/speedy", "var/log/speedy", "run/speedy"):
        st = os.stat(root / d)
        assert st.st_uid == uid, d
    assert oct(os.stat(root / "var/lib/speedy").st_mode & 0o777) == "0o750"


def test_unregistered_chunkserver_logs_once_how_to_register(tmp_path):
    with Cluster(tmp_path, groups=1, per_group=1, report_interval=0.2) as cluster:
        d = cluster.servers[0]
        with cluster.client() as c:
            c.remove_server(1, "127.0.0.1", d.port)
        log = os.path.join(cluster.root, d.name, "server.log")
        hint = f"admin add-server 1 127.0.0.1:{d.port}"
        deadline = time.monotonic() + 20
        while hint not in open(log).read() and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(1.5)  # seven more reports
        text = open(log).read()
        assert text.count(hint) == 1, text[-2000:]
        assert f"speedy --master 127.0.0.1:{cluster.master.port} {hint}" in text
