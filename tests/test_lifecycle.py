"""Device lifecycle: data validation before joining, interrupt during local training, finish.

HTTP-level checks run over the real engine and SQLite; the run at the end uses a
real server and real device processes on Fashion-MNIST subsets.
"""

import re
import threading

import numpy as np
import pytest

from fedhub.device.launcher import launch, stop
from fedhub.engine import wire
from fedhub.engine.devices import DeviceRegistry
from fedhub.engine.storage import Storage
from fedhub.split import split_to_devices, write_device_data
from tests.conftest import ServerProcess, wait_until
from tests.slow_trainer import batches_done
from tests.test_api import (
    ADMIN,
    ENROLL,
    bearer,
    device_row,
    make_app,
    register,
    update_body,
    upload,
    wait_task,
)

GOOD = {"ok": True, "problems": [], "num_examples": 3, "class_counts": [1, 2, 0]}
BAD = {"ok": False, "problems": ["labels must be in 0..9"], "num_examples": 3, "class_counts": []}


@pytest.fixture
def app_engine(tmp_path):
    app, engine = make_app(tmp_path, min_devices=2, rounds=2, auto_activate=True, start=True)
    yield app, engine
    engine.stop()


def test_validation_decides_who_may_train(app_engine):
    app, _ = app_engine
    c = app.test_client()
    r = c.post("/api/devices/register", json={"name": "bad", "validation": BAD},
               headers={"X-Enroll-Secret": ENROLL})
    assert r.status_code == 201 and r.get_json()["lifecycle"] == "invalid"
    token = r.get_json()["token"]
    row = device_row(c, "bad")
    assert row["lifecycle"] == "invalid" and "labels must be in 0..9" in row["lifecycle_reason"]
    assert row["validation"]["problems"] == ["labels must be in 0..9"]
    task = c.get("/api/devices/bad/task", headers=bearer(token))
    assert task.status_code == 409 and task.get_json()["field"] == "validation"
    assert "labels must be in 0..9" in task.get_json()["message"]
    # a device that has not reported yet is "validating"; a good report makes it "init"
    other = register(c, "good").get_json()["token"]
    assert device_row(c, "good")["lifecycle"] == "validating"
    r = c.post("/api/devices/good/validation", json={"validation": GOOD}, headers=bearer(other))
    assert r.status_code == 200 and r.get_json()["lifecycle"] == "init"
    # the invalid device is not counted towards min_devices=2: the driver says so, no round opens
    wait_until(lambda: c.get("/api/status").get_json()["reason"]
               == "waiting for devices: 1 active and online, 2 needed", 10, "the driver to count 1 device")
    assert c.get("/api/status").get_json()["round"] is None
    # fixing the data (a new, good report) lets it in
    r = c.post("/api/devices/bad/validation", json={"validation": {**GOOD}}, headers=bearer(token))
    assert r.get_json()["lifecycle"] == "init"
    assert wait_task(c, "bad", token)["round"] == 1
    assert device_row(c, "bad")["lifecycle"] == "training"


def test_a_device_enrolling_with_invalid_data_is_never_a_candidate(tmp_path):
    """The candidates for a round are read in one step: a device that enrolls with invalid data
    while the driver is reading them is either not there yet or already refused, never an
    active, online device whose refusal the driver has not seen.

    The enrollment is started from inside the first read (the refusals) and the read goes on only
    once the enrollment has either finished (the step is not one: it must then be seen refused)
    or is waiting for the registry's lock (it is): states, observed, not a sleep."""
    registry = DeviceRegistry(Storage(tmp_path / "state"), enroll_secret=ENROLL, auto_activate=True)
    lock, contended = registry._lock, threading.Event()

    class ObservedLock:
        """The registry's own lock, noting when a thread has to wait for it."""

        def __enter__(self):
            if not lock.acquire(blocking=False):
                contended.set()
                lock.acquire()
            return self

        def __exit__(self, *exc):
            lock.release()

    registry._lock = ObservedLock()
    refused, injected = registry.lifecycle.refused, []

    def refused_while_bad_enrolls():
        seen = refused()
        enrolling = threading.Thread(target=registry.register, args=("bad", ENROLL),
                                     kwargs={"validation": BAD})
        enrolling.start()
        wait_until(lambda: contended.is_set() or not enrolling.is_alive(), 10,
                   "the enrollment to finish or wait for the registry", interval=0.01)
        injected.append("waited" if contended.is_set() else "finished")
        return seen

    registry.lifecycle.refused = refused_while_bad_enrolls
    assert "bad" not in registry.available()
    registry.lifecycle.refused = refused
    # Not vacuous: the enrollment really was started inside the read (and, today, waited for it).
    assert len(injected) == 1, "available() no longer reads lifecycle.refused(): inject elsewhere"
    wait_until(lambda: registry.lifecycle.get("bad")["state"] == "invalid", 10, "bad to enroll")
    assert registry.available() == []


