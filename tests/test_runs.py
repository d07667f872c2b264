"""Runs (issue 21): a state directory keeps every run; starting never destroys one.

In-process: the storage's migration of a state directory written before runs, the start /
continue / resume / new-run decisions, Reset as a new run, the four ``/api/runs`` routes (with
hostile input), ``fedhub runs``. With real processes (slow): the new user's sequence, a run, the
README's attack example with another strategy, a DP run restarted without ``--dp``, then Reset
and Start with the same enrolled device.
"""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from fedhub.api import build_app
from fedhub.engine import wire
from fedhub.engine.config import FederationConfig, TrainingConfig
from fedhub.engine.devices import DeviceRegistry
from fedhub.engine.errors import RunMismatch
from fedhub.engine.rounds import Coordinator
from fedhub.engine.storage import Storage

from .conftest import wait_until
from .test_api import ADMIN, ENROLL, INITIAL, bearer, register, update_body, upload, wait_task


def make(tmp_path, *, resume=None, new_run=None, **fed):
    fed.setdefault("round_timeout", 30)
    fed.setdefault("auto_activate", True)
    training = {k: fed.pop(k) for k in ("epochs", "batch_size", "learning_rate", "compression") if k in fed}
    config = FederationConfig(**fed, training=TrainingConfig(**training))
    storage = Storage(tmp_path / "state")
    devices = DeviceRegistry(storage, enroll_secret=ENROLL, auto_activate=config.auto_activate)
    engine = Coordinator(storage, devices, initial_weights=INITIAL, config=config,
                         evaluate=lambda w: {"loss": float(np.abs(w["dense/kernel"]).sum()), "accuracy": 0.5},
                         max_upload_bytes=1_000_000, identity={"dataset": "digits"}, resume=resume,
                         new_run=new_run)
    app = build_app(engine, admin_token=ADMIN, max_wait=5)
    engine.start()
    return app, engine


def status(c):
    return c.get("/api/status").get_json()


def train(c, name, token, number, value=1.0):
    """One round with one device: its task, its update, the round complete."""
    task = wait_task(c, name, token)
    assert task["round"] == number, task
    body = update_body(value, number, task["model_version"], 10)
    assert upload(c, name, token, number, body).status_code == 200
    wait_until(lambda: status(c)["completed_rounds"] >= number, 15, f"round {number}", interval=0.05)


def finish(tmp_path, **fed):
    """A run of one round, trained to its end; the device's token."""
    app, engine = make(tmp_path, min_devices=1, rounds=1, start=True, **fed)
    try:
        c = app.test_client()
        token = register(c, "d1").get_json()["token"]
        train(c, "d1", token, 1)
        wait_until(lambda: status(c)["status"] == "finished", 10, "finished", interval=0.05)
        return token, engine.run_message
    finally:
        engine.stop()


# ---------------------------------------------------------------- starting: which run

def test_a_finished_run_is_kept_and_the_next_start_is_a_new_run_that_trains(tmp_path):
    token, said = finish(tmp_path)
    assert said == "starting run 1 'fedavg-1'"
    app, engine = make(tmp_path, min_devices=1, rounds=1, start=True, strategy="fedmedian")
    try:
        assert engine.run_message == ("run 1 'fedavg-1' is finished: starting run 2 'fedmedian-2' "
                                      "(--resume 1 continues it, with a larger --rounds)")
        c = app.test_client()
        assert status(c)["status"] == "running" and status(c)["run"] == {"id": 2, "name": "fedmedian-2"}
        train(c, "d1", token, 1)  # the same device, enrolled once: no re-enrollment
        runs = c.get("/api/runs").get_json()["runs"]
        assert [(r["id"], r["status"], r["completed_rounds"], r["current"]) for r in runs] == [
            (2, "finished", 1, True), (1, "finished", 1, False)]
        assert runs[0]["settings"]["strategy"] == "fedmedian" and runs[1]["settings"]["strategy"] == "fedavg"
        assert runs[1]["settings"]["dataset"] == "digits" and "start" not in runs[1]["settings"]
        # run 1's files are where they were; run 2 has a folder of its own
        assert (tmp_path / "state" / "saved" / "round_00001.safetensors").is_file()
        assert (tmp_path / "state" / "runs" / "2-fedmedian-2" / "saved" / "round_00001.safetensors").is_file()
        assert len(c.get("/api/runs/1").get_json()["history"]) == 1
    finally:
        engine.stop()


