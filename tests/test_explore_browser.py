"""The explorer's front end in a real browser: headless Debian Chromium driven by selenium
through /usr/bin/chromedriver, against a real uvicorn server (a background thread on a free
127.0.0.1 port) over the tiny real encode output of ``explore_helpers.make_explore_dir``.

The oracle for what the page shows is the JSON API called directly with httpx (the same
requests the page should make): the scatter click opens the latent under the pointer (the
page reports where it drew each point; the click is a real pointer event at that pixel), the
listed latents of the clicked patches equal POST /api/patches, the probabilities after a
slider move equal POST /api/intervene and differ from the clean ones, and the static export
opened from file:// renders the same table rows as the live API. Every step fails on a
console error (uncaught exceptions, failed loads) or an error banner. Screenshots go under
the test's tmp_path; with SAE_EXPLORE_SCREENSHOT=<path> the Image page with a moved slider is
also saved there at 1200x800 (how docs/explore-screenshot.png was made, then quantized to
256 colours with PIL to stay small). A further test checks the scatter's grid-index hit test
against brute force on 65,536 synthetic points.

Skips (with the reason) only when selenium, /usr/bin/chromium or /usr/bin/chromedriver is
missing; .ci/run installs them.
"""

from __future__ import annotations

import functools
import http.server
import json
import math
import os
import threading
import time
from pathlib import Path

import httpx
import pytest

from explore_helpers import explore_dir  # noqa: F401  (session fixture)

CHROMIUM = "/usr/bin/chromium"
CHROMEDRIVER = "/usr/bin/chromedriver"

try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains
    from selenium.webdriver.common.by import By
    _SELENIUM = None
except ImportError as exc:  # pragma: no cover - CI installs selenium
    _SELENIUM = f"selenium is not installed ({exc}); pip install -r requirements-test.txt"

_missing = [p for p in (CHROMIUM, CHROMEDRIVER) if not os.path.exists(p)]
pytestmark = pytest.mark.skipif(
    bool(_SELENIUM or _missing),
    reason=_SELENIUM or f"{', '.join(_missing)} missing: apt-get install chromium chromium-driver (.ci/run does)")

WAIT_S = 15.0
WINDOW = (1200, 800)


# ----- fixtures ---------------------------------------------------------------------------
def _make_app(directory: Path):
    from saeengine.explore.api import create_app

    # The same encoding as the compare partner: its nearest latent is each latent itself.
    return create_app(directory, compare={"twin": directory})


@pytest.fixture(scope="module")
def app(explore_dir):  # noqa: F811
    return _make_app(explore_dir)


@pytest.fixture(scope="module")
def server(app):
    import uvicorn

    from saeengine.explore.server import bind

    # Bound here on a free loopback port and handed to uvicorn: no race for the port (the
    # server's own bind: TCP_NODELAY, so no ~40 ms delayed-ACK wait per request).
    sock = bind("127.0.0.1", 0)
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, log_level="warning", access_log=False, lifespan="auto")
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, kwargs={"sockets": [sock]}, name="explore-uvicorn", daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not srv.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError("the explore server did not start (see the log above)")
        time.sleep(0.05)
    base = f"http://127.0.0.1:{port}/"
    try:
        yield base
    finally:
        srv.should_exit = True
        thread.join(timeout=10)
        sock.close()
        assert not thread.is_alive(), "the uvicorn thread did not stop"


@pytest.fixture(scope="module")
def api(server):
    with httpx.Client(base_url=server + "api/", timeout=30) as client:
        yield client


@pytest.fixture(scope="module")
def browser():
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for arg in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                "--disable-extensions", "--no-first-run", f"--window-size={WINDOW[0]},{WINDOW[1]}",
                "--force-device-scale-factor=1"):
        options.add_argument(arg)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    driver = webdriver.Chrome(options=options, service=Service(CHROMEDRIVER))
    driver.set_page_load_timeout(30)
    # --window-size includes the (invisible) browser frame: pin the viewport itself.
    driver.execute_cdp_cmd("Emulation.setDeviceMetricsOverride",
                           {"width": WINDOW[0], "height": WINDOW[1], "deviceScaleFactor": 1, "mobile": False})
    try:
        yield driver
    finally:
        driver.quit()


