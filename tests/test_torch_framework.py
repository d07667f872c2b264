"""The framework seam with PyTorch: FedHub's PyTorch networks on real CIFAR-10 and Fashion-MNIST
subsets, and a real PyTorch CIFAR-10 federation (server and two device processes) that never
loads TensorFlow.

The fast tests here check the command line and picture decoding without importing a framework;
everything that imports torch or trains is marked slow.
"""

from __future__ import annotations

import base64
import io
import json
import os
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image

from fedhub import datasets, frameworks
from fedhub import serve as server
from fedhub.frameworks.images import colour_image_to_array

from .conftest import CIFAR_DIR, ONE_THREAD, ROOT, ServerProcess, stop_processes, wait_until

# --------------------------------------------------------------------------- command line (fast)


def refused(argv: list[str], capsys) -> str:
    with pytest.raises(SystemExit) as exit_info:
        server.parse_args(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def test_framework_and_dataset_pick_the_network_and_reach_the_task():
    config = server.parse_args(["4000", "--framework", "torch", "--dataset", "cifar-10"])
    assert (config.framework, config.dataset, config.model) == ("torch", "cifar-10", "cifar")
    task = config.federation.training.task()
    assert task["framework"] == "torch" and task["model"] == "cifar"
    torch_fashion = server.parse_args(["4000", "--framework", "torch", "--model", "cnn"])
    assert (torch_fashion.dataset, torch_fashion.model) == ("fashion-mnist", "cnn")
    default = server.parse_args(["4000"])  # the Keras / Fashion-MNIST run, unchanged
    assert (default.framework, default.dataset, default.model) == ("keras", "fashion-mnist", "basic")
    assert "framework" not in default.federation.training.task(), "a task without it means Keras"


@pytest.mark.parametrize("argv, expected", [
    (["--framework", "jax"], "--framework must be one of keras, torch"),
    (["--dataset", "mnist"], "unknown data set 'mnist'; choose one of fashion-mnist, cifar-10"),
    (["--dataset", "cifar-10", "--model", "basic"],
     "--model basic cannot learn cifar-10 with --framework keras (it takes fashion-mnist images); "
     "choose cifar"),
    (["--framework", "torch", "--dataset", "cifar-10", "--model", "basic"],
     "--model basic cannot learn cifar-10 with --framework torch (it takes fashion-mnist images); "
     "choose cifar"),
    (["--framework", "torch", "--model", "resnet"], "torch has no network 'resnet'"),
], ids=["framework", "dataset", "keras-cifar", "wrong-images", "no-such-network"])
def test_combinations_that_cannot_run_are_one_error_line(argv, expected, capsys):
    assert expected in refused(["4000", *argv], capsys)


def test_a_colour_picture_becomes_a_cifar_sized_rgb_image():
    rng = np.random.default_rng(0)
    exact = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(exact, "RGB").save(buffer, "PNG")
    assert np.array_equal(colour_image_to_array(buffer.getvalue()), exact), "a CIFAR-sized PNG is kept"
    wide = np.zeros((300, 600, 4), np.uint8)
    wide[..., 0], wide[..., 3] = 200, 255
    wide[:, :150, 3] = 0  # transparent on the left: composited onto white, then cropped away
    buffer = io.BytesIO()
    Image.fromarray(wide, "RGBA").save(buffer, "PNG")
    out = colour_image_to_array(buffer.getvalue())
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    assert np.all(out[..., 0] >= 199) and np.all(out[..., 1:] <= 1), "the centre square, red"


# --------------------------------------------------------------------------- the adapter (slow)


@pytest.mark.slow
def test_the_cifar_network_learns_cifar_10(cifar, torch_one_thread):
    (x_train, y_train), (x_test, y_test) = cifar
    network = frameworks.get("torch").build("cifar")
    assert (network.image_shape, network.class_names) == ((32, 32, 3), datasets.get("cifar-10").class_names)
    before = network.evaluate(x_test[:1000], y_test[:1000])
    assert before["accuracy"] < 0.2, "untrained: about chance (0.1)"
    seen = []
    metrics = network.train(x_train[:3000], y_train[:3000], epochs=2, batch_size=32, learning_rate=1e-3,
                            progress=lambda done, total: seen.append((done, total)))
    assert seen[0] == (0, 2 * 94) and seen[-1] == (2 * 94, 2 * 94), "every batch reported"
    assert 0 <= metrics["accuracy"] <= 1 and np.isfinite(metrics["loss"])
    after = network.evaluate(x_test[:1000], y_test[:1000])
    assert after["accuracy"] > 0.25, f"well above chance on held-out images: {after['accuracy']}"
    assert after["loss"] < before["loss"]
    confusion = np.asarray(after["confusion_matrix"])
    assert confusion.shape == (10, 10) and confusion.sum() == 1000
    assert np.trace(confusion) / 1000 == pytest.approx(after["accuracy"])
    probabilities = network.predict(x_test[:5])
    assert probabilities.shape == (5, 10) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)


