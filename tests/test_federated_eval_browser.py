"""Federated evaluation in Debian's Chromium: the per-device accuracy chart and the latest
round's per-device table on the live page (/stats), and on the Streamlit dashboard.

* against a stand-in for the server's read-only API, serving hand-made history entries (old ones
  without ``federated_evaluation``, None, reports with personal models): the page's JavaScript
  shapes them exactly as fedhub/dashboard/federated_eval.py does (points, rows, the line above
  the table), follows new rounds without a reload, and fits a phone;
* against a real server and real devices that hold out part of their data: two rounds, each
  device evaluating the global model it trained from, seen on /stats and on the dashboard.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

from fedhub.dashboard import federated_eval as fe
from tests.chromium import wait_js
from tests.conftest import ServerProcess, launch_devices, stop_processes, wait_until
from tests.test_federated_eval_views import device, ditto_history, entry, report, summary
from tests.test_stats_page import STATS_DIR, open_page
from tests.test_stats_page import browser as browser  # the fixture: Chromium via Playwright

pytestmark = pytest.mark.slow

# What the page's per-device accuracy chart draws, and its legend.
FED_CHART = """() => {
  const chart = window.Chart && window.Chart.getChart('fed-eval-chart');
  if (!chart) return null;
  return { labels: chart.data.labels,
           datasets: chart.data.datasets.map((d) => ({ label: d.label, data: d.data, fill: d.fill ?? null })),
           legend: (chart.legend.legendItems || []).map((item) => item.text),
           aria: chart.canvas.getAttribute('aria-label') };
}"""
# The per-device table's cells, row by row.
FED_ROWS = """() => [...document.querySelectorAll('#fed-eval-devices tr')].map(
  (tr) => [...tr.cells].map((td) => td.textContent))"""
FED_STATE = """() => ({
  empty: document.querySelector('#fed-eval figure').classList.contains('empty'),
  note: document.getElementById('fed-eval-none').textContent,
  noteShown: document.getElementById('fed-eval-none').offsetParent !== null,
  chartShown: document.getElementById('fed-eval-chart').offsetParent !== null,
  tableHidden: document.getElementById('fed-eval-table').hidden,
  what: document.getElementById('fed-eval-what').textContent })"""
# Where each chart series comes from in fedhub.dashboard.federated_eval's points.
SERIES = {"worst device": "worst", "global: worst–best device": "best", "global: mean (by examples)": "mean",
          "global: worst 10 % of devices": "worst_10pct", "personal: mean (by examples)": "personal_mean",
          "server: test accuracy": "test_accuracy"}


def fmt(value: float | None) -> str:
    return "–" if value is None else f"{value:.4f}"


def expected_rows(history: list[dict]) -> list[list[str]]:
    """The table the page should show: fedhub.dashboard.federated_eval's rows, as the page writes them."""
    found = fe.latest(history)
    assert found is not None
    return [[r["device"], "–" if r["num_examples"] is None else str(r["num_examples"]),
             fmt(r["global_accuracy"]),
             "—" if r["personal_accuracy"] is None else fmt(r["personal_accuracy"])] for r in found.rows]


def assert_chart_matches(chart: dict, history: list[dict]) -> None:
    """The page drew the points fedhub.dashboard.federated_eval computes, series by series."""
    points = fe.accuracy_points(history)
    assert chart["labels"] == [str(p["x"]) for p in points]
    drawn = {d["label"]: d["data"] for d in chart["datasets"]}
    personal = any(p["personal_mean"] is not None for p in points)
    assert list(drawn) == [s for s in SERIES if personal or s != "personal: mean (by examples)"], list(drawn)
    for label, data in drawn.items():
        want = [p[SERIES[label]] for p in points]
        assert data == pytest.approx(want), (label, data, want)
    assert "worst device" not in chart["legend"] and "global: worst–best device" in chart["legend"]
    assert [d["fill"] for d in chart["datasets"][:2]] == [False, "-1"]  # the band: best filled down to worst


# --------------------------------------------------------------------------- a stand-in server


