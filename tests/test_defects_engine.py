"""Issue 18's engine defects, each on a real server: a plain update in a secure-aggregation
round, asynchronous mode's admission, task polls queued on the storage lock, a private run
continued without its privacy, and the smaller ones (an interrupt report for round 0, a start
after the privacy budget is spent, secure-aggregation messages parsed without bounds).

Where a real model is not the point, the server holds the NumPy/digits model
(``tests.seeded_digits``) and devices are played by hand over HTTP.
"""

from __future__ import annotations

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import requests

from examples import digits
from fedhub.engine import wire
from fedhub.engine.secagg.params import levels_for

from .conftest import ROOT, ServerProcess, wait_until
from .rounds_by_hand import enroll, train_rounds

DIGITS = ("--model-factory", "tests.seeded_digits:build_model", "--min-devices", "1",
          "--auto-activate", "--no-tensorboard")
DP = ("--dp", "central-fixed", "--dp-noise-multiplier", "1.5", "--dp-clip", "0.5")


def digits_server(tmp_path, data_dir, *args: str) -> ServerProcess:
    digits.split(tmp_path / "devices", 1, limit=20)  # only its test set: devices are played by hand
    return ServerProcess(tmp_path, data_dir, "--test-data", str(tmp_path / "devices" / "test.npz"),
                         *DIGITS, *args)


def status(server: ServerProcess) -> dict:
    return server.get("/api/status").json()


def refused_start(server: ServerProcess, *args: str) -> str:
    """Start ``server.py`` on ``server``'s state directory with ``args`` and expect it to refuse:
    exit 2 with one ``error:`` line (the last) and no traceback. That line."""
    cmd = [sys.executable, str(ROOT / "server.py"), str(server.port), "--state-dir", str(server.state_dir),
           "--eval-dir", str(server.eval_dir), "--data-dir", str(server.data_dir), *args]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=server.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        out, err = proc.communicate(timeout=120)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, err = proc.communicate()
        raise AssertionError(f"the server started instead of refusing:\n{out}\n{err}") from None
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, (proc.returncode, err)
    assert err.strip().splitlines()[-1] == errors[0] and "Traceback" not in err, err
    return errors[0]


# 1. a plain update in a secure-aggregation round ----------------------------------------------
@pytest.mark.slow
def test_a_secure_round_refuses_plain_weights_and_unbounded_messages(tmp_path, data_dir):
    """During the masked stage a device posts ordinary weights (5,000 examples' worth) to the
    plain update route: refused with 409 naming ``round``, nothing changes, and the round's
    model is the masked devices' mean only. Stage messages go through the bounded JSON parser:
    a body larger than the round's stage can hold is refused before parsing, NaN is not JSON."""
    from .test_secagg_live import HandDevice, hand_server, mean_change, run_round

    server = hand_server(tmp_path, data_dir, "--rounds", "1").start()
    try:
        devices = [HandDevice(server, f"hand{i}", 0.01 * i, 100) for i in (1, 2, 3, 4)]
        hand1 = devices[0]
        wait_until(lambda: (status(server)["round"] or {}).get("secagg"), 30, "round 1's advertise stage")
        messages = [
            b'{"stage": "advertise", "round": 1, "device": "hand1", "pad": [' + b"0," * 500_000 + b"0]}",
            b'{"stage": "advertise", "round": NaN, "device": "hand1"}',
        ]
        answers = [hand1.post(1, body) for body in messages]
        assert [(r.status_code, r.json()["field"]) for r in answers] == [(400, "body"), (400, "body")], \
            [r.text for r in answers]
        assert "bytes it can hold" in answers[0].json()["message"]
        assert "NaN is not a JSON number" in answers[1].json()["message"]

        def stage() -> str | None:
            for d in devices:
                d.step(d.task())
            return ((status(server)["round"] or {}).get("secagg") or {}).get("stage")

        wait_until(lambda: stage() == "masked", 30, "the masked stage", interval=0.05)
        task = hand1.task()
        assert task["action"] == "train" and task["round"] == 1
        before = status(server)["round"]
        global_weights, _ = wire.decode(hand1.session.get(f"{server.url}/api/model", timeout=30).content)
        plain = wire.encode({k: v + np.asarray(1.0, v.dtype) for k, v in global_weights.items()},
                            wire.Meta(round=1, model_version=task["model_version"], num_examples=5000))
        r = hand1.session.post(f"{server.url}/api/devices/hand1/updates/1", data=plain, timeout=30,
                               headers={"Content-Type": "application/octet-stream"})
        assert r.status_code == 409, r.text
        assert r.json()["field"] == "round" and "secure-aggregation round" in r.json()["message"], r.text
        after = status(server)["round"]
        assert (after["reported"], after["secagg"]) == (before["reported"], before["secagg"])
        run_round(server, devices, 1)
        [entry] = server.get("/api/history").json()["rounds"]
    finally:
        server.stop()
    assert entry["num_updates"] == 4 and entry["secagg"]["total_weight"] == 400, entry
    # the mean of the masked changes (0.01 .. 0.04, 100 examples each); a plain +1.0 of 5,000
    # examples folded in would have moved it to about 0.93
    np.testing.assert_allclose(mean_change(server, 1), 0.025, atol=0.5 / levels_for(32, 4, 10_000) + 1e-6)


