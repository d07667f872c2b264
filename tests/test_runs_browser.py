"""Runs in the browser (issue 21): two real runs of one real server, FedAvg then FedMedian, the
second started with ``POST /api/runs``; one device process with ``--stay`` trains both.

* the Streamlit dashboard (``streamlit run dashboard/index.py``, in Debian's Chromium) compares
  them: both runs' curves on one chart (its legend names both), and their settings side by
  side with ``strategy`` marked as differing;
* ``/stats`` follows the current run and shows a past one chosen in its run picker;
* the dashboard's New run form (AppTest, in-process) starts a third run with the chosen settings.
"""

from __future__ import annotations

import pytest
from streamlit.testing.v1 import AppTest

from fedhub.device.launcher import stop
from fedhub.split import split_to_devices
from tests.chromium import wait_js
from tests.conftest import ROOT, ServerProcess, launch_devices, wait_until
from tests.test_dashboard_browser import Dashboard
from tests.test_stats_page import POINTS, open_page
from tests.test_stats_page import browser as browser  # the fixture: Chromium via Playwright

pytestmark = pytest.mark.slow

# The text of every Vega chart on the page (Streamlit draws Altair charts as SVG): titles, axes, legend.
CHART_TEXTS = """() => [...document.querySelectorAll('[data-testid="stVegaLiteChart"]')].map(
  (chart) => [...chart.querySelectorAll('svg text')].map((t) => t.textContent.trim()).filter(Boolean))"""
# The compare settings table (st.table): setting -> [differs mark, cells..., whether the row is marked].
SETTINGS_ROWS = """() => {
  const table = [...document.querySelectorAll('[data-testid="stTable"] table')].find(
    (t) => [...t.querySelectorAll('th')].some((th) => th.textContent.trim() === 'differs'));
  if (!table) return null;
  return Object.fromEntries([...table.querySelectorAll('tbody tr')].map((tr) => {
    const cells = [...tr.children].map((c) => c.textContent.trim());
    const marked = [...tr.querySelectorAll('td')].some((td) => getComputedStyle(td).backgroundColor
      !== 'rgba(0, 0, 0, 0)' && getComputedStyle(td).backgroundColor !== 'transparent');
    return [cells[0], [...cells.slice(1), marked]];
  }));
}"""


class TwoRuns:
    """A server that ran FedAvg for two rounds, then (``POST /api/runs``) FedMedian for two."""

    def __init__(self, tmp, data_dir) -> None:
        self.root = tmp / "devices"
        split_to_devices(self.root, 1, data_dir=data_dir, limit=200, progress=False)
        self.server = ServerProcess(tmp, data_dir, "--test-limit", "200", "--min-devices", "1",
                                    "--rounds", "2", "--auto-activate", "--start", "--strategy", "fedavg",
                                    "--no-tensorboard").start()
        self.devices = launch_devices(self.server, self.root, ["device1"], "--stay")
        self.tmp = tmp

    def finished(self) -> bool:
        return self.server.get("/api/status").json()["status"] == "finished"

    def make(self) -> None:
        wait_until(self.finished, 240, "run 1 (fedavg)", interval=1)
        r = self.server.admin("POST", "/api/runs", json={"settings": {"strategy": "fedmedian"}})
        assert r.status_code == 201, r.text
        assert self.server.admin("POST", "/api/training/start").ok
        wait_until(lambda: self.finished() and self.server.get("/api/status").json()["completed_rounds"] == 2,
                   240, "run 2 (fedmedian), trained by the device that stayed", interval=1)
        runs = self.server.get("/api/runs").json()["runs"]
        assert [(r["id"], r["settings"]["strategy"], r["current"]) for r in runs] == [
            (2, "fedmedian", True), (1, "fedavg", False)]
        # as the dashboard and /stats name them (the server names a run after its strategy)
        self.fedmedian, self.fedavg = (f"{r['name']} · finished{' (current)' * r['current']}" for r in runs)

    def close(self) -> None:
        stop(self.devices)
        self.server.stop()


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, data_dir):
    runs = TwoRuns(tmp_path_factory.mktemp("runs"), data_dir)
    try:
        runs.make()
        yield runs
    finally:
        runs.close()


def test_the_dashboard_compares_two_runs_on_one_chart(browser, two_runs, tmp_path):
    server = two_runs.server
    dashboard = Dashboard(tmp_path, {"FEDHUB_SERVER": server.url, "FEDHUB_ADMIN_TOKEN": server.admin_token})
    page = browser.new_page(viewport={"width": 1500, "height": 1200})
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    try:
        dashboard.wait_ready()
        page.goto(dashboard.url)
        page.get_by_role("tab", name="Runs", exact=True).click()

        def compare_charts() -> list[list[str]]:
            return [texts for texts in page.evaluate(CHART_TEXTS)
                    if "test accuracy per round, by run" in texts]
        (accuracy,) = wait_until(compare_charts, 120, "the compare chart of test accuracy")
        # one chart, both runs: its legend names each
        assert two_runs.fedavg in accuracy and two_runs.fedmedian in accuracy, accuracy
        rows = wait_until(lambda: page.evaluate(SETTINGS_ROWS), 30, "the settings side by side")
        # columns: differs, then one per run, newest first (the picker's order)
        assert rows["strategy"] == ["≠", "fedmedian", "fedavg", True], rows
        assert rows["epochs"][0] == "" and rows["epochs"][-1] is False, rows
        assert [s for s, row in rows.items() if row[0] == "≠"] == ["strategy"], rows
        assert problems == [], problems
        assert "Traceback" not in dashboard.log(), dashboard.log()
    finally:
        page.close()
        dashboard.stop()


