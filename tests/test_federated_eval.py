"""Federated evaluation, personalization and fairness (issue 22).

Fast: the report's checks, the distribution's arithmetic, who evaluates, the held-out split,
FedPer's personal tensors and the device's personal store. Slow: the evaluation endpoint on a
real server hit the way a careless or hostile device would; each method (FedAvg, fine-tuning,
FedPer, Ditto, q-FFL) end to end on a real pool of worker processes with PyTorch, with secure
aggregation and in asynchronous mode; Ditto with real Keras device processes.
"""

from __future__ import annotations

import importlib.util
import math
import random
import sqlite3
from pathlib import Path

import numpy as np
import pytest
import requests

from fedhub.device.personal import PersonalStore, layer_of, personal_names
from fedhub.engine import federated_eval, wire
from fedhub.engine.config import FederationConfig, TrainingConfig
from fedhub.engine.errors import InvalidInput
from fedhub.engine.params import SettingError
from fedhub.split import holdout_indices, read_device_arrays, read_device_holdout, split_to_devices

from .cli_inprocess import assert_one_line_error, run_main
from .conftest import launch_devices, wait_until

GOOD = {"round": 3, "global": {"loss": 0.5, "accuracy": 0.8, "num_examples": 40},
        "personal": {"loss": 0.1, "accuracy": 0.95}}


# --------------------------------------------------------------------------- the report (fast)


def test_a_good_report_is_kept_as_sent():
    assert federated_eval.parse_report(GOOD) == GOOD
    assert federated_eval.parse_report({**GOOD, "personal": None})["personal"] is None
    assert federated_eval.parse_report({"round": 0, "global": GOOD["global"]})["personal"] is None


@pytest.mark.parametrize("body, field", [
    ([], "body"),
    ({**GOOD, "extra": 1}, "extra"),
    ({**GOOD, "round": True}, "round"),
    ({**GOOD, "round": -1}, "round"),
    ({**GOOD, "round": "3"}, "round"),
    ({**GOOD, "round": 2**60}, "round"),
    ({"round": 3}, "global"),
    ({**GOOD, "global": [0.5, 0.8]}, "global"),
    ({**GOOD, "global": {"loss": 0.5, "accuracy": 1.5, "num_examples": 4}}, "global.accuracy"),
    ({**GOOD, "global": {"loss": 0.5, "accuracy": float("nan"), "num_examples": 4}}, "global.accuracy"),
    ({**GOOD, "global": {"loss": -1, "accuracy": 0.5, "num_examples": 4}}, "global.loss"),
    ({**GOOD, "global": {"loss": float("inf"), "accuracy": 0.5, "num_examples": 4}}, "global.loss"),
    ({**GOOD, "global": {"loss": 0.5, "accuracy": 0.5, "num_examples": 0}}, "global.num_examples"),
    ({**GOOD, "global": {"loss": 0.5, "accuracy": 0.5, "num_examples": True}}, "global.num_examples"),
    ({**GOOD, "global": {"loss": 0.5, "accuracy": 0.5, "num_examples": 4.0}}, "global.num_examples"),
    ({**GOOD, "global": {"loss": 0.5, "accuracy": 0.5}}, "global.num_examples"),
    ({**GOOD, "global": {**GOOD["global"], "secret": "x"}}, "global.secret"),
    ({**GOOD, "personal": {"loss": 0.5, "accuracy": "high"}}, "personal.accuracy"),
    ({**GOOD, "personal": {"loss": 0.5, "accuracy": 0.5, "num_examples": 4}}, "personal.num_examples"),
    ({**GOOD, "personal": 0.9}, "personal"),
], ids=lambda v: v if isinstance(v, str) else None)
def test_a_bad_report_names_its_field(body, field):
    with pytest.raises(InvalidInput) as caught:
        federated_eval.parse_report(body)
    assert caught.value.field == field, caught.value.message


def test_the_distribution_is_weighted_and_its_worst_tenth_is_the_worst_devices():
    # ten devices: the worst 10 % is the worst one; the mean is weighted by held-out examples
    rows = [(1.0, a / 10, n) for a, n in zip(range(10), [10] * 9 + [910], strict=True)]
    d = federated_eval.distribution(rows)
    assert d["devices"] == 10 and d["num_examples"] == 1000
    assert d["accuracy"] == pytest.approx((sum(a / 10 * 10 for a in range(9)) + 0.9 * 910) / 1000)
    assert (d["worst_10pct"], d["worst"], d["best"]) == (0.0, 0.0, 0.9)
    assert d["std"] == pytest.approx(float(np.std([a / 10 for a in range(10)])))
    # eleven devices: ceil(1.1) = 2 worst ones
    d = federated_eval.distribution([(0.0, a / 10, 1) for a in range(11)])
    assert d["worst_10pct"] == pytest.approx(0.05)
    assert federated_eval.distribution([]) is None


