"""End to end on loopback: the real server, real device processes, a real SQLite file."""

from __future__ import annotations

import hashlib
import signal
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedhub.device.client import ServerError
from fedhub.device.launcher import stop
from fedhub.engine import wire
from fedhub.engine.aggregation import weighted_mean
from fedhub.server_process import free_port

from .conftest import ROOT, launch_devices, wait_until
from .slow_trainer import batches_done
from .test_faults import _enroll, _random_like, _train_task

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
    # A killed device counts as online until --device-timeout: 600 s, so that it is selected
    # for round 2 however long the steps before take on a busy machine.
    server = server_factory("--rounds", "2", "--min-devices", "1", "--test-limit", "1000",
                            "--round-timeout", "300", "--device-timeout", "600").start()
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

        # Round 2 runs again once both devices are there (device2 relaunched), not on the clock.
        server.args = (*server.args, "--min-devices", "2")
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


def test_ctrl_c_on_a_device_leaves_and_the_round_closes_without_it(server_factory, split_devices, tmp_path):
    """README: Ctrl-C on a device tells the server it leaves (the round stops waiting for it)
    and exits cleanly. The round's deadline is 10 minutes away: it closes at once instead."""
    root = split_devices(2, 300)
    # 2 epochs of 300 examples in batches of 8: 76 batches, a second each on device2
    server = server_factory("--rounds", "1", "--min-devices", "2", "--auto-activate", "--start",
                            "--round-timeout", "600", "--test-limit", "300", "--no-tensorboard",
                            "--epochs", "2", "--batch-size", "8").start()
    procs = launch_devices(server, root, ["device1"])
    # device2's batches are slow (tests/slow_trainer.py): it is still training when Ctrl-C comes
    procs += launch_devices(server, root, ["device2"], "--trainer", "tests.slow_trainer:from_folder")
    try:
        wait_until(lambda: (_status(server)["round"] or {}).get("reported") == ["device1"], 240,
                   "device1's update")
        wait_until(lambda: batches_done(root / "device2") >= 1, 120, "device2 to be training")
        assert _status(server)["round"]["selected"] == ["device1", "device2"]
        assert batches_done(root / "device2") < 76, "device2 is still training"
        procs[1].send_signal(signal.SIGINT)
        assert procs[1].wait(120) == 0, "Ctrl-C is a clean exit"
        # it said goodbye before exiting: the server no longer waits for it, and shows it
        # interrupted, not "training" for good
        assert "device2" not in (_status(server)["round"] or {}).get("selected", [])
        device2 = next(d for d in server.get("/api/devices").json()["devices"] if d["name"] == "device2")
        assert device2["lifecycle"] == "interrupted", device2
        assert "the device was stopped (Ctrl-C or SIGTERM)" in device2["lifecycle_reason"], device2
        wait_until(lambda: _history(server), 60, "round 1 to close without device2")
        assert procs[0].wait(60) == 0
    finally:
        stop(procs)
    assert "interrupted: leaving the federation" in (tmp_path / "logs" / "device2.log").read_text()
    (round1,) = _history(server)
    assert round1["num_updates"] == 1 and set(round1["devices"]) == {"device1"}
    assert round1["closed_at"] - round1["started_at"] < 300, "closed long before its 600 s deadline"


def test_fraction_and_fedavgm_through_the_server(server_factory):
    """--fraction 0.5 selects 2 of 4 devices a round; --strategy fedavgm applies server momentum."""
    server = server_factory("--rounds", "2", "--fraction", "0.5", "--strategy", "fedavgm",
                            "--auto-activate", "--test-limit", "100", "--no-tensorboard").start()
    clients = {f"sim{i}": _enroll(server.url, server, f"sim{i}") for i in range(1, 5)}
    _, initial = clients["sim1"].model()
    assert server.admin("POST", "/api/training/start").ok
    means = []
    for number in (1, 2):
        selected = wait_until(lambda n=number: (r := _status(server)["round"] or {}).get("number") == n
                              and r["selected"], 30, f"round {number} to open")
        assert len(selected) == 2 and set(selected) < set(clients), selected  # ceil(0.5 * 4)
        for name in sorted(set(clients) - set(selected)):
            assert clients[name].task(wait=0)["action"] == "wait"
            with pytest.raises(ServerError) as refused:
                clients[name].upload(number, initial, num_examples=1, model_version=number - 1)
            assert refused.value.status == 409 and "not selected" in str(refused.value)
        updates = []
        for i, name in enumerate(selected):
            task = _train_task(clients[name])
            version, _ = clients[name].model()
            assert task["round"] == version + 1 == number
            update, n = _random_like(initial, 10 * number + i), 100 * (i + 1)
            clients[name].upload(number, update, num_examples=n, model_version=version)
            updates.append((update, n))
        means.append(weighted_mean(updates))
        wait_until(lambda n=number: _status(server)["model_version"] == n, 60, f"round {number}")
    got, meta = wire.decode(server.admin("GET", "/api/model").content)
    assert meta.model_version == 2
    # FedAvgM (server learning rate 1, momentum 0.9): round 1 gives the mean m1 (v1 = g0 - m1);
    # round 2 gives g1 - (0.9 * v1 + g1 - m2) = m2 - 0.9 * (g0 - m1).
    for name, g0 in initial.items():
        m1, m2 = (m[name].astype(np.float64) for m in means)
        expected = m2 - 0.9 * (g0.astype(np.float64) - m1)
        np.testing.assert_allclose(got[name], expected, rtol=1e-5, atol=1e-6, err_msg=name)
        assert not np.allclose(got[name], m2, atol=1e-4), f"{name}: plain FedAvg, no momentum"
    assert [len(r["devices"]) for r in _history(server)] == [2, 2]


