"""Devices between runs (issue 21): a device started with ``--stay``, and the dashboard's local
devices (a pool with ``stay``), save the final model when a run finishes and then wait,
enrolled, for the next run; Reset then Start trains them again, without a relaunch. A device
without ``--stay`` still leaves when the run is over.

Real processes: a server, device processes, the pool's worker processes. The next run is made
with the admin routes ``POST /api/training/reset`` then ``POST /api/training/start``.
"""

from __future__ import annotations

import csv
import functools
import time
from pathlib import Path

import pytest

from fedhub.dashboard import local_devices
from fedhub.dashboard.local_devices import LocalDevices
from fedhub.device.launcher import stop
from fedhub.device.main import parse_args
from fedhub.device.pool import DevicePool
from tests.conftest import launch_devices, wait_until


def trained_rounds(folder: Path) -> int:
    """Rows in the device's own ``history.csv``: one per round it trained, over every run."""
    path = folder / "history.csv"
    if not path.exists():
        return 0
    with path.open() as f:
        return sum(1 for _ in csv.DictReader(f))


def next_run(server, rounds: int = 1) -> None:
    """What the dashboard's Reset then Start does: a new run from the initial model."""
    assert server.admin("POST", "/api/training/reset").json()["status"] == "idle"
    r = server.admin("POST", "/api/training/start", json={"rounds": rounds})
    assert r.ok, r.text


def polled_after(server, names: list[str], since: float) -> None:
    """Until each of ``names`` has asked the server for work after ``since`` (its ``last_seen``):
    a device that stays keeps asking; one that left would not."""
    def seen() -> dict[str, float]:
        return {d["name"]: d["last_seen"] or 0.0 for d in server.get("/api/devices").json()["devices"]}

    wait_until(lambda: all(seen().get(n, 0.0) > since for n in names), 60, f"{names} to ask again")


def test_stay_is_off_unless_asked():
    assert parse_args(["4000", "device1"]).stay is False
    assert parse_args(["4000", "device1", "--stay"]).stay is True


@pytest.mark.slow
def test_a_staying_device_trains_in_the_next_run_and_the_other_leaves(server_factory, split_devices):
    root = split_devices(2, 200)
    server = server_factory("--rounds", "1", "--min-devices", "1", "--auto-activate", "--test-limit", "200",
                            "--no-tensorboard").start()
    staying, leaving = launch_devices(server, root, ["device1"], "--stay") + launch_devices(
        server, root, ["device2"])
    logs = root.parent / "logs"

    def said() -> str:
        return "\n".join((logs / f"{n}.log").read_text() for n in ("device1", "device2")) + server.log()

    try:
        # one device opens a round (the next run has only device1); Start once both have enrolled
        wait_until(lambda: len(server.get("/api/devices").json()["devices"]) == 2, 240, "both to enroll")
        assert server.admin("POST", "/api/training/start", json={"rounds": 1}).ok
        assert leaving.wait(240) == 0, said()  # run 1 over: device2 saves the model and goes
        (round1,) = server.get("/api/history").json()["rounds"]
        assert set(round1["devices"]) == {"device1", "device2"}
        wait_until(lambda: "waiting for the next run" in (logs / "device1.log").read_text(), 60,
                   "device1 to say it stays")
        assert (root / "device1" / "saved").is_dir(), "the final model is saved, as without --stay"
        polled_after(server, ["device1"], time.time())  # it goes on asking: neither exits nor trains
        assert staying.poll() is None, said()
        assert (logs / "device1.log").read_text().count("run finished at model version") == 1

        next_run(server)
        wait_until(lambda: server.get("/api/status").json()["status"] == "finished", 240, "run 2", interval=1)
        (round1,) = server.get("/api/history").json()["rounds"]
        assert set(round1["devices"]) == {"device1"}, "the device that left is not waited for"
        assert trained_rounds(root / "device1") == 2
        devices = {d["name"]: d for d in server.get("/api/devices").json()["devices"]}
        assert devices["device1"]["state"] != "offline", devices["device1"]
        assert staying.poll() is None, said()
    finally:
        stop([staying, leaving])
    assert staying.returncode == 0, said()
    assert "leaving the federation" in (logs / "device1.log").read_text()


@pytest.mark.slow
def test_dashboard_devices_stay_for_the_next_run_until_stopped(server_factory, split_devices, monkeypatch,
                                                                tmp_path):
    root = split_devices(3, 30)
    server = server_factory("--rounds", "1", "--min-devices", "3", "--auto-activate", "--start",
                            "--test-limit", "200", "--no-tensorboard").start()
    monkeypatch.setenv("FEDHUB_ENROLL_SECRET", server.enroll_secret)
    # The pool asks again for the devices it has not heard from for `keepalive` seconds (20 by
    # default): a staying device's next ask after a run, which polled_after waits for. A shorter
    # one (still well under the server's --device-timeout) brings that ask sooner.
    monkeypatch.setattr(local_devices, "DevicePool", functools.partial(DevicePool, keepalive=2.0))
    local = LocalDevices()
    try:
        local.launch(server.url, 3, workers=2, devices_root=root, state_dir=tmp_path)
        wait_until(lambda: server.get("/api/status").json()["status"] == "finished", 240, "run 1", interval=1)
        polled_after(server, ["device1", "device2", "device3"], time.time())  # told "finish", they ask on
        assert sorted(local.running()) == ["device1", "device2", "device3"], local.rows()

        next_run(server)
        wait_until(lambda: server.get("/api/status").json()["status"] == "finished", 240, "run 2", interval=1)
        (entry,) = server.get("/api/history").json()["rounds"]
        assert sorted(entry["devices"]) == ["device1", "device2", "device3"], "the same devices, again"
        assert sorted(local.running()) == ["device1", "device2", "device3"]
    finally:
        stopped = local.stop_all()
    assert sorted(stopped) == ["device1", "device2", "device3"]
    assert not local.running()
    assert {r["process"] for r in local.rows()} == {"stopped"}