def test_summarize_keeps_each_device_and_both_models():
    poor = {"loss": 1.0, "accuracy": 0.4, "num_examples": 10}
    reports = {"b": federated_eval.parse_report(GOOD),
               "a": federated_eval.parse_report({**GOOD, "personal": None, "global": poor})}
    s = federated_eval.summarize(reports, model_version=2, personalization="ditto")
    assert list(s["devices"]) == ["a", "b"] and s["model_version"] == 2
    assert s["global"]["accuracy"] == pytest.approx((0.8 * 40 + 0.4 * 10) / 50)
    assert s["personal"]["devices"] == 1 and s["personal"]["accuracy"] == 0.95
    assert federated_eval.summarize({}, model_version=0, personalization="none") is None
    # the trackers' scalars: the global model at its own step, the personal ones at the round's
    entry = {"round": 3, "federated_evaluation": s}
    steps = {name: step for step, name, _ in federated_eval.scalars(entry)}
    assert steps["federated/global/worst_10pct"] == 2 and steps["federated/personal/accuracy"] == 3


def test_who_evaluates_every_n_rounds_and_a_share_of_them():
    devices = ("d1", "d2", "d3", "d4")
    rng = random.Random(0)
    state = rng.getstate()
    assert federated_eval.choose(devices, 1, every=2, fraction=1.0, rng=rng) == ()
    assert federated_eval.choose(devices, 2, every=2, fraction=1.0, rng=rng) == devices
    assert federated_eval.choose(devices, 2, every=0, fraction=1.0, rng=rng) == ()
    assert rng.getstate() == state  # all of them: no draw, the selection's sequence is unchanged
    half = federated_eval.choose(devices, 4, every=1, fraction=0.5, rng=rng)
    assert len(half) == 2 and set(half) <= set(devices)
    assert len(federated_eval.choose(devices, 4, every=1, fraction=0.01, rng=rng)) == 1


# --------------------------------------------------------------------------- held-out data (fast)


def test_held_out_examples_are_disjoint_from_training_and_drawn_beyond_the_limit():
    indices = np.arange(1000)[::-1]
    train, held = holdout_indices(indices, 0.1, seed=1)
    assert len(held) == 100 and len(train) == 900 and not set(train) & set(held)
    assert sorted([*train, *held]) == list(range(1000))
    again = holdout_indices(indices, 0.1, seed=1)
    assert np.array_equal(again[1], held)
    # with a limit the device trains on the same first examples as without a held-out share
    train, held = holdout_indices(indices, 0.1, limit=300, seed=1)
    assert np.array_equal(train, indices[:300]) and len(held) == 30 and not set(train) & set(held)
    # a share too small to hold any example out holds none
    train, held = holdout_indices(np.arange(4), 0.1)
    assert len(train) == 4 and len(held) == 0


def test_the_split_writes_each_devices_held_out_share_alone_or_with_the_others(tmp_path, data_dir):
    common = dict(scheme="classes", limit=200, data_dir=data_dir, progress=False, holdout=0.2)
    summary = split_to_devices(tmp_path / "all", 3, **common)
    split_to_devices(tmp_path / "one", 3, only="device2", memmap=True, **common)
    for name in ("device1", "device2", "device3"):
        x, y = read_device_arrays(tmp_path / "all" / name)
        hx, hy = read_device_holdout(tmp_path / "all" / name)
        assert len(y) == 200 and len(hy) == 40 == summary[name]["held_out"]
        assert set(np.unique(hy)) <= set(np.unique(y))  # the device's own classes
        seen = {bytes(image) for image in x}
        assert not any(bytes(image) in seen for image in hx)
    # --only writes device2's share as the whole split does (npy form, mapped)
    alone = read_device_holdout(tmp_path / "one" / "device2", mmap=True)
    assert np.array_equal(alone[0], read_device_holdout(tmp_path / "all" / "device2")[0])
    # a split without a held-out share removes the held-out file of the split before it
    split_to_devices(tmp_path / "all", 3, **{**common, "holdout": 0.0})
    assert read_device_holdout(tmp_path / "all" / "device1") is None