def test_validation_report_refusals(app_engine):
    app, _ = app_engine
    c = app.test_client()
    token = register(c, "d1").get_json()["token"]
    cases = [
        ("nope", "validation"),
        ({**GOOD, "ok": "yes"}, "validation.ok"),
        ({**GOOD, "problems": ["x"]}, "validation.ok"),
        ({**BAD, "problems": []}, "validation.ok"),
        ({**GOOD, "problems": "none"}, "validation.problems"),
        ({**BAD, "problems": ["x" * 301]}, "validation.problems"),
        ({**GOOD, "num_examples": -1}, "validation.num_examples"),
        ({**GOOD, "class_counts": [1, 1, 0]}, "validation.class_counts"),
        ({**GOOD, "class_counts": [1, -1, 3]}, "validation.class_counts"),
    ]
    for report, field in cases:
        r = c.post("/api/devices/d1/validation", json={"validation": report}, headers=bearer(token))
        assert r.status_code == 400 and r.get_json()["field"] == field, (report, r.get_json())
    assert device_row(c, "d1")["lifecycle"] == "validating"  # refusals changed nothing
    r = c.post("/api/devices/register", json={"name": "d2", "validation": {"ok": True}},
               headers={"X-Enroll-Secret": ENROLL})
    assert r.status_code == 400 and r.get_json()["field"] == "validation.num_examples"
    assert all(d["name"] != "d2" for d in c.get("/api/devices").get_json()["devices"])


def test_interrupt_over_http(app_engine):
    app, _ = app_engine
    c = app.test_client()
    # refusals: who may interrupt, whom, when (one device enrolled: no round can open yet)
    tokens = {"d1": register(c, "d1").get_json()["token"]}
    assert c.post("/api/devices/d1/interrupt").status_code == 401
    assert c.post("/api/devices/d1/interrupt", headers=bearer(tokens["d1"])).status_code == 403
    assert c.post("/api/devices/nobody/interrupt", headers=bearer(ADMIN)).status_code == 404
    r = c.post("/api/devices/d1/interrupt", headers=bearer(ADMIN))
    assert r.status_code == 409 and r.get_json()["field"] == "name"  # not training yet
    for number in (2, 2**53 - 1):  # rounds that cannot have started: reporting them changes nothing
        r = c.post("/api/devices/d1/interrupted", json={"round": number}, headers=bearer(tokens["d1"]))
        assert r.status_code == 409 and r.get_json()["field"] == "round", r.get_json()
        assert "cannot have started" in r.get_json()["message"]
    assert device_row(c, "d1")["lifecycle"] == "validating"
    tokens["d2"] = register(c, "d2").get_json()["token"]
    assert c.post("/api/devices/d2/interrupt", headers=bearer(tokens["d1"])).status_code == 403
    for name, token in tokens.items():
        wait_task(c, name, token)
    assert c.get("/api/devices/d2/signal", headers=bearer(tokens["d2"])).get_json()["interrupt"] is False
    assert c.get("/api/devices/d2/signal", headers=bearer(tokens["d1"])).status_code == 403
    r = c.post("/api/devices/d2/interrupt", headers=bearer(ADMIN))
    assert r.status_code == 200 and r.get_json() == {"name": "d2", "round": 1, "interrupted": True}
    signal = c.get("/api/devices/d2/signal", headers=bearer(tokens["d2"])).get_json()
    assert signal == {"interrupt": True, "round": 1, "lifecycle": "interrupted"}
    assert c.get("/api/status").get_json()["round"]["selected"] == ["d1"]
    task = c.get("/api/devices/d2/task", headers=bearer(tokens["d2"])).get_json()
    assert task["action"] == "wait" and "without this device" in task["reason"]
    r = c.post("/api/devices/d2/interrupted", json={"round": 2}, headers=bearer(tokens["d2"]))
    assert r.status_code == 409 and r.get_json()["field"] == "round"
    r = c.post("/api/devices/d2/interrupted", json={"round": 1, "detail": "stopped after 3 of 40 batches"},
               headers=bearer(tokens["d2"]))
    assert r.status_code == 200 and "stopped after 3 of 40 batches" in r.get_json()["lifecycle_reason"]
    assert c.get("/api/devices/d2/signal", headers=bearer(tokens["d2"])).get_json()["interrupt"] is False
    assert upload(c, "d2", tokens["d2"], 1, update_body(9.0, 1, 0, 5)).status_code == 409
    assert upload(c, "d1", tokens["d1"], 1, update_body(1.0, 1, 0, 5)).status_code == 200
    wait_until(lambda: c.get("/api/history").get_json()["rounds"], 10, "round 1 to close")
    assert set(c.get("/api/history").get_json()["rounds"][0]["devices"]) == {"d1"}
    # the next round takes the interrupted device again
    assert wait_task(c, "d2", tokens["d2"])["round"] == 2
    assert device_row(c, "d2")["lifecycle"] == "training"