def test_an_unfinished_run_continues_only_with_its_settings_and_keeps_its_own_rounds(tmp_path):
    app, engine = make(tmp_path, min_devices=1, rounds=4, start=True)
    c = app.test_client()
    token = register(c, "d1").get_json()["token"]
    train(c, "d1", token, 1)
    engine.stop()
    # crash recovery: the same settings but no --rounds: it goes on, with its own 4 rounds
    app, engine = make(tmp_path, min_devices=1, start=True)
    try:
        assert engine.run_message.startswith(
            "continuing run 1 'fedavg-1' after round 1 of 4 (its own 4 rounds")
        shown = status(app.test_client())
        assert (shown["completed_rounds"], shown["total_rounds"]) == (1, 4)
    finally:
        engine.stop()
    # another setting: a new run, and run 1 stays, stopped
    app, engine = make(tmp_path, min_devices=1, start=True, epochs=2)
    try:
        assert engine.run_message == (
            "settings differ from run 1 'fedavg-1' (epochs 1 -> 2): starting run 2 'fedavg-2' (run 1 "
            "'fedavg-1' is kept; --resume 1 continues it with its own settings)")
        assert engine.run(1)["status"] == "stopped" and engine.run()["completed_rounds"] == 0
    finally:
        engine.stop()


def test_resume_continues_a_finished_run_for_more_rounds_and_refuses_other_settings(tmp_path):
    token, _ = finish(tmp_path, strategy="fedavgm")
    with pytest.raises(RunMismatch, match=r"cannot resume run 1 'fedavgm-1': its settings differ: "
                                          r"strategy: the run's fedavgm, here fedavg"):
        make(tmp_path, min_devices=1, rounds=3, resume="1")
    with pytest.raises(RunMismatch, match=r"it has 1 round done and rounds is 1; give more rounds"):
        make(tmp_path, min_devices=1, rounds=1, strategy="fedavgm", resume="fedavgm-1")
    with pytest.raises(RunMismatch, match=r"resume: no run '7'"):
        make(tmp_path, min_devices=1, rounds=3, strategy="fedavgm", resume="7")
    app, engine = make(tmp_path, min_devices=1, rounds=2, start=True, strategy="fedavgm", resume="fedavgm-1")
    try:
        assert engine.run_message == "resuming run 1 'fedavgm-1' after round 1 of 2"
        c = app.test_client()
        assert engine.strategy.state()  # FedAvgM's velocity, restored with the checkpoint
        train(c, "d1", token, 2)
        assert [r["id"] for r in c.get("/api/runs").get_json()["runs"]] == [1]
    finally:
        engine.stop()


def test_a_dp_run_restarted_without_dp_starts_a_new_run_and_resume_refuses_naming_dp(tmp_path):
    dp = {"mode": "central-fixed", "noise_multiplier": 1.0, "clipping_norm": 1.0}
    app, engine = make(tmp_path, min_devices=1, rounds=3, start=True, dp=dp)
    c = app.test_client()
    token = register(c, "d1").get_json()["token"]
    train(c, "d1", token, 1)
    spent = status(c)["privacy"]["epsilon"]
    engine.stop()
    with pytest.raises(RunMismatch, match=r"dp: the run's .*central-fixed.*, here off \(a run that used "
                                          r"differential privacy goes on only with its DP settings\)"):
        make(tmp_path, min_devices=1, rounds=3, resume="1")
    app, engine = make(tmp_path, min_devices=1, rounds=3)
    try:
        assert engine.run_message.startswith("settings differ from run 1 'fedavg-dp-1' (dp central-fixed -> "
                                             "off): starting run 2 'fedavg-2'")
        assert status(app.test_client())["privacy"] is None
    finally:
        engine.stop()
    app, engine = make(tmp_path, min_devices=1, rounds=3, dp=dp, resume="1")  # with its DP: it goes on
    try:
        assert status(app.test_client())["privacy"]["epsilon"] == pytest.approx(spent, rel=1e-12)
    finally:
        engine.stop()


def test_new_run_names_a_fresh_run_and_refuses_a_name_in_use(tmp_path):
    finish(tmp_path)
    _, engine = make(tmp_path, min_devices=1, new_run="baseline")
    engine.stop()
    assert engine.run_message == "starting run 2 'baseline'"
    for name, why in (("baseline", "exists already"), ("fedavg-1", "exists already"),
                      ("12", "cannot be a number"), ("", "non-empty")):
        with pytest.raises(RunMismatch, match=why):
            make(tmp_path, min_devices=1, new_run=name)