# 2. asynchronous mode's admission -------------------------------------------------------------
@pytest.mark.slow
def test_async_mode_takes_updates_only_from_admitted_devices(tmp_path, data_dir):
    """The rule of synchronous rounds in asynchronous mode: an update from a device the admin
    deactivated, or one whose data is invalid, is refused with 409 naming why, the buffer
    unchanged; once activated again the same device's update is taken."""
    server = digits_server(tmp_path, data_dir, "--mode", "async", "--buffer", "2", "--start",
                           "--rounds", "0").start()
    try:
        tokens = {name: enroll(server, name) for name in ("good", "off")}
        tokens["bad"] = enroll(server, "bad", problems=("labels must be in 0..9",))
        r = server.admin("POST", "/api/devices/off/deactivate")
        assert r.status_code == 200, r.text
        auth = {"Authorization": f"Bearer {tokens['good']}"}
        weights, meta = wire.decode(server.get("/api/model", headers=auth).content)
        body = wire.encode({k: v + np.asarray(1e-3, v.dtype) for k, v in weights.items()},
                           wire.Meta(round=0, model_version=meta.model_version, num_examples=100))

        def upload(name: str) -> requests.Response:
            return requests.post(f"{server.url}/api/devices/{name}/updates/0", data=body, timeout=30,
                                 headers={"Authorization": f"Bearer {tokens[name]}",
                                          "Content-Type": "application/octet-stream"})

        off, bad = upload("off"), upload("bad")
        assert (off.status_code, off.json()["field"]) == (409, "active"), off.text
        assert "inactive" in off.json()["message"]
        assert (bad.status_code, bad.json()["field"]) == (409, "validation"), bad.text
        assert "labels must be in 0..9" in bad.json()["message"]
        assert status(server)["buffer"] == {"target": 1, "received": 0}

        assert upload("good").status_code == 200
        assert server.admin("POST", "/api/devices/off/activate").status_code == 200
        again = upload("off")
        assert again.status_code == 200, again.text
        wait_until(lambda: status(server)["model_version"] >= 1, 60, "model version 1")
        [version] = server.get("/api/history").json()["rounds"]
    finally:
        server.stop()
    assert sorted(version["devices"]) == ["good", "off"]


# 8. task polls do not queue on the storage lock -----------------------------------------------
def test_task_polls_and_status_answer_while_the_storage_is_busy(tmp_path):
    """A real HTTP server (waitress, in this process, over the NumPy model) whose storage lock
    is held, as by a long write: task polls, a refused device's included, and ``GET /api/status``
    still answer, as whether a device is refused is kept in memory. Before, every task poll read
    SQLite under that lock, and a crowd of them queued behind any write."""
    from fedhub.api import build_app
    from fedhub.api.serving import ServeOptions, Serving
    from fedhub.engine.config import FederationConfig
    from fedhub.engine.devices import DeviceRegistry
    from fedhub.engine.rounds import Coordinator
    from fedhub.engine.storage import Storage

    from .test_api import ADMIN, ENROLL, INITIAL

    storage = Storage(tmp_path / "state")
    devices = DeviceRegistry(storage, enroll_secret=ENROLL, auto_activate=True)
    engine = Coordinator(storage, devices, initial_weights=INITIAL, config=FederationConfig())
    engine.start()
    serving = Serving(build_app(engine, admin_token=ADMIN, max_wait=5), ServeOptions(port=0, threads=8))
    serving.start()
    try:
        tokens = {}
        for name, report in (("good", {"ok": True, "problems": [], "num_examples": 3}),
                             ("bad", {"ok": False, "problems": ["no examples"], "num_examples": 0})):
            r = requests.post(f"{serving.url}/api/devices/register", timeout=30,
                              headers={"X-Enroll-Secret": ENROLL}, json={"name": name, "validation": report})
            assert r.status_code == 201, r.text
            tokens[name] = r.json()["token"]

        def task(name: str) -> requests.Response:
            return requests.get(f"{serving.url}/api/devices/{name}/task?wait=0", timeout=20,
                                headers={"Authorization": f"Bearer {tokens[name]}"})

        with storage.transaction(), ThreadPoolExecutor(3) as pool:  # the storage lock, held
            good, bad = pool.submit(task, "good"), pool.submit(task, "bad")
            shown = pool.submit(requests.get, f"{serving.url}/api/status", timeout=20)
            good, bad, shown = good.result(), bad.result(), shown.result()
        assert good.status_code == 200 and good.json()["action"] == "wait", good.text
        assert "training has not been started" in good.json()["reason"]
        assert (bad.status_code, bad.json()["field"]) == (409, "validation"), bad.text
        assert "no examples" in bad.json()["message"]
        assert shown.status_code == 200 and shown.json()["devices"] == {"idle": 2}, shown.text
    finally:
        serving.stop()
        engine.stop()
        storage.close()