@pytest.fixture(autouse=True)
def _fresh_console(browser):
    """Each test judges only its own console messages (get_log drains the buffer)."""
    browser.get("about:blank")
    browser.get_log("browser")
    yield


# ----- helpers ----------------------------------------------------------------------------
def wait_for(driver, script: str, what: str, timeout: float = WAIT_S):
    """Poll a JS expression until it is truthy; returns its value."""
    deadline = time.monotonic() + timeout
    while True:
        value = driver.execute_script("return (" + script + ");")
        if value:
            return value
        if time.monotonic() > deadline:
            errors = driver.execute_script("return document.getElementById('error') && document.getElementById('error').textContent")
            raise AssertionError(f"timed out after {timeout}s waiting for {what} ({script}); page error: {errors!r}; "
                                 f"console: {driver.get_log('browser')}")
        time.sleep(0.05)


def open_page(driver, url: str) -> None:
    """Load url and wait until the app says the page rendered (data-ready="1")."""
    driver.get(url)
    wait_for(driver, "document.getElementById('view') && ['1','error'].includes(document.getElementById('view').dataset.ready)",
             f"{url} to render")
    assert_clean(driver, url)


def assert_clean(driver, where: str) -> None:
    """No error banner and no console error (uncaught exceptions, failed loads) so far."""
    banner = driver.execute_script("var e = document.getElementById('error'); return e && !e.hidden ? e.textContent : ''")
    assert not banner, f"{where}: the page shows an error: {banner}"
    assert driver.execute_script("return document.getElementById('view').dataset.ready") == "1", where
    severe = [e for e in driver.get_log("browser") if e.get("level") == "SEVERE"]
    assert not severe, f"{where}: console errors: {severe}"


def images_loaded(driver) -> tuple[int, int]:
    """(decoded, total) <img> elements in the view; waits until none is still loading."""
    wait_for(driver, "[...document.querySelectorAll('#view img')].every(i => i.complete)", "images to load")
    return tuple(driver.execute_script(
        "var i = [...document.querySelectorAll('#view img')];"
        "return [i.filter(x => x.naturalWidth > 0).length, i.length];"))


def click_scatter_point(driver, wanted_gap: float = 4.0, among=None) -> int:
    """Really click (pointer events at a pixel) a scatter point with no neighbour within
    wanted_gap px, so exactly one latent is under the pointer; returns its id. among: the
    ids allowed (default: all)."""
    points = driver.execute_script("return SAE_TEST.scatter.points()")
    assert points, "the scatter drew no points"
    chosen = None
    for p in points:
        if among is not None and p["id"] not in among:
            continue
        gap = min((math.hypot(p["x"] - q["x"], p["y"] - q["y"]) for q in points if q is not p), default=99)
        if gap > wanted_gap:
            chosen = p
            break
    assert chosen is not None, f"every scatter point (of {among or 'all'}) has a neighbour closer than {wanted_gap} px"
    canvas = driver.find_element(By.ID, "scatter")
    w, h = driver.execute_script("return SAE_TEST.scatter.size")
    # Selenium 4 offsets are from the element's centre; the page reports CSS px from its corner.
    ActionChains(driver).move_to_element_with_offset(canvas, round(chosen["x"] - w / 2), round(chosen["y"] - h / 2)) \
        .click().perform()
    return int(chosen["id"])


def page_probs(driver, which: str) -> list[tuple[int, float]]:
    return [(int(c), float(p)) for c, p in driver.execute_script(
        f"return [...document.querySelectorAll('#probs-{which} [data-class]')]"
        ".map(e => [e.dataset.class, e.dataset.p])")]


def api_probs(rows) -> list[tuple[int, float]]:
    return [(int(r["index"]), float(r["p"])) for r in rows]


def assert_probs_equal(page, api_rows, what):
    assert [c for c, _ in page] == [c for c, _ in api_rows], f"{what}: classes differ: {page} vs {api_rows}"
    for (c, p), (_, q) in zip(page, api_rows):
        assert math.isclose(p, q, rel_tol=1e-9, abs_tol=1e-12), f"{what}: class {c}: page {p} vs API {q}"


