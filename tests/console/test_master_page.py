"""The master's console in headless Chromium against a real master and chunkservers."""
from __future__ import annotations

import json

import pytest

from speedy.client.master import explain_no_group
from tests.support.browser import submit, wait_for
from tests.support.cluster import cluster_fixture
from tests.support.master import MasterProc, http

HEARTBEAT_TIMEOUT = 3.0

cluster = cluster_fixture(groups=2, per_group=2, heartbeat_timeout=HEARTBEAT_TIMEOUT,
                          monitor_interval=0.5, report_interval=0.5)




def server_row(driver, name: str):
    from selenium.webdriver.common.by import By
    return driver.find_element(By.CSS_SELECTOR, f'tr[data-server="{name}"]')


def status_of(driver, name: str) -> str:
    from selenium.webdriver.common.by import By
    return server_row(driver, name).find_element(By.CSS_SELECTOR, ".st").text


def test_page_shows_groups_and_turns_a_killed_server_ro_without_reloading(
        cluster, open_browser, shot):
    from selenium.webdriver.common.by import By
    d = open_browser()
    d.get(f"http://{cluster.master_addr}/")
    assert d.title == "speedy master"
    sections = d.find_elements(By.CSS_SELECTOR, "section.card")
    assert [s.get_attribute("id") for s in sections] == ["group-1", "group-2"]
    for s in cluster.servers:
        assert status_of(d, s.name_addr) == "RW"
        assert "st-RW" in server_row(d, s.name_addr).find_element(
            By.CSS_SELECTOR, ".st").get_attribute("class")
    assert d.find_element(By.ID, "g1-writes").text == "accepts writes"
    facts = d.find_element(By.CSS_SELECTOR, ".facts").text
    assert "version" in facts and "fids handed out" in facts and "up" in facts
    wait_for(d, lambda d: "live" in d.find_element(By.ID, "live").text, 10, "the JS to run")
    shot(d, "master")

    victim = cluster.group(1)[0]
    d.execute_script("window.notReloaded = true;")
    cluster.kill(victim)
    wait_for(d, lambda d: status_of(d, victim.name_addr) == "RO",
             HEARTBEAT_TIMEOUT + 8, f"{victim.name_addr} to turn RO on the page")
    assert d.execute_script("return window.notReloaded === true;"), "the page was reloaded"
    assert "st-RO" in server_row(d, victim.name_addr).find_element(
        By.CSS_SELECTOR, ".st").get_attribute("class")
    wait_for(d, lambda d: d.find_element(By.ID, "g1-writes").text == "takes no writes", 5,
             "group 1 to take no writes")
    why = d.find_element(By.ID, "g1-why").text
    route = cluster.client().master.route()
    assert f"group 1: {why};" in explain_no_group(route.groups, 0, 2)   # the client's reason
    assert why == f"{victim.name_addr} is RO"
    assert d.find_element(By.ID, "g2-writes").text == "accepts writes"
    shot(d, "master-ro")

    d.set_window_size(390, 844)  # a phone: nothing wider than the screen but the tables
    d.refresh()
    assert d.execute_script("return document.documentElement.scrollWidth <= window.innerWidth")
    shot(d, "master-phone")


def test_page_without_javascript_is_a_plain_table(cluster, open_browser, shot):
    from selenium.webdriver.common.by import By
    d = open_browser(js=False)
    d.get(f"http://{cluster.master_addr}/ui/")
    rows = d.find_elements(By.CSS_SELECTOR, "tbody tr")
    assert len(rows) == len(cluster.servers)
    assert {r.get_attribute("data-server") for r in rows} == \
        {s.name_addr for s in cluster.servers}
    assert d.find_element(By.ID, "live").text == "(reload to refresh)"  # no script ran
    headers = [th.text for th in d.find_elements(By.CSS_SELECTOR, "#group-1 thead th")]
    assert headers[:4] == ["Server", "Status", "Heartbeat", "Free"]
    assert "Garbage" in headers
    shot(d, "master-nojs")


def test_state_json_matches_the_page(cluster):
    r = http(cluster.master.port, "GET", "/ui/state.json")
    assert r.status == 200
    state = json.loads(r.body)
    assert set(state) == {"layout", "cells", "bars"}
    assert state["cells"]["g2-writes"] == ["accepts writes", "badge ok"]
    page = http(cluster.master.port, "GET", "/").body.decode()
    assert f'data-layout="{state["layout"]}"' in page
    assert http(cluster.master.port, "GET", "/ui/static/../app.py").status == 404
    assert http(cluster.master.port, "POST", "/ui/state.json", b"{}").status == 405


def test_admin_form_sets_a_status_without_token(cluster, open_browser):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select
    d = open_browser()
    d.get(f"http://{cluster.master_addr}/")
    target = cluster.group(2)[1]
    row = server_row(d, target.name_addr)
    Select(row.find_element(By.NAME, "Status")).select_by_visible_text("ERR")
    submit(d, row.find_element(By.CSS_SELECTOR, "button[type=submit]"))
    notice = d.find_element(By.CSS_SELECTOR, ".notice").text
    assert notice == f"2:{target.name_addr} set to ERR"
    wait_for(d, lambda d: status_of(d, target.name_addr) == "ERR", 10, "ERR on the page")
    row = server_row(d, target.name_addr)
    Select(row.find_element(By.NAME, "Status")).select_by_visible_text("RW")
    submit(d, row.find_element(By.CSS_SELECTOR, "button[type=submit]"))
    wait_for(d, lambda d: status_of(d, target.name_addr) == "RW", 10, "RW on the page")
    # A form posted from another site's page is refused.
    r = http(cluster.master.port, "POST", "/ui/setstatus",
             b"GroupId=2&Ip=127.0.0.1&Port=1&Status=3", headers={
                 "Origin": "http://evil.example", "Content-Type":
                 "application/x-www-form-urlencoded"})
    assert r.status == 403


def test_token_hides_every_action(tmp_path, open_browser, shot):
    from selenium.webdriver.common.by import By
    m = MasterProc(tmp_path, token="s3cret").start()
    try:
        for port in (7001, 7002):
            r = http(m.port, "POST", "/v1/chunkserver/initserver",
                     {"GroupId": 5, "Ip": "127.0.0.1", "Port": port},
                     headers={"X-Speedy-Token": "s3cret"})
            assert r.status == 200, r.body
        d = open_browser()
        d.get(f"http://127.0.0.1:{m.port}/")
        assert len(d.find_elements(By.CSS_SELECTOR, "tbody tr")) == 2
        assert d.find_elements(By.TAG_NAME, "form") == []
        assert d.find_elements(By.TAG_NAME, "button") == []
        assert "Action" not in [th.text for th in d.find_elements(By.TAG_NAME, "th")]
        assert "s3cret" not in d.page_source
        assert d.find_element(By.ID, "g5-why").text == \
            "127.0.0.1:7001 is INIT, 127.0.0.1:7002 is INIT"
        shot(d, "master-token")
        r = http(m.port, "POST", "/ui/setstatus", b"GroupId=5&Ip=127.0.0.1&Port=7001&Status=3",
                 headers={"Content-Type": "application/x-www-form-urlencoded"})
        assert r.status == 403 and b"--token" in r.body
    finally:
        m.stop()


@pytest.mark.parametrize("path", ["/ui/nothing", "/ui/static/nothing.js", "/ui/static/layout.html"])
def test_unknown_console_paths_are_404(cluster, path):
    r = http(cluster.master.port, "GET", path)
    assert r.status == 404 and r.body.endswith(b"\n")