def test_differences_name_each_setting_and_ignore_what_may_change():
    from fedhub.engine import runs

    old = {"strategy": "fedavg", "strategy_params": {}, "dp": {"mode": "local", "delta": 1e-5},
           "secagg": None, "rounds": 3, "min_devices": 2, "epochs": 1}
    new = {**old, "strategy": "krum", "strategy_params": {"num_malicious": 1}, "dp": None,
           "secagg": {"bits": 32}, "rounds": 9, "min_devices": 5}
    diffs = runs.differences(old, new)
    assert [key for key, _, _ in diffs] == ["dp", "secagg", "strategy", "strategy_params"]
    assert runs.describe(diffs) == ('dp local -> off, secagg off -> on, strategy fedavg -> krum, '
                                    'strategy_params {} -> {"num_malicious": 1}')
    tighter = {**old, "dp": {"mode": "local", "delta": 1e-6}}
    assert runs.differences(old, tighter) == [("dp.delta", 1e-5, 1e-6)]


# ---------------------------------------------------------------- Reset and POST /api/runs

def test_reset_starts_a_new_run_and_the_enrolled_devices_train_in_it(tmp_path):
    app, engine = make(tmp_path, min_devices=1, rounds=2, start=True)
    try:
        c = app.test_client()
        token = register(c, "d1").get_json()["token"]
        train(c, "d1", token, 1)
        r = c.post("/api/training/reset", headers=bearer(ADMIN))
        assert r.status_code == 200 and r.get_json()["status"] == "idle"
        assert r.get_json()["run"] == {"id": 2, "name": "fedavg-2"} and r.get_json()["total_rounds"] == 2
        assert wait_task(c, "d1", token, action="wait")["reason"] == "training has not been started"
        runs = c.get("/api/runs").get_json()["runs"]
        assert [(r["id"], r["status"], r["completed_rounds"]) for r in runs] == [
            (2, "idle", 0), (1, "stopped", 1)]
        assert len(c.get("/api/runs/1").get_json()["history"]) == 1  # nothing of run 1 destroyed
        assert c.post("/api/training/start", headers=bearer(ADMIN)).status_code == 200
        train(c, "d1", token, 1, value=3.0)
        assert [e["round"] for e in c.get("/api/history").get_json()["rounds"]] == [1]
    finally:
        engine.stop()


def test_post_runs_starts_a_new_run_with_other_settings_live(tmp_path):
    app, engine = make(tmp_path, min_devices=1, rounds=1, start=True)
    try:
        c = app.test_client()
        token = register(c, "d1").get_json()["token"]
        train(c, "d1", token, 1)
        body = {"name": "krum try", "settings": {"strategy": "fedavgm", "rounds": 2, "epochs": 3,
                                                 "learning_rate": 0.01, "dp": {"mode": "central-fixed"}}}
        r = c.post("/api/runs", json=body, headers=bearer(ADMIN))
        assert r.status_code == 201, r.get_json()
        run = r.get_json()
        assert (run["id"], run["name"], run["status"], run["current"], run["history"]) == (
            2, "krum try", "idle", True, [])
        assert run["settings"]["strategy"] == "fedavgm" and run["settings"]["dp"]["mode"] == "central-fixed"
        assert run["total_rounds"] == 2 and status(c)["strategy"]["name"].startswith("dp-central-fixed")
        assert c.post("/api/training/start", headers=bearer(ADMIN)).status_code == 200
        task = wait_task(c, "d1", token)
        assert (task["round"], task["config"]["epochs"], task["config"]["learning_rate"]) == (1, 3, 0.01)
        assert (tmp_path / "state" / "runs" / "2-krum-try" / "saved" / "round_00000.safetensors").is_file()
    finally:
        engine.stop()