def info_has_head(api) -> bool:
    return bool(api.get("info").json()["has_head"])


class _QuietFiles(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):  # no access log on stderr
        pass


# ----- tests --------------------------------------------------------------------------------
def test_latents_table_matches_api_and_scatter_click_opens_latent(browser, server, api, tmp_path):
    open_page(browser, server + "#/latents?sort=frequency&order=desc&filter=alive&limit=25")
    expected = api.get("latents", params=dict(offset=0, limit=25, sort="frequency", order="desc", filter="alive")).json()
    shown = [int(x) for x in browser.execute_script(
        "return [...document.querySelectorAll('#latents-table tbody tr')].map(r => r.dataset.latentId)")]
    assert shown == [r["id"] for r in expected["rows"]]
    assert int(browser.find_element(By.ID, "page-info").get_attribute("data-total")) == expected["total"]

    # Sorting by clicking a header: mean, descending first.
    browser.find_element(By.CSS_SELECTOR, 'th[data-sort="mean"] a').click()
    wait_for(browser, "location.hash.includes('sort=mean') && document.getElementById('view').dataset.ready === '1'", "sort by mean")
    by_mean = api.get("latents", params=dict(offset=0, limit=25, sort="mean", order="desc", filter="alive")).json()
    shown = [int(x) for x in browser.execute_script(
        "return [...document.querySelectorAll('#latents-table tbody tr')].map(r => r.dataset.latentId)")]
    assert shown == [r["id"] for r in by_mean["rows"]]

    scatter = api.get("scatter").json()
    assert int(browser.find_element(By.ID, "scatter").get_attribute("data-points")) == len(scatter["ids"])
    browser.save_screenshot(str(tmp_path / "latents.png"))

    latent = click_scatter_point(browser)
    wait_for(browser, f"document.querySelector('#latent-title[data-latent=\"{latent}\"]')", f"latent {latent}'s page")
    assert browser.execute_script("return location.hash") == f"#/latent/{latent}"
    wait_for(browser, "document.getElementById('view').dataset.ready === '1'", "the latent page")
    assert_clean(browser, f"latent {latent}")
    decoded, total = images_loaded(browser)
    assert decoded == total
    detail = api.get(f"latent/{latent}").json()
    n_thumbs = sum(len(v) for v in detail["exemplars"].values()) + len(detail["quantiles"])
    assert total == n_thumbs > 0
    assert int(browser.find_element(By.ID, "histogram").get_attribute("data-bins")) == len(detail["histogram"]["counts"])
    coact = [int(x) for x in browser.execute_script(
        "return [...document.querySelectorAll('#coactivating [data-latent-id]')].map(a => a.dataset.latentId)")]
    assert coact == [c["id"] for c in detail["coactivating"]]

    if detail["head_effect"] is not None:
        for side, key in (("head-top", "top"), ("head-bottom", "bottom")):
            shown = [int(x) for x in browser.execute_script(
                f"return [...document.querySelectorAll('#{side} [data-class]')].map(e => e.dataset.class)")]
            assert shown == [r["index"] for r in detail["head_effect"][key]], side
    assert info_has_head(api) == (detail["head_effect"] is not None)

    # The note round-trips through PUT /api/latent/{j}/note (restored afterwards: the data is shared).
    old = detail["note"]
    try:
        box = browser.find_element(By.ID, "note")
        box.clear()
        box.send_keys("browser test note")
        browser.find_element(By.ID, "save-note").click()
        wait_for(browser, "document.getElementById('note-status').dataset.saved === 'browser test note'", "the note to save")
        assert api.get(f"latent/{latent}").json()["note"] == "browser test note"
    finally:
        api.put(f"latent/{latent}/note", json={"note": old}).raise_for_status()
    browser.save_screenshot(str(tmp_path / "latent.png"))
    assert_clean(browser, "after saving the note")


