"""The engine on the strategy interface, over HTTP, the real engine and a real SQLite file.

A round that cannot be aggregated fails with its reason recorded and runs again; the
strategy's state is saved beside each checkpoint, restored on restart and forgotten on
reset; a device whose data turns invalid leaves the round at once; round hooks run off
the driver thread; history entries are built once, not re-read on every poll; an upload
is one transaction.
"""

import sqlite3
import threading
import time

import numpy as np
import pytest
from safetensors.numpy import load as st_load

from fedhub.engine import wire
from fedhub.engine.config import FederationConfig
from fedhub.engine.devices import DeviceRegistry
from fedhub.engine.rounds import Coordinator
from fedhub.engine.storage import Storage
from fedhub.engine.strategies import ParamError, make_strategy
from tests.conftest import wait_until
from tests.test_api import ADMIN, ENROLL, INITIAL, bearer, make_app, register, update_body, upload, wait_task

GOOD = {"ok": True, "problems": [], "num_examples": 3, "class_counts": [1, 2, 0]}
BAD = {"ok": False, "problems": ["labels must be in 0..9"], "num_examples": 3, "class_counts": []}


def status(c):
    return c.get("/api/status").get_json()


def completed(c, n, timeout=15):
    wait_until(lambda: status(c)["completed_rounds"] >= n, timeout, f"round {n}", interval=0.05)


def weights_of(value):
    return {k: np.full(v.shape, value, np.float32) for k, v in INITIAL.items()}


def test_a_configuration_that_cannot_work_is_refused_at_start_up(tmp_path):
    config = FederationConfig(strategy="krum", strategy_params={"num_malicious": 1}, min_devices=3)
    with pytest.raises(ValueError, match="krum with num_malicious=1 needs at least 5 updates a round; "
                                         "min_devices is 3"):
        config.validate()
    storage = Storage(tmp_path / "state")
    with pytest.raises(ValueError, match="needs at least 5"):
        Coordinator(storage, DeviceRegistry(storage, enroll_secret=ENROLL), initial_weights=INITIAL,
                    config=config)
    with pytest.raises(ParamError, match=r"unknown key 'f' \(allowed keys: num_malicious\)"):
        FederationConfig(strategy="krum", strategy_params={"f": 1}).validate()
    FederationConfig(strategy="krum", strategy_params={"num_malicious": 1}, min_devices=5).validate()


def test_a_round_short_of_usable_updates_fails_with_its_reason_and_runs_again(tmp_path):
    app, engine = make_app(tmp_path, strategy="krum", min_devices=3, rounds=1, auto_activate=True,
                           start=True)
    try:
        c = app.test_client()
        tokens = {n: register(c, n).get_json()["token"] for n in ("d1", "d2", "d3")}
        for name, token in tokens.items():
            assert wait_task(c, name, token)["round"] == 1
        first = status(c)
        for name, value in (("d1", 1.0), ("d2", 1.1)):
            assert upload(c, name, tokens[name], 1, update_body(value, 1, 0, 10)).status_code == 200
        # d3 leaves: the round closes with the two updates, fewer than Krum's 2f + 3 = 3
        assert c.post("/api/devices/d3/leave", headers=bearer(tokens["d3"])).status_code == 200
        s = wait_until(lambda: (s := status(c))["last_error"] and s, 15, "the failure")
        assert s["last_error"] == ("round 1 failed: krum needs at least 3 usable updates, got 2; the "
                                   "previous global model stays and the round runs again")
        assert s["model_version"] == 0 and s["status"] == "running"
        answer = c.get("/api/history").get_json()
        assert answer["rounds"] == []
        [failure] = answer["failures"]
        assert failure["round"] == 1 and failure["reason"] == s["last_error"]
        # it runs again, with all three, and succeeds: Krum keeps one update and says why not the others
        values = {"d1": 1.0, "d2": 1.1, "d3": 9.0}
        assert c.get("/api/devices/d3/task", headers=bearer(tokens["d3"])).status_code == 200  # it is back
        for name, token in tokens.items():
            assert wait_task(c, name, token)["round"] == 1
        # the same number, a new attempt: a new start, and a revision that long polls wake on
        again = status(c)
        assert again["round"]["number"] == 1 and again["round"]["started_at"] > first["round"]["started_at"]
        assert again["revision"] != first["revision"]
        for name, token in tokens.items():
            assert upload(c, name, token, 1, update_body(values[name], 1, 0, 10)).status_code == 200
        completed(c, 1)
        assert status(c)["last_error"] is None
        [entry] = c.get("/api/history").get_json()["rounds"]
        assert entry["strategy"] == {"name": "krum", "params": {"num_malicious": 0}}
        assert entry["num_updates"] == 3 and entry["num_used"] == 1
        outcome = {n: d["aggregation"] for n, d in entry["devices"].items()}
        assert [n for n, a in outcome.items() if a["status"] == "used"] in (["d1"], ["d2"])
        assert outcome["d3"]["status"] == "rejected" and "Krum score" in outcome["d3"]["reason"]
        assert outcome["d3"]["distance"] > 10 * outcome["d1"]["distance"] + 1
    finally:
        engine.stop()


