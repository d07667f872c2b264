"""The live accuracy page (dashboard_stats/) in Debian's Chromium, against a real federated run.

The browser is driven by Playwright for Python with ``executable_path``: no browser download.
"""

from __future__ import annotations

import re

import pytest
import requests

from fedhub.device.launcher import launch, stop
from fedhub.split import split_to_devices
from tests.chromium import chromium, wait_js
from tests.conftest import ROOT, ServerProcess, wait_until
from tests.test_api import make_app

STATS_DIR = ROOT / "dashboard_stats"

# Each devices-table row: name -> [lifecycle, why, the row's class].
LIFECYCLES = """() => Object.fromEntries([...document.querySelectorAll('#devices tr')].map(
  (tr) => [tr.cells[0].textContent, [tr.cells[2].textContent, tr.cells[3].textContent, tr.className]]))"""
# A device's own words about its data, which the page must show as text, never as markup.
PROBLEM = 'labels must be in 0..9 <img src=x onerror="document.title=1">'

POINTS = """([canvas, n]) => {
  const chart = window.Chart && window.Chart.getChart(canvas);
  return !!chart && chart.data.datasets.length > 0
    && chart.data.datasets[0].data.filter((v) => v !== null).length === n;
}"""


# --------------------------------------------------------------------------- without a browser


@pytest.fixture
def client(tmp_path):
    app, engine = make_app(tmp_path, min_devices=1)
    yield app.test_client()
    engine.stop()


def test_page_and_assets_are_served(client):
    r = client.get("/stats")
    assert r.status_code == 308 and r.headers["Location"].endswith("/stats/")
    page = client.get("/stats/")
    assert page.status_code == 200 and page.mimetype == "text/html"
    assert "script-src 'self'" in page.headers["Content-Security-Policy"]
    for asset, mimetype in [("stats.js", "text/javascript"), ("style.css", "text/css"),
                            ("vendor/chart.umd.min.js", "text/javascript")]:
        r = client.get(f"/stats/{asset}")
        assert r.status_code == 200 and r.mimetype == mimetype, asset
    # every asset the page links to is there, and nothing comes from another host
    html = page.get_data(as_text=True)
    links = re.findall(r'(?:src|href)="([^"]+)"', html)
    assert links and not [u for u in links if "//" in u]
    for link in links:
        if not link.startswith("data:"):
            assert client.get(f"/stats/{link}").status_code == 200, link
    # nothing else leaves the folder
    for path in ("/stats/../server.py", "/stats/%2e%2e/server.py", "/stats/vendor/update.sh",
                 "/stats/nope.js"):
        r = client.get(path)
        assert r.status_code == 404 and r.is_json, path


def test_cross_origin_reads_only_for_public_gets(client):
    for path in ("/api/status", "/api/history", "/api/devices", "/health", "/api/runs", "/api/runs/1"):
        assert client.get(path).headers.get("Access-Control-Allow-Origin") == "*", path
    assert "Access-Control-Allow-Origin" not in client.get("/api/model").headers
    assert "Access-Control-Allow-Origin" not in client.post("/api/training/start").headers


def test_server_data_is_only_rendered_as_text():
    lines = (STATS_DIR / "stats.js").read_text().splitlines()
    script = "\n".join(line for line in lines if not line.strip().startswith("//"))  # code, not comments
    for forbidden in ("innerHTML", "outerHTML", "insertAdjacentHTML", "eval(", "new Function",
                      "document.write"):
        assert forbidden not in script, forbidden
    assert "textContent" in script
    assert "<script>" not in (STATS_DIR / "index.html").read_text()  # no inline script (CSP)


def test_chart_js_is_vendored_with_its_licence():
    vendor = STATS_DIR / "vendor"
    assert "Chart.js" in (vendor / "chart.umd.min.js").read_text()[:200]
    assert "MIT License" in (vendor / "LICENSE.md").read_text()
    assert "npm pack" in (vendor / "update.sh").read_text()


# --------------------------------------------------------------------------- in Chromium


@pytest.fixture(scope="module")
def browser():
    with chromium() as b:
        yield b


def open_page(browser, url: str):
    page = browser.new_page(viewport={"width": 1280, "height": 900})
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}")
            if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.goto(url)
    return page, problems


def wait_points(page, n: int) -> None:
    for canvas in ("accuracy-chart", "loss-chart"):
        wait_js(page, POINTS, [canvas, n], what=f"{n} points on {canvas}")


def wait_lifecycles(page, server, **states: str) -> dict[str, list[str]]:
    """Until the devices table shows each device's lifecycle state and reason as the server has
    them, and the devices named in ``states`` are in those states."""
    def same():
        expected = {d["name"]: [d["lifecycle"], d["lifecycle_reason"]]
                    for d in server.get("/api/devices").json()["devices"]}
        shown = page.evaluate(LIFECYCLES)
        if {name: row[:2] for name, row in shown.items()} != expected:
            return None
        return shown if all(shown[name][0] == state for name, state in states.items()) else None
    return wait_until(same, 30, f"the devices table to show each device's lifecycle {states}", interval=0.25)