@pytest.mark.slow
def test_the_fashion_networks_mirror_the_keras_ones_and_learn(fashion, torch_one_thread):
    (x_train, y_train), (x_test, y_test) = fashion
    torch_framework = frameworks.get("torch")
    assert set(torch_framework.networks) == set(frameworks.networks("torch"))
    assert set(frameworks.get("keras").networks) == set(frameworks.networks("keras"))
    # Same layers as model.py's Keras networks: the same number of weights in each layer.
    keras_sizes = {"basic": [784 * 128, 128, 128 * 10, 10],
                   "cnn": [3 * 3 * 32, 32, 3 * 3 * 32 * 64, 64, 1600 * 128, 128, 128 * 10, 10]}
    for name, floor in (("basic", 0.7), ("cnn", 0.6)):
        network = torch_framework.build(name)
        sizes = [int(np.prod(w.shape)) for w in network.get_weights().values()]
        assert sizes == keras_sizes[name], name
        network.train(x_train[:3000], y_train[:3000], epochs=1, batch_size=32)
        accuracy = network.evaluate(x_test[:1000], y_test[:1000])["accuracy"]
        assert accuracy > floor, f"{name}: {accuracy}"


@pytest.mark.slow
def test_the_keras_sizes_above_are_model_py_s():
    """The layer sizes the test above holds the PyTorch networks to are the Keras networks'."""
    from fedhub.frameworks.keras_model import Model

    for name, count in (("basic", 101_770), ("cnn", 225_034)):
        assert Model(name).num_parameters() == count
        torch_network = frameworks.get("torch").build(name)
        assert sum(w.size for w in torch_network.get_weights().values()) == count


@pytest.mark.slow
def test_weights_round_trip_by_name(cifar, torch_one_thread):
    (_, _), (x_test, _) = cifar
    first, second = (frameworks.get("torch").build("cifar", seed=s) for s in (1, 2))
    weights = first.get_weights()
    assert list(weights) == list(first.module.state_dict()), "state_dict order, by name"
    assert not np.allclose(first.predict(x_test[:20]), second.predict(x_test[:20]))
    second.set_weights(dict(reversed(list(weights.items()))))  # by name, not by position
    assert np.array_equal(first.predict(x_test[:20]), second.predict(x_test[:20]))
    unchanged = second.get_weights()
    for broken, message in (
            ({k: v for k, v in weights.items() if k != "fc3.bias"}, "missing weight tensor 'fc3.bias'"),
            ({**weights, "extra": np.zeros(1)}, "unexpected weight tensor 'extra'"),
            ({**weights, "fc3.bias": np.zeros(3)}, "'fc3.bias' has shape (3,), expected (10,)"),
            ({**weights, "fc1.bias": np.full(120, np.nan)}, "'fc1.bias' contains NaN")):
        with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
            second.set_weights(broken)
        assert all(np.array_equal(unchanged[k], v) for k, v in second.get_weights().items()), \
            "nothing changed by a refused set"


