"""The Streamlit dashboard in Debian's Chromium: a real ``streamlit run dashboard/index.py``
process, a real server and a real device, driven by clicks.

AppTest (tests/test_dashboard.py) runs the script in-process; this sees what a person sees:
the page's live refresh (a device that enrolls appears without a reload) and one button flow
(activate the device, press Start, watch the round complete).
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import requests

from fedhub.device.launcher import launch, stop
from fedhub.server_process import free_port
from fedhub.split import split_to_devices
from tests.conftest import ROOT, ServerProcess, wait_until
from tests.test_stats_page import browser  # noqa: F401 - the fixture: Chromium via Playwright

pytestmark = pytest.mark.slow

# Each metric on the page, label -> value, as shown.
METRICS = """() => Object.fromEntries([...document.querySelectorAll('[data-testid="stMetric"]')].map(
  (m) => [m.querySelector('[data-testid="stMetricLabel"]').innerText.trim(),
          m.querySelector('[data-testid="stMetricValue"]').innerText.trim()]))"""
BUTTONS = """() => [...document.querySelectorAll('button')].map((b) => b.innerText.trim()).filter(Boolean)"""


class Dashboard:
    """``streamlit run dashboard/index.py`` on a free loopback port, its log kept for failures."""

    def __init__(self, tmp, env: dict[str, str]) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp / "streamlit.log"
        cmd = [sys.executable, "-m", "streamlit", "run", str(ROOT / "dashboard" / "index.py"),
               "--server.address", "127.0.0.1", "--server.port", str(self.port),
               "--server.headless", "true", "--browser.gatherUsageStats", "false",
               "--server.fileWatcherType", "none"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                         env={**os.environ, **env})

    def wait_ready(self) -> None:
        def healthy():
            assert self.proc.poll() is None, self.log()
            try:
                return requests.get(f"{self.url}/_stcore/health", timeout=2).text == "ok"
            except requests.ConnectionError:
                return False
        wait_until(healthy, 180, "streamlit to answer")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def stop(self) -> None:
        stop([self.proc])


def test_live_refresh_and_activate_start_round_in_chromium(browser, tmp_path, data_dir):  # noqa: F811
    split_to_devices(tmp_path / "devices", 1, data_dir=data_dir, limit=200, progress=False)
    server = ServerProcess(tmp_path, data_dir, "--test-limit", "200", "--min-devices", "1", "--rounds", "1",
                           "--no-tensorboard").start()
    dashboard = Dashboard(tmp_path, {"FEDHUB_SERVER": server.url, "FEDHUB_ADMIN_TOKEN": server.admin_token})
    devices = []
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    problems: list[str] = []
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    try:
        dashboard.wait_ready()
        page.goto(dashboard.url)

        def metrics():
            return page.evaluate(METRICS)
        wait_until(lambda: metrics().get("Status") == "idle", 60, "the page to show the server's status")
        assert metrics()["Completed rounds"] == "0 / 1"
        assert not [b for b in page.evaluate(BUTTONS) if b.endswith("device1")], "no device yet"

        # live refresh: a device enrolls (inactive) and its row and button appear, without a reload
        devices = launch(server.url, ["device1"], devices_root=tmp_path / "devices",
                         env={"FEDHUB_ENROLL_SECRET": server.enroll_secret}, log_dir=tmp_path)
        wait_until(lambda: "Activate device1" in page.evaluate(BUTTONS), 240, "device1 on the page")
        assert server.get("/api/devices").json()["devices"][0]["active"] is False

        page.get_by_role("button", name="Activate device1", exact=True).click()
        wait_until(lambda: "Deactivate device1" in page.evaluate(BUTTONS), 30, "the button to change")
        assert server.get("/api/devices").json()["devices"][0]["active"] is True

        page.get_by_role("button", name="Start", exact=True).click()
        wait_until(lambda: metrics().get("Status") in ("running", "finished"), 30, "the run to start")
        # the round runs and completes; the page follows it by itself
        wait_until(lambda: metrics().get("Status") == "finished", 120, "the page to show the finished run")
        assert metrics()["Completed rounds"] == "1 / 1"
        (round1,) = server.get("/api/history").json()["rounds"]
        assert set(round1["devices"]) == {"device1"}
        page.get_by_role("tab", name="Results").click()  # the charts have a tab of their own
        wait_until(lambda: page.locator('[data-testid="stVegaLiteChart"]').count() >= 2, 30,
                   "the accuracy and loss charts")
        # the model download follows the run too: the round trained is there without a reload
        wait_until(lambda: any(b.endswith("Download round 1") for b in page.evaluate(BUTTONS)), 30,
                   "round 1's download")  # (after the button's icon)
        assert problems == [], problems
        assert "Traceback" not in dashboard.log(), dashboard.log()
    finally:
        page.close()
        stop(devices)
        dashboard.stop()
        server.stop()