@pytest.mark.slow
@pytest.mark.parametrize("framework", ["keras", "torch"])
def test_a_worker_evaluates_its_devices_held_out_sets_in_one_pass_as_one_by_one(tmp_path, data_dir,
                                                                                framework):
    from fedhub.device.virtual import SharedModel, _builtin_trainer

    split_to_devices(tmp_path, 4, scheme="classes", limit=60, data_dir=data_dir, progress=False,
                     holdout=0.25, seed=3)
    split_to_devices(tmp_path, 4, only="device4", scheme="classes", limit=60, data_dir=data_dir,
                     progress=False, holdout=0.0, seed=3)  # device4: nothing held out
    shared = SharedModel(_builtin_trainer("basic", framework))
    shared.initialise({"framework": framework})
    weights = shared.trainer.network.get_weights()
    folders = [tmp_path / f"device{i}" for i in range(1, 5)]
    alone = [shared._evaluate_holdout(folder, weights) for folder in folders]
    assert alone[3] is None and all(r["num_examples"] == 15 for r in alone[:3])
    shared.plan_holdouts(folders)
    together = [shared.holdout(folder, weights) for folder in folders]
    assert together[3] is None
    for one, many in zip(alone[:3], together[:3], strict=True):
        assert many["num_examples"] == one["num_examples"] and many["accuracy"] == one["accuracy"]
        assert many["loss"] == pytest.approx(one["loss"], rel=1e-5)
    assert len({r["accuracy"] for r in together[:3]}) > 1  # each its own set, not one mean
    # a device whose held-out file is damaged fails alone; the others are evaluated as before
    (folders[1] / "data" / "eval.npz").write_bytes(b"not an archive")
    shared.plan_holdouts(folders)
    assert shared.holdout(folders[0], weights) == pytest.approx(together[0], rel=1e-5)
    with pytest.raises(Exception, match=r"eval\.npz"):
        shared.holdout(folders[1], weights)
    assert shared.holdout(folders[2], weights) == pytest.approx(together[2], rel=1e-5)


def test_the_split_command_refuses_a_bad_holdout_in_one_line(tmp_path):
    from fedhub import split

    assert_one_line_error(run_main(split.main, ["--devices", "2", "--holdout", "1.5", "--out",
                                                str(tmp_path / "d"), "--quiet"]), "holdout")
    assert not (tmp_path / "d").exists()


# --------------------------------------------------------------------------- personalization (fast)


def test_fedper_keeps_the_last_layer_by_default_or_the_prefixes_named():
    torch_like = {"net.0.weight": 0, "net.0.bias": 0, "net.2.weight": 0, "net.2.bias": 0}
    keras_like = {"sequential/dense/kernel": 0, "sequential/dense/bias": 0,
                  "sequential/dense_1/kernel": 0, "sequential/dense_1/bias": 0}
    assert personal_names(torch_like) == ["net.2.weight", "net.2.bias"]
    assert personal_names(keras_like) == ["sequential/dense_1/kernel", "sequential/dense_1/bias"]
    assert personal_names(torch_like, "net.0.") == ["net.0.weight", "net.0.bias"]
    assert layer_of("fc.weight") == "fc" and layer_of("conv") == "conv"
    with pytest.raises(ValueError, match="names none"):
        personal_names(torch_like, "head")
    with pytest.raises(ValueError, match="every tensor"):
        personal_names(torch_like, "net")


def test_the_personal_store_keeps_only_what_fits_and_what_its_method_made(tmp_path):
    store = PersonalStore(tmp_path)
    like = {"a": np.zeros((2, 3), np.float32), "b": np.zeros(4, np.float32)}
    assert store.load(like, "ditto") == {}
    store.save({"a": np.ones((2, 3)), "b": np.ones(5), "c": np.ones(1)}, "ditto")
    kept = store.load(like, "ditto")
    assert list(kept) == ["a"] and kept["a"].dtype == np.float32  # b's shape and c do not fit
    assert store.load(like, "fedper") == {}  # another method's weights are not this one's
    store.path.write_bytes(b"\x00" * 20)
    assert store.load(like, "ditto") == {}


