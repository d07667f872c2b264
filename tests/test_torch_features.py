"""Every feature family once with PyTorch: the real ``server.py --framework torch --dataset
cifar-10`` and real ``device/device.py`` processes on small real CIFAR-10 shares (300 images a
device, 200 test images, 2 rounds).

Compatible features share a run, so four runs cover them all (the server refuses the rest
together at start-up, fedhub/engine/config.py):

- robust: Krum against a device declaring a scaling attack, with top-k compressed updates and
  local DP on the devices;
- averaging: FedAvg under central DP with q8 compressed updates, TensorBoard on, then the
  confusion matrix, validation, export and a colour picture's prediction of its round 2;
- secure aggregation with distributed DP (which needs it), under FedAvgM;
- asynchronous rounds (FedBuff) under FedAdam, a server optimizer.

The Keras live tests (test_keras_live, test_privacy_live, test_secagg_live,
test_compression_live, test_strategies_live, test_async, test_tensorboard) check the same
mechanisms on other models; their helpers are reused here.
"""

from __future__ import annotations

import base64
import io
import shutil
import sqlite3
import subprocess
import sys

import numpy as np
import pytest
import requests
from PIL import Image

from fedhub import datasets
from fedhub.device.launcher import stop
from fedhub.device.runner import RESIDUAL_FILE
from fedhub.engine import wire
from fedhub.engine.privacy import PrivacyAccountant
from tests.conftest import CIFAR_DIR, ONE_THREAD
from tests.test_keras_live import checkpoint, run

from .conftest import ROOT, ServerProcess, launch_devices, wait_until

pytestmark = pytest.mark.slow  # real server and device processes, PyTorch in each

TORCH = ("--framework", "torch", "--dataset", "cifar-10", "--auto-activate", "--start", "--rounds", "2",
         "--quorum", "1", "--round-timeout", "120", "--test-limit", "200")
NAMES = ["device1", "device2", "device3"]
PARAMETERS = 62_006  # the seed's CIFAR-10 CNN