@pytest.mark.parametrize(("body", "status_code", "field"), [
    ({"settings": {"strategy": "nope"}}, 400, "settings.strategy"),
    ({"settings": {"rounds": -1}}, 400, "settings.rounds"),
    ({"settings": {"rounds": "3"}}, 400, "settings.rounds"),
    ({"settings": {"quorum": 2}}, 400, "settings.quorum"),
    ({"settings": {"epochs": True}}, 400, "settings.epochs"),
    ({"settings": {"learning_rate": 1e400}}, 400, "body"),
    ({"settings": {"port": 1}}, 400, "settings.port"),
    ({"settings": {"state_dir": "/etc"}}, 400, "settings.state_dir"),
    ({"settings": {"compression": "zip"}}, 400, "settings.compression"),
    ({"settings": {"dp": {"mode": "central-fixed", "delta": 5}}}, 400, "settings.dp.delta"),
    ({"settings": {"dp": "on"}}, 400, "settings.dp"),
    ({"settings": {"strategy": "krum", "strategy_params": {"num_malicious": 3}}}, 400,
     "settings.min_devices"),
    ({"settings": {"strategy_params": {"nope": 1}}}, 400, "settings.strategy_params"),
    ({"settings": {"strategy": "fedmedian", "dp": {"mode": "central-fixed"}}}, 400, "settings"),
    ({"settings": [1]}, 400, "settings"),
    ({"name": "1"}, 400, "name"),
    ({"name": "x" * 101}, 400, "name"),
    ({"name": "a/b"}, 400, "name"),
    ({"name": "fedavg-1"}, 409, "name"),
    ({"name": "a", "extra": 1}, 400, "extra"),
    ([], 400, "body"),
])
def test_post_runs_refusals_name_the_setting_and_change_nothing(tmp_path, body, status_code, field):
    app, engine = make(tmp_path, min_devices=1, rounds=1)
    try:
        c = app.test_client()
        before = c.get("/api/runs").get_json()
        r = c.post("/api/runs", json=body, headers=bearer(ADMIN))
        assert (r.status_code, r.get_json()["field"]) == (status_code, field), r.get_json()
        assert c.get("/api/runs").get_json() == before and status(c)["run"]["id"] == 1
    finally:
        engine.stop()


def test_runs_routes_refuse_hostile_input(tmp_path):
    app, engine = make(tmp_path, min_devices=1, rounds=1)
    try:
        c = app.test_client()
        token = register(c, "d1").get_json()["token"]
        for bad in ("99", "9" * 40, "nobody", "%00", "x" * 200, "-1"):
            r = c.get(f"/api/runs/{bad}")
            assert r.status_code in (400, 404) and r.is_json, (bad, r.status_code)
        assert c.post("/api/runs", json={}).status_code == 401
        assert c.post("/api/runs", json={}, headers=bearer(token)).status_code == 403
        assert c.delete("/api/runs/1", headers=bearer(token)).status_code == 403
        huge = {"settings": {"strategy_params": {"k" * 10: "v" * 20_000}}}
        r = c.post("/api/runs", json=huge, headers=bearer(ADMIN))
        assert (r.status_code, r.get_json()["field"]) == (413, "body")
        r = c.delete("/api/runs/1", headers=bearer(ADMIN))
        assert (r.status_code, r.get_json()["field"]) == (409, "id")  # the current run
        assert c.delete("/api/runs/2", headers=bearer(ADMIN)).status_code == 404
        assert [r["id"] for r in c.get("/api/runs").get_json()["runs"]] == [1]
    finally:
        engine.stop()


def test_delete_removes_an_old_run_its_rows_and_its_folder(tmp_path):
    app, engine = make(tmp_path, min_devices=1, rounds=1, start=True)
    try:
        c = app.test_client()
        token = register(c, "d1").get_json()["token"]
        c.post("/api/runs", json={"name": "second"}, headers=bearer(ADMIN))
        c.post("/api/training/start", headers=bearer(ADMIN))
        train(c, "d1", token, 1)
        folder = engine.run_dir
        assert folder.name == "2-second"
        c.post("/api/training/reset", headers=bearer(ADMIN))
        r = c.delete("/api/runs/second", headers=bearer(ADMIN))
        assert r.status_code == 200 and r.get_json() == {"deleted": 2, "name": "second"}
        assert not folder.exists() and c.get("/api/runs/2").status_code == 404
        db = sqlite3.connect(tmp_path / "state" / "fedhub.sqlite3")
        assert db.execute("SELECT COUNT(*) FROM rounds WHERE run_id = 2").fetchone() == (0,)
        assert db.execute("SELECT COUNT(*) FROM history WHERE run_id = 2").fetchone() == (0,)
        assert [r["id"] for r in c.get("/api/runs").get_json()["runs"]] == [3, 1]
    finally:
        engine.stop()