@pytest.mark.slow
def test_export_loads_in_plain_torch_and_predicts_as_the_adapter(cifar, fashion, torch_one_thread):
    torch = torch_one_thread
    (x_train, y_train), (x_test, _) = cifar
    cases = (("cifar", x_train[:500], y_train[:500], x_test[:64]),
             ("basic", fashion[0][0][:500], fashion[0][1][:500], fashion[1][0][:64]))
    for name, x, y, images in cases:
        network = frameworks.get("torch").build(name)
        network.train(x, y, epochs=1)
        data = network.export(network.get_weights())
        about = {"fedhub.json": ""}
        program = torch.export.load(io.BytesIO(data), extra_files=about)
        with torch.no_grad():
            plain = program.module()(torch.from_numpy(images)).numpy()  # raw uint8 images in
        np.testing.assert_allclose(plain, network.predict(images), atol=1e-5)
        assert json.loads(about["fedhub.json"])["class_names"] == list(network.class_names)


@pytest.mark.slow
def test_fedprox_pulls_toward_the_start_and_an_interrupt_stops_at_the_next_batch(cifar, torch_one_thread):
    from fedhub.device.trainer import TrainingInterrupted

    (x, y), _ = cifar
    x, y = x[:640], y[:640]
    free, pulled = (frameworks.get("torch").build("cifar", seed=0) for _ in range(2))
    start = free.get_weights()

    def distance(weights):
        return float(np.sqrt(sum(((weights[k].astype(np.float64) - start[k]) ** 2).sum() for k in start)))

    free.train(x, y, epochs=2, learning_rate=1e-2)
    pulled.train(x, y, epochs=2, learning_rate=1e-2, proximal_mu=10.0)
    assert distance(pulled.get_weights()) < distance(free.get_weights()) / 2
    network = pulled

    stop = threading.Event()

    def stop_after_three(done, total):
        if done == 3:
            stop.set()

    with pytest.raises(TrainingInterrupted) as interrupted:
        network.train(x, y, epochs=1, stop=stop, progress=stop_after_three)
    assert (interrupted.value.batches_done, interrupted.value.batches_total) == (3, 20)
    assert not stop.is_set(), "cleared: the interrupt was for this call only"


@pytest.mark.slow
def test_the_device_trainer_builds_the_network_the_task_names(cifar, torch_one_thread):
    from fedhub.device.trainer import ImageTrainer

    (x, y), _ = cifar
    trainer = ImageTrainer(x[:300], y[:300])
    assert trainer.validate()["ok"], "CIFAR-10's colour images are valid device data"
    trainer.initialise({})
    assert trainer.network is None, "no framework known before the first task: nothing built"
    start = frameworks.get("torch").build("cifar").get_weights()
    result = trainer.train(start, {"framework": "torch", "model": "cifar", "epochs": 1, "batch_size": 32,
                                   "learning_rate": 1e-3})
    assert (trainer.network.framework, trainer.network.name) == ("torch", "cifar")
    assert result.num_examples == 300 and set(result.weights) == set(start)
    assert {"loss", "accuracy", "train_seconds"} <= set(result.metrics)
    assert trainer.progress() == (10, 10)
    assert set(trainer.evaluate(result.weights)) == {"loss", "accuracy"}


# --------------------------------------------------------------------------- a real federation (slow)


def _mapped_libraries(pid: int) -> str:
    return Path(f"/proc/{pid}/maps").read_text()