@pytest.mark.parametrize("settings, field", [
    ({"personal_layers": "fc"}, "personal_layers"),
    ({"personalization": "fedper", "personal_layers": "fc,,x"}, "personal_layers"),
    ({"personalization": "pfedme"}, "personalization"),
    ({"ditto_lambda": -1.0}, "ditto_lambda"),
])
def test_personalization_settings_that_cannot_work_are_refused(settings, field):
    with pytest.raises(SettingError) as caught:
        TrainingConfig(**settings).validate()
    assert field in str(caught.value)


def test_the_task_carries_the_personalization_and_the_evaluation_settings_are_checked():
    task = TrainingConfig(personalization="ditto", ditto_lambda=0.5).task()
    assert (task["personalization"], task["ditto_lambda"]) == ("ditto", 0.5)
    assert "personalization" not in TrainingConfig().task()
    fedper = TrainingConfig(personalization="fedper", personal_layers="fc2").task()
    assert fedper["personal_layers"] == "fc2" and "ditto_lambda" not in fedper
    for bad in ({"fed_eval_every": -1}, {"fed_eval_fraction": 0.0}, {"fed_eval_fraction": 1.5}):
        with pytest.raises(SettingError):
            FederationConfig(**bad).validate()


def test_the_server_command_refuses_personal_layers_without_fedper_in_one_line(tmp_path):
    from fedhub import serve

    outcome = run_main(serve.main, ["4000", "--personal-layers", "fc", "--state-dir", str(tmp_path / "s")])
    assert_one_line_error(outcome, "--personal-layers names FedPer's personal layers: it needs "
                                   "--personalization fedper")
    assert not (tmp_path / "s").exists()


# --------------------------------------------------------------------------- the endpoint (slow)


def _evaluation_server(server_factory, *extra: str):
    from .test_hostile_input import LIGHT, enroll, train_task

    server = server_factory("--auto-activate", "--start", "--min-devices", "1", "--rounds", "2",
                            *LIGHT, *extra).start()
    token = enroll(server, "d1")
    return server, token, train_task(server, "d1", token)


def _post(server, token: str, body, **kw) -> requests.Response:
    return requests.post(f"{server.url}/api/devices/d1/evaluation", timeout=30,
                         headers={"Authorization": f"Bearer {token}", **kw.pop("headers", {})},
                         **({"json": body} if body is not None else {}), **kw)


@pytest.mark.slow
def test_the_evaluation_endpoint_refuses_hostile_reports_and_keeps_the_good_one(server_factory):
    from .test_hostile_input import assert_error, global_weights, update, upload

    server, token, task = _evaluation_server(server_factory)
    assert task["config"]["evaluate"] is True
    report = {**GOOD, "round": task["round"], "personal": None}
    assert_error(_post(server, token, {**report, "global": {"loss": 1, "accuracy": 2, "num_examples": 3}}),
                 400, "global.accuracy")
    assert_error(_post(server, token, {**report, "global": "x" * 100_000}), 413)
    assert_error(_post(server, token, None, data=b"{", headers={"Content-Type": "application/json"}), 400)
    assert_error(_post(server, token, None, data=b"round=1"), 400, "Content-Type")
    assert_error(_post(server, token, {**report, "round": 2}), 409, "round")  # not its round
    assert_error(_post(server, "not-a-token", report), 401)
    other = requests.post(f"{server.url}/api/devices/register", json={"name": "d2"},
                          headers={"X-Enroll-Secret": server.enroll_secret}, timeout=30).json()["token"]
    assert_error(requests.post(f"{server.url}/api/devices/d1/evaluation", json=report, timeout=30,
                               headers={"Authorization": f"Bearer {other}"}), 403)
    assert _post(server, token, report).json() == {"round": task["round"], "accepted": True}
    assert _post(server, token, report).status_code == 200  # a retry of the same report
    changed = {**report, "global": {**report["global"], "accuracy": 0.1}}
    assert_error(_post(server, token, changed), 409, "round")
    # the round's entry holds the one report kept, as the distribution of one device
    weights = global_weights(server, token)
    assert upload(server, "d1", token, task["round"], update(weights, task)).status_code == 200
    entry = wait_until(lambda: next(iter(server.get("/api/history").json()["rounds"]), None), 60,
                       "round 1's entry")
    fe = entry["federated_evaluation"]
    assert fe["model_version"] == 0 and fe["devices"] == {
        "d1": {"num_examples": 40, "global": {"loss": 0.5, "accuracy": 0.8}, "personal": None}}
    assert fe["global"]["worst_10pct"] == fe["global"]["best"] == 0.8 and fe["personal"] is None
    # kept durably: the round's row in SQLite holds it too
    with sqlite3.connect(server.state_dir / "fedhub.sqlite3") as db:
        rows = db.execute("SELECT entry FROM history").fetchall()
    assert any('"federated_evaluation"' in row[0] and '"worst_10pct"' in row[0] for row in rows)