# ---------------------------------------------------------------- a state directory from before runs

# The schema a state directory had before runs (fedhub/engine/storage.py at 5c1affa), and rows
# as that code wrote them: a finished run of two rounds.
OLD_SCHEMA = """
CREATE TABLE devices (name TEXT PRIMARY KEY, token_hash TEXT NOT NULL UNIQUE, active INTEGER NOT NULL
    DEFAULT 0, num_examples INTEGER, registered_at REAL NOT NULL, last_seen REAL, state TEXT NOT NULL
    DEFAULT 'idle', info TEXT NOT NULL DEFAULT '{}');
CREATE TABLE rounds (number INTEGER PRIMARY KEY, status TEXT NOT NULL, started_at REAL NOT NULL,
    closed_at REAL, selected TEXT NOT NULL DEFAULT '[]', config TEXT NOT NULL DEFAULT '{}', num_updates
    INTEGER NOT NULL DEFAULT 0, num_examples INTEGER NOT NULL DEFAULT 0, test_loss REAL, test_accuracy REAL,
    checkpoint TEXT);
CREATE TABLE updates (round INTEGER NOT NULL, device TEXT NOT NULL, num_examples INTEGER NOT NULL,
    metrics TEXT NOT NULL DEFAULT '{}', upload_id TEXT, body_sha256 TEXT, received_at REAL NOT NULL,
    PRIMARY KEY (round, device));
CREATE TABLE settings (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE device_lifecycle (name TEXT PRIMARY KEY, state TEXT NOT NULL, reason TEXT NOT NULL DEFAULT '',
    round INTEGER, validation TEXT, updated_at REAL NOT NULL);
CREATE TABLE device_logs (id INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT NOT NULL, level TEXT NOT NULL,
    message TEXT NOT NULL, time REAL NOT NULL, round INTEGER, received_at REAL NOT NULL);
CREATE INDEX device_logs_by_device ON device_logs (device, id);
CREATE TABLE history (round INTEGER PRIMARY KEY, entry TEXT NOT NULL);
CREATE TABLE round_failures (id INTEGER PRIMARY KEY AUTOINCREMENT, round INTEGER NOT NULL, started_at REAL
    NOT NULL, failed_at REAL NOT NULL, reason TEXT NOT NULL);
CREATE TABLE async_updates (id INTEGER PRIMARY KEY AUTOINCREMENT, device TEXT NOT NULL, target INTEGER
    NOT NULL, base_version INTEGER NOT NULL, staleness INTEGER NOT NULL, weight REAL NOT NULL, num_examples
    INTEGER NOT NULL, metrics TEXT NOT NULL DEFAULT '{}', upload_id TEXT, body_sha256 TEXT, body_path TEXT
    NOT NULL, folded INTEGER NOT NULL DEFAULT 0, received_at REAL NOT NULL);
CREATE UNIQUE INDEX async_updates_by_key ON async_updates (device, upload_id);
"""


def old_state_dir(folder: Path, *, status: str, rounds: int = 2) -> None:
    """A state directory as FedHub wrote it before runs: ``rounds`` rounds of d1."""
    (folder / "saved").mkdir(parents=True)
    db = sqlite3.connect(folder / "fedhub.sqlite3")
    db.executescript(OLD_SCHEMA)
    db.execute("INSERT INTO devices VALUES ('d1', 'hash', 1, 10, 1.0, 1.0, 'idle', '{}')")
    for n in range(rounds + 1):
        weights = {k: np.full(v.shape, float(n), np.float32) for k, v in INITIAL.items()}
        path = folder / "saved" / f"round_{n:05d}.safetensors"
        path.write_bytes(wire.encode(weights, wire.Meta(round=n, model_version=n)))
        db.execute("INSERT INTO rounds VALUES (?, 'complete', ?, ?, '[\"d1\"]', '{}', ?, ?, ?, 0.5, ?)",
                   (n, 100.0 + n, 101.0 + n, int(n > 0), 10 * int(n > 0), float(n), str(path)))
        if n:
            db.execute("INSERT INTO updates VALUES (?, 'd1', 10, '{}', 'key', 'sha', ?)", (n, 100.5 + n))
            entry = {"round": n, "test_loss": float(n), "test_accuracy": 0.5, "num_updates": 1,
                     "num_examples": 10, "started_at": 100.0 + n, "closed_at": 101.0 + n,
                     "devices": {"d1": {"num_examples": 10}}, "strategy": None, "num_used": 1}
            db.execute("INSERT INTO history VALUES (?, ?)", (n, json.dumps(entry)))
    db.execute("INSERT INTO device_logs(device, level, message, time, round, received_at) VALUES "
               "('d1', 'ERROR', 'boom', 1.0, 1, 1.0)")
    db.execute("INSERT INTO round_failures(round, started_at, failed_at, reason) VALUES (1, 1, 2, 'short')")
    db.execute("INSERT INTO settings VALUES ('status', ?)", (status,))
    db.commit()
    db.close()