class StandIn:
    """The server's public read-only API as /stats polls it (status, history, devices, runs),
    answering with the history a test sets, cross-origin like the real one."""

    def __init__(self) -> None:
        self.history: list[dict] = []
        self.devices: list[dict] = []
        stand_in = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                path = self.path.split("?", 1)[0]
                body = stand_in.answer(path)
                data = json.dumps(body).encode()
                self.send_response(200 if body is not None else 404)
                self.send_header("Content-Type", "application/json")
                self.send_header("Access-Control-Allow-Origin", "*")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def answer(self, path: str) -> Any:
        history = list(self.history)
        if path == "/api/status":
            return {"status": "running", "mode": "sync", "completed_rounds": len(history),
                    "total_rounds": None, "round": None, "reason": "",
                    "strategy": {"name": "fedavg", "params": {}}, "compression": None, "privacy": None,
                    "secure_aggregation": None, "devices": {}}
        if path == "/api/history":
            return {"rounds": history, "failures": []}
        if path == "/api/devices":
            return {"devices": self.devices, "total": len(self.devices), "offset": 0}
        if path == "/api/runs":
            return {"runs": []}
        return None

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def stand_in():
    server = StandIn()
    yield server
    server.close()


def a_device(name: str, attack: dict | None = None) -> dict:
    return {"name": name, "state": "idle", "lifecycle": "waiting", "lifecycle_reason": "", "last_seen": 0,
            "num_examples": 100, "latest": None, "active": True, "attack": attack}


def test_the_page_shapes_hand_made_reports_as_the_dashboard_does(browser, stand_in, tmp_path):
    # an older run's rounds: no federated evaluation at all
    stand_in.history = [entry(1, 0.5), entry(2, 0.6)]
    stand_in.devices = [a_device("device1"), a_device("device2", {"kind": "scale", "params": {"factor": 10}})]
    page, problems = open_page(browser, (STATS_DIR / "index.html").as_uri() + f"?server={stand_in.url}")
    wait_js(page, "() => document.querySelectorAll('#rounds tr').length === 2", what="the two rounds")
    state = page.evaluate(FED_STATE)
    assert state["empty"] and state["noteShown"] and not state["chartShown"] and state["tableHidden"], state
    assert state["note"].startswith("No device has evaluated yet") and "--holdout" in state["note"]

    # the reports arrive: chart and table, without a reload
    history = ditto_history()
    stand_in.history = history
    wait_js(page, "() => !document.querySelector('#fed-eval figure').classList.contains('empty')",
            what="the per-device accuracy chart")
    wait_js(page, "() => document.querySelectorAll('#fed-eval-devices tr').length === 3", what="the table")
    state = page.evaluate(FED_STATE)
    assert state["chartShown"] and not state["noteShown"] and not state["tableHidden"], state
    assert state["what"] == fe.describe(fe.latest(history))
    chart = page.evaluate(FED_CHART)
    assert_chart_matches(chart, history)
    assert chart["aria"].startswith("each round's device accuracy on held-out data; latest global model 2")
    assert page.evaluate(FED_ROWS) == expected_rows(history)
    assert page.evaluate(FED_ROWS)[0] == ["device2", "100", "0.6000", "0.8000"]
    # a device that declared an attack is marked beside its name here too
    assert page.evaluate("document.querySelector('#fed-eval-devices tr td').dataset.attack") == \
        "scale (factor=10)"
    page.screenshot(path=str(tmp_path / "fed-eval-desktop.png"), full_page=True)

    # a round without a report, then one without personal models: the table follows the latest
    plain = report(4, summary(0.82, 0.7, 0.9, 0.72, devices=2, num_examples=200), devices={
        "device1": device(120, 0.9), "device3": device(80, 0.7)})
    history = [*history, entry(4, 0.85, None), entry(5, 0.86, plain), entry(6, 0.87)]
    stand_in.history = history
    wait_js(page, "() => document.querySelectorAll('#fed-eval-devices tr').length === 2",
            what="round 5's table")
    assert page.evaluate(FED_ROWS) == [["device3", "80", "0.7000", "—"], ["device1", "120", "0.9000", "—"]]
    assert page.evaluate(FED_STATE)["what"] == fe.describe(fe.latest(history))
    assert fe.describe(fe.latest(history)).startswith("Round 5: global model v4 on 2 devices, 200 held-out")
    assert_chart_matches(page.evaluate(FED_CHART), history)

    # a phone, dark: the chart and the table fit the screen, the table scrolls in its own box
    phone = browser.new_page(viewport={"width": 390, "height": 844}, color_scheme="dark", is_mobile=True,
                             has_touch=True, device_scale_factor=2)
    phone_problems: list[str] = []
    phone.on("pageerror", lambda e: phone_problems.append(str(e)))
    phone.goto((STATS_DIR / "index.html").as_uri() + f"?server={stand_in.url}")
    wait_js(phone, "() => document.querySelectorAll('#fed-eval-devices tr').length === 2", what="the table")
    scroll_width, viewport = phone.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
    assert scroll_width <= viewport == 390, (scroll_width, viewport)
    for selector in ("#fed-eval-chart", "#fed-eval-table .table-box"):
        box = phone.locator(selector).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= viewport, (selector, box)
    phone.screenshot(path=str(tmp_path / "fed-eval-phone.png"), full_page=True)
    assert problems == [] and phone_problems == [], (problems, phone_problems)
    phone.close()
    page.close()


