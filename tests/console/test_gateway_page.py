"""The gateway's console in headless Chromium against a real cluster and gateway."""
from __future__ import annotations

import json
import urllib.parse
import urllib.request

from tests.support.browser import png, submit, wait_for
from tests.support.cluster import cluster_fixture
from tests.support.gateway import Gateway, gateway_fixture

cluster = cluster_fixture(groups=1, per_group=2)
gateway = gateway_fixture()

FORM = {"Content-Type": "application/x-www-form-urlencoded"}




def put_path(gw: Gateway, path: str, data: bytes, ctype: str = "") -> dict:
    """Store data under path through the console's raw upload (as gateway.js does)."""
    headers = {"Accept": "application/json"}
    if ctype:
        headers["Content-Type"] = ctype
    status, _h, body = gw.request("POST", "/ui/upload?path=" + urllib.parse.quote(path, safe=""),
                                  data, headers)
    assert status == 201, body
    return json.loads(body)


def image_loaded(driver, img) -> bool:
    return driver.execute_script("return arguments[0].complete && arguments[0].naturalWidth",
                                 img) > 0


def no_alert(driver) -> bool:
    from selenium.common.exceptions import NoAlertPresentException
    try:
        driver.switch_to.alert
    except NoAlertPresentException:
        return True
    return False


def test_uploaded_image_is_listed_with_thumbnail_opens_and_serves_its_bytes(
        cluster, gateway, open_browser, shot, tmp_path):
    from selenium.webdriver.common.by import By
    image = png(120, 80, seed=3)
    (tmp_path / "photo.png").write_bytes(image)
    d = open_browser()
    base = f"http://{gateway.addr}"
    d.get(base + "/ui/?prefix=pics/")
    d.find_element(By.ID, "file").send_keys(str(tmp_path / "photo.png"))
    d.find_element(By.CSS_SELECTOR, "#upload button[type=submit]").click()
    key = wait_for(d, lambda d: d.find_elements(By.CSS_SELECTOR, "#results .key"), 20,
                   "the upload's key")[0].text
    url = d.find_element(By.CSS_SELECTOR, "#results a.url").text
    assert url == f"{base}/{key}"
    shot(d, "gateway-upload")

    d.get(base + "/ui/?prefix=pics/")
    row = d.find_element(By.CSS_SELECTOR, 'tr.file[data-path="pics/photo.png"]')
    assert "image/png" in row.text and "photo.png" in row.text
    thumb = row.find_element(By.CSS_SELECTOR, "img.thumb")
    assert thumb.get_attribute("src") == f"{base}/{key}"
    wait_for(d, lambda d: image_loaded(d, thumb), 10, "the thumbnail to load")
    assert d.execute_script("return arguments[0].naturalWidth", thumb) == 120
    shot(d, "gateway-listing")

    submit(d, row.find_element(By.CSS_SELECTOR, "a.name"))
    assert d.find_element(By.ID, "name").text == "pics/photo.png"
    assert d.find_element(By.CSS_SELECTOR, "code.key").text == key
    replicas = d.find_element(By.XPATH, "//code[@class='key']/../following-sibling::td").text
    assert sorted(replicas.split(", ")) == sorted(s.name_addr for s in cluster.servers)
    preview = d.find_element(By.ID, "preview")
    wait_for(d, lambda d: image_loaded(d, preview), 10, "the preview to load")
    link = d.find_element(By.ID, "url")
    assert link.text == url
    with urllib.request.urlopen(link.get_attribute("href"), timeout=10) as r:
        assert r.read() == image
        assert r.headers["Content-Type"] == "image/png"
    shot(d, "gateway-file")

    d.find_element(By.CSS_SELECTOR, "#delete button").click()      # asks first
    alert = d.switch_to.alert
    assert "pics/photo.png" in alert.text
    alert.dismiss()
    assert d.find_element(By.ID, "name").text == "pics/photo.png"   # still there
    d.find_element(By.CSS_SELECTOR, "#delete button").click()
    d.switch_to.alert.accept()
    wait_for(d, lambda d: "Deleted" in d.find_element(By.TAG_NAME, "h2").text, 10, "delete")
    status, _h, _b = gateway.request("GET", f"/{key}")
    assert status == 404