@pytest.mark.slow
def test_real_devices_validate_get_interrupted_and_finish(tmp_path, data_dir):
    root = tmp_path / "devices"
    split_to_devices(root, 2, data_dir=data_dir, limit=2000, progress=False)
    write_device_data(root, "empty", np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.uint8))
    server = ServerProcess(tmp_path, data_dir, "--rounds", "2", "--min-devices", "2", "--auto-activate",
                           "--start", "--test-limit", "300", "--epochs", "2", "--batch-size", "8",
                           "--no-tensorboard").start()
    env = {"FEDHUB_ENROLL_SECRET": server.enroll_secret}
    procs = launch(server.url, ["device1", "empty"], devices_root=root,
                   extra_args=["--poll-wait", "2"], env=env, log_dir=tmp_path / "logs")
    # device2's batches are slow until it is interrupted, and it writes down how many it has done
    procs += launch(server.url, ["device2"], devices_root=root, env=env, log_dir=tmp_path / "logs",
                    extra_args=["--poll-wait", "2", "--trainer", "tests.slow_trainer:from_folder"])
    by_name = dict(zip(["device1", "empty", "device2"], procs, strict=True))

    def logs():
        return "\n".join((tmp_path / "logs" / f"{n}.log").read_text() for n in by_name) + server.log()

    try:
        # invalid data: the device reports it, is refused, exits 1; the reason is in the API
        assert by_name["empty"].wait(120) == 1, logs()
        devices = {d["name"]: d for d in server.get("/api/devices").json()["devices"]}
        assert devices["empty"]["lifecycle"] == "invalid", devices["empty"]
        assert "no examples" in devices["empty"]["lifecycle_reason"]
        token = (root / "empty" / "token").read_text()
        r = server.get("/api/devices/empty/task", headers=bearer(token))
        assert r.status_code == 409 and "no examples" in r.json()["message"]

        # interrupt device2 while it trains round 1: the round goes on without it
        def training():
            devices = {d["name"]: d for d in server.get("/api/devices").json()["devices"]}
            return devices.get("device2", {}).get("lifecycle") == "training"
        wait_until(training, 120, "device2 to train round 1", interval=0.05)
        wait_until(lambda: batches_done(root / "device2") >= 1, 60, "device2's first batch", interval=0.05)
        sent_at = batches_done(root / "device2")
        r = server.admin("POST", "/api/devices/device2/interrupt")
        assert r.status_code == 200 and r.json()["round"] == 1, r.text

        # The device's WARNING line is the lasting record: its lifecycle row moves on to round 2
        # as soon as round 1 closes, which can be quicker than one poll of this test.
        def confirmed():
            logs = server.admin("GET", "/api/logs?device=device2&level=WARNING&round=1").json()["logs"]
            return next((e["message"] for e in logs if "stopped after" in e["message"]), None)
        message = wait_until(confirmed, 60, "device2's WARNING log confirming the interrupt")
        done, total = map(int, re.search(r"stopped after (\d+) of (\d+) batches", message).groups())
        assert total == 2 * 2000 // 8, message
        assert sent_at <= done <= sent_at + 2, f"interrupt sent after batch {sent_at}; {message}"

        # finish: both devices train round 2, save the final model and exit 0
        for name in ("device1", "device2"):
            assert by_name[name].wait(240) == 0, logs()
        history = server.get("/api/history").json()["rounds"]
        assert [h["round"] for h in history] == [1, 2]
        assert set(history[0]["devices"]) == {"device1"}
        assert set(history[1]["devices"]) == {"device1", "device2"}
        devices = {d["name"]: d for d in server.get("/api/devices").json()["devices"]}
        assert devices["device1"]["lifecycle"] == devices["device2"]["lifecycle"] == "finished"
        info = server.admin("GET", "/api/logs?device=device1").json()["logs"]
        assert any(e["message"].startswith("enrolled") for e in info)
        assert any(e["round"] == 2 and "training" in e["message"] for e in info)
        from fedhub.frameworks.keras_model import Model

        weights, meta = wire.decode(server.admin("GET", "/api/model").content)
        assert meta.model_version == 2
        for name in ("device1", "device2"):
            saved = Model.load(root / name / "saved" / "final.keras").get_weights()
            assert all(np.array_equal(saved[k], weights[k]) for k in weights), name
    finally:
        stop(procs)
        server.stop()


def test_signal_needs_the_device_token(app_engine):
    app, _ = app_engine
    c = app.test_client()
    assert c.get("/api/devices/d1/signal").status_code == 401
    r = c.post("/api/devices/d1/interrupted", json={"round": 1}, headers=bearer("forged"))
    assert r.status_code == 401