def test_stats_follows_the_current_run_and_shows_a_past_one(browser, two_runs):
    server = two_runs.server
    history = {run: server.get(f"/api/runs/{run}").json()["history"] for run in (1, 2)}
    page, problems = open_page(browser, f"{server.url}/stats")
    wait_js(page, POINTS, ["accuracy-chart", 2], what="the current run's 2 rounds")
    assert page.text_content("#strategy") == "fedmedian"
    assert page.is_visible("#run-select")
    assert page.locator("#run-select option").all_text_contents() == [
        "the current run (live)", two_runs.fedavg]
    first = page.locator("#rounds tr").first.locator("td").all_text_contents()
    assert first[1] == f"{history[2][-1]['test_accuracy']:.4f}"

    page.select_option("#run-select", "1")  # the past run, as it ended
    wait_js(page, "document.getElementById('strategy').textContent === 'fedavg'", what="run 1's strategy")
    wait_js(page, "(acc) => document.querySelector('#rounds tr td:nth-child(2)').textContent === acc",
            f"{history[1][-1]['test_accuracy']:.4f}", what="run 1's rounds")
    assert page.locator("#rounds tr").count() == 2
    assert page.text_content("#status") == "finished"
    assert page.text_content("#completed") == "2 / 2"
    assert "past run" in page.text_content("#run-note")
    assert page.locator("#devices tr").count() == 1, "the devices table stays live"

    page.select_option("#run-select", "")  # back to the current run, live
    wait_js(page, "document.getElementById('strategy').textContent === 'fedmedian'", what="the current run")
    assert page.text_content("#run-note") == ""
    assert problems == [], problems
    page.close()


def test_new_run_form_starts_a_run_with_the_chosen_settings(two_runs, monkeypatch):
    server = two_runs.server
    monkeypatch.setenv("FEDHUB_SERVER", server.url)
    monkeypatch.setenv("FEDHUB_ADMIN_TOKEN", server.admin_token)
    at = AppTest.from_file(str(ROOT / "dashboard" / "index.py"), default_timeout=30).run()
    assert not at.exception, at.exception
    # the Results tab shows a past run when asked, read-only
    assert at.selectbox(key="results_run").options == ["the current run (live)", two_runs.fedavg]
    at.selectbox(key="results_run").set_value(1).run()
    assert any("fedavg" in i.value and "2 of 2 rounds" in i.value and "read-only" in i.value
               for i in at.info), [i.value for i in at.info]
    assert not at.exception, at.exception
    # the form starts as a copy of the current run (fedmedian, 2 rounds)
    assert at.selectbox(key="new_strategy").value == "fedmedian"
    assert at.number_input(key="new_rounds").value == 2
    at.selectbox(key="new_strategy").set_value("krum").run()
    at.text_input(key="new_param_krum_num_malicious").set_value("many").run()
    at.button(key="new_run").click().run()
    assert any("num_malicious must be int" in e.value for e in at.error), [e.value for e in at.error]
    # a setting the server refuses: it says which, and why
    at.text_input(key="new_param_krum_num_malicious").set_value("0").run()
    at.button(key="new_run").click().run()
    assert any("strategy krum with num_malicious=0 needs at least 3 updates a round" in e.value
               for e in at.error), [e.value for e in at.error]
    assert len(server.get("/api/runs").json()["runs"]) == 2, "nothing started"

    at.selectbox(key="new_strategy").set_value("fedprox").run()
    at.text_input(key="new_param_fedprox_proximal_mu").set_value("0.1").run()
    at.number_input(key="new_rounds").set_value(1).run()
    at.text_input(key="new_name").set_value("prox-once").run()
    at.checkbox(key="new_start").uncheck().run()
    at.button(key="new_run").click().run()
    assert not at.exception, at.exception
    said = [s.value for s in at.success]
    assert any(s.startswith("new run #3 (fedprox): idle") for s in said), (said, [e.value for e in at.error])
    newest = server.get("/api/runs").json()["runs"][0]
    assert (newest["id"], newest["name"], newest["current"], newest["status"]) == (
        3, "prox-once", True, "idle")
    assert newest["settings"]["strategy"] == "fedprox" and newest["settings"]["rounds"] == 1
    assert newest["settings"]["strategy_params"] == {"proximal_mu": 0.1}
    # the Run tab shows what the status says of the new run, its Rounds input too (it said 2 before)
    at.run()
    status = server.get("/api/status").json()
    assert (status["completed_rounds"], status["total_rounds"]) == (0, 1)
    assert {m.label: m.value for m in at.metric}["Completed rounds"] == "0 / 1"
    assert at.number_input(key="rounds").value == 1