@pytest.mark.slow
def test_without_federated_evaluation_no_device_is_asked_and_a_report_is_refused(server_factory):
    server, token, task = _evaluation_server(server_factory, "--fed-eval-every", "0")
    assert "evaluate" not in task["config"]
    r = _post(server, token, {**GOOD, "round": task["round"]})
    assert r.status_code == 409 and r.json()["field"] == "round"


# --------------------------------------------------------------------------- each method, end to end (slow)


def _simulate(tmp_path: Path, data_dir: Path, **options) -> list[dict]:
    import fedhub

    root = tmp_path / "devices"
    split_to_devices(root, 3, scheme="classes", limit=150, data_dir=data_dir, progress=False, memmap=True,
                     holdout=0.2)
    return list(fedhub.simulate("basic", root, rounds=2, framework="torch", workers=2, fraction=1.0,
                                data_dir=data_dir, test_limit=300, root=tmp_path, timeout=300, **options))


def _checkpoint(tmp_path: Path, number: int) -> dict[str, np.ndarray]:
    path = next((tmp_path / "server").rglob(f"round_{number:05d}.safetensors"))
    return wire.decode(path.read_bytes())[0]


METHODS = {
    "fedavg": {},
    "finetune": {"personalization": "finetune"},
    "fedper": {"personalization": "fedper"},
    "ditto": {"personalization": "ditto", "ditto_lambda": 0.5},
    "qfedavg": {"strategy": "qfedavg", "strategy_params": {"q": 1.0, "learning_rate": 1.0}},
    "secure-aggregation": {"secagg": {}, "min_devices": 3},
    "async": {"mode": "async", "buffer_size": 3},
}


@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory, data_dir) -> tuple[Path, list[dict], str | None]:
    """One fine-tuning run for its end-to-end check and for the tracking check below: logged to
    MLflow and TensorBoard where MLflow is installed (logging changes nothing in the run). Its
    folder, its history and the MLflow store's URI (None without MLflow)."""
    tmp = tmp_path_factory.mktemp("finetune")
    tracking: dict = {}
    if importlib.util.find_spec("mlflow") is not None:
        from .test_tracking import store

        uri, _ = store(tmp)
        tracking = {"mlflow": uri, "runs_dir": tmp / "runs", "run_id": "finetune"}
    return tmp, _simulate(tmp, data_dir, **METHODS["finetune"], **tracking), tracking.get("mlflow")


@pytest.mark.slow
@pytest.mark.parametrize("method", list(METHODS))
def test_each_method_runs_end_to_end_on_a_pool_of_real_processes(tmp_path, data_dir, method, request):
    if method == "finetune":  # the run the tracking test reads too
        tmp_path, history, _ = request.getfixturevalue("finetune_run")
    else:
        history = _simulate(tmp_path, data_dir, **METHODS[method])
    assert [e["round"] for e in history] == [1, 2]
    personalization = METHODS[method].get("personalization", "none")
    names = ["device1", "device2", "device3"]
    for entry in history:
        fe = entry["federated_evaluation"]
        assert fe is not None, entry
        assert fe["personalization"] == personalization
        if method != "async":  # a version of async mode gets the reports since the one before
            assert sorted(fe["devices"]) == names and fe["model_version"] == entry["round"] - 1
        for device in fe["devices"].values():
            assert device["num_examples"] == 30 and 0 <= device["global"]["accuracy"] <= 1
            assert (device["personal"] is None) == (personalization == "none")
        assert math.isfinite(fe["global"]["accuracy"]) and fe["global"]["worst"] <= fe["global"]["best"]
        assert (fe["personal"] is None) == (personalization == "none")
    last = history[-1]["federated_evaluation"]
    if personalization != "none":
        # two classes per device: a model of its own fits the device's held-out data far better
        # than the global model that has seen six classes in two rounds
        assert last["personal"]["accuracy"] > last["global"]["accuracy"] + 0.2, last
    if method == "secure-aggregation":
        assert all("secagg" in e for e in history)
    if method == "qfedavg":
        losses = [m["start_loss"] for e in history for m in e["devices"].values()]
        assert len(losses) == 6 and all(v > 0 for v in losses)
    folders = [tmp_path / "devices" / n / "personal.safetensors" for n in names]
    assert all(p.is_file() for p in folders) == (personalization in ("fedper", "ditto"))
    if personalization == "fedper":
        # the personal layer never left the devices: the global model's last layer is still the
        # initial one, while the layers learnt together moved; each device kept a head of its own
        before, after = _checkpoint(tmp_path, 0), _checkpoint(tmp_path, 2)
        head = personal_names(before)
        assert head and all(np.array_equal(before[n], after[n]) for n in head)
        assert any(not np.array_equal(before[n], after[n]) for n in before if n not in head)
        heads = [PersonalStore(p.parent).load(before, "fedper") for p in folders]
        assert all(sorted(h) == sorted(head) for h in heads)
        assert not np.array_equal(heads[0][head[0]], heads[1][head[0]])
    if personalization == "ditto":
        after = _checkpoint(tmp_path, 2)
        own = PersonalStore(folders[0].parent).load(after, "ditto")
        assert sorted(own) == sorted(after)
        assert any(not np.allclose(own[n], after[n]) for n in after)


