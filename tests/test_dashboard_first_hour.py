"""The Streamlit dashboard as a new user meets it, against a real server (issue 8, "first hour").

Messages that stay until dismissed, resetting a finished run, the latest global model's
confusion matrix, a model download, tables without "None", an uploader that states the
server's limit, and no Deploy button. Streamlit's AppTest runs ``dashboard/index.py`` in this
process for the buttons; the download and the toolbar are checked in Debian's Chromium
against a real ``streamlit run``, as a download happens in the browser.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tomllib
import zipfile

import numpy as np
import pandas as pd
import pyarrow as pa
import pytest
import requests
from playwright.sync_api import TimeoutError as PlaywrightTimeout
from streamlit.testing.v1 import AppTest

from fedhub.server_process import free_port
from tests.chromium import chromium
from tests.conftest import ROOT, ServerProcess, wait_until
from tests.rounds_by_hand import enroll, train_rounds

pytestmark = pytest.mark.slow
DASHBOARD = str(ROOT / "dashboard" / "index.py")
TEST_IMAGES = 200


@pytest.fixture
def server(tmp_path, data_dir):
    server = ServerProcess(tmp_path, data_dir, "--test-limit", str(TEST_IMAGES), "--min-devices", "1",
                           "--no-tensorboard").start()
    yield server
    server.stop()


@pytest.fixture
def dashboard(server, monkeypatch):
    """A function that opens the dashboard (AppTest) on ``server`` with its admin token."""
    monkeypatch.setenv("FEDHUB_SERVER", server.url)
    monkeypatch.setenv("FEDHUB_ADMIN_TOKEN", server.admin_token)
    monkeypatch.delenv("FEDHUB_CA", raising=False)

    def open_dashboard() -> AppTest:
        at = AppTest.from_file(DASHBOARD, default_timeout=60).run()
        assert not at.exception, at.exception
        return at
    return open_dashboard


def texts(elements) -> list[str]:
    return [e.value for e in elements]


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def chart_data(at: AppTest, title: str) -> pd.DataFrame:
    charts = [c for c in at.get("vega_lite_chart") if title in c.proto.spec]
    assert len(charts) == 1, [json.loads(c.proto.spec).get("title") for c in at.get("vega_lite_chart")]
    return pa.ipc.open_stream(charts[0].proto.datasets[0].data.data).read_all().to_pandas()


def flashed(at: AppTest) -> bool:
    """An action's outcome is on the page (it comes with its Dismiss button)."""
    return "dismiss-controls" in [b.key for b in at.button]


def status(server: ServerProcess) -> dict:
    return server.get("/api/status").json()


def test_messages_stay_until_dismissed_or_the_next_action(server, dashboard):
    enroll(server, "d1", active=False)
    at = dashboard()
    at.button(key="toggle-d1").click().run()
    assert texts(at.success) == ["d1 activated"]
    for _ in range(3):  # each live refresh draws the page again: the message stays
        at.run()
        assert texts(at.success) == ["d1 activated"] and not at.exception

    # the next action's outcome takes its place
    at.number_input(key="rounds").set_value(2).run()
    at.button(key="start").click().run()
    assert texts(at.success) == ["training started (2 rounds)"]
    at.run()
    assert texts(at.success) == ["training started (2 rounds)"]

    # dismissed: gone, and it does not come back
    at.button(key="dismiss-controls").click().run()
    assert not at.success
    at.run()
    assert not at.success

    # a refusal stays as long (the message is the one beside its Dismiss button)
    at.text_input(key="admin_token").set_value("not-the-token").run()
    at.button(key="pause").click().run()
    assert flashed(at) and "refused the admin token" in at.error[0].value
    assert status(server)["status"] == "running"
    at.run()
    assert flashed(at) and "refused the admin token" in at.error[0].value
    at.text_input(key="admin_token").set_value(server.admin_token).run()
    assert flashed(at) and "refused the admin token" in at.error[0].value  # typing is no action
    at.button(key="pause").click().run()
    assert not [e for e in texts(at.error) if "refused" in e]
    assert texts(at.success) == ["paused: the round in progress still completes"]
    assert status(server)["status"] == "paused"