def test_a_state_directory_from_before_runs_becomes_run_1_and_keeps_everything(tmp_path):
    old_state_dir(tmp_path / "state", status="paused", rounds=2)
    storage = Storage(tmp_path / "state")
    [run] = storage.list_runs()
    assert (run["id"], run["name"], run["status"], run["folder"]) == (1, "run-1", "paused", "")
    assert run["settings"] is None and run["completed_rounds"] == 2
    assert storage.run_id == 1 and storage.checkpoint_dir == tmp_path / "state" / "saved"
    assert [r["number"] for r in storage.list_rounds()] == [0, 1, 2]
    assert storage.get_update(1, "d1")["upload_id"] == "key"
    assert [e["round"] for e in storage.list_history()] == [1, 2]
    assert storage.list_round_failures(5)[0]["reason"] == "short"
    assert storage.list_logs(round_number=1)[0]["message"] == "boom"
    assert storage.get_device("d1")["token_hash"] == "hash"
    storage.close()
    # a server on it: an unfinished run of unknown settings goes on, and now has these
    app, engine = make(tmp_path, min_devices=1, rounds=4)
    try:
        assert engine.run_message == ("continuing run 1 'run-1' after round 2 (its settings were not "
                                      "recorded: these are now)")
        c = app.test_client()
        assert (status(c)["completed_rounds"], status(c)["status"]) == (2, "paused")
        assert engine.run()["settings"]["strategy"] == "fedavg"
        np.testing.assert_array_equal(engine.global_weights()[1]["dense/bias"], np.full(2, 2.0))
    finally:
        engine.stop()
    Storage(tmp_path / "state").close()  # opening it again migrates nothing twice


def test_a_finished_run_from_before_runs_is_kept_and_a_new_run_starts_beside_it(tmp_path):
    old_state_dir(tmp_path / "state", status="finished", rounds=2)
    _, engine = make(tmp_path, min_devices=1, rounds=2)
    try:
        assert engine.run_message.startswith("run 1 'run-1' is finished: starting run 2 'fedavg-2'")
        assert engine.run_dir == tmp_path / "state" / "runs" / "2-fedavg-2"
        assert len(engine.run(1)["history"]) == 2
    finally:
        engine.stop()


# ---------------------------------------------------------------- fedhub runs