@pytest.mark.slow
def test_ditto_with_real_keras_device_processes(server_factory, split_devices):
    """Keras devices pull their personal model toward the global one through the proximal
    term's anchors (by variable path), and report both models on their held-out data."""
    from fedhub.device.launcher import stop

    names = ["device1", "device2"]
    root = split_devices(len(names), 200)  # the split command's default: 10 % held out besides
    server = server_factory("--auto-activate", "--start", "--no-tensorboard", "--quorum", "1",
                            "--test-limit", "300", "--round-timeout", "120", "--rounds", "2",
                            "--min-devices", "2", "--personalization", "ditto").start()
    procs = launch_devices(server, root, names)
    try:
        wait_until(lambda: server.get("/api/status").json()["status"] == "finished", 180, "the run")
    finally:
        stop(procs)
    rounds = server.get("/api/history").json()["rounds"]
    assert [e["round"] for e in rounds] == [1, 2]
    for entry in rounds:
        fe = entry["federated_evaluation"]
        assert sorted(fe["devices"]) == names and fe["personalization"] == "ditto"
        assert all(d["num_examples"] == 20 and d["personal"] is not None for d in fe["devices"].values())
    for name in names:
        own = (root / name / "personal.safetensors")
        assert own.is_file()
        kept = PersonalStore(own.parent).load(_keras_global(server), "ditto")
        assert kept and all("/" in n for n in kept)  # Keras' variable paths


def _keras_global(server) -> dict[str, np.ndarray]:
    path = sorted((server.state_dir).rglob("round_*.safetensors"))[-1]
    return wire.decode(path.read_bytes())[0]


@pytest.mark.slow
def test_mlflow_and_tensorboard_show_the_distribution_beside_the_test_accuracy(finetune_run):
    """The global model's per-device figures at that model's step (beside its test accuracy),
    the personal models' at the round's step, in a real MLflow store and real event files."""
    pytest.importorskip("mlflow")
    from .test_tensorboard import read_run
    from .test_tracking import history as metric_history
    from .test_tracking import runs, store

    tmp_path, history, logged_to = finetune_run  # fine-tuning, logged to MLflow and TensorBoard
    uri, client = store(tmp_path)
    assert uri == logged_to
    [run] = runs(client)
    rid = run.info.run_id
    for model, step_of in (("global", lambda e: e["round"] - 1), ("personal", lambda e: e["round"])):
        for statistic in ("accuracy", "worst_10pct", "best", "std"):
            expected = {step_of(e): e["federated_evaluation"][model][statistic] for e in history}
            assert metric_history(client, rid, f"federated/{model}/{statistic}") == pytest.approx(expected)
    scalars = read_run(tmp_path / "runs" / "finetune" / "global")
    assert scalars["federated/global/worst_10pct"] == pytest.approx(
        {e["round"] - 1: e["federated_evaluation"]["global"]["worst_10pct"] for e in history})
    assert set(scalars["federated/personal/accuracy"]) == {1, 2} and set(scalars["test_accuracy"]) == {1, 2}