def fedavgm_reference(rounds):
    """The global weights and state a fresh FedAvgM reaches over ``rounds`` of (value, n) updates."""
    strategy, current = make_strategy("fedavgm"), INITIAL
    for updates in rounds:
        agg = strategy.begin(current)
        for i, (value, n) in enumerate(updates):
            agg.add(f"d{i}", weights_of(value), n)
        result = agg.result()
        strategy.load_state(result.state)
        current = result.weights
    return current, strategy.state()


def one_round(c, token, number, value, version=None):
    assert wait_task(c, "d1", token)["round"] == number
    body = update_body(value, number, number - 1 if version is None else version, 10)
    assert upload(c, "d1", token, number, body).status_code == 200
    completed(c, number)


def test_strategy_state_is_saved_with_each_round_restored_on_restart_and_forgotten_on_reset(tmp_path):
    app, engine = make_app(tmp_path, strategy="fedavgm", min_devices=1, rounds=3, auto_activate=True,
                           start=True)
    c = app.test_client()
    token = register(c, "d1").get_json()["token"]
    one_round(c, token, 1, 1.0)
    engine.stop()
    saved = tmp_path / "state" / "saved" / "round_00001.strategy.safetensors"
    body = saved.read_bytes()
    _, expected = fedavgm_reference([[(1.0, 10)]])
    state = st_load(body)
    assert state.keys() == expected.keys() == {"velocity/dense/kernel", "velocity/dense/bias"}
    for key, value in expected.items():
        np.testing.assert_array_equal(state[key], value)
    assert '"name": "fedavgm"' in wire.header(body)["__metadata__"]["strategy"]

    # a new server on the same state: the velocity comes back, round 2 is the uninterrupted one's
    app, engine = make_app(tmp_path, strategy="fedavgm", min_devices=1, rounds=3, auto_activate=True,
                           start=True)
    try:
        c = app.test_client()
        for key, value in expected.items():
            np.testing.assert_array_equal(engine.strategy.state()[key], value)
        one_round(c, token, 2, 2.0)
        reference, _ = fedavgm_reference([[(1.0, 10)], [(2.0, 10)]])
        weights, _ = wire.decode(c.get("/api/model", headers=bearer(ADMIN)).data)
        for name in INITIAL:
            np.testing.assert_array_equal(weights[name], reference[name])
        # reset: a new run, with no velocity, in memory or in its folder; the first run's state
        # stays in its own; round 1 is a fresh FedAvgM's round 1
        assert c.post("/api/training/reset", headers=bearer(ADMIN)).get_json()["status"] == "idle"
        assert engine.strategy.state() == {}
        assert engine.run_dir != tmp_path / "state" and engine.run()["name"] == "fedavgm-2"
        assert not list((engine.run_dir / "saved").glob("*.strategy.safetensors"))
        assert len(list((tmp_path / "state" / "saved").glob("*.strategy.safetensors"))) == 2
        assert c.post("/api/training/start", headers=bearer(ADMIN)).status_code == 200
        one_round(c, token, 1, 3.0)
        fresh, _ = fedavgm_reference([[(3.0, 10)]])
        weights, _ = wire.decode(c.get("/api/model", headers=bearer(ADMIN)).data)
        for name in INITIAL:
            np.testing.assert_array_equal(weights[name], fresh[name])
    finally:
        engine.stop()


def test_another_strategys_saved_state_is_not_loaded(tmp_path):
    app, engine = make_app(tmp_path, strategy="fedavgm", min_devices=1, rounds=2, auto_activate=True,
                           start=True)
    c = app.test_client()
    token = register(c, "d1").get_json()["token"]
    one_round(c, token, 1, 1.0)
    engine.stop()
    app, engine = make_app(tmp_path, strategy="fedadam", min_devices=1, rounds=2, auto_activate=True,
                           start=True)
    try:
        assert engine.strategy.state() == {}
        assert status(app.test_client())["strategy"]["name"] == "fedadam"
    finally:
        engine.stop()