def test_reset_a_finished_run_after_confirming(server, dashboard):
    token = enroll(server, "d1")
    train_rounds(server, "d1", token, 1)
    at = dashboard()
    assert metrics(at)["Status"] == "finished" and metrics(at)["Completed rounds"] == "1 / 1"
    assert any(i.startswith("The run is over (1 round done)") for i in texts(at.info)), texts(at.info)

    # Start as it is: the server refuses, and the dashboard says why and what to do
    at.button(key="start").click().run()
    assert any("the run is over (1 round done); start with a larger 'rounds' or reset" in e
               for e in texts(at.error)), texts(at.error)

    # Reset asks first; nothing changes until it is confirmed. It starts a new run and keeps this one.
    at.button(key="reset").click().run()
    assert not at.error  # a new action: the refusal has gone
    warning = "Reset starts a new run with the same settings, from the initial model. This run's 1 " \
              "completed round stays readable as a past run"
    assert any(w.startswith(warning) for w in texts(at.warning)), texts(at.warning)
    assert status(server)["status"] == "finished"
    at.button(key="reset_cancel").click().run()
    assert "reset_confirm" not in [b.key for b in at.button]
    assert not [w for w in texts(at.warning) if w.startswith("Reset starts")]
    assert status(server)["completed_rounds"] == 1

    at.button(key="reset").click().run()
    at.button(key="reset_confirm").click().run()
    assert texts(at.success) == ["reset: a new run from the initial model, with the same settings (the old "
                                 "one is kept: Runs tab); Start trains it"]
    (new, old) = server.get("/api/runs").json()["runs"]
    assert (new["current"], old["current"], old["completed_rounds"]) == (True, False, 1)
    assert status(server)["status"] == "idle" and status(server)["completed_rounds"] == 0
    assert server.get("/api/history").json()["rounds"] == []
    assert metrics(at)["Status"] == "idle" and metrics(at)["Completed rounds"] == "0 / 1"
    assert "reset_confirm" not in [b.key for b in at.button]

    # and a new run starts where the old one could not
    at.button(key="start").click().run()
    assert texts(at.success) == ["training started (1 round)"]
    assert status(server)["status"] == "running"


def test_confusion_matrix_tables_and_uploader(server, dashboard, fashion):
    token = enroll(server, "d1")
    train_rounds(server, "d1", token, 2)
    requests.post(f"{server.url}/api/devices/register", json={"name": "d2"}, timeout=30,
                  headers={"X-Enroll-Secret": server.enroll_secret}).raise_for_status()
    requests.post(f"{server.url}/api/devices/d1/logs", json=[{"level": "INFO", "message": "no round"}],
                  headers={"Authorization": f"Bearer {token}"}, timeout=30).raise_for_status()
    at = dashboard()

    expected = server.admin("GET", "/api/rounds/2/evaluation").json()
    cells = chart_data(at, "confusion matrix")
    names = expected["class_names"]
    matrix = cells.pivot(index="true", columns="predicted", values="count").loc[names, names].to_numpy()
    assert matrix.tolist() == expected["confusion_matrix"]
    # each row holds one true class's test images, as many as the test set has
    _, (_, y_test) = fashion
    assert matrix.sum(axis=1).tolist() == np.bincount(y_test[:TEST_IMAGES], minlength=10).tolist()
    per_class = chart_data(at, "accuracy on each class")
    assert list(per_class["class"]) == names
    assert per_class["accuracy"].tolist() == pytest.approx(
        [np.nan if a is None else a for a in expected["per_class_accuracy"]], nan_ok=True)
    assert (f"Round 2's global model on {TEST_IMAGES} test images: accuracy {expected['accuracy']:.4f}"
            in " ".join(texts(at.caption)))

    # an empty cell shows a dash, not Streamlit's "None"
    devices = next(t.value for t in at.dataframe if "lifecycle" in t.value.columns).set_index("device")
    assert pd.isna(devices.loc["d2", "examples"]) and pd.isna(devices.loc["d2", "local accuracy"])
    logs = [t.value for t in at.dataframe if "message" in t.value.columns]
    assert len(logs) == 1 and logs[0]["round"].isna().all()
    assert {t.proto.placeholder for t in at.dataframe} == {"–"}

    # the uploader says what the server takes (16 MiB a request), not Streamlit's 200 MB
    assert at.get("file_uploader")[0].proto.max_upload_size_mb == 16

    # a new round: the panel follows, with the server's evaluation of that round
    train_rounds(server, "d1", token, 1)
    at.run()
    latest = server.admin("GET", "/api/rounds/latest/evaluation").json()
    assert latest["round"] == 3
    cells = chart_data(at, "confusion matrix")
    matrix = cells.pivot(index="true", columns="predicted", values="count").loc[names, names].to_numpy()
    assert matrix.tolist() == latest["confusion_matrix"]
    assert "Round 3's global model" in " ".join(texts(at.caption))