def test_fedhub_runs_list_show_export_delete(tmp_path, capsys):
    from fedhub import cli

    finish(tmp_path)
    _, engine = make(tmp_path, min_devices=1, rounds=1, strategy="fedmedian")
    engine.stop()
    state = ["--state-dir", str(tmp_path / "state")]
    assert cli.main(["runs", *state, "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split() == ["id", "name", "status", "rounds", "strategy", "created", "finished"]
    assert lines[1].split()[:6] == ["*", "2", "fedmedian-2", "idle", "0/1", "fedmedian"]
    assert lines[2].split()[:5] == ["1", "fedavg-1", "finished", "1/1", "fedavg"]
    assert cli.main(["runs", *state, "show", "fedavg-1"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["settings"]["strategy"] == "fedavg" and [r["round"] for r in shown["rounds"]] == [1]
    out = tmp_path / "export"
    assert cli.main(["runs", *state, "export", "1", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["history.csv", "model.safetensors", "settings.json"]
    assert json.loads((out / "settings.json").read_text())["settings"]["strategy"] == "fedavg"
    assert (out / "history.csv").read_text().splitlines()[1].startswith("1,")
    weights, meta = wire.decode((out / "model.safetensors").read_bytes())
    assert meta.round == 1 and set(weights) == set(INITIAL)
    for argv, why in ((["export", "1", str(out)], "is not an empty folder"),
                      (["show", "9"], "no run '9'"),
                      (["delete", "2"], "current run"),
                      ([], "give a command")):
        with pytest.raises(SystemExit) as exited:
            cli.main(["runs", *state, *argv])
        assert exited.value.code == 2
        assert why in capsys.readouterr().err
    assert cli.main(["runs", *state, "delete", "1"]) == 0
    assert "deleted run 1 'fedavg-1'" in capsys.readouterr().out
    assert not (tmp_path / "state" / "saved").exists()
    with pytest.raises(SystemExit):
        cli.main(["runs", "--state-dir", str(tmp_path / "nothing"), "list"])
    assert "no FedHub state" in capsys.readouterr().err


def test_history_csv_is_the_current_runs_in_the_eval_folder(tmp_path, monkeypatch):
    """A plain ``python server.py`` (no state directory) writes eval/history.csv and TensorBoard's
    runs/ in the checkout, as the README says; the database and checkpoints in server_training/."""
    from fedhub import serve
    from fedhub.checkout import ROOT

    monkeypatch.delenv("FEDHUB_STATE_DIR", raising=False)
    config = serve.parse_args([])
    assert (config.state_dir, config.eval_dir, config.runs_dir) == (
        ROOT / "server_training", ROOT / "eval", ROOT / "runs")
    config = serve.parse_args(["--state-dir", str(tmp_path)])
    assert (config.eval_dir, config.runs_dir) == (tmp_path / "eval", tmp_path / "runs")


def test_a_run_switch_waits_for_nothing_and_status_reads_no_row(tmp_path):
    """Reset as a new run while a device long-polls: the poll is answered, the device gets the new
    run's tasks once it starts."""
    app, engine = make(tmp_path, min_devices=1, rounds=1)
    try:
        c = app.test_client()
        token = register(c, "d1").get_json()["token"]
        started = time.monotonic()
        c.post("/api/training/reset", headers=bearer(ADMIN))
        assert time.monotonic() - started < 5
        c.post("/api/training/start", headers=bearer(ADMIN))
        assert wait_task(c, "d1", token)["round"] == 1
    finally:
        engine.stop()


# ---------------------------------------------------------------- the new user's sequence, real processes

@pytest.mark.slow
def test_a_new_users_sequence_with_real_processes(server_factory, split_devices):
    """Issue 21's sequence with server.py and device processes: a run to its end; the README's
    attack example with another strategy trains a new run (not "finished") and says so in one
    line; a DP run restarted without --dp starts a new run (and --resume of it is refused, naming
    dp); Reset and Start: a new run trains with the same enrolled, still running device."""
    from fedhub.device.launcher import stop

    from .conftest import ServerProcess, launch_devices

    root = split_devices(3, 120)
    # Short deadlines: a restarted server counts the devices that left run 2 as online until
    # --device-timeout passes, so run 3's first round selects all three and waits for its deadline
    # (it then opens again with device1 alone); with --round-timeout 120 that wait was two minutes.
    common = ("--framework", "torch", "--test-limit", "200", "--no-tensorboard", "--auto-activate", "--start",
              "--round-timeout", "15", "--device-timeout", "10")

    def run_lines(server) -> list[str]:
        return [line for line in server.log().splitlines()
                if line.startswith(("starting run", "continuing run", "resuming run", "settings differ",
                                    "run "))]

    def finished(server) -> bool:
        return server.get("/api/status").json()["status"] == "finished"

    # 1. a first run: FedAvg, one round, one device, to its end (the device leaves)
    server = server_factory(*common, "--rounds", "1").start()
    procs = launch_devices(server, root, ["device1"])
    try:
        wait_until(lambda: finished(server), 240, "run 1 to finish")
        assert procs[0].wait(60) == 0
    finally:
        stop(procs)
    server.stop()
    assert run_lines(server) == ["starting run 1 'fedavg-1'"]

    # 2. the README's attack example, another strategy: a new run, that trains
    server.args = (*common, "--rounds", "1", "--strategy", "krum", "--strategy-arg", "num_malicious=0",
                   "--min-devices", "3")
    server.start()
    status = server.get("/api/status").json()
    assert status["status"] == "running" and status["run"]["name"] == "krum-2", status
    assert run_lines(server)[-1] == ("run 1 'fedavg-1' is finished: starting run 2 'krum-2' (--resume 1 "
                                     "continues it, with a larger --rounds)")
    procs = launch_devices(server, root, ["device1", "device2", "device3"])
    try:
        wait_until(lambda: finished(server), 300, "the krum run to finish")
    finally:
        stop(procs)
    [entry] = server.get("/api/history").json()["rounds"]
    assert entry["strategy"]["name"] == "krum" and entry["num_updates"] == 3
    server.stop()

    # 3. a DP run (until paused: rounds here take a second), stopped after a round, then restarted
    # without --dp
    dp = ("--dp", "central-fixed", "--dp-noise-multiplier", "1.0", "--dp-clipping-norm", "1.0")
    server.args = (*common, "--rounds", "0", *dp)
    server.start()
    procs = launch_devices(server, root, ["device1"])  # it stays to the end of this test
    try:
        wait_until(lambda: server.get("/api/status").json()["completed_rounds"] >= 1, 240, "a DP round")
        assert server.get("/api/status").json()["privacy"]["epsilon"] > 0
        server.stop()
        refused = ServerProcess(server.state_dir.parent, server.data_dir, *common, "--rounds", "3",
                                "--resume", "3")
        refused.env = server.env
        with pytest.raises(RuntimeError, match="server exited 2"):
            refused.start()
        assert ("error: cannot resume run 3 'fedavg-dp-3': its settings differ: dp: the run's "
                in refused.log()), refused.log()
        assert "(a run that used differential privacy goes on only with its DP settings)" in refused.log()
        server.args = (*common, "--rounds", "0")
        server.start()
        assert run_lines(server)[-1].startswith(
            "settings differ from run 3 'fedavg-dp-3' (dp central-fixed -> off): starting run 4 'fedavg-4'")
        assert server.get("/api/status").json()["privacy"] is None
        wait_until(lambda: server.get("/api/status").json()["completed_rounds"] >= 1, 240,
                   "run 4's first round, by the device enrolled in run 3")

        # 4. Reset, then Start: a new run, the same device process trains in it
        reset = server.admin("POST", "/api/training/reset").json()
        assert reset["status"] == "idle" and reset["run"]["name"] == "fedavg-5"
        assert server.admin("POST", "/api/training/start").ok
        wait_until(lambda: server.get("/api/status").json()["completed_rounds"] >= 1, 240,
                   "run 5's first round")
        assert procs[0].poll() is None, "the device stayed enrolled and running"
        devices = server.get("/api/devices").json()["devices"]
        assert [d["name"] for d in devices] == ["device1", "device2", "device3"]
    finally:
        stop(procs)
    runs = {r["id"]: r for r in server.get("/api/runs").json()["runs"]}
    assert sorted(runs) == [1, 2, 3, 4, 5]
    assert [runs[i]["status"] for i in (1, 2, 3, 4)] == ["finished", "finished", "stopped", "stopped"]
    assert runs[3]["settings"]["dp"]["mode"] == "central-fixed" and runs[3]["completed_rounds"] >= 1
    assert runs[5]["current"] and runs[5]["completed_rounds"] >= 1
    assert len(server.get("/api/runs/1").json()["history"]) == 1  # nothing destroyed along the way
    rows = (server.eval_dir / "history.csv").read_text().splitlines()  # run 5's, the current run's
    assert rows[0].startswith("round,") and rows[1].startswith("1,")
    assert len(rows) - 1 <= len(server.get("/api/history").json()["rounds"])


@pytest.mark.slow
def test_a_simulated_run_records_how_its_data_was_split(tmp_path, data_dir, capsys):
    """The server cannot see how devices' data was split: fedhub.simulate says it, and the run's
    settings keep it (compared like any other setting)."""
    import fedhub.simulate as simulate_cli
    from fedhub import runs_cli

    root = tmp_path / "sim"
    assert simulate_cli.main(["--framework", "torch", "--devices", "2", "--fraction", "1", "--rounds", "1",
                              "--limit", "32", "--test-limit", "50", "--workers", "1", "--split", "dirichlet",
                              "--alpha", "0.5", "--data-dir", str(data_dir), "--root", str(root),
                              "--quiet"]) == 0
    capsys.readouterr()
    assert runs_cli.main(["show", "1", "--state-dir", str(root / "server")]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["settings"]["data_split"] == "dirichlet alpha=0.5 over 2 devices, at most 32 examples each"
    assert shown["settings"]["dataset"] == "fashion-mnist" and len(shown["rounds"]) == 1