def test_hostile_names_show_as_text(gateway, open_browser, shot):
    from selenium.webdriver.common.by import By
    names = ["evil/<img src=x onerror=alert(1)>.png", "evil/<script>alert(1)</script>",
             'evil/"><b id=injected>bold']
    for n in names:
        put_path(gateway, n, png(8, 8), "image/png")
    d = open_browser()
    d.get(f"http://{gateway.addr}/ui/?prefix=evil/")
    text = d.find_element(By.ID, "listing").text
    assert "<img src=x onerror=alert(1)>.png" in text
    assert "<script>alert(1)</" in text                  # a folder: the name has a "/"
    assert '"><b id=injected>bold' in text
    assert d.find_elements(By.ID, "injected") == []
    assert d.execute_script("return document.scripts.length") == 1   # gateway.js only
    assert not d.find_elements(By.CSS_SELECTOR, 'img[src="x"]')
    assert no_alert(d)
    shot(d, "gateway-hostile")
    submit(d, d.find_element(By.LINK_TEXT, "<img src=x onerror=alert(1)>.png"))
    assert d.find_element(By.ID, "name").text == names[0]
    assert d.title == f"{names[0]} - speedy gateway"
    assert d.execute_script("return document.scripts.length") == 1
    assert no_alert(d)
    d.back()
    submit(d, d.find_element(By.LINK_TEXT, "<script>alert(1)</"))     # the folder
    assert d.find_element(By.CSS_SELECTOR, ".crumbs").text.endswith("<script>alert(1)</")
    assert "script>" in d.find_element(By.ID, "listing").text
    assert no_alert(d)


def test_plain_forms_without_javascript(gateway, open_browser, shot, tmp_path):
    from selenium.webdriver.common.by import By
    (tmp_path / "notes.txt").write_bytes(b"hello, console\n")
    d = open_browser(js=False)
    base = f"http://{gateway.addr}"
    d.get(base + "/ui/?prefix=docs/")
    d.find_element(By.ID, "file").send_keys(str(tmp_path / "notes.txt"))
    submit(d, d.find_element(By.CSS_SELECTOR, "#upload button[type=submit]"))
    key = d.find_element(By.ID, "key").text
    assert d.find_element(By.ID, "url").text == f"{base}/{key}"
    submit(d, d.find_element(By.LINK_TEXT, "docs/notes.txt"))
    submit(d, d.find_element(By.CSS_SELECTOR, "#delete button"))     # the confirmation page
    assert d.find_element(By.TAG_NAME, "h2").text == "Delete this file?"
    shot(d, "gateway-confirm")
    submit(d, d.find_element(By.CSS_SELECTOR, "#delete button"))
    assert d.find_element(By.TAG_NAME, "h2").text == "Deleted"
    d.get(base + "/ui/?prefix=docs/")
    assert "docs/notes.txt" not in d.page_source and "notes.txt" not in \
        d.find_element(By.ID, "listing").text


def test_console_posts_are_checked(gateway):
    status, _h, body = gateway.request("POST", "/ui/delete", b"path=x&confirm=yes",
                                       dict(FORM, Origin="http://evil.example"))
    assert status == 403 and b"cross-site" in body
    status, _h, body = gateway.request("GET", "/ui/upload")
    assert status == 405
    status, _h, body = gateway.request("POST", "/ui/upload", b"x", {"Accept": "application/json"})
    assert status == 400 and b"file name" in body
    status, _h, body = gateway.request("POST", "/ui/upload?path=a%0Ab", b"x")
    assert status == 400 and b"control" in body
    status, _h, _b = gateway.request("GET", "/ui/file?path=nothing/here")
    assert status == 404
    status, headers, _b = gateway.request("GET", "/ui/")
    assert status == 200 and "default-src 'self'" in headers["content-security-policy"]


def test_signing_key_makes_the_console_read_only(cluster, gateway, open_browser, tmp_path):
    from selenium.webdriver.common.by import By
    put_path(gateway, "ro/pic.png", png(10, 10), "image/png")
    with Gateway(cluster, tmp_path, metadb=gateway.metadb,
                 extra=["--signing_key=k3y"]) as signed:
        d = open_browser()
        d.get(f"http://{signed.addr}/ui/?prefix=ro/")
        assert "pic.png" in d.find_element(By.ID, "listing").text
        assert d.find_elements(By.ID, "upload") == []
        assert d.find_elements(By.TAG_NAME, "img") == []
        assert "read-only" in d.page_source
        submit(d, d.find_element(By.LINK_TEXT, "pic.png"))
        assert d.find_elements(By.ID, "delete") == [] and d.find_elements(By.ID, "url") == []
        for path, body in (("/ui/upload?path=ro/x", b"x"),
                           ("/ui/delete", b"path=ro/pic.png&confirm=yes")):
            status, _h, text = signed.request("POST", path, body, FORM)
            assert status == 403 and b"read-only" in text
