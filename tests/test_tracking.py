"""Tracking (issue 21, section 3): MLflow runs logged to a real MLflow store in tmp_path (its folder
store, through the ``mlflow-skinny`` client ``make test`` installs) and read back with MLflow's
own client; TensorBoard run folders named by the run, with its settings for HParams, and none
left by a failed start."""

from __future__ import annotations

import logging
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from fedhub import tracking
from fedhub.tensorboard_log import TensorBoardLog

try:
    from mlflow.tracking import MlflowClient
except ImportError:  # a skip outside CI only: `make test` installs the extra
    if os.environ.get("CI"):
        raise
    pytest.skip("MLflow is not installed (pip install -e \".[mlflow]\")", allow_module_level=True)

SETTINGS = {"strategy": "krum", "strategy_params.num_malicious": 1, "rounds": 3, "dp": True,
            "dp.noise_multiplier": 1.0, "secagg": False, "model_factory": "x" * 700}


def entry(step: int, devices: tuple[str, ...] = ("d1", "d2", "d3"), epsilon: float | None = 1.5) -> dict:
    return {"round": step, "test_loss": 1.0 / step, "test_accuracy": 0.1 * step, "num_updates": len(devices),
            "num_used": len(devices), "num_examples": 10 * len(devices), "closed_at": 1_800_000_000.0 + step,
            "devices": {**{d: {"loss": 0.5, "accuracy": 0.2 * i, "num_examples": 10, "train_seconds": 0.1,
                               "odd: name{}": 1.0, "aggregation": {"status": "used"}}
                           for i, d in enumerate(devices, 1)}, "bad": {"failed": True, "error": "x"}},
            **({"privacy": {"epsilon": epsilon * step}} if epsilon else {})}


def weights(step: int) -> dict[str, np.ndarray]:
    return {"dense/kernel": np.full((3, 2), step, np.float32), "dense/bias": np.arange(2.0) + step}


def store(tmp_path: Path) -> tuple[str, MlflowClient]:
    uri = tracking.store_uri(str(tmp_path / "mlruns"))  # a folder: MLflow's file store
    return uri, MlflowClient(tracking_uri=uri)


def runs(client: MlflowClient, experiment: str = "fedhub") -> list:
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs([found.experiment_id], order_by=["attributes.start_time"])


def history(client: MlflowClient, run_id: str, key: str) -> dict[int, float]:
    return {m.step: m.value for m in client.get_metric_history(run_id, key)}


def load_weights(client: MlflowClient, run_id: str, tmp_path: Path) -> dict[str, np.ndarray]:
    from safetensors.numpy import load_file

    return load_file(client.download_artifacts(run_id, "model/weights.safetensors", str(tmp_path)))


# ------------------------------------------------------------------------- the hook, fast

def test_a_run_logs_its_settings_rounds_devices_epsilon_and_final_model(tmp_path):
    _, client = store(tmp_path)
    hook = tracking.MlflowLog(str(tmp_path / "mlruns"), run_name="krum-run", run_id=7, settings=SETTINGS,
                              max_devices=2, last_round=3, tags={"framework": "torch", "mode": "sync"},
                              export=(lambda w: b"exported", ".pt2"))
    assert runs(client) == []  # nothing before the first completed round
    for step in (1, 2, 3):
        hook(entry(step, ("d1", "d2", "d3") if step < 3 else ("d3", "d1")), weights(step))
    hook.close()  # after FINISHED: nothing more
    [run] = runs(client)
    assert run.info.status == "FINISHED" and run.info.run_name == "krum-run"
    assert run.data.tags["fedhub.run_id"] == "7" and run.data.tags["fedhub.framework"] == "torch"
    params = run.data.params
    assert params["strategy"] == "krum" and params["strategy_params.num_malicious"] == "1"
    assert params["dp"] == "true" and params["dp.noise_multiplier"] == "1.0"
    assert len(params["model_factory"]) == tracking.MAX_PARAM_VALUE  # cut to what every store takes
    rid = run.info.run_id
    assert history(client, rid, "test_accuracy") == pytest.approx({1: 0.1, 2: 0.2, 3: 0.3})
    assert history(client, rid, "dp_epsilon") == pytest.approx({1: 1.5, 2: 3.0, 3: 4.5})
    assert history(client, rid, "num_updates") == {1: 3, 2: 3, 3: 2}
    # the first two devices to report have metrics of their own; every device is in the spread
    assert set(history(client, rid, "device/d1/accuracy")) == {1, 2, 3}
    assert set(history(client, rid, "device/d2/accuracy")) == {1, 2}
    assert client.get_metric_history(rid, "device/d3/accuracy") == []
    assert history(client, rid, "devices/accuracy_max") == pytest.approx({1: 0.6, 2: 0.6, 3: 0.4})
    assert set(history(client, rid, "device/d1/odd_ name__")) == {1, 2, 3}  # a name MLflow takes
    final = load_weights(client, rid, tmp_path / "download")
    assert set(final) == set(weights(3))
    for name, value in weights(3).items():
        np.testing.assert_array_equal(final[name], value)
    names = {a.path for a in client.list_artifacts(rid, "model")}
    assert names == {"model/weights.safetensors", "model/model.pt2", "model/README.md"}