# --------------------------------------------------------------------------- a real run

ROUNDS = 2
# The devices hold out part of their data for evaluation: `python -m fedhub.split` holds out 10 %
# by default (--holdout); a device can also be told `--holdout FRACTION` of its own data.
DEVICE_ARGS: tuple[str, ...] = ()
SERVER_ARGS = ("--test-limit", "300", "--min-devices", "2", "--rounds", str(ROUNDS), "--auto-activate",
               "--start", "--no-tensorboard")  # --fed-eval-every: 1 by default
# The text of every Vega chart on the Streamlit page.
CHART_TEXTS = """() => [...document.querySelectorAll('[data-testid="stVegaLiteChart"]')].map(
  (chart) => [...chart.querySelectorAll('svg text')].map((t) => t.textContent.trim()).filter(Boolean))"""


def test_a_real_run_shows_each_devices_accuracy_on_held_out_data(browser, tmp_path, data_dir,
                                                                split_devices):
    from tests.test_dashboard_browser import Dashboard

    root = split_devices(2, limit=400)
    server = ServerProcess(tmp_path, data_dir, *SERVER_ARGS).start()
    devices = launch_devices(server, root, ["device1", "device2"], *DEVICE_ARGS)
    dashboard = None
    try:
        wait_until(lambda: server.get("/api/status").json()["status"] == "finished", 300,
                   f"{ROUNDS} rounds with two devices", interval=1)
        history = server.get("/api/history").json()["rounds"]
        assert len(history) == ROUNDS
        for r in history:
            assert "federated_evaluation" in r, f"round {r['round']}'s entry has no federated_evaluation: {r}"
            report_ = r["federated_evaluation"]
            assert report_ is not None, f"no device evaluated in round {r['round']} (held-out data?)"
            assert report_["model_version"] == r["round"] - 1, report_
            assert set(report_["devices"]) == {"device1", "device2"}, report_
            assert report_["global"]["devices"] == 2 and report_["global"]["num_examples"] > 0, report_
            assert report_["personalization"] == "none" and report_["personal"] is None, report_
        found = fe.latest(history)
        assert (found.round, found.model_version) == (ROUNDS, ROUNDS - 1)

        page, problems = open_page(browser, f"{server.url}/stats")
        wait_js(page, "() => document.querySelectorAll('#fed-eval-devices tr').length === 2",
                what="the per-device table")
        wait_js(page, "() => !document.querySelector('#fed-eval figure').classList.contains('empty')",
                what="the per-device accuracy chart")
        assert_chart_matches(page.evaluate(FED_CHART), history)
        assert page.evaluate(FED_ROWS) == expected_rows(history)
        assert page.evaluate(FED_STATE)["what"] == fe.describe(found)
        assert page.is_visible("#fed-eval-chart")
        page.screenshot(path=str(tmp_path / "fed-eval-real.png"), full_page=True)
        assert problems == [], problems
        page.close()

        # the Streamlit dashboard's Results tab: the same chart, and the latest round's devices
        dashboard = Dashboard(tmp_path, {"FEDHUB_SERVER": server.url,
                                         "FEDHUB_ADMIN_TOKEN": server.admin_token})
        dashboard.wait_ready()
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        errors: list[str] = []
        page.on("pageerror", lambda e: errors.append(f"page error: {e}"))
        page.goto(dashboard.url)
        page.get_by_role("tab", name="Results", exact=True).click()
        def fed_charts() -> list[list[str]]:
            return [t for t in page.evaluate(CHART_TEXTS) if "devices' accuracy on their held-out data" in t]
        (texts,) = wait_until(fed_charts, 120, "the per-device accuracy chart on the dashboard", interval=0.5)
        assert "global: worst–best device" in texts and "server: test accuracy" in texts, texts
        wait_until(lambda: fe.describe(found) in page.inner_text("body"), 30, "the line above the devices")
        page.screenshot(path=str(tmp_path / "fed-eval-dashboard.png"), full_page=True)
        assert errors == [], errors
        assert "Traceback" not in dashboard.log(), dashboard.log()
        page.close()
    finally:
        if dashboard is not None:
            dashboard.stop()
        stop_processes(devices)
        server.stop()