def test_reset_wipes_rounds_checkpoints_and_history_but_keeps_the_secrets(server_factory):
    """--reset: rounds, checkpoints and history are wiped first (the enrolled devices with the
    database); the secret files the server made itself (mode 0600) stay."""
    server = server_factory("--rounds", "1", "--auto-activate", "--start", "--test-limit", "100",
                            "--no-tensorboard")
    for name in ("FEDHUB_ENROLL_SECRET", "FEDHUB_ADMIN_TOKEN"):
        server.env.pop(name)  # the default: secrets in files beside the state
    server.start()
    secrets = {p: p.read_bytes() for p in (server.state_dir / "enroll.secret",
                                           server.state_dir / "admin.token")}
    for path in secrets:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    server.enroll_secret = secrets[server.state_dir / "enroll.secret"].decode().strip()
    server.admin_token = secrets[server.state_dir / "admin.token"].decode().strip()
    client = _enroll(server.url, server)
    task = _train_task(client)
    version, weights = client.model()
    client.upload(task["round"], _random_like(weights, 1), num_examples=10, model_version=version)
    wait_until(lambda: _status(server)["status"] == "finished", 60, "round 1")
    assert server.admin("GET", "/api/logs").status_code == 200, "the admin token file works"
    saved = server.state_dir / "saved"
    assert sorted(p.name for p in saved.iterdir()) == ["round_00000.safetensors", "round_00001.safetensors"]
    assert len((server.eval_dir / "history.csv").read_text().splitlines()) == 2
    server.stop()

    server.args = (*server.args, "--reset")
    server.start()
    status = _status(server)
    assert status["completed_rounds"] == 0 and status["status"] == "running"
    assert _history(server) == [] and server.get("/api/devices").json()["devices"] == []
    assert sorted(p.name for p in saved.iterdir()) == ["round_00000.safetensors"]
    assert not (server.eval_dir / "history.csv").exists()
    assert {p: p.read_bytes() for p in secrets} == secrets, "the secrets are kept"
    assert server.admin("GET", "/api/logs").status_code == 200
    with pytest.raises(ServerError) as forgotten:
        client.task(wait=0)
    assert forgotten.value.status == 401, "the device was forgotten with the database"


@pytest.mark.slow
def test_sigint_stops_a_server_and_a_device_started_with_sigint_ignored(server_factory, split_devices,
                                                                         tmp_path):
    """A script's background job starts with SIGINT ignored (a shell without job control does
    that, and Python keeps it): Ctrl-C and the launchers' SIGINT still stop FedHub's processes,
    the device leaving the federation as it says."""
    root = split_devices(1, 100)
    server = server_factory("--rounds", "0", "--test-limit", "50", "--no-tensorboard").start()

    def interrupted(args: list[str], log: Path, ready: str) -> str:
        """Start ``args`` with SIGINT ignored, SIGINT it once ``ready`` is in its log: its log."""
        with open(log, "wb") as out:
            proc = subprocess.Popen([sys.executable, *args], cwd=ROOT, stdout=out, stderr=subprocess.STDOUT,
                                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
        try:
            wait_until(lambda: ready in log.read_text(), 120, f"{args[0]} to say {ready!r}")
            proc.send_signal(signal.SIGINT)
            assert proc.wait(60) == 0
        finally:
            stop([proc])
        return log.read_text()

    said = interrupted(["device/device.py", "--server", server.url, "--name", "device1", "--devices-root",
                        str(root), "--enroll-secret", server.enroll_secret, "--poll-wait", "1"],
                       tmp_path / "device.log", "waiting")
    assert "leaving the federation" in said or "interrupted" in said, said
    said = interrupted(["server.py", str(free_port()), "--state-dir", str(tmp_path / "state2"),
                        "--test-limit", "50", "--no-tensorboard", "--data-dir", str(server.data_dir)],
                       tmp_path / "server.log", "FedHub server on")
    assert "Traceback" not in said, said