def test_a_reset_opens_a_new_mlflow_run_and_a_stop_before_the_end_is_killed(tmp_path):
    _, client = store(tmp_path)
    hook = tracking.MlflowLog(str(tmp_path / "mlruns"), run_name="r", settings={"strategy": "fedavg"},
                              last_round=5, finished=lambda: False)
    for step in (1, 2, 1):  # rounds 1, 2, then a reset: round 1 again
        hook(entry(step, epsilon=None), weights(step))
    hook.close()
    first, second = runs(client)
    assert (first.info.run_name, first.info.status) == ("r", "KILLED")
    assert (second.info.run_name, second.info.status) == ("r-2", "KILLED")
    assert set(history(client, first.info.run_id, "test_accuracy")) == {1, 2}
    assert set(history(client, second.info.run_id, "test_accuracy")) == {1}
    assert client.get_metric_history(first.info.run_id, "dp_epsilon") == []
    assert load_weights(client, first.info.run_id, tmp_path / "a")["dense/bias"].tolist() == [2.0, 3.0]


def test_servers_in_one_process_starting_together_share_one_new_experiment(tmp_path):
    """MLflow's folder store lets two threads that both find no experiment of a name each create
    one (or read the other's half-written one): two simulations tracked into one new experiment
    at once ended with a run in each of two experiments of that name, or with none."""
    for trial in range(8):
        root = tmp_path / str(trial)
        _, client = store(root)
        hooks = [tracking.MlflowLog(str(root / "mlruns"), run_name=f"r{i}", experiment="compare",
                                    settings={"strategy": "fedavg"}, last_round=1) for i in range(2)]
        start = threading.Barrier(len(hooks))

        def log(hook, start=start):
            start.wait()
            hook(entry(1, epsilon=None), weights(1))

        threads = [threading.Thread(target=log, args=(hook,)) for hook in hooks]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        named = [e for e in client.search_experiments() if e.name == "compare"]
        assert len(named) == 1, (trial, named)
        assert sorted(r.info.run_name for r in runs(client, "compare")) == ["r0", "r1"], trial


def test_a_server_restarted_in_the_middle_of_a_run_goes_on_with_its_mlflow_run(tmp_path):
    _, client = store(tmp_path)
    for steps in ((1, 2), (3,)):  # a server, stopped after round 2; the next goes on with round 3
        hook = tracking.MlflowLog(str(tmp_path / "mlruns"), run_name="fedavg-1", run_id=1,
                                  settings={"rounds": 3})
        for step in steps:
            hook(entry(step), weights(step))
        hook.close()
    [run] = runs(client)
    assert run.info.status == "FINISHED"
    assert set(history(client, run.info.run_id, "test_accuracy")) == {1, 2, 3}


