"""TensorBoard: a real run writes runs/<run-name>/global and one run per device; read them back
(the run's settings for HParams and its folder's naming: tests/test_tracking.py)."""

import numpy as np
import pytest

from tests.test_trainers import run_digits


def read_run(path):
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.util import tensor_util

    acc = ea.EventAccumulator(str(path), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    def value(event):  # a scalar's value, or a histogram's buckets (left edge, right edge, count)
        array = tensor_util.make_ndarray(event.tensor_proto)
        return float(array) if array.ndim == 0 else array

    return {tag: {e.step: value(e) for e in acc.Tensors(tag)} for tag in acc.Tags()["tensors"]}


def histogram_count(buckets) -> int:
    return round(float(np.asarray(buckets)[:, 2].sum()))


@pytest.mark.slow
def test_event_files_match_the_history(tmp_path, data_dir):
    server, _ = run_digits(tmp_path, data_dir, "--runs-dir", str(tmp_path / "runs"), "--run-id", "digits-run")
    try:
        history = server.get("/api/history").json()["rounds"]
    finally:
        server.stop()
    run = tmp_path / "runs" / "digits-run"
    assert sorted(p.name for p in run.iterdir() if p.is_dir()) == ["digits1", "digits2", "global"]
    scalars = read_run(run / "global")
    assert set(scalars) == {"test_loss", "test_accuracy", "num_updates", "num_examples",
                            "devices/loss", "devices/accuracy"}
    for h in history:
        assert scalars["test_accuracy"][h["round"]] == pytest.approx(h["test_accuracy"], rel=1e-6)
        assert scalars["test_loss"][h["round"]] == pytest.approx(h["test_loss"], rel=1e-6)
        assert scalars["num_examples"][h["round"]] == h["num_examples"] == 600
        assert histogram_count(scalars["devices/accuracy"][h["round"]]) == 2  # both devices' spread
        low, high = np.asarray(scalars["devices/accuracy"][h["round"]])[[0, -1], [0, 1]]
        accuracies = [d["accuracy"] for d in h["devices"].values()]
        assert low <= min(accuracies) + 1e-6 and max(accuracies) <= high + 1e-6
    for name in ("digits1", "digits2"):
        device = read_run(run / name)
        assert {"loss", "accuracy", "num_examples", "train_seconds"} <= set(device)
        for h in history:
            assert device["accuracy"][h["round"]] == pytest.approx(h["devices"][name]["accuracy"], rel=1e-6)
            assert device["loss"][h["round"]] == pytest.approx(h["devices"][name]["loss"], rel=1e-6)


@pytest.mark.slow
def test_only_the_first_devices_get_runs_and_every_device_is_in_the_spread(tmp_path):
    from fedhub.tensorboard_log import TensorBoardLog

    log = TensorBoardLog(tmp_path, "capped", max_device_runs=2)
    for step, names in ((1, ["d1", "d2", "d3"]), (2, ["d3", "d4", "d1"])):
        devices = {n: {"loss": 1.0 / step, "accuracy": 0.1 * int(n[1:]), "num_examples": 10} for n in names}
        devices["failed"] = {"error": "an ERROR line, no update"}
        log({"round": step, "test_loss": 0.5, "test_accuracy": 0.8, "num_updates": 3,
             "num_examples": 30, "devices": devices}, {})
    log.close()
    assert sorted(p.name for p in (tmp_path / "capped").iterdir()) == ["d1", "d2", "global"]
    assert set(read_run(tmp_path / "capped" / "d1")["accuracy"]) == {1, 2}  # kept its run in round 2
    assert set(read_run(tmp_path / "capped" / "d2")["accuracy"]) == {1}
    spread = read_run(tmp_path / "capped" / "global")["devices/accuracy"]
    assert histogram_count(spread[1]) == histogram_count(spread[2]) == 3
    assert np.asarray(spread[2])[-1, 1] == pytest.approx(0.4)  # d4, which has no run, is in it


def test_tensorboard_devices_flag_is_checked():
    """In-process (server.py's real-process check is in tests/test_cli_settings.py)."""
    from fedhub import serve as server
    from tests.cli_inprocess import assert_one_line_error, run_main

    assert_one_line_error(run_main(server.parse_args, ["--tensorboard-devices", "-1"]),
                          "--tensorboard-devices must be at least 0 and at most 100000")