@pytest.mark.slow
def test_live_page_during_a_real_run(browser, tmp_path, data_dir):
    split_to_devices(tmp_path / "devices", 2, data_dir=data_dir, limit=300, progress=False)
    server = ServerProcess(tmp_path, data_dir, "--test-limit", "300", "--min-devices", "2",
                           "--auto-activate", "--rounds", "0").start()
    devices = []
    try:
        devices = launch(server.url, ["device1", "device2"], devices_root=tmp_path / "devices",
                         env={"FEDHUB_ENROLL_SECRET": server.enroll_secret}, log_dir=tmp_path)
        wait_until(lambda: server.get("/api/status").json()["devices"].get("idle") == 2, 90,
                   "two devices enrolled and idle")
        # a first stretch of training, then a pause: the count of completed rounds is stable
        assert server.admin("POST", "/api/training/start").ok
        wait_until(lambda: server.get("/api/status").json()["completed_rounds"] >= 1, 90, "round 1")
        assert server.admin("POST", "/api/training/pause").ok
        status = wait_until(lambda: (s := server.get("/api/status").json())["round"] is None and s,
                            60, "the round in progress to complete")
        done = status["completed_rounds"]
        # a device whose data is invalid: refused, and the page says why
        bad = {"ok": False, "problems": [PROBLEM], "num_examples": 0, "class_counts": []}
        r = requests.post(f"{server.url}/api/devices/register", json={"name": "broken", "validation": bad},
                          headers={"X-Enroll-Secret": server.enroll_secret}, timeout=30)
        assert r.status_code == 201 and r.json()["lifecycle"] == "invalid", r.text

        page, problems = open_page(browser, f"{server.url}/stats")
        wait_points(page, done)
        assert page.locator("#rounds tr").count() == done
        assert page.text_content("#status") == "paused"
        assert page.text_content("#completed") == str(done)
        devices_on_chart = page.evaluate("Chart.getChart('accuracy-chart').data.datasets.map(d => d.label)")
        assert devices_on_chart[1:] == ["device1", "device2"]
        assert page.locator("#devices tr").count() == 3
        assert "connected to" in page.text_content("#connection")
        shown = wait_lifecycles(page, server, device1="waiting", device2="waiting")
        assert shown["broken"] == ["invalid", f"invalid data: {PROBLEM}", "lifecycle-invalid"]
        assert shown["device1"][2] == shown["device2"][2] == ""
        assert page.locator("#devices img").count() == 0 and page.title() == "FedHub · live accuracy"

        # exactly one more round: the page gains exactly one point, without a reload
        assert server.admin("POST", "/api/training/start", json={"rounds": done + 1}).ok
        wait_points(page, done + 1)
        wait_js(page, "document.getElementById('status').textContent === 'finished'")
        shown = wait_lifecycles(page, server, device1="finished", device2="finished", broken="invalid")
        assert shown["device1"][1] == "the run is over"
        # an ERROR naming a round marks that device's update failed: its row says so
        token = (tmp_path / "devices" / "device1" / "token").read_text()
        r = requests.post(f"{server.url}/api/devices/device1/logs", timeout=30,
                          json=[{"level": "ERROR", "message": "disk full", "round": done + 1}],
                          headers={"Authorization": f"Bearer {token}"})
        assert r.ok, r.text
        wait_js(page, """(text) => [...document.querySelectorAll('#devices tr')].some(
                  (tr) => tr.cells[0].textContent === 'device1' && tr.cells[6].textContent === text)""",
                f"update failed (round {done + 1})", what="device1's failed update")
        assert server.get("/api/status").json()["completed_rounds"] == done + 1
        assert page.locator("#rounds tr").count() == done + 1
        first_row = page.locator("#rounds tr").first.locator("td").all_text_contents()
        last = server.get("/api/history").json()["rounds"][-1]
        assert first_row[:3] == [str(done + 1), f"{last['test_accuracy']:.4f}", f"{last['test_loss']:.4f}"]

        # the same page opened as a file, reading the server cross-origin
        file_page, file_problems = open_page(
            browser, (STATS_DIR / "index.html").as_uri() + f"?server={server.url}")
        wait_points(file_page, done + 1)
        assert "connected to" in file_page.text_content("#connection")

        assert problems == [] and file_problems == []

        # the server goes away: the page says so and keeps trying
        server.stop()
        wait_js(page, "document.getElementById('connection').textContent.includes('cannot reach')",
                timeout=15)
    finally:
        stop(devices)
        server.stop()
