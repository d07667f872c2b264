"""End to end on loopback: the real server, real device processes, a real SQLite file."""

from __future__ import annotations

import hashlib
import signal
import sqlite3

import pytest

from device.launcher import stop

from .conftest import launch_devices, wait_until

pytestmark = pytest.mark.slow


@pytest.fixture
def devices_root(split_devices):
    return split_devices(2, 1500)


def _launch(server, root, names):
    return launch_devices(server, root, names)


def _db(server):
    return sqlite3.connect(server.state_dir / "fedhub.sqlite3")


def _history(server):
    return server.get("/api/history").json()["rounds"]


def test_two_devices_two_rounds(server_factory, devices_root):
    server = server_factory("--rounds", "2", "--min-devices", "2", "--auto-activate", "--start",
                            "--test-limit", "2000").start()
    procs = _launch(server, devices_root, ["device1", "device2"])
    try:
        wait_until(lambda: server.get("/api/status").json()["status"] == "finished", 240,
                   "the run to finish")
        codes = [p.wait(60) for p in procs]
    finally:
        stop(procs)
    assert codes == [0, 0], "devices exit cleanly when the run finishes"
    history = _history(server)
    assert [r["round"] for r in history] == [1, 2]
    for r in history:
        assert r["num_updates"] == 2 and r["num_examples"] == 3000
        assert r["test_accuracy"] > 0.3, "well above chance (0.1) on held-out data"
        assert set(r["devices"]) == {"device1", "device2"}
        assert all(0 <= d["accuracy"] <= 1 for d in r["devices"].values())
    db = _db(server)
    assert db.execute("SELECT number, status, num_updates FROM rounds ORDER BY number").fetchall() == [
        (0, "complete", 0), (1, "complete", 2), (2, "complete", 2)]
    updates = db.execute("SELECT round, device, num_examples FROM updates ORDER BY round, device")
    assert updates.fetchall() == [
        (1, "device1", 1500), (1, "device2", 1500), (2, "device1", 1500), (2, "device2", 1500)]
    rows = db.execute("SELECT name, active, token_hash FROM devices ORDER BY name").fetchall()
    assert [(n, a) for n, a, _ in rows] == [("device1", 1), ("device2", 1)]
    token = (devices_root / "device1" / "token").read_text().strip()
    assert token not in {h for _, _, h in rows}, "tokens are stored hashed"
    assert hashlib.sha256(token.encode()).hexdigest() == rows[0][2]
    for n in (0, 1, 2):
        assert (server.state_dir / "saved" / f"round_{n:05d}.safetensors").exists()
    csv_rows = (server.eval_dir / "history.csv").read_text().strip().splitlines()
    assert len(csv_rows) == 3 and csv_rows[0].startswith("round,")
    assert (devices_root / "device1" / "history.csv").exists()


def _status(server):
    return server.get("/api/status").json()


def test_server_killed_mid_round_resumes_from_checkpoint(server_factory, devices_root):
    server = server_factory("--rounds", "2", "--min-devices", "1", "--test-limit", "1000",
                            "--round-timeout", "300").start()
    procs = _launch(server, devices_root, ["device1", "device2"])
    try:
        wait_until(lambda: len(server.get("/api/devices").json()["devices"]) == 2, 120, "enrollment")
        # Round 1 with device1 alone; pausing stops round 2 from opening before we are ready.
        assert server.admin("POST", "/api/devices/device1/activate").ok
        assert server.admin("POST", "/api/training/start").ok
        wait_until(lambda: (_status(server)["round"] or {}).get("number") == 1, 60, "round 1 to open")
        assert server.admin("POST", "/api/training/pause").json()["status"] == "paused"
        wait_until(lambda: len(_history(server)) == 1, 120, "round 1")
        # device2 is selected for round 2, then vanishes: round 2 waits for it.
        procs[1].send_signal(signal.SIGKILL)
        procs[1].wait()
        assert server.admin("POST", "/api/devices/device2/activate").ok
        assert server.admin("POST", "/api/training/resume").ok
        wait_until(lambda: (_status(server)["round"] or {}).get("reported") == ["device1"], 120,
                   "device1's round-2 update")
        assert _status(server)["round"]["selected"] == ["device1", "device2"]
        round1 = _history(server)[0]
        checkpoint = server.state_dir / "saved" / "round_00001.safetensors"
        digest = hashlib.sha256(checkpoint.read_bytes()).hexdigest()
        server.kill()  # SIGKILL with round 2 half done
        db = _db(server)
        assert db.execute("SELECT status FROM rounds WHERE number = 2").fetchone() == ("open",)
        db.close()

        server.start()
        procs[1:] = _launch(server, devices_root, ["device2"])
        wait_until(lambda: _status(server)["status"] == "finished", 240, "round 2 after the restart")
    finally:
        stop(procs)
    assert "resuming after completed round 1" in server.log()
    history = _history(server)
    assert [r["round"] for r in history] == [1, 2]
    assert history[0] == round1, "round 1 is neither lost nor changed"
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == digest
    assert history[1]["num_updates"] == 2, "round 2 counts each device once"
    db = _db(server)
    assert db.execute("SELECT device FROM updates WHERE round = 2 ORDER BY device").fetchall() == [
        ("device1",), ("device2",)]
