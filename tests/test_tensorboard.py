"""TensorBoard: a real run writes runs/<run-id>/global and one run per device; read them back."""

import pytest

from tests.test_trainers import run_digits


def read_run(path):
    from tensorboard.backend.event_processing import event_accumulator as ea
    from tensorboard.util import tensor_util

    acc = ea.EventAccumulator(str(path), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    return {tag: {e.step: float(tensor_util.make_ndarray(e.tensor_proto)) for e in acc.Tensors(tag)}
            for tag in acc.Tags()["tensors"]}


@pytest.mark.slow
def test_event_files_match_the_history(tmp_path, data_dir):
    server, _ = run_digits(tmp_path, data_dir, "--runs-dir", str(tmp_path / "runs"), "--run-id", "digits-run")
    try:
        history = server.get("/api/history").json()["rounds"]
    finally:
        server.stop()
    run = tmp_path / "runs" / "digits-run"
    assert sorted(p.name for p in run.iterdir()) == ["digits1", "digits2", "global"]
    scalars = read_run(run / "global")
    assert set(scalars) == {"test_loss", "test_accuracy", "num_updates", "num_examples"}
    for h in history:
        assert scalars["test_accuracy"][h["round"]] == pytest.approx(h["test_accuracy"], rel=1e-6)
        assert scalars["test_loss"][h["round"]] == pytest.approx(h["test_loss"], rel=1e-6)
        assert scalars["num_examples"][h["round"]] == h["num_examples"] == 600
    for name in ("digits1", "digits2"):
        device = read_run(run / name)
        assert {"loss", "accuracy", "num_examples", "train_seconds"} <= set(device)
        for h in history:
            assert device["accuracy"][h["round"]] == pytest.approx(h["devices"][name]["accuracy"], rel=1e-6)
            assert device["loss"][h["round"]] == pytest.approx(h["devices"][name]["loss"], rel=1e-6)