def test_a_run_ended_early_by_the_engine_is_finished(tmp_path):
    _, client = store(tmp_path)
    hook = tracking.MlflowLog(str(tmp_path / "mlruns"), run_name="budget", last_round=10,
                              finished=lambda: True)
    hook(entry(1), weights(1))
    hook.close()
    [run] = runs(client)
    assert run.info.status == "FINISHED"


def test_an_unreachable_tracking_server_warns_once_and_the_run_goes_on(caplog):
    from fedhub.server_process import free_port

    hook = tracking.MlflowLog(f"http://127.0.0.1:{free_port()}", run_name="lost", last_round=3)
    with caplog.at_level(logging.WARNING, logger="fedhub.tracking"):
        for step in (1, 2, 3):
            hook(entry(step), weights(step))  # no exception
        hook.close()
    warnings = [r for r in caplog.records if r.name == "fedhub.tracking"]
    assert len(warnings) == 1 and "the run goes on without it" in warnings[0].getMessage()
    assert "\n" not in warnings[0].getMessage()


def test_mlflow_missing_or_a_database_store_without_it_is_one_line(monkeypatch):
    from fedhub import serve as server
    from tests.cli_inprocess import assert_one_line_error, run_main

    monkeypatch.setattr(tracking, "_installed", lambda name: name != "sqlalchemy")
    assert_one_line_error(run_main(server.parse_args, ["--mlflow", "sqlite:///mlflow.db"]),
                          "--mlflow sqlite:///mlflow.db is a database store, which needs the full MLflow")
    monkeypatch.setattr(tracking, "_installed", lambda name: False)
    assert_one_line_error(run_main(server.parse_args, ["--mlflow", "http://x:5000"]),
                          "--mlflow needs MLflow: pip install 'fedhub[mlflow]'")


def test_a_run_switch_applies_from_the_first_round_started_after_it(tmp_path):
    """The engine's run listener (a reset, POST /api/runs) names the next run; a round of the run
    before it that still waits for the hooks stays in that run."""
    _, client = store(tmp_path)
    hook = tracking.MlflowLog(str(tmp_path / "mlruns"), run_name="fedavg-1", run_id=1,
                              settings={"strategy": "fedavg", "rounds": 5, "dp": True, "dp.delta": 1e-5})
    hook(entry(1), weights(1))
    late = {**entry(2), "started_at": 100.0}  # started before the switch
    hook.switch({"id": 2, "name": "median run",
                 "settings": {"strategy": "fedmedian", "dp": None, "rounds": 1}})
    hook(late, weights(2))
    hook({**entry(1, epsilon=None), "started_at": 4e9}, weights(3))  # the new run's round 1, its last
    first, second = runs(client)
    assert (first.info.run_name, first.info.status) == ("fedavg-1", "KILLED")
    assert set(history(client, first.info.run_id, "test_accuracy")) == {1, 2}
    assert (second.info.run_name, second.info.status) == ("median run", "FINISHED")
    assert second.data.tags["fedhub.run_id"] == "2"
    assert second.data.params["strategy"] == "fedmedian" and second.data.params["dp"] == "false"
    assert "dp.delta" not in second.data.params


def test_a_reset_of_a_real_engine_is_a_new_mlflow_run(tmp_path):
    from tests.test_api import ADMIN, bearer, make_app, register
    from tests.test_engine import one_round

    _, client = store(tmp_path)
    app, engine = make_app(tmp_path, strategy="fedavg", min_devices=1, rounds=3, auto_activate=True,
                           start=True)
    hook = tracking.MlflowLog(str(tmp_path / "mlruns"), run_name=engine.run()["name"],
                              run_id=engine.run()["id"], settings={"strategy": "fedavg", "rounds": 3},
                              last_round=3, finished=lambda: engine.status()["status"] == "finished")
    engine.add_hook(hook)
    engine.add_run_listener(hook.switch)
    try:
        c = app.test_client()
        token = register(c, "d1").get_json()["token"]
        one_round(c, token, 1, 1.0)
        one_round(c, token, 2, 2.0)
        assert c.post("/api/training/reset", headers=bearer(ADMIN)).status_code == 200
        assert c.post("/api/training/start", headers=bearer(ADMIN)).status_code == 200
        one_round(c, token, 1, 3.0)
    finally:
        engine.stop()  # closes the hooks: the second run ends KILLED after its round 1
    first, second = runs(client)
    assert first.info.run_name == "fedavg-1" and second.info.run_name == engine.run()["name"] != "fedavg-1"
    assert first.info.status == second.info.status == "KILLED"
    assert set(history(client, first.info.run_id, "test_accuracy")) == {1, 2}
    assert set(history(client, second.info.run_id, "test_accuracy")) == {1}
    assert load_weights(client, second.info.run_id, tmp_path / "d")["dense/bias"].tolist() == [3.0, 3.0]