def test_a_device_whose_data_turns_invalid_leaves_the_round_at_once(tmp_path):
    app, engine = make_app(tmp_path, min_devices=2, rounds=1, auto_activate=True, start=True)
    try:
        c = app.test_client()
        tokens = {}
        for name in ("d1", "d2"):
            r = c.post("/api/devices/register", json={"name": name, "validation": GOOD},
                       headers={"X-Enroll-Secret": ENROLL})
            tokens[name] = r.get_json()["token"]
        for name, token in tokens.items():
            assert wait_task(c, name, token)["round"] == 1
        r = c.post("/api/devices/d2/validation", json={"validation": BAD}, headers=bearer(tokens["d2"]))
        assert r.get_json()["lifecycle"] == "invalid"
        assert status(c)["round"]["selected"] == ["d1"], "dropped now, not at the deadline"
        assert c.get("/api/devices/d2/task", headers=bearer(tokens["d2"])).status_code == 409
        assert upload(c, "d1", tokens["d1"], 1, update_body(1.0, 1, 0, 10)).status_code == 200
        completed(c, 1)
    finally:
        engine.stop()


def test_round_hooks_run_off_the_driver_thread_and_the_run_ends_after_them(tmp_path):
    app, engine = make_app(tmp_path, min_devices=1, rounds=2, auto_activate=True, start=True)
    release = threading.Event()
    seen = []

    def slow_hook(entry, weights):
        seen.append((entry["round"], threading.current_thread().name, float(weights["dense/bias"][0])))
        release.wait(30)

    engine.add_hook(slow_hook)
    answers: list[bool] = []  # what the driver heard each time it asked whether the hooks are done
    hooks_idle = engine._hooks.idle

    def idle_spy() -> bool:
        answer = hooks_idle()
        answers.append(answer)
        return answer

    engine._hooks.idle = idle_spy
    try:
        c = app.test_client()
        token = register(c, "d1").get_json()["token"]
        one_round(c, token, 1, 1.0)
        # round 1's hook is still running, and round 2 is open all the same
        assert wait_task(c, "d1", token)["round"] == 2
        assert seen == [(1, "fedhub-hooks", 1.0)]
        assert upload(c, "d1", token, 2, update_body(2.0, 2, 1, 10)).status_code == 200
        completed(c, 2)
        # What must not happen: the run declared over before its last round's hooks ran. Wait
        # until the driver has asked, twice after the last round, whether the hooks are done
        # (the last question before it declares the run over) and heard no.
        wait_until(lambda: answers.count(False) >= 2, 10, "the driver to ask about the hooks",
                   interval=0.05)
        assert status(c)["status"] == "running"
        release.set()
        wait_until(lambda: status(c)["status"] == "finished", 10, "the end of the run", interval=0.05)
        assert [s[0] for s in seen] == [1, 2]
    finally:
        release.set()
        engine.stop()


def test_history_is_built_once_and_a_late_error_still_marks_the_update(tmp_path):
    app, engine = make_app(tmp_path, min_devices=1, rounds=1, auto_activate=True, start=True)
    try:
        c = app.test_client()
        token = register(c, "d1").get_json()["token"]
        one_round(c, token, 1, 1.0)
        statements = []
        engine._storage._db.set_trace_callback(statements.append)
        for _ in range(3):
            [entry] = c.get("/api/history").get_json()["rounds"]
            [device] = c.get("/api/devices").get_json()["devices"]
        engine._storage._db.set_trace_callback(None)
        assert entry["devices"]["d1"]["accuracy"] == 0.7
        assert entry["devices"]["d1"]["aggregation"]["status"] == "used"
        assert device["latest"]["round"] == 1
        assert not [s for s in statements if "updates" in s or "device_logs" in s], statements
        # an ERROR naming the completed round, sent late, still marks the update failed
        r = c.post("/api/devices/d1/logs", json=[{"level": "ERROR", "message": "disk died", "round": 1}],
                   headers=bearer(token))
        assert r.status_code == 200
        [entry] = c.get("/api/history").get_json()["rounds"]
        assert entry["devices"]["d1"]["failed"] is True and entry["devices"]["d1"]["error"] == "disk died"
        assert c.get("/api/devices").get_json()["devices"][0]["latest"]["failed"] is True
    finally:
        engine.stop()
    # and it was stored: a restarted server serves the same entry without rebuilding it (the run
    # is finished, so the restart starts run 2; run 1 keeps its history)
    app, engine = make_app(tmp_path, min_devices=1, rounds=1, auto_activate=True, start=True)
    try:
        [again] = app.test_client().get("/api/runs/1").get_json()["history"]
        assert again == entry
        assert app.test_client().get("/api/history").get_json()["rounds"] == []
    finally:
        engine.stop()


