"""Progress inside a round through the protocol (``POST /api/devices/<name>/progress``), shown by
both dashboards; and the Streamlit dashboard finding the run's state directory.

A real server; the device here is the protocol client itself (``fedhub.device.client.Client``), so the
progress it reports is exactly known and the pages can be checked against it.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import requests
from streamlit.testing.v1 import AppTest

from fedhub import state_dir as state
from fedhub.device.client import Client
from tests.conftest import ROOT, wait_until

pytestmark = pytest.mark.slow
DASHBOARD = str(ROOT / "dashboard" / "index.py")


def progress_call(server, name: str, body, token: str | None) -> requests.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return requests.post(f"{server.url}/api/devices/{name}/progress", json=body, headers=headers, timeout=30)


def test_progress_through_the_protocol_and_on_both_dashboards(server_factory, monkeypatch):
    server = server_factory("--auto-activate", "--start", "--rounds", "1", "--test-limit", "10",
                            "--no-tensorboard").start()
    probe = Client(server.url, "probe", retry_for=30)
    probe.register(server.enroll_secret)
    task = probe.task(wait=20)
    assert task["action"] == "train" and task["round"] == 1, task
    other = Client(server.url, "other", retry_for=30)  # enrolled after round 1 opened: not in it
    other.register(server.enroll_secret)

    # bounded and validated: each refusal names its field, and changes nothing
    good = {"round": 1, "done": 40, "total": 188}
    refusals = [
        ({**good, "done": 189}, probe.token, 400, "done"),
        ({**good, "done": -1}, probe.token, 400, "done"),
        ({**good, "done": "40"}, probe.token, 400, "done"),
        ({**good, "total": 0}, probe.token, 400, "total"),
        ({**good, "total": 2**53}, probe.token, 400, "total"),
        ({**good, "round": True}, probe.token, 400, "round"),
        ({"round": 1, "done": 40}, probe.token, 400, "total"),
        ([40, 188], probe.token, 400, "body"),
        ({**good, "round": 2}, probe.token, 409, "round"),
        (good, None, 401, "Authorization"),
        (good, other.token, 403, "Authorization"),
    ]
    for body, token, status, field in refusals:
        r = progress_call(server, "probe", body, token)
        assert r.status_code == status and r.json()["field"] == field, (body, r.status_code, r.text)
    r = progress_call(server, "other", good, other.token)  # not selected for the round
    assert r.status_code == 409 and r.json()["field"] == "round", r.text
    assert server.get("/api/status").json()["round"]["progress"] == {}

    assert probe.report_progress(1, 40, 188) == good
    assert server.get("/api/status").json()["round"]["progress"] == {"probe": {"done": 40, "total": 188}}

    # the Streamlit dashboard: a column in the devices table
    monkeypatch.setenv("FEDHUB_SERVER", server.url)
    monkeypatch.setenv("FEDHUB_ADMIN_TOKEN", server.admin_token)
    at = AppTest.from_file(DASHBOARD, default_timeout=30).run()
    assert not at.exception, at.exception
    table = next(t.value for t in at.dataframe if "lifecycle" in t.value.columns)  # the devices table
    shown = dict(zip(table["device"], table["round progress"], strict=True))
    assert shown == {"probe": "40/188 batches (21%)", "other": ""}

    # the live page, in Chromium: after the device's state
    from tests.chromium import chromium

    states = "() => Object.fromEntries([...document.querySelectorAll('#devices tr')].map(" \
             "(tr) => [tr.cells[0].textContent, tr.cells[1].textContent]))"
    with chromium() as browser:
        page = browser.new_page()
        page.goto(f"{server.url}/stats/")
        wait_until(lambda: page.evaluate(states).get("probe") == "training · 40/188 batches", 30,
                   "the live page to show the progress")
        assert page.evaluate(states)["other"] == "idle"
        probe.report_progress(1, 120, 188)  # and it follows, without a reload
        wait_until(lambda: page.evaluate(states).get("probe") == "training · 120/188 batches", 30,
                   "the live page to show the new progress")

    # the progress lives only as long as the device trains in the open round (which, without
    # it, is discarded)
    probe.leave()
    r = server.get("/api/status").json()["round"]
    assert r is None or r["progress"] == {}, r
    r = progress_call(server, "probe", good, probe.token)
    assert r.status_code == 409 and r.json()["field"] == "round", r.text


def test_the_dashboard_finds_the_state_directory(tmp_path, monkeypatch):
    for name in ("FEDHUB_ADMIN_TOKEN", "FEDHUB_DEVICES_ROOT", "FEDHUB_SERVER", state.STATE_DIR_ENV):
        monkeypatch.delenv(name, raising=False)

    def admin_token(home: Path, token: str) -> None:
        home.mkdir()
        fd = os.open(home / "admin.token", os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")

    from_env, from_flag = tmp_path / "env-run", tmp_path / "flag-run"
    admin_token(from_env, "token-of-env-run")
    admin_token(from_flag, "token-of-flag-run")
    monkeypatch.setenv(state.STATE_DIR_ENV, str(from_env))
    # streamlit run dashboard/index.py -- --state-dir DIR puts the flag in the script's argv
    for argv, home, token in ([["index.py"], from_env, "token-of-env-run"],
                              [["index.py", "--state-dir", str(from_flag)], from_flag, "token-of-flag-run"]):
        monkeypatch.setattr(sys, "argv", argv)
        at = AppTest.from_file(DASHBOARD, default_timeout=30).run()
        assert not at.exception, at.exception
        assert at.text_input(key="admin_token").value == token
        assert at.text_input(key="devices_root").value == str(home / "devices")
        assert at.text_input(key="state_dir").value == str(home)

    # a server address without a scheme is http; one that is no address is said so, not a traceback
    monkeypatch.setattr(sys, "argv", ["index.py"])
    monkeypatch.setenv("FEDHUB_SERVER", "ftp://127.0.0.1:1")
    at = AppTest.from_file(DASHBOARD, default_timeout=30).run()
    assert not at.exception and "must start with http:// or https://" in at.error[0].value