def test_streamlit_settings_match_the_server():
    """`streamlit run` reads .streamlit/config.toml from the checkout: no Deploy button, and
    the same upload limit as the uploader's."""
    config = tomllib.loads((ROOT / ".streamlit" / "config.toml").read_text())
    assert config["client"]["toolbarMode"] in ("viewer", "minimal")
    assert config["server"]["maxUploadSize"] == 16


def test_no_emoji_in_the_pages():
    """Emoji render as empty boxes on a plain Linux font set; Streamlit's Material icons do not."""
    sources = [*(ROOT / "dashboard").glob("*.py"), *(ROOT / "dashboard_stats").glob("*.*")]
    for path in sources:
        text = path.read_text()
        emoji = sorted({c for c in text if ord(c) >= 0x1F000 or 0x2600 <= ord(c) <= 0x27BF})
        assert not emoji, (path.name, emoji)


# --------------------------------------------------------------------------- in Chromium


@pytest.fixture
def streamlit_page(server, tmp_path):
    """The dashboard served by a real ``streamlit run`` from the checkout, in Chromium."""
    port = free_port()
    env = {**os.environ, "FEDHUB_SERVER": server.url, "FEDHUB_ADMIN_TOKEN": server.admin_token}
    with open(tmp_path / "streamlit.log", "ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "streamlit", "run", DASHBOARD,
                                 "--server.port", str(port)], cwd=ROOT, env=env,
                                stdout=log, stderr=subprocess.STDOUT)
    try:
        def up():
            try:
                return requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2).ok
            except requests.ConnectionError:
                return False
        wait_until(up, 60, "the dashboard to answer")
        with chromium() as browser:
            page = browser.new_page(viewport={"width": 1400, "height": 1000}, accept_downloads=True)
            page.goto(f"http://127.0.0.1:{port}")
            yield page
    finally:
        proc.terminate()
        proc.wait(20)


def weights_in(keras_file: bytes) -> bytes:
    return zipfile.ZipFile(io.BytesIO(keras_file)).read("model.weights.h5")


def test_download_a_model_in_the_browser(server, streamlit_page, tmp_path):
    token = enroll(server, "d1")
    train_rounds(server, "d1", token, 2)
    page = streamlit_page
    # Streamlit's developer options (Deploy, Rerun) are not offered
    page.get_by_role("tab", name="Predict").wait_for(timeout=60_000)
    assert page.get_by_role("button", name="Deploy").count() == 0
    page.get_by_role("tab", name="Predict").click()
    page.get_by_text("16MB per file").wait_for(timeout=30_000)  # the picture box
    assert page.get_by_text("16MB per file").count() == 1
    assert page.get_by_text("200MB").count() == 0
    page.get_by_role("tab", name="Results").click()  # where the download is
    page.get_by_text("Download a model").wait_for(timeout=60_000)
    button = page.get_by_role("button", name="Download round 2")
    button.wait_for(timeout=30_000)

    # choose round 1, and download it
    # The live view above re-renders every 2 s and can move the box or close its list as it opens:
    # open it again, as a person would, until the option can be picked.
    for attempt in range(6):
        page.get_by_label("Round to download").click()
        try:
            page.get_by_role("option", name="round 1").click(timeout=5_000)
            break
        except PlaywrightTimeout:
            assert attempt < 5, "the round list did not open in six tries"
    button = page.get_by_role("button", name="Download round 1")
    button.wait_for(timeout=30_000)
    # The file is fetched on the click; a click the 2-s re-render lands on (under load) starts no
    # download: click again, as a person would when nothing happens.
    for attempt in range(3):
        try:
            with page.expect_download(timeout=20_000) as download:
                button.click()
            break
        except PlaywrightTimeout:
            assert attempt < 2, "no download in three clicks"
    path = tmp_path / "downloaded.keras"
    download.value.save_as(path)
    assert download.value.suggested_filename == "fedhub_round_00001.keras"
    got = path.read_bytes()
    round_1 = server.admin("GET", "/api/rounds/1/model.keras").content
    round_2 = server.admin("GET", "/api/rounds/2/model.keras").content
    assert weights_in(got) == weights_in(round_1) != weights_in(round_2)
    page.screenshot(path=str(tmp_path / "dashboard.png"), full_page=True)
