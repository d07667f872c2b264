"""The dashboard's local devices run on the launcher's worker pool: N devices on K worker
processes (virtual devices), not one process per device; they train a real round, stay for
the next run (tests/test_devices_between_runs.py), and stop when told."""

from __future__ import annotations

import psutil
import pytest

from fedhub.dashboard.local_devices import LocalDevices
from tests.conftest import wait_until

pytestmark = pytest.mark.slow


def test_local_devices_run_on_two_workers(server_factory, split_devices, monkeypatch, tmp_path):
    root = split_devices(5, 30)
    server = server_factory("--rounds", "1", "--min-devices", "5", "--auto-activate", "--start",
                            "--test-limit", "200", "--no-tensorboard").start()
    monkeypatch.setenv("FEDHUB_ENROLL_SECRET", server.enroll_secret)
    local = LocalDevices()
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    try:
        assert local.launch(server.url, 5, workers=2, devices_root=root, state_dir=tmp_path) == [
            f"device{i}" for i in range(1, 6)]
        started = {p.pid for p in psutil.Process().children(recursive=True)} - before
        assert len(started) == 2, "two worker processes host the five devices"
        assert local.launch(server.url, 5, workers=2, devices_root=root, state_dir=tmp_path) == [], \
            "already running"
        rows = local.rows()
        assert [(r["device"], r["worker"]) for r in rows] == [
            ("device1", 0), ("device2", 1), ("device3", 0), ("device4", 1), ("device5", 0)]
        wait_until(lambda: server.get("/api/status").json()["status"] == "finished", 240, "the round")
        (entry,) = server.get("/api/history").json()["rounds"]
        assert sorted(entry["devices"]) == [f"device{i}" for i in range(1, 6)]
        assert len(local.running()) == 5, "they stay enrolled for the next run"
    finally:
        local.stop_all()
    assert not local.running()
    assert {r["process"] for r in local.rows()} == {"stopped"}
