"""Bring your own training: a NumPy trainer on scikit-learn's digits (examples/digits.py) runs
through the real server (a Keras model from --model-factory) with real device processes."""

import subprocess
import sys

import numpy as np
import pytest

from examples import digits
from fedhub.device.launcher import launch, stop
from fedhub.engine import wire
from tests.conftest import ROOT, ServerProcess

DIGITS_SERVER_ARGS = ("--model-factory", "examples.digits:build_model", "--learning-rate", "0.5",
                      "--epochs", "3", "--batch-size", "16", "--min-devices", "2", "--auto-activate",
                      "--start", "--rounds", "2")


def run_digits(tmp_path, data_dir, *extra: str) -> tuple[ServerProcess, list]:
    """Split digits over two device folders, run the server and both devices to the end."""
    digits.split(tmp_path / "devices", 2, limit=300)
    server = ServerProcess(tmp_path, data_dir, *DIGITS_SERVER_ARGS, "--test-data",
                           str(tmp_path / "devices" / "test.npz"), *extra).start()
    procs = launch(server.url, ["digits1", "digits2"], devices_root=tmp_path / "devices",
                   extra_args=["--trainer", "examples.digits:SoftmaxTrainer", "--poll-wait", "2"],
                   env={"FEDHUB_ENROLL_SECRET": server.enroll_secret}, log_dir=tmp_path / "logs")
    try:
        codes = [p.wait(180) for p in procs]
    finally:
        stop(procs)
    logs = "".join(p.read_text() for p in sorted((tmp_path / "logs").glob("*.log")))
    assert codes == [0, 0], logs + server.log()
    return server, procs


@pytest.mark.slow
def test_numpy_trainer_through_the_real_server(tmp_path, data_dir):
    server, _ = run_digits(tmp_path, data_dir, "--no-tensorboard")
    try:
        history = server.get("/api/history").json()["rounds"]
        assert [h["round"] for h in history] == [1, 2]
        assert all(set(h["devices"]) == {"digits1", "digits2"} for h in history)
        assert history[-1]["test_accuracy"] > 0.5  # 10 classes: chance is 0.1
        assert history[-1]["devices"]["digits1"]["num_examples"] == 300
        # each device saved the run's final model: the server's final global weights
        weights, meta = wire.decode(server.admin("GET", "/api/model").content)
        assert meta.model_version == 2
        for name in ("digits1", "digits2"):
            with np.load(tmp_path / "devices" / name / "saved" / "final.npz") as final:
                np.testing.assert_array_equal(final["kernel"], weights[digits.KERNEL])
                np.testing.assert_array_equal(final["bias"], weights[digits.BIAS])
        devices = server.get("/api/devices").json()["devices"]
        assert {d["lifecycle"] for d in devices} == {"finished"}
        assert devices[0]["validation"]["num_examples"] == 300
        assert sum(devices[0]["validation"]["class_counts"]) == 300
    finally:
        server.stop()


def test_trainer_flag_errors(tmp_path):
    """A wrong --trainer is a clean CLI error (exit 2, no traceback), before any network call."""
    cases = [
        ("nosuch.module:Trainer", "No module named 'nosuch'"),
        ("examples.digits:NoSuchName", "NoSuchName"),
        ("examples.digits:SoftmaxTrainer", "no "),  # the data file is missing
    ]
    from fedhub.device import main as device_command
    from tests.cli_inprocess import assert_one_line_error, run_main

    for spec, expected in cases:  # in-process (the real-process check: tests/test_cli_settings.py)
        out = run_main(device_command.main, ["--server", "http://127.0.0.1:9", "--name", "d1",
                                             "--devices-root", str(tmp_path), "--trainer", spec])
        assert_one_line_error(out, expected)
        assert out.stderr.startswith(f"error: --trainer {spec}:"), out.stderr


@pytest.mark.slow
def test_model_factory_errors(tmp_path, data_dir):
    for args, expected in [(("--model-factory", "examples.digits:nothing"), "cannot be loaded"),
                           (("--model-factory", "examples.digits:load_digits"), "not a keras.Model")]:
        out = subprocess.run([sys.executable, "server.py", "0", "--state-dir", str(tmp_path / "s"),
                              "--no-tensorboard", *args], capture_output=True, text=True, cwd=ROOT,
                             timeout=120)
        assert out.returncode == 2 and expected in out.stderr, out.stderr
        assert "Traceback" not in out.stderr


@pytest.mark.slow
def test_fedprox_proximal_term_pulls_the_keras_trainer_toward_the_global_model(fashion):
    """``proximal_mu`` in the task config (``--strategy fedprox``) adds (mu/2)·||w - w_global||² to
    the built-in trainer's loss, w_global being the weights the round started from."""
    from fedhub.device.trainer import KerasTrainer

    (x, y), _ = fashion
    trainer = KerasTrainer(x[:256], y[:256])
    trainer.initialise({})
    start = trainer.model.get_weights()
    config = {"epochs": 2, "batch_size": 32, "learning_rate": 1e-3}

    def distance(weights):
        return float(np.sqrt(sum(((weights[k].astype(np.float64) - start[k]) ** 2).sum() for k in start)))

    free = trainer.train(start, config)
    assert trainer.proximal is None, "no term without proximal_mu"
    pulled = trainer.train(start, {**config, "proximal_mu": 10.0})
    assert distance(pulled.weights) < distance(free.weights) / 2
    expected = 0.5 * 10.0 * sum(((pulled.weights[k].astype(np.float64) - start[k]) ** 2).sum() for k in start)
    assert trainer.proximal.value() == pytest.approx(expected, rel=1e-4)
    losses = trainer.model.keras_model.losses  # what fit adds to the loss it minimises
    assert float(sum(np.asarray(v) for v in losses)) == pytest.approx(expected, rel=1e-4)
    # mu back to 0: the term is gone from the loss
    trainer.train(pulled.weights, {**config, "proximal_mu": 0.0})
    assert trainer.proximal.value() == 0.0