@pytest.mark.slow
def test_a_pytorch_cifar_10_federation_through_the_real_server_and_devices(tmp_path, cifar):
    """``server.py PORT --framework torch --dataset cifar-10`` and two ``device/device.py PORT NAME``
    processes (the original forms) train rounds on real CIFAR-10 shares; neither the server nor a
    device maps TensorFlow into memory; the export scores in plain PyTorch what the server
    reported; a colour picture is predicted with CIFAR-10's class names."""
    import torch

    root = tmp_path / "devices"
    split = subprocess.run(
        [sys.executable, "-m", "fedhub.split", "--devices", "2", "--dataset", "cifar-10",
         "--limit", "600", "--data-dir", str(CIFAR_DIR), "--out", str(root), "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert split.returncode == 0, split.stderr
    srv = ServerProcess(tmp_path, CIFAR_DIR, "--framework", "torch", "--dataset", "cifar-10",
                        "--rounds", "0", "--min-devices", "2", "--auto-activate", "--start",
                        "--test-limit", "500", "--no-tensorboard", env=ONE_THREAD)
    procs = []
    try:
        srv.start()
        env = {**os.environ, **ONE_THREAD, "FEDHUB_ENROLL_SECRET": srv.enroll_secret}
        for name in ("device1", "device2"):
            with open(tmp_path / f"{name}.log", "ab") as log:
                procs.append(subprocess.Popen(
                    [sys.executable, "device/device.py", str(srv.port), name, "--devices-root", str(root),
                     "--poll-wait", "2"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT))

        def history():
            return srv.get("/api/history").json()["rounds"]

        rounds = wait_until(lambda: len(history()) >= 2 and history(), 90, "two PyTorch rounds")
        for pid in (srv.proc.pid, *(p.pid for p in procs)):
            maps = _mapped_libraries(pid)
            assert "libtorch" in maps, "the check reads the process's libraries: torch is there"
            assert "tensorflow" not in maps, f"process {pid} loaded TensorFlow"
        for r in rounds[:2]:
            assert r["num_updates"] == 2 and r["num_examples"] == 1200
            assert set(r["devices"]) == {"device1", "device2"}
        assert rounds[1]["test_accuracy"] > 0.15, "above chance (0.1) after two rounds"
        evaluation = srv.admin("GET", "/api/rounds/2/evaluation").json()
        assert evaluation["class_names"] == list(datasets.get("cifar-10").class_names)
        assert np.asarray(evaluation["confusion_matrix"]).sum() == 500

        exported = srv.admin("GET", "/api/rounds/2/model.keras")
        assert exported.status_code == 200
        assert 'filename="fedhub_round_00002.pt2"' in exported.headers["Content-Disposition"]
        program = torch.export.load(io.BytesIO(exported.content))
        (_, _), (x_test, y_test) = cifar
        with torch.no_grad():
            predicted = program.module()(torch.from_numpy(x_test[:500])).numpy().argmax(axis=1)
        assert float((predicted == y_test[:500]).mean()) == pytest.approx(rounds[1]["test_accuracy"],
                                                                          abs=1 / 500)

        def validate(x, y):
            body = io.BytesIO()
            np.savez(body, x=x, y=y)
            return requests.post(f"{srv.url}/api/rounds/2/validate", data=body.getvalue(), timeout=30,
                                 headers={"Authorization": f"Bearer {srv.admin_token}",
                                          "Content-Type": "application/octet-stream"})

        checked = validate(x_test[:500], y_test[:500])
        assert checked.status_code == 200, checked.text
        assert checked.json()["accuracy"] == pytest.approx(rounds[1]["test_accuracy"])
        grey = validate(np.zeros((10, 28, 28), np.uint8), np.zeros(10, np.uint8))
        assert grey.status_code == 400 and grey.json()["field"] == "x", grey.text
        assert "(32, 32, 3)" in grey.json()["message"]

        picture = io.BytesIO()
        Image.fromarray(x_test[0], "RGB").save(picture, "PNG")
        answer = srv.admin("POST", "/api/predict", files={"image": ("ship.png", picture.getvalue())})
        assert answer.status_code == 200, answer.text
        body = answer.json()
        assert body["class_names"] == list(datasets.get("cifar-10").class_names)
        assert body["class_name"] == body["class_names"][body["class_index"]]
        shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["input_png"]))))
        assert np.array_equal(shown, x_test[0]), "the network saw the 32x32 colour picture itself"
        for pid in (srv.proc.pid,):
            assert "tensorflow" not in _mapped_libraries(pid), "predicting loaded no TensorFlow"
    finally:
        stop_processes(procs)
        srv.stop()
        logs = "\n".join((tmp_path / f"{n}.log").read_text(errors="replace")[-2000:]
                         for n in ("device1", "device2") if (tmp_path / f"{n}.log").exists())
        print(logs)
