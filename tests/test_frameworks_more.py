"""The framework seam, continued: devices learn the run's network from ``GET /api/status`` and
build it before their first task; the seed's CIFAR-10 CNN in Keras; a PyTorch module of the
user's own (``--model-factory``) through a real server and device; both dashboards' download
and predict with CIFAR-10.

Every test here starts a server process or imports a framework, so all are slow. Training runs
on small real CIFAR-10 subsets with one thread per process.
"""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from fedhub import datasets, frameworks

from .conftest import CIFAR_DIR, ONE_THREAD, ROOT, ServerProcess, stop_processes, wait_until

pytestmark = pytest.mark.slow

FACTORY = "tests.torch_factory:build"
CIFAR_CLASSES = list(datasets.get("cifar-10").class_names)




def split_cifar(root: Path, devices: int, limit: int) -> Path:
    done = subprocess.run(
        [sys.executable, "-m", "fedhub.split", "--devices", str(devices), "--dataset", "cifar-10",
         "--limit", str(limit), "--data-dir", str(CIFAR_DIR), "--out", str(root), "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return root


def start_device(server: ServerProcess, root: Path, name: str, log_dir: Path,
                 *extra: str) -> subprocess.Popen:
    # PYTHONPATH: the device imports tests.torch_factory, as a user's device imports their module
    env = {**os.environ, **ONE_THREAD, "FEDHUB_ENROLL_SECRET": server.enroll_secret,
           "PYTHONPATH": str(ROOT)}
    with open(log_dir / f"{name}.log", "ab") as log:
        return subprocess.Popen([sys.executable, "device/device.py", str(server.port), name,
                                 "--devices-root", str(root), "--poll-wait", "2", *extra],
                                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)


def probe(server: ServerProcess, tmp: Path, name: str, trainer) -> tuple[bool, list[str]]:
    """An in-process device (the real device loop and client) joining ``server``: what
    :meth:`DeviceRunner.join` returned and the lines it printed. It leaves again at once."""
    from fedhub.device.client import Client
    from fedhub.device.runner import DeviceRunner

    lines: list[str] = []
    client = Client(server.url, name, retry_for=5)
    runner = DeviceRunner(client, trainer, tmp / name, enroll_secret=server.enroll_secret,
                          print_fn=lambda line, **_: lines.append(line))
    (tmp / name).mkdir(parents=True, exist_ok=True)
    joined = runner.join()
    if joined:
        runner.leave()
    return joined, lines


# --------------------------------------------------------------------------- built before the first task


def test_devices_build_the_servers_network_before_their_first_task_and_the_dashboard_shows_cifar(
        tmp_path, cifar, torch_one_thread, monkeypatch):
    """A PyTorch CIFAR-10 server announces its network in ``GET /api/status``; a device builds it
    while joining, before it ever asks for a task (so round 1 does not wait for the framework's
    import); a device whose --framework is not the server's stops with one error line. Then a
    real device trains a round, and the Streamlit dashboard names the download ``.pt2`` and
    predicts a colour picture with CIFAR-10's class names."""
    from streamlit.testing.v1 import AppTest

    from fedhub.device.trainer import ImageTrainer

    (x_train, y_train), (x_test, _) = cifar
    srv = ServerProcess(tmp_path, CIFAR_DIR, "--framework", "torch", "--dataset", "cifar-10",
                        "--rounds", "1", "--min-devices", "1", "--auto-activate", "--test-limit", "300",
                        "--no-tensorboard", env=ONE_THREAD)
    procs: list[subprocess.Popen] = []
    try:
        srv.start()
        status = srv.get("/api/status").json()
        assert status["network"] == {"framework": "torch", "name": "cifar", "builtin": True,
                                     "dataset": "cifar-10", "class_names": CIFAR_CLASSES,
                                     "image_shape": [32, 32, 3], "export_suffix": ".pt2"}

        trainer = ImageTrainer(x_train[:200], y_train[:200])
        joined, lines = probe(srv, tmp_path, "probe", trainer)
        assert joined, lines
        assert trainer.network is not None, "built while joining, before any task"
        assert (trainer.network.framework, trainer.network.name) == ("torch", "cifar")
        assert srv.get("/api/status").json()["completed_rounds"] == 0, "no round ran: no task yet"

        pinned = ImageTrainer(x_train[:200], y_train[:200], framework="keras")
        joined, lines = probe(srv, tmp_path, "pinned", pinned)
        assert not joined and pinned.network is None
        errors = [line for line in lines if "error:" in line]
        assert errors == ["[pinned] error: --framework keras does not match the server's framework torch; "
                          "leave --framework out or give --framework torch"], lines
        devices = {d["name"] for d in srv.get("/api/devices").json()["devices"]}
        assert "pinned" not in devices, "it never enrolled"

        root = split_cifar(tmp_path / "devices", 1, 400)
        # the same mismatch as a command: a usage error, exit 2, one error line
        wrong = start_device(srv, root, "device1", tmp_path, "--framework", "keras")
        assert wrong.wait(120) == 2
        assert "does not match the server's framework torch" in (tmp_path / "device1.log").read_text()
        procs.append(start_device(srv, root, "device1", tmp_path))
        assert srv.admin("POST", "/api/training/start", json={"rounds": 1}).ok
        wait_until(lambda: srv.get("/api/status").json()["completed_rounds"] >= 1, 120, "round 1")

        picture = io.BytesIO()
        Image.fromarray(x_test[3], "RGB").resize((96, 96)).save(picture, "PNG")

        def predicts() -> bool:
            r = srv.admin("POST", "/api/predict", files={"image": ("x.png", picture.getvalue())})
            return r.ok and r.json()["round"] == 1
        wait_until(predicts, 60, "the server to predict with round 1's model")
        direct = srv.admin("POST", "/api/predict", files={"image": ("x.png", picture.getvalue())}).json()

        for key, value in {"FEDHUB_SERVER": srv.url, "FEDHUB_ADMIN_TOKEN": srv.admin_token,
                           "FEDHUB_ENROLL_SECRET": srv.enroll_secret}.items():
            monkeypatch.setenv(key, value)
        at = AppTest.from_file(str(ROOT / "dashboard" / "index.py"), default_timeout=60).run()
        assert not at.exception, at.exception
        assert at.title[0].value == "FedHub · federated CIFAR-10"
        (download,) = [d for d in at.get("download_button")]
        assert download.proto.label == "Download round 1"
        assert "torch.export" in " ".join(c.value for c in at.caption)
        captions = " ".join(c.value for c in at.caption)
        assert "Classes (CIFAR-10): " + ", ".join(CIFAR_CLASSES) + "." in captions
        assert "32x32, in colour" in captions and "28x28" not in captions

        at.file_uploader(key="picture").set_value(("ship.png", picture.getvalue(), "image/png")).run()
        assert not at.exception and not at.error, [e.value for e in at.error]
        captions = [c for img in at.get("image") for c in img.captions]
        assert captions == ["ship.png", "what the model saw (32x32)"]
        shown = " ".join(e.value for e in (*at.success, *at.warning))
        assert f"**{direct['class_name']}**" in shown and direct["class_name"] in CIFAR_CLASSES
        bars = [c for c in at.get("vega_lite_chart") if "probability of each class" in c.proto.spec]
        assert len(bars) == 1 and all(name in bars[0].proto.spec for name in CIFAR_CLASSES)
    finally:
        stop_processes(procs)
        srv.stop()


def test_the_download_file_name_follows_the_servers_export_suffix():
    """The download's name comes from the server's network, not from Keras' suffix: the
    dashboard module's helpers, on what ``GET /api/status`` says of a PyTorch and a Keras run."""
    from fedhub.dashboard import page as index

    class Status:
        def __init__(self, network):
            self.network = network

        def status(self):
            return {"network": self.network}

    torch_run = index.run_network(Status({"framework": "torch", "name": "cifar", "builtin": True,
                                          "dataset": "cifar-10", "class_names": CIFAR_CLASSES,
                                          "image_shape": [32, 32, 3], "export_suffix": ".pt2"}))
    assert torch_run["export_suffix"] == ".pt2" and "torch.export" in index.export_caption(torch_run)
    old_server = index.run_network(Status(None))  # a server from before: Keras, Fashion-MNIST
    assert old_server["export_suffix"] == ".keras" and old_server["image_shape"] == [28, 28]
    assert "keras.saving.load_model" in index.export_caption(old_server)


# --------------------------------------------------------------------------- the seed's CNN in Keras


def test_the_keras_cifar_network_is_the_torch_one_in_shapes_and_learns(cifar, torch_one_thread):
    from fedhub.frameworks.keras_model import Model

    (x_train, y_train), (x_test, y_test) = cifar
    keras_network = frameworks.get("keras").build("cifar")
    torch_network = frameworks.get("torch").build("cifar")
    assert (keras_network.dataset, keras_network.image_shape) == ("cifar-10", (32, 32, 3))
    assert list(keras_network.class_names) == CIFAR_CLASSES
    keras_sizes = sorted(w.size for w in keras_network.get_weights().values())
    torch_sizes = sorted(w.size for w in torch_network.get_weights().values())
    assert keras_sizes == torch_sizes, "the same layers: 2 convolutions, 3 fully connected"
    assert Model("cifar").num_parameters() == sum(torch_sizes) == 62_006
    kernels = {k: v.shape for k, v in keras_network.get_weights().items() if k.endswith("kernel")}
    assert sorted(kernels.values()) == sorted([(5, 5, 3, 6), (5, 5, 6, 16), (400, 120), (120, 84), (84, 10)])

    before = keras_network.evaluate(x_test[:500], y_test[:500])
    keras_network.train(x_train[:2000], y_train[:2000], epochs=2, batch_size=32, learning_rate=1e-3)
    after = keras_network.evaluate(x_test[:500], y_test[:500])
    assert after["accuracy"] > 0.2 and after["loss"] < before["loss"], (before, after)

    # The export takes raw uint8 colour images and normalises them inside, as training did.
    import keras

    data = keras_network.export(keras_network.get_weights())
    path = Path(os.environ.get("TMPDIR", "/tmp")) / f"fedhub-cifar-{os.getpid()}.keras"
    path.write_bytes(data)
    try:
        plain = keras.saving.load_model(path)
    finally:
        path.unlink()
    np.testing.assert_allclose(plain.predict(x_test[:32], verbose=0), keras_network.predict(x_test[:32]),
                               atol=1e-5)


def test_keras_cifar_is_what_the_server_runs_for_cifar_10_with_keras():
    from fedhub import serve as server

    config = server.parse_args(["4000", "--dataset", "cifar-10"])
    assert (config.framework, config.model) == ("keras", "cifar")
    assert frameworks.networks("keras", "cifar-10") == ("cifar",)


# --------------------------------------------------------------------------- a PyTorch module of one's own


def test_a_torch_module_of_your_own_trains_through_a_real_server_and_device(tmp_path, cifar,
                                                                           torch_one_thread):
    """``--framework torch --dataset cifar-10 --model-factory tests.torch_factory:build`` on the
    server and the device: a round trains the user's module (its own layers, its own mean and
    std), the server tests it on CIFAR-10, predicts with it and exports a ``.pt2`` that plain
    PyTorch runs to the score the server reported; no process loads TensorFlow. A device without
    the factory refuses to join in one line."""
    torch = torch_one_thread
    from fedhub.device.trainer import ImageTrainer

    (x_train, y_train), (x_test, y_test) = cifar
    root = split_cifar(tmp_path / "devices", 1, 600)
    srv = ServerProcess(tmp_path, CIFAR_DIR, "--framework", "torch", "--dataset", "cifar-10",
                        "--model-factory", FACTORY, "--rounds", "2", "--min-devices", "1",
                        "--auto-activate", "--start", "--test-limit", "300", "--no-tensorboard",
                        env={**ONE_THREAD, "PYTHONPATH": str(ROOT)})
    procs: list[subprocess.Popen] = []
    try:
        srv.start()
        network = srv.get("/api/status").json()["network"]
        assert network == {"framework": "torch", "name": FACTORY, "builtin": False, "dataset": "cifar-10",
                           "class_names": CIFAR_CLASSES, "image_shape": [32, 32, 3],
                           "export_suffix": ".pt2"}

        joined, lines = probe(srv, tmp_path, "nofactory", ImageTrainer(x_train[:100], y_train[:100]))
        assert not joined
        assert any("error: the server trains torch model 'tests.torch_factory:build', not one of "
                   "FedHub's networks" in line and "--model-factory" in line for line in lines), lines

        procs.append(start_device(srv, root, "device1", tmp_path, "--framework", "torch",
                                  "--model-factory", FACTORY))
        history = lambda: srv.get("/api/history").json()["rounds"]  # noqa: E731
        rounds = wait_until(lambda: len(history()) >= 2 and history(), 180, "two rounds of the own module")
        for pid in (srv.proc.pid, procs[0].pid):
            maps = Path(f"/proc/{pid}/maps").read_text()
            assert "libtorch" in maps and "tensorflow" not in maps, pid
        assert rounds[1]["num_examples"] == 600 and set(rounds[1]["devices"]) == {"device1"}
        accuracy = rounds[1]["test_accuracy"]
        assert accuracy > 0.15, f"above chance (0.1) after two rounds: {accuracy}"

        exported = srv.admin("GET", "/api/rounds/2/model.keras")
        assert 'filename="fedhub_round_00002.pt2"' in exported.headers["Content-Disposition"]
        program = torch.export.load(io.BytesIO(exported.content))
        with torch.no_grad():
            predicted = program.module()(torch.from_numpy(x_test[:300])).numpy().argmax(axis=1)
        assert float((predicted == y_test[:300]).mean()) == pytest.approx(accuracy, abs=1 / 300)

        picture = io.BytesIO()
        Image.fromarray(x_test[0], "RGB").save(picture, "PNG")
        answer = srv.admin("POST", "/api/predict", files={"image": ("cat.png", picture.getvalue())})
        assert answer.status_code == 200, answer.text
        assert answer.json()["class_names"] == CIFAR_CLASSES
    finally:
        stop_processes(procs)
        srv.stop()


def test_a_factory_that_is_no_module_or_does_not_fit_is_one_line(torch_one_thread):
    torch_framework = frameworks.get("torch")
    with pytest.raises(ValueError, match=r"returned str, not a torch.nn.Module"):
        torch_framework.from_factory("tests.torch_factory:not_a_module", dataset="cifar-10")
    with pytest.raises(ValueError, match=r"cannot take one fashion-mnist image \(float32 \(1, 1, 28, 28\)\)"):
        torch_framework.from_factory(FACTORY, dataset="fashion-mnist")
    with pytest.raises(ValueError, match="cannot be loaded"):
        torch_framework.from_factory("tests.torch_factory:missing", dataset="cifar-10")
    network = torch_framework.from_factory(FACTORY, dataset="cifar-10")
    assert (network.mean, network.std, network.factory) == (0.5, 0.25, FACTORY)
    assert list(network.get_weights()) == ["features.0.weight", "features.0.bias", "head.weight", "head.bias"]
