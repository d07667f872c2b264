"""The Python API: examples/python_api.py end to end (devices in child processes), and a
Server with one device in this process and one in a child process that only knows the URL."""

import json
import subprocess
import sys

import numpy as np
import pytest
import requests

from examples.digits import load_digits
from tests.conftest import ROOT


@pytest.mark.slow
def test_example_script(tmp_path):
    out = subprocess.run([sys.executable, "-m", "examples.python_api", "--devices", "2", "--rounds", "2",
                          "--root", str(tmp_path / "sim"), "--json", str(tmp_path / "result.json")],
                         capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "round 2: test accuracy" in out.stdout
    # TensorFlow's start-up lines and Keras' optimizer warning are silenced, as the README says
    for chatter in ("oneDNN custom operations", "cpu_feature_guard", "absl::InitializeLog", "UserWarning"):
        assert chatter not in out.stderr, out.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    history, evaluation = result["history"], result["evaluation"]
    assert [h["round"] for h in history] == [1, 2]
    assert set(history[-1]["devices"]) == {"device1", "device2"}
    assert evaluation["num_examples"] == 400 and evaluation["accuracy"] > 0.5
    # fedhub.evaluate on the final model computes what the server computed for the last round
    assert evaluation["accuracy"] == pytest.approx(history[-1]["test_accuracy"], abs=1e-6)
    assert np.array(evaluation["confusion_matrix"]).sum() == 400
    for name in ("device1", "device2"):  # the child processes saved the final model and exited
        assert (tmp_path / "sim" / "devices" / name / "saved" / "final.keras").is_file()


def build():
    import keras

    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(10)])
    model.compile(optimizer=keras.optimizers.SGD(0.5),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


@pytest.mark.slow
def test_server_with_local_and_remote_devices(tmp_path):
    import keras

    import fedhub
    from fedhub.frameworks.keras_model import get_keras_weights

    x, y = load_digits()
    (x1, y1), (x2, y2), (xt, yt) = (x[:300], y[:300]), (x[300:600], y[300:600]), (x[1400:], y[1400:])
    held = {"local": (x[600:700], y[600:700]), "remote": (x[700:750], y[700:750])}
    with fedhub.Server(build(), test_data=(xt, yt), rounds=2, min_devices=2, epochs=2, batch_size=16,
                       learning_rate=0.5, state_dir=tmp_path / "server", runs_dir=tmp_path / "runs",
                       run_id="api", personalization="finetune") as server:
        assert requests.get(f"{server.url}/health", timeout=5).ok
        local = fedhub.Device(server, "local", x1, y1, root=tmp_path / "devices", quiet=True,
                              holdout=held["local"]).start()
        # a device that only has the URL and the enrollment secret downloads the model itself
        remote = fedhub.Device(server.url, "remote", x2, y2, enroll_secret=server.enroll_secret,
                               root=tmp_path / "devices", quiet=True, holdout=held["remote"]).spawn()
        streamed = [entry["round"] for entry in server.rounds(timeout=240)]
        assert streamed == [1, 2]
        assert remote.join(120) == 0, remote.log_path.read_text()
        assert local.join(120) == 0
        history = server.history()
        assert set(history[-1]["devices"]) == {"local", "remote"}
        for entry in history:  # each evaluated the global model and its fine-tuned one on its own
            devices = entry["federated_evaluation"]["devices"]
            assert {n: d["num_examples"] for n, d in devices.items()} == {"local": 100, "remote": 50}
            assert all(d["personal"] is not None for d in devices.values())
        final = server.global_model()
        report = server.evaluate(xt, yt)
        assert report["accuracy"] == pytest.approx(history[-1]["test_accuracy"], abs=1e-6)
        assert report["accuracy"] > 0.5
        first = fedhub.evaluate(server.global_model(1), xt, yt)["accuracy"]
        assert first == pytest.approx(history[0]["test_accuracy"], abs=1e-6)
        lifecycle = {d["name"]: d["lifecycle"] for d in server.devices()}
        assert lifecycle == {"local": "finished", "remote": "finished"}
        for device in (local, remote):
            saved = keras.saving.load_model(device.final_model_path)
            for a, b in zip(saved.weights, final.weights, strict=True):
                np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
        assert set(get_keras_weights(final)) == set(get_keras_weights(server.global_model(0)))
    assert (tmp_path / "runs" / "api" / "global").is_dir()
    with pytest.raises(requests.ConnectionError):
        requests.get(f"{server.url}/health", timeout=5)


@pytest.mark.slow
def test_simulate_reports_a_device_with_invalid_data(tmp_path):
    import fedhub

    x, y = load_digits()
    bad_labels = y[:100] + 10  # out of range for a 10-class model
    with pytest.raises(RuntimeError, match=r"device2 stopped with exit code 1: invalid data: labels"):
        fedhub.simulate(build, [(x[:100], y[:100]), (x[100:200], bad_labels)], rounds=1,
                        processes=False, root=tmp_path, timeout=120)
    with pytest.raises(ValueError, match="x: x has shape"):
        fedhub.evaluate(build(), x[:, :10], y)


@pytest.mark.slow
def test_simulate_with_a_robust_strategy_and_an_attacking_device(tmp_path):
    """simulate takes the strategy and, per device, an attack; the pool's virtual devices mount it."""
    import fedhub

    x, y = load_digits()
    partitions = [(x[i * 200:(i + 1) * 200], y[i * 200:(i + 1) * 200]) for i in range(4)]
    history = fedhub.simulate(build, partitions, rounds=2, workers=1, epochs=2, batch_size=16,
                              learning_rate=0.5, test_data=(x[1400:], y[1400:]), root=tmp_path,
                              timeout=400, strategy="fedmedian",
                              attacks={"device4": fedhub.make_attack("sign-flip", factor=10)})
    for entry in history:
        assert entry["strategy"] == {"name": "fedmedian", "params": {}}
        distance = {name: d["aggregation"]["distance"] for name, d in entry["devices"].items()}
        honest = max(distance[n] for n in ("device1", "device2", "device3"))
        assert distance["device4"] > 5 * honest, distance  # its update reversed, ten times over
    # Chance is 0.1 and following a ten-fold reversed update ends there; honest runs reach about
    # 0.8 to 0.85 here, depending on thread scheduling.
    assert history[-1]["test_accuracy"] > 0.7, "the median does not follow the attacker"
    logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
    assert "[device4] attacking the federation: sign-flip (factor=10.0)" in logs
    with pytest.raises(ValueError, match="attacks name no device: device9"):
        fedhub.simulate(build, partitions, attacks={"device9": fedhub.make_attack("scale")})