def test_lifecycle_memory_follows_only_what_commits(tmp_path):
    """The lifecycle states in memory are what SQLite holds: a write in a transaction that
    rolls back leaves the device as it was, and a restart reads back what committed."""
    from fedhub.engine.lifecycle import Lifecycle
    from fedhub.engine.storage import Storage

    storage = Storage(tmp_path)
    lifecycle = Lifecycle(storage)
    lifecycle.report("d1", {"ok": True, "problems": [], "num_examples": 3, "class_counts": []})
    with pytest.raises(RuntimeError), storage.transaction():
        lifecycle.set("d1", "training", round_number=1)
        raise RuntimeError("the update could not be recorded")
    assert lifecycle.get("d1")["state"] == "init"
    lifecycle.set("d1", "waiting", reason="update for round 1 sent", round_number=1)
    assert lifecycle.get("d1")["validation"]["num_examples"] == 3  # the report stays
    lifecycle.report("d2", {"ok": False, "problems": ["no examples"], "num_examples": 0, "class_counts": []})
    again = Lifecycle(storage)
    assert again.all() == lifecycle.all() and again.refused() == {"d2"}
    assert again.refusal("d2").field == "validation" and again.refusal("d1") is None
    storage.close()


# 9. a private run is not continued without its privacy ----------------------------------------
@pytest.mark.slow
def test_a_dp_run_does_not_continue_without_its_privacy(tmp_path, data_dir):
    """Two rounds under central DP, then the same state directory: ``--resume`` of it without
    ``--dp``, or with another noise multiplier, is refused by server.py with one ``error:`` line
    naming each differing DP setting; a plain start without ``--dp`` starts a new run beside it (the
    private run is kept, with its accountant). With the same settings, resumed, the run continues
    with the epsilon it spent."""
    server = digits_server(tmp_path, data_dir, *DP, "--rounds", "3").start()
    try:
        token = enroll(server, "hand")
        assert train_rounds(server, "hand", token, 2) == 2
        spent = status(server)["privacy"]["epsilon"]
    finally:
        server.stop()
    assert spent > 0
    base = ("--test-data", str(tmp_path / "devices" / "test.npz"), *DIGITS, "--rounds", "3", "--resume", "1")
    other = (*DP[:3], "3", *DP[4:])
    for args, have in (((), "dp: the run's "), (other, "dp.noise_multiplier: the run's 1.5, here 3.0")):
        line = refused_start(server, *base, *args)
        assert line.startswith("error: cannot resume run 1 'fedavg-dp-1': its settings differ: "), line
        assert have in line and "goes on only with its DP settings" in line, line

    server.args = (*server.args[:-2], "--rounds", "3", "--resume", "1")  # the same settings: it goes on
    server.start()
    try:
        assert status(server)["privacy"]["epsilon"] == pytest.approx(spent, rel=1e-12)
        assert "restored dp-central-fixed(fedavg)'s state from round 2" in server.log()
        assert status(server)["run"] == {"id": 1, "name": "fedavg-dp-1"}
    finally:
        server.stop()


@pytest.mark.slow
def test_fedhub_server_does_not_continue_a_dp_run_without_its_privacy(tmp_path, data_dir):
    """The Python API's server: a round under central DP, then the same state directory without
    ``dp``: a new run (the private one is kept); ``resume`` of the private run without ``dp``
    raises the project's error (a FedHubError) naming dp."""
    from fedhub import Server
    from fedhub.engine.errors import FedHubError
    from tests.seeded_digits import build_model

    digits.split(tmp_path / "devices", 1, limit=20)
    test = np.load(tmp_path / "devices" / "test.npz")
    kw = {"test_data": (test["x"], test["y"]), "state_dir": tmp_path / "state", "min_devices": 1}
    privacy = {"mode": "central-fixed", "noise_multiplier": 1.5, "clipping_norm": 0.5}
    with Server(build_model(), dp=privacy, **kw) as api_server:
        view = ServerProcess(tmp_path, data_dir)  # its HTTP helpers, aimed at this server
        view.url, view.admin_token, view.enroll_secret = (api_server.url, api_server.admin_token,
                                                          api_server.enroll_secret)
        assert train_rounds(view, "hand", enroll(view, "hand"), 1) == 1
    with pytest.raises(FedHubError, match=r"cannot resume run 1 'fedavg-dp-1': its settings differ: dp"):
        Server(build_model(), resume="1", **kw).start()
    with Server(build_model(), **kw) as plain:
        assert plain.status()["privacy"] is None and plain.status()["run"]["id"] == 2
    with Server(build_model(), dp=privacy, resume="1", **kw) as again:  # the same settings: it goes on
        assert again.status()["privacy"]["rounds"] == 1