def test_patches_and_slider_match_api(browser, server, api, tmp_path):
    info = api.get("info").json()
    assert info["has_head"], "the fixture's EfficientNet-Lite0 head should be known"
    image = 0
    open_page(browser, server + f"#/image/{image}")
    grid = api.get(f"image/{image}").json()
    h, w = grid["grid"]
    assert len(browser.find_elements(By.CSS_SELECTOR, ".patch[data-patch]")) == h * w
    clean = page_probs(browser, "after")
    assert_probs_equal(clean, api_probs(grid["probs"]), "clean probabilities")

    patches = sorted({(h // 2) * w + w // 2, (h // 2) * w + w // 2 - 1, (h // 2 - 1) * w + w // 2})
    for p in patches:
        browser.find_element(By.CSS_SELECTOR, f'.patch[data-patch="{p}"]').click()
    wait_for(browser, f"document.getElementById('patch-latents').dataset.patches === '{json.dumps(patches, separators=(',', ':'))}'"
                      " && document.getElementById('patch-latents').dataset.pending === '0'", "the selection's latents")
    expected = api.post("patches", json={"image": image, "patches": patches}).json()["latents"]
    shown = browser.execute_script(
        "return [...document.querySelectorAll('.patch-latent')].map(e => [+e.dataset.latentId, +e.dataset.value])")
    assert [i for i, _ in shown] == [L["id"] for L in expected] and expected
    for (i, v), L in zip(shown, expected):
        assert math.isclose(v, L["value"], rel_tol=1e-6), (i, v, L)
    assert_clean(browser, "patch selection")

    latent = expected[0]["id"]
    browser.find_element(By.CSS_SELECTOR, f'.add-slider[data-latent="{latent}"]').click()
    slider = wait_for(browser, f"document.querySelector('.slider[data-latent=\"{latent}\"]')", "the slider")
    version = int(browser.find_element(By.ID, "probs").get_attribute("data-version"))
    scale = 10.0
    browser.execute_script("arguments[0].value = arguments[1];"
                           "arguments[0].dispatchEvent(new Event('input', {bubbles: true}));", slider, str(scale))
    request = {"image": image, "patches": patches, "edits": [{"latent": latent, "scale": scale}]}
    # Done when the newest answer is drawn and it answers this request (parsed on both sides:
    # JS writes 10, Python 10.0).
    wait_for(browser, f"+document.getElementById('probs').dataset.version > {version}"
                      " && document.getElementById('probs').dataset.pending === '0'"
                      " && JSON.stringify(JSON.parse(document.getElementById('probs').dataset.request || 'null'))"
                      f" === JSON.stringify({json.dumps(request)})",
             "the probabilities after the slider move")
    answer = api.post("intervene", json=request).json()
    after, before = page_probs(browser, "after"), page_probs(browser, "before")
    assert_probs_equal(after, api_probs(answer["after"]), "after the edit")
    assert_probs_equal(before, api_probs(answer["before"]), "before the edit")
    clean_p = dict(clean)
    changed = max(abs(p - clean_p.get(c, 0.0)) for c, p in after)
    assert changed > 1e-4, f"scale {scale} on latent {latent} left the probabilities unchanged: {after}"
    assert_clean(browser, "slider move")
    browser.save_screenshot(str(tmp_path / "image.png"))
    target = os.environ.get("SAE_EXPLORE_SCREENSHOT")
    if target:
        browser.execute_script("window.scrollTo(0, 0)")
        browser.save_screenshot(target)


def test_upload_opens_its_patch_grid(browser, server, api, tmp_path):
    from PIL import Image

    path = tmp_path / "upload.png"
    Image.new("RGB", (64, 48), (200, 30, 30)).save(path)
    open_page(browser, server + "#/image")
    browser.find_element(By.ID, "upload").send_keys(str(path))
    wait_for(browser, "location.hash.startsWith('#/image/upload') && document.getElementById('view').dataset.ready === '1'",
             "the uploaded image's page")
    assert_clean(browser, "upload")
    image = browser.find_element(By.ID, "image-title").get_attribute("data-image")
    h, w = api.get(f"image/{image}").json()["grid"]
    assert len(browser.find_elements(By.CSS_SELECTOR, ".patch[data-patch]")) == h * w


def test_static_export_opens_from_file(browser, app, server, api, tmp_path):
    from saeengine.explore.export import export_static

    out = tmp_path / "export"
    # A few latent pages without head effects keep the export quick; the table holds every row.
    export_static(app.state.explorer, out, latents=4, head_effects=False, progress=False)
    exported = json.loads((out / "api" / "info.json").read_text())["exported_latents"]
    assert exported

    # Over http (any static host): the page fetches api/<path>.json.
    handler = functools.partial(_QuietFiles, directory=str(out))
    files = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=files.serve_forever, daemon=True)
    thread.start()
    try:
        open_page(browser, f"http://127.0.0.1:{files.server_address[1]}/index.html#/latent/{exported[0]}")
        wait_for(browser, f"document.querySelector('#latent-title[data-latent=\"{exported[0]}\"]')", "the exported latent")
        decoded, total = images_loaded(browser)
        assert decoded == total > 0, "the export's thumbnails did not load over http"
        assert_clean(browser, "static export over http")
    finally:
        files.shutdown()
        files.server_close()
        thread.join(timeout=5)

    # From disk (file://): fetch is refused there, so the page loads the api/<path>.js twins.
    url = (out / "index.html").resolve().as_uri()
    open_page(browser, url + "#/latents?sort=frequency&order=desc&filter=alive&limit=25")
    assert browser.execute_script("return window.SAE_STATIC") is True
    # The live-only pages are hidden; the table sorted and filtered here equals the live API's.
    assert not browser.find_element(By.CSS_SELECTOR, '#nav a[data-page="image"]').is_displayed()
    expected = api.get("latents", params=dict(offset=0, limit=25, sort="frequency", order="desc", filter="alive")).json()
    shown = [int(x) for x in browser.execute_script(
        "return [...document.querySelectorAll('#latents-table tbody tr')].map(r => r.dataset.latentId)")]
    assert shown == [r["id"] for r in expected["rows"]]
    assert int(browser.find_element(By.ID, "page-info").get_attribute("data-total")) == expected["total"]
    browser.save_screenshot(str(tmp_path / "static-latents.png"))
    # The other filters and orders, computed in the page from api/latents.json, agree with the server.
    for filt, sort, order in (("dense", "mean", "asc"), ("dead", "id", "desc"), ("all", "max", "desc")):
        open_page(browser, url + f"#/latents?sort={sort}&order={order}&filter={filt}&limit=25")
        expected = api.get("latents", params=dict(offset=0, limit=25, sort=sort, order=order, filter=filt)).json()
        shown = [int(x) for x in browser.execute_script(
            "return [...document.querySelectorAll('#latents-table tbody tr')].map(r => r.dataset.latentId)")]
        assert shown == [r["id"] for r in expected["rows"]], (filt, sort, order)
        assert int(browser.find_element(By.ID, "page-info").get_attribute("data-total")) == expected["total"], filt
    open_page(browser, url + "#/latents?sort=frequency&order=desc&filter=alive&limit=25")

    latent = click_scatter_point(browser, among=exported)
    wait_for(browser, f"document.querySelector('#latent-title[data-latent=\"{latent}\"]')"
                      " && document.getElementById('view').dataset.ready === '1'", f"static latent {latent}")
    assert_clean(browser, f"static latent {latent}")
    decoded, total = images_loaded(browser)
    assert decoded == total > 0, "the export's thumbnails did not load from file://"
    assert browser.find_element(By.ID, "note").get_attribute("readonly") is not None
    assert not browser.find_elements(By.ID, "save-note")
    browser.save_screenshot(str(tmp_path / "static-latent.png"))


def test_compare_page_against_itself(browser, server, api):
    """Compared with a second copy of the same SAE, every latent's nearest is itself (cosine 1)."""
    open_page(browser, server + "#/compare?image=3&other=twin")
    expected = api.get("compare", params={"image": 3, "other": "twin"}).json()
    shown = [int(x) for x in browser.execute_script(
        "return [...document.querySelectorAll('#compare-this li')].map(e => e.dataset.latentId)")]
    assert shown == [L["id"] for L in expected["this"]["latents"]] and shown
    other = [int(x) for x in browser.execute_script(
        "return [...document.querySelectorAll('#compare-other-latents li')].map(e => e.dataset.latentId)")]
    assert other == shown
    rows = browser.execute_script("return [...document.querySelectorAll('#compare-nearest tbody tr')]"
                                  ".map(e => [+e.dataset.latentId, +e.dataset.otherId, +e.dataset.cosine])")
    assert [r[0] for r in rows] == [r["id"] for r in expected["nearest"]]
    for j, k, cos in rows:
        assert k == j and math.isclose(cos, 1.0, abs_tol=1e-5), (j, k, cos)
    decoded, total = images_loaded(browser)
    assert decoded == total > 0
    assert_clean(browser, "compare")


def test_scatter_hit_test_at_65k_points(browser, server):
    """The scatter's grid index at F = 2^16: its hit test equals a brute-force nearest-point
    search (within the 6 px radius, ties to the smaller id) at random pixels, and is fast."""
    open_page(browser, server + "#/latents")
    result = browser.execute_script("""
        var n = 65536, ids = [], fx = [], my = [], seed = 12345;
        function rnd() { seed = (seed * 1103515245 + 12345) % 2147483648; return seed / 2147483648; }
        for (var i = 0; i < n; i++) { ids.push(i); fx.push(-6 + 5.5 * rnd()); my.push(-2 + 3 * rnd()); }
        // Exact duplicates, so ties are exercised too.
        for (var i = 0; i < 200; i++) { fx[n - 1 - i] = fx[i]; my[n - 1 - i] = my[i]; }
        var box = document.createElement('div');
        document.body.appendChild(box);
        SAE_TEST.drawScatter(box, {ids: ids, log10_frequency: fx, log10_mean: my});
        var s = SAE_TEST.scatter, pts = s.points(), W = s.size[0], H = s.size[1];
        var probes = [];
        for (var t = 0; t < 300; t++) probes.push([rnd() * W, rnd() * H]);
        for (var t = 0; t < 200; t++) probes.push([pts[t].x + 0.3, pts[t].y - 0.2]);   // on duplicates
        var bad = [], t0 = performance.now();
        var got = probes.map(function (p) { return s.hit(p[0], p[1]); });
        var ms = (performance.now() - t0) / probes.length;
        probes.forEach(function (p, k) {
            var best = null, bestD = 36;
            for (var i = 0; i < pts.length; i++) {
                var dx = pts[i].x - p[0], dy = pts[i].y - p[1], d = dx * dx + dy * dy;
                if (d < bestD || (d === bestD && best !== null && pts[i].id < best)) { bestD = d; best = pts[i].id; }
            }
            if (best !== got[k]) bad.push([p, best, got[k]]);
        });
        box.remove();
        return {n: pts.length, bad: bad.slice(0, 5), n_bad: bad.length, ms: ms,
                hits: got.filter(function (g) { return g !== null; }).length};
    """)
    assert result["n"] == 65536
    assert result["n_bad"] == 0, result["bad"]
    assert result["hits"] >= 200  # the probes on points all hit something
    assert result["ms"] < 5, f"{result['ms']:.3f} ms per hit test at 65k points"
    assert_clean(browser, "65k scatter")


def test_bad_routes_say_what_to_do(browser, server, api):
    """An out-of-range latent or a non-integer search shows a message (no request, no console error)."""
    d_sae = api.get("info").json()["d_sae"]
    browser.get(server + f"#/latent/{d_sae}")
    wait_for(browser, "document.getElementById('view').dataset.ready === 'error'", "the error state")
    banner = browser.find_element(By.ID, "error").text
    assert f"0..{d_sae - 1}" in banner and str(d_sae) in banner, banner
    open_page(browser, server + "#/latents?q=abc")
    assert "not a non-negative integer" in browser.find_element(By.ID, "latents-empty").text
    assert not [e for e in browser.get_log("browser") if e.get("level") == "SEVERE"]