# ------------------------------------------------------------------------- TensorBoard
# In-process and quick, but slow-tier: TensorBoard's event writer imports TensorFlow where it is
# installed (tensorboard.compat), which the fast tier does not allow.

def read_events(folder: Path) -> dict[str, list]:
    """Each tag's events in the folder's own event files (not its sub-runs)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

    out: dict[str, list] = {}
    for path in sorted(folder.glob("events.out.tfevents.*")):
        for event in EventFileLoader(str(path)).Load():
            for value in event.summary.value:
                out.setdefault(value.tag, []).append((event.step, value))
    return out


def session_start(folder: Path):
    from tensorboard.plugins.hparams import metadata

    [(_, value)] = read_events(folder)[metadata.SESSION_START_INFO_TAG]
    assert value.metadata.plugin_data.plugin_name == metadata.PLUGIN_NAME
    return metadata.parse_session_start_info_plugin_data(value.metadata.plugin_data.content)


@pytest.mark.slow
def test_tensorboard_writes_nothing_before_a_round_then_the_settings_for_hparams(tmp_path):
    log = TensorBoardLog(tmp_path / "runs", "my run/1", 1, settings=SETTINGS)
    assert not (tmp_path / "runs").exists()  # a server that fails to start leaves no folder
    log(entry(1), {})
    log.close()
    run = tmp_path / "runs" / "my-run-1"  # the name, made a folder name
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["d1", "global"]
    info = session_start(run)
    assert info.group_name == "my-run-1"
    assert info.hparams["strategy"].string_value == "krum"
    assert info.hparams["dp.noise_multiplier"].number_value == 1.0
    assert info.hparams["dp"].bool_value is True and info.hparams["secagg"].bool_value is False


@pytest.mark.slow
def test_a_reset_or_a_name_used_before_gets_a_new_folder_and_a_restart_goes_on(tmp_path):
    log = TensorBoardLog(tmp_path, "run", 0, settings={"strategy": "fedavg"})
    for step in (1, 2, 1):  # a reset after round 2
        log(entry(step), {})
    log.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run-2"]
    assert [s for s, _ in read_events(tmp_path / "run" / "global")["test_accuracy"]] == [1, 2]
    assert [s for s, _ in read_events(tmp_path / "run-2" / "global")["test_accuracy"]] == [1]
    again = TensorBoardLog(tmp_path, "run", 0)  # the same name, a new run from round 1
    again(entry(1), {})
    restarted = TensorBoardLog(tmp_path, "run", 0)  # a server restarted in the middle of "run"
    restarted(entry(3), {})
    again.close()
    restarted.close()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run", "run-2", "run-3"]
    assert [s for s, _ in read_events(tmp_path / "run" / "global")["test_accuracy"]] == [1, 2, 3]
    # the engine says another run is current (a reset, POST /api/runs): its name, its settings
    log = TensorBoardLog(tmp_path, "fedavg-1", 0,
                         settings={"strategy": "fedavg", "dp": True, "dp.delta": 1e-5})
    log({**entry(1), "started_at": 100.0}, {})
    log.switch({"id": 2, "name": "krum 2", "settings": {"strategy": "krum", "dp": None}})
    log({**entry(2), "started_at": 100.0}, {})  # the run before's, still queued for the hooks
    log({**entry(1), "started_at": 4e9}, {})
    log.close()
    assert [s for s, _ in read_events(tmp_path / "fedavg-1" / "global")["test_accuracy"]] == [1, 2]
    info = session_start(tmp_path / "krum-2")
    assert info.hparams["strategy"].string_value == "krum" and info.hparams["dp"].bool_value is False
    assert "dp.delta" not in info.hparams


# ------------------------------------------------------------------------- end to end (slow)

@pytest.mark.slow
def test_a_server_that_fails_to_start_leaves_no_tensorboard_folder_and_no_mlflow_run(tmp_path, data_dir):
    import socket

    import fedhub

    _, client = store(tmp_path)
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        server = fedhub.Server("basic", framework="torch", data_dir=str(data_dir), test_limit=50,
                               port=taken.getsockname()[1], runs_dir=tmp_path / "runs",
                               mlflow=str(tmp_path / "mlruns"), state_dir=tmp_path / "state")
        with pytest.raises(OSError):
            server.start()
        if server.engine is not None:
            server.engine.stop()
    assert not (tmp_path / "runs").exists()
    assert runs(client) == []


@pytest.mark.slow
def test_two_simulated_runs_with_different_strategies_are_both_in_mlflow(tmp_path, fashion, data_dir):
    import torch

    import fedhub
    from fedhub.engine import wire

    (x, y), _ = fashion
    partitions = [(x[i * 32:(i + 1) * 32], y[i * 32:(i + 1) * 32]) for i in range(3)]
    uri, client = store(tmp_path)
    cells = {"fedavg": {"dp": {"mode": "central-fixed", "noise_multiplier": 0.3, "clipping_norm": 0.5}},
             "fedmedian": {}}

    def run(strategy: str):
        return fedhub.simulate("basic", partitions, framework="torch", rounds=2, workers=1, batch_size=16,
                               data_dir=str(data_dir), test_limit=50, timeout=240, root=tmp_path / strategy,
                               strategy=strategy, mlflow=uri, mlflow_experiment="compare", **cells[strategy])

    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(cells, pool.map(run, cells), strict=True))
    by_strategy = {r.data.params["strategy"]: r for r in runs(client, "compare")}
    assert set(by_strategy) == {"fedavg", "fedmedian"}
    for strategy, result in results.items():
        run_ = by_strategy[strategy]
        rid = run_.info.run_id
        assert run_.info.status == "FINISHED"
        assert run_.data.tags["fedhub.framework"] == "torch" and run_.data.tags["fedhub.strategy"] == strategy
        assert run_.data.params["rounds"] == "2" and "mlflow" not in run_.data.params
        assert not any(key.endswith("_dir") for key in run_.data.params)
        accuracy = history(client, rid, "test_accuracy")
        assert accuracy == pytest.approx({e["round"]: e["test_accuracy"] for e in result})
        assert len(client.get_metric_history(rid, "device/device1/accuracy")) == 2
        for way in ("bytes_up", "bytes_down"):  # each round's traffic, as its history entry says
            assert history(client, rid, way) == {e["round"]: e[way] for e in result}
            assert all(e[way] > 0 for e in result)
        epsilon = history(client, rid, "dp_epsilon")
        if strategy == "fedavg":
            assert run_.data.params["dp.mode"] == "central-fixed"
            assert epsilon == pytest.approx({e["round"]: e["privacy"]["epsilon"] for e in result})
        else:
            assert epsilon == {} and run_.data.params["dp"] == "false"
        [checkpoint] = (tmp_path / strategy / "server").rglob("round_00002.safetensors")
        expected, _ = wire.decode(checkpoint.read_bytes(), max_bytes=2**40)
        final = load_weights(client, rid, tmp_path / "download" / strategy)
        assert set(final) == set(expected)
        for name, value in expected.items():
            np.testing.assert_allclose(final[name], value)
        assert {a.path for a in client.list_artifacts(rid, "model")} == {
            "model/weights.safetensors", "model/model.pt2", "model/README.md"}
        exported = client.download_artifacts(rid, "model/model.pt2", str(tmp_path / strategy))
        program = torch.export.load(exported)
        probabilities = program.module()(torch.zeros((2, 28, 28), dtype=torch.uint8))
        assert tuple(probabilities.shape) == (2, 10)
