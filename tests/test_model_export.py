"""Model export (.keras of any completed round) and validation of an uploaded labelled .npz,
against a real server after a real one-round run on Fashion-MNIST subsets."""

import io

import numpy as np
import pytest
import requests

from fedhub.device.launcher import launch, stop
from fedhub.engine import wire
from fedhub.split import load_fashion_mnist, split_to_devices
from tests.conftest import ServerProcess

TEST_LIMIT = 300


def validate(server, body: bytes, round_text: str = "1", ctype: str = "application/octet-stream"):
    return requests.post(f"{server.url}/api/rounds/{round_text}/validate", data=body, timeout=60,
                         headers={"Authorization": f"Bearer {server.admin_token}", "Content-Type": ctype})


def npz(**arrays) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def finished_server(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("export")
    split_to_devices(tmp / "devices", 1, data_dir=data_dir, limit=500, progress=False)
    server = ServerProcess(tmp, data_dir, "--rounds", "1", "--auto-activate", "--start", "--test-limit",
                           str(TEST_LIMIT), "--no-tensorboard").start()
    procs = launch(server.url, ["device1"], devices_root=tmp / "devices", extra_args=["--poll-wait", "2"],
                   env={"FEDHUB_ENROLL_SECRET": server.enroll_secret}, log_dir=tmp / "logs")
    try:
        assert procs[0].wait(180) == 0, (tmp / "logs" / "device1.log").read_text() + server.log()
    finally:
        stop(procs)
    yield server, tmp
    server.stop()


@pytest.mark.slow
def test_export_loads_in_plain_keras(finished_server):
    import keras

    server, tmp = finished_server
    weights, _ = wire.decode(server.admin("GET", "/api/model").content)
    for round_text, version in [("1", 1), ("latest", 1), ("0", 0)]:
        r = server.admin("GET", f"/api/rounds/{round_text}/model.keras")
        assert r.status_code == 200 and r.headers["X-Model-Version"] == str(version)
        assert f"fedhub_round_{version:05d}.keras" in r.headers["Content-Disposition"]
        path = tmp / f"round-{round_text}.keras"
        path.write_bytes(r.content)
        loaded = keras.saving.load_model(path)  # plain Keras, safe mode (its default)
        expected = weights if version == 1 else wire.decode(
            (tmp / "server_training" / "saved" / "round_00000.safetensors").read_bytes())[0]
        assert loaded.name == "fedhub_basic" and len(loaded.weights) == len(expected)
        for v in loaded.weights:  # plain Keras drops the model-name prefix from loaded paths
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), expected[f"{loaded.name}/{v.path}"])
    # errors: unknown round, not a round, no token
    assert server.admin("GET", "/api/rounds/7/model.keras").status_code == 404
    r = server.admin("GET", "/api/rounds/one/model.keras")
    assert r.status_code == 400 and r.json()["field"] == "round"
    assert server.get("/api/rounds/1/model.keras").status_code == 401


@pytest.mark.slow
def test_validation_of_an_uploaded_dataset(finished_server, data_dir):
    server, _ = finished_server
    _, (x_test, y_test) = load_fashion_mnist(data_dir)
    x, y = x_test[:TEST_LIMIT], y_test[:TEST_LIMIT]
    r = validate(server, npz(x=x, y=y))
    assert r.status_code == 200, r.text
    report = r.json()
    # the same images as the server's own test set: the same accuracy and loss as the history
    history = server.get("/api/history").json()["rounds"][0]
    assert report["round"] == 1 and report["num_examples"] == TEST_LIMIT
    assert report["accuracy"] == pytest.approx(history["test_accuracy"], abs=1e-6)
    assert report["loss"] == pytest.approx(history["test_loss"], rel=1e-4)
    confusion = np.array(report["confusion_matrix"])
    assert confusion.shape == (10, 10) and confusion.sum() == TEST_LIMIT
    assert np.trace(confusion) / TEST_LIMIT == pytest.approx(report["accuracy"])
    counts = np.bincount(y, minlength=10)
    assert (confusion.sum(axis=1) == counts).all()
    for k in range(10):
        assert report["per_class_accuracy"][k] == pytest.approx(confusion[k, k] / counts[k])
    # float images in 0..1 and (N, 28, 28, 1) are accepted too, as in training
    r = validate(server, npz(x=(x[..., None] / 255.0).astype(np.float32), y=y))
    assert r.json()["accuracy"] == pytest.approx(report["accuracy"])


@pytest.mark.slow
def test_validation_refusals(finished_server, data_dir):
    server, _ = finished_server
    x = np.zeros((20, 28, 28), np.uint8)
    y = np.arange(20, dtype=np.int64) % 10
    object_labels = io.BytesIO()
    np.savez(object_labels, x=x, y=np.array([{"a": 1}] * 20, dtype=object))
    cases = [
        (b"not an npz", 400, "body"),
        (npz(x=x), 400, "y"),
        (npz(images=x, labels=y), 400, "x"),
        (npz(x=np.zeros((20, 27, 27), np.uint8), y=y), 400, "x"),
        (npz(x=np.zeros((0, 28, 28), np.uint8), y=y[:0]), 400, "x"),
        (npz(x=np.full((20, 28, 28), 200.0, np.float32), y=y), 400, "x"),  # floats must be 0..1
        (npz(x=np.full((20, 28, 28), np.nan, np.float32), y=y), 400, "x"),
        (npz(x=x, y=y + 5), 400, "y"),
        (npz(x=x, y=y.astype(np.float32)), 400, "y"),
        (npz(x=x, y=y[:10]), 400, "y"),
        (object_labels.getvalue(), 400, "y"),  # never unpickled
    ]
    for body, status, field in cases:
        r = validate(server, body)
        assert r.status_code == status and r.json()["field"] == field, (field, r.text)
        assert r.json()["message"]
    r = validate(server, npz(x=x, y=y), ctype="text/plain")
    assert r.status_code == 400 and r.json()["field"] == "Content-Type"
    assert validate(server, npz(x=x, y=y), round_text="9").status_code == 404
    assert server.get("/api/rounds/1/validate").status_code == 405
    r = server.get("/health")
    assert r.ok  # the server is still fine after all that