@pytest.fixture(scope="module")
def shares(tmp_path_factory):
    """Three devices' real CIFAR-10 shares of 300 images, split once by the real CLI."""
    root = tmp_path_factory.mktemp("cifar") / "devices"
    split = subprocess.run(
        [sys.executable, "-m", "fedhub.split", "--devices", "3", "--dataset", "cifar-10",
         "--limit", "300", "--data-dir", str(CIFAR_DIR), "--out", str(root), "--quiet"],
        cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert split.returncode == 0, split.stderr
    return root


@pytest.fixture
def federation(tmp_path, shares, monkeypatch):
    """``federation(*server_args)``: a started PyTorch server and a fresh copy of the shares (a
    device keeps state in its folder: a residual, its history). Every process trains with one
    thread: the machine is shared."""
    for key, value in ONE_THREAD.items():
        monkeypatch.setenv(key, value)
    servers = []

    def make(*args: str) -> tuple[ServerProcess, object]:
        root = tmp_path / "devices"
        shutil.copytree(shares, root)
        server = ServerProcess(tmp_path, CIFAR_DIR, *TORCH, *args)
        servers.append(server)
        return server.start(), root

    yield make
    for server in servers:
        server.stop()


def change(server: ServerProcess, number: int) -> np.ndarray:
    """Every parameter's change from round ``number - 1``'s global model to round ``number``'s."""
    before, after = checkpoint(server, number - 1), checkpoint(server, number)
    assert set(before) == set(after)
    return np.concatenate([(after[k].astype(np.float64) - before[k]).ravel() for k in sorted(before)])


def device_log(root, name: str) -> str:
    return (root.parent / "logs" / f"{name}.log").read_text(errors="replace")


def test_krum_rejects_a_declared_attacker_under_top_k_and_local_dp(federation):
    """Krum (f=0) keeps one honest update and rejects the device scaling its change by 100;
    top-k sends a tenth of each change (the global change, one device's, is that sparse) and
    keeps the rest as a residual; local DP clips and noises on the devices, epsilon per round."""
    z, clip = 1.0, 0.5
    server, root = federation("--min-devices", "3", "--no-tensorboard", "--strategy", "krum",
                              "--compression", "topk:0.1", "--dp", "local",
                              "--dp-noise-multiplier", str(z), "--dp-clip", str(clip))
    status = server.get("/api/status").json()
    assert status["compression"]["uplink"] == "topk:0.1"
    honest = launch_devices(server, root, NAMES[:2])
    attacker = launch_devices(server, root, NAMES[2:], "--attack", "scale", "--attack-arg", "factor=100")
    try:
        wait_until(lambda: server.get("/api/status").json()["status"] == "finished", 150, "the run")
        devices = {d["name"]: d for d in server.get("/api/devices").json()["devices"]}
    finally:
        stop(honest + attacker)
    rounds = server.get("/api/history").json()["rounds"]
    assert [r["round"] for r in rounds] == [1, 2]
    assert devices["device3"]["attack"] == {"kind": "scale", "params": {"factor": 100.0}}
    assert devices["device1"]["attack"] is None
    accountant = PrivacyAccountant(delta=1e-5)
    for entry in rounds:
        assert entry["strategy"]["name"] == "dp-local(krum)" and entry["num_updates"] == 3
        assert entry["num_used"] == 1
        outcome = entry["devices"]["device3"]["aggregation"]
        assert outcome["status"] == "rejected" and "Krum score" in outcome["reason"], outcome
        p = entry["privacy"]
        assert p["mode"] == "local" and p["epsilon"] == pytest.approx(accountant.record_round(1.0, z / 2),
                                                                      rel=1e-9)
        moved = change(server, entry["round"])
        assert moved.size == PARAMETERS
        # Krum's choice is one device's top-k update: at most a tenth of the coordinates moved.
        assert 0 < np.count_nonzero(moved) <= 0.1 * PARAMETERS + 10
    for name in NAMES:
        log = device_log(root, name)
        assert f"round 1: local DP: change clipped to L2 norm {clip:g}, Gaussian noise of std " \
               f"{z * clip:g} added" in log, log[-2000:]
        residual, _ = wire.decode((root / name / RESIDUAL_FILE).read_bytes())
        kept = np.concatenate([v.ravel() for v in residual.values()])
        assert kept.size == PARAMETERS and np.count_nonzero(kept) > 0.5 * PARAMETERS, \
            "top-k keeps the unsent rest on the device"


def test_fedavg_central_dp_q8_tensorboard_and_the_round_s_model(federation, tmp_path):
    """FedAvg under central DP with q8 updates: each round moves the model by noise of std
    z·C/n, epsilon is the accountant's; TensorBoard's event files hold the history's accuracy;
    round 2's confusion matrix, validation, export and a colour picture's prediction agree."""
    import torch

    from tests.test_tensorboard import read_run

    z, clip, names = 1.0, 0.5, NAMES[:2]
    server, root = federation("--min-devices", "2", "--compression", "q8", "--dp", "central-fixed",
                              "--dp-noise-multiplier", str(z), "--dp-clip", str(clip),
                              "--runs-dir", str(tmp_path / "runs"), "--run-id", "torch-run")
    rounds = run(server, root, names)
    assert [r["round"] for r in rounds] == [1, 2]
    status = server.get("/api/status").json()
    # The server refuses an update not compressed as announced (field "compression"): every
    # device's update counted below went as q8.
    assert status["compression"]["uplink"] == "q8"
    accountant = PrivacyAccountant(delta=1e-5)
    for entry in rounds:
        assert sorted(entry["devices"]) == names and entry["num_examples"] == 600
        p = entry["privacy"]
        assert (p["mode"], p["noise_multiplier"], p["clipping_norm"]) == ("central-fixed", z, clip)
        assert p["epsilon"] == pytest.approx(accountant.record_round(1.0, z), rel=1e-9)
        # the clipped mean moves by an L2 norm of at most C; the noise is what the change is made of
        assert np.std(change(server, entry["round"])) == pytest.approx(z * clip / 2, rel=0.02)
    assert status["privacy"]["epsilon"] == pytest.approx(rounds[-1]["privacy"]["epsilon"])
    for name in names:
        assert "round 2: loss" in device_log(root, name)

    run_dir = tmp_path / "runs" / "torch-run"
    assert sorted(p.name for p in run_dir.iterdir() if p.is_dir()) == ["device1", "device2", "global"]
    scalars = read_run(run_dir / "global")
    for entry in rounds:
        assert scalars["test_accuracy"][entry["round"]] == pytest.approx(entry["test_accuracy"], rel=1e-6)
        assert scalars["num_examples"][entry["round"]] == 600

    evaluation = server.admin("GET", "/api/rounds/2/evaluation").json()
    classes = list(datasets.get("cifar-10").class_names)
    assert evaluation["class_names"] == classes
    confusion = np.asarray(evaluation["confusion_matrix"])
    assert confusion.shape == (10, 10) and confusion.sum() == 200
    assert np.trace(confusion) / 200 == pytest.approx(rounds[1]["test_accuracy"])

    (_, _), (x_test, y_test) = datasets.load("cifar-10", CIFAR_DIR)
    body = io.BytesIO()
    np.savez(body, x=x_test[:200], y=y_test[:200])
    checked = requests.post(f"{server.url}/api/rounds/2/validate", data=body.getvalue(), timeout=60,
                            headers={"Authorization": f"Bearer {server.admin_token}",
                                     "Content-Type": "application/octet-stream"})
    assert checked.status_code == 200, checked.text
    assert checked.json()["accuracy"] == pytest.approx(rounds[1]["test_accuracy"])

    exported = server.admin("GET", "/api/rounds/2/model.keras")
    assert exported.status_code == 200 and exported.headers["Content-Disposition"].endswith('.pt2"')
    program = torch.export.load(io.BytesIO(exported.content))
    with torch.no_grad():
        predicted = program.module()(torch.from_numpy(x_test[:200])).numpy().argmax(axis=1)
    assert float((predicted == y_test[:200]).mean()) == pytest.approx(rounds[1]["test_accuracy"])

    picture = io.BytesIO()
    Image.fromarray(x_test[0], "RGB").save(picture, "PNG")
    answer = server.admin("POST", "/api/predict", files={"image": ("ship.png", picture.getvalue())})
    assert answer.status_code == 200, answer.text
    said = answer.json()
    assert said["class_names"] == classes and said["class_name"] == classes[int(predicted[0])]
    shown = np.asarray(Image.open(io.BytesIO(base64.b64decode(said["input_png"]))))
    assert np.array_equal(shown, x_test[0]), "the network saw the 32x32 colour picture itself"


def test_secure_aggregation_with_distributed_dp(federation):
    """SecAgg+ over three PyTorch devices, each adding its share of the noise before masking: the
    server stores no update, unmasks only the sum, and the new model moves by noise of std z·C/3
    (the masked mean carries it); epsilon counts as central DP's."""
    z, clip = 1.0, 0.5
    server, root = federation("--min-devices", "3", "--no-tensorboard", "--strategy", "fedavgm",
                              "--secure-aggregation", "--secagg-clip", "2", "--dp", "distributed",
                              "--dp-noise-multiplier", str(z), "--dp-clip", str(clip))
    rounds = run(server, root, NAMES)
    assert [r["round"] for r in rounds] == [1, 2]
    accountant = PrivacyAccountant(delta=1e-5)
    for entry in rounds:
        secagg = entry["secagg"]
        assert secagg["enabled"] and secagg["survivors"] == 3 and entry["num_updates"] == 3, secagg
        assert secagg["recovered"] == []
        assert entry["strategy"]["name"] == "dp-distributed(fedavgm)", entry["strategy"]
        p = entry["privacy"]
        assert p["mode"] == "distributed" and p["epsilon"] == pytest.approx(
            accountant.record_round(1.0, z), rel=1e-9)
    # Round 1 has no server momentum yet: the change is the unmasked mean, noise of std z·C/3.
    assert np.std(change(server, 1)) == pytest.approx(z * clip / 3, rel=0.05)
    assert "round 2: secure aggregation stage 'unmask'" in server.log()
    db = sqlite3.connect(server.state_dir / "fedhub.sqlite3")
    assert db.execute("SELECT COUNT(*) FROM updates").fetchone() == (0,), "no update stored"
    for name in NAMES:
        assert "masked update sent" in device_log(root, name)


def test_asynchronous_rounds_under_fedadam(federation):
    """--mode async with FedAdam: each version folds the buffer's two updates as they come, and
    records each one's base version and staleness."""
    server, root = federation("--min-devices", "1", "--no-tensorboard", "--mode", "async", "--buffer", "2",
                              "--max-staleness", "3", "--strategy", "fedadam")
    rounds = run(server, root, NAMES[:2])
    assert [h["model_version"] for h in rounds] == [1, 2]
    for entry in rounds:
        assert entry["mode"] == "async" and entry["num_updates"] == 2 and len(entry["updates"]) == 2
        assert entry["strategy"]["name"] == "fedadam"
        assert all(u["staleness"] <= 3 and u["base_version"] < entry["model_version"]
                   for u in entry["updates"])
        assert entry["test_accuracy"] is not None
    assert np.abs(change(server, 2)).max() > 0, "FedAdam moved the model"