# 10. the smaller ones ---------------------------------------------------------------------------
@pytest.mark.slow
def test_a_spent_budget_refuses_start_and_round_zero_is_never_interrupted(tmp_path, data_dir):
    """Once the privacy budget is spent, ``POST /api/training/start`` is refused with 409 saying
    so, and the run stays finished. An ``interrupted`` report for round 0 (the initial model,
    which no device trains) is refused with 400 naming ``round``, the device's state unchanged."""
    from .test_privacy_live import epsilons

    first, second = epsilons(2, 1.5)
    server = digits_server(tmp_path, data_dir, *DP, "--dp-max-epsilon", f"{(first + second) / 2}").start()
    try:
        token = enroll(server, "hand")
        auth = {"Authorization": f"Bearer {token}"}
        before = lifecycle(server)
        r = requests.post(f"{server.url}/api/devices/hand/interrupted", json={"round": 0}, headers=auth,
                          timeout=30)
        assert (r.status_code, r.json()["field"]) == (400, "round"), r.text
        assert "round 0 is the initial model" in r.json()["message"]
        assert lifecycle(server) == before == ("init", "", None)

        train_one_round(server, token)
        wait_until(lambda: status(server)["status"] == "finished", 60, "the budget to run out")
        finished = status(server)
        assert finished["reason"].startswith("privacy budget spent: after 1 rounds")
        for body in ({}, {"rounds": 10}):
            r = server.admin("POST", "/api/training/start", json=body)
            assert (r.status_code, r.json()["field"]) == (409, "dp_max_epsilon"), r.text
            assert r.json()["message"].startswith("the privacy budget is spent, so the run is over")
            assert "reset to start a new run" in r.json()["message"]
        assert status(server)["revision"] == finished["revision"]  # still finished, nothing reopened
    finally:
        server.stop()


def lifecycle(server: ServerProcess) -> tuple:
    [row] = server.get("/api/devices").json()["devices"]
    return row["lifecycle"], row["lifecycle_reason"], row["lifecycle_round"]


def train_one_round(server: ServerProcess, token: str) -> None:
    """Round 1 with the hand device alone: its weights back nudged (the server needs
    ``--min-devices 1``)."""
    auth = {"Authorization": f"Bearer {token}"}
    assert server.admin("POST", "/api/training/start", json={"rounds": 0}).status_code == 200

    def train_task():
        task = server.get("/api/devices/hand/task?wait=1", headers=auth).json()
        return task if task["action"] == "train" else None

    task = wait_until(train_task, 60, "a training task for round 1", interval=0.1)
    weights, _ = wire.decode(server.get("/api/model", headers=auth).content)
    meta = wire.Meta(round=1, model_version=task["model_version"], num_examples=100)
    r = requests.post(f"{server.url}/api/devices/hand/updates/1", timeout=30,
                      data=wire.encode({k: v + np.asarray(1e-3, v.dtype) for k, v in weights.items()}, meta),
                      headers={**auth, "Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text


def test_a_device_that_left_is_still_gone_after_the_server_restarts(tmp_path):
    """A server restarted within --device-timeout used to count devices that had left as online
    (the leave was kept in memory only) and select them, so the round waited out its deadline."""
    from fedhub.engine.devices import DeviceRegistry
    from fedhub.engine.storage import Storage

    from .test_api import ENROLL

    storage = Storage(tmp_path / "state")
    devices = DeviceRegistry(storage, enroll_secret=ENROLL, auto_activate=True)
    for name in ("stays", "goes"):
        devices.register(name, ENROLL)
    devices.leave("goes")
    storage.close()

    storage = Storage(tmp_path / "state")  # the restarted server
    devices = DeviceRegistry(storage, enroll_secret=ENROLL, auto_activate=True)
    assert devices.available() == ["stays"]
    devices.touch("goes")  # it asks for work again: back
    storage.close()
    storage = Storage(tmp_path / "state")
    assert sorted(DeviceRegistry(storage, enroll_secret=ENROLL).available()) == ["goes", "stays"]
    storage.close()