def test_an_upload_is_one_transaction(tmp_path):
    app, engine = make_app(tmp_path, min_devices=2, rounds=1, auto_activate=True, start=True)
    try:
        c = app.test_client()
        token = register(c, "d1").get_json()["token"]
        other = register(c, "d2").get_json()["token"]
        wait_task(c, "d1", token)
        wait_task(c, "d2", other)  # still training: the round stays open, the driver writes nothing
        statements = []
        engine._storage._db.set_trace_callback(statements.append)
        assert upload(c, "d1", token, 1, update_body(1.0, 1, 0, 10)).status_code == 200
        engine._storage._db.set_trace_callback(None)
        writes = [s.split()[0] for s in statements if s.split()[0] in ("BEGIN", "COMMIT", "INSERT", "UPDATE")]
        assert writes[0] == "BEGIN" and writes[-1] == "COMMIT" and writes.count("COMMIT") == 1, statements
        assert any(s.startswith("INSERT INTO updates") for s in statements)
        assert any(s.startswith("INSERT INTO device_lifecycle") for s in statements)
    finally:
        engine.stop()
    db = sqlite3.connect(tmp_path / "state" / "fedhub.sqlite3")
    assert db.execute("SELECT device, num_examples FROM updates").fetchall() == [("d1", 10)]


def test_commits_that_do_not_wait_for_the_disk_are_still_atomic(tmp_path):
    """``transaction(durable=False)`` (uploads, lifecycle states): all or nothing, seen by a new
    connection, and the connection waits for the disk again afterwards."""
    storage = Storage(tmp_path)

    def synchronous() -> int:
        return storage._db.execute("PRAGMA synchronous").fetchone()[0]

    with storage.transaction(durable=False):
        storage.set_setting("a", "1")
        storage.set_setting("b", "2")
    assert synchronous() == 2  # FULL
    with pytest.raises(RuntimeError), storage.transaction(durable=False):
        storage.set_setting("c", "3")
        raise RuntimeError("refused half-way")
    assert synchronous() == 2
    other = sqlite3.connect(tmp_path / "fedhub.sqlite3")
    assert dict(other.execute("SELECT key, value FROM settings WHERE key IN ('a', 'b', 'c')")) == {
        "a": "1", "b": "2"}
    other.close()
    storage.close()


def test_a_device_that_left_stays_offline_until_it_asks_for_work_again(tmp_path):
    """Its last log lines or signal checks may arrive after its leave: they do not bring it back
    (a round would wait for a device that is gone); asking for a task does."""
    app, engine = make_app(tmp_path, min_devices=2, auto_activate=True)
    try:
        c = app.test_client()
        token = register(c, "d1").get_json()["token"]

        def state():
            return {d["name"]: d["state"] for d in c.get("/api/devices").get_json()["devices"]}["d1"]
        assert state() == "idle"
        assert c.post("/api/devices/d1/leave", headers=bearer(token)).status_code == 200
        assert state() == "offline"
        assert c.get("/api/devices/d1/signal", headers=bearer(token)).status_code == 200
        r = c.post("/api/devices/d1/logs", headers=bearer(token),
                   json=[{"level": "INFO", "message": "bye", "time": time.time()}])
        assert r.status_code == 200, r.get_json()
        assert state() == "offline"
        assert c.get("/api/devices/d1/task?wait=0", headers=bearer(token)).status_code == 200
        assert state() == "idle"
    finally:
        engine.stop()


def test_the_status_counts_agree_with_each_devices_state(tmp_path):
    """``GET /api/status`` counts in one pass what ``GET /api/devices`` says of each device."""
    now = [1000.0]
    registry = DeviceRegistry(Storage(tmp_path / "state"), enroll_secret=ENROLL, auto_activate=True,
                              device_timeout=60.0, clock=lambda: now[0])
    for name in ("idle1", "idle2", "busy", "stale", "gone", "off"):
        registry.register(name, ENROLL)
    now[0] += 50
    registry.touch("idle1")
    registry.touch("idle2")
    registry.set_activity("busy", "training")  # online however long unseen: a step sends nothing
    registry.leave("gone")
    registry.set_active("off", False)
    now[0] += 30  # "stale" and "busy" last seen 80 s ago
    states = {d["name"]: d["state"] for d in registry.list()}
    assert states == {"idle1": "idle", "idle2": "idle", "busy": "training", "stale": "offline",
                      "gone": "offline", "off": "inactive"}
    assert registry.counts() == {"idle": 2, "training": 1, "offline": 2, "inactive": 1}
    assert registry.available() == ["busy", "idle1", "idle2"]
