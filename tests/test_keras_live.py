"""Differential privacy and secure aggregation with FedHub's own Keras ``basic`` model (101,770
parameters), over HTTP, with real device processes on small real Fashion-MNIST subsets.

The other live DP and secure-aggregation tests use a small NumPy model on scikit-learn's digits,
which lets them retrain each update by hand; these two show that the same mechanisms hold with
the model and data a user runs. Each takes well under a minute.
"""

from __future__ import annotations

import sqlite3

import numpy as np
import pytest

from fedhub.device.launcher import stop
from fedhub.engine import wire
from fedhub.engine.privacy import PrivacyAccountant
from fedhub.engine.secagg.params import levels_for
from tests.recording_trainer import recorded

from .conftest import launch_devices, wait_until

pytestmark = pytest.mark.slow  # real server and device processes, TensorFlow in each

COMMON = ("--auto-activate", "--start", "--no-tensorboard", "--quorum", "1", "--test-limit", "500",
          "--round-timeout", "120")


def checkpoint(server, number: int) -> dict[str, np.ndarray]:
    weights, _ = wire.decode((server.state_dir / "saved" / f"round_{number:05d}.safetensors").read_bytes())
    return weights


def run(server, root, names, *device_args: str) -> list[dict]:
    procs = launch_devices(server, root, names, *device_args)
    try:
        wait_until(lambda: server.get("/api/status").json()["status"] == "finished", 150, "the run")
    finally:
        stop(procs)
    return server.get("/api/history").json()["rounds"]


def test_central_dp_noises_the_keras_models_mean_as_promised(server_factory, split_devices):
    """--dp central-fixed: each round's new global model is the old one plus the mean of the
    clipped changes plus Gaussian noise of standard deviation z·C/n on every one of the basic
    model's parameters; epsilon is the accountant's own figure."""
    z, clip, names = 1.0, 0.5, ["device1", "device2"]
    root = split_devices(len(names), 300)
    server = server_factory(*COMMON, "--rounds", "2", "--min-devices", "2", "--dp", "central-fixed",
                            "--dp-noise-multiplier", str(z), "--dp-clip", str(clip)).start()
    rounds = run(server, root, names)
    accountant = PrivacyAccountant(delta=1e-5)
    assert [r["round"] for r in rounds] == [1, 2]
    for entry in rounds:
        assert sorted(entry["devices"]) == names and entry["num_examples"] == 600
        p = entry["privacy"]
        assert (p["mode"], p["noise_multiplier"], p["clipping_norm"], p["sampling_rate"]) == (
            "central-fixed", z, clip, 1.0)
        assert p["noise_std"] == pytest.approx(z * clip / len(names))
        assert p["epsilon"] == pytest.approx(accountant.record_round(1.0, z), rel=1e-9)
        before, after = checkpoint(server, entry["round"] - 1), checkpoint(server, entry["round"])
        change = np.concatenate([(after[k].astype(np.float64) - before[k]).ravel() for k in before])
        assert change.size == 101_770
        # The clipped mean moves the model by an L2 norm of at most C (an RMS of C/sqrt(101,770),
        # 0.0016 per parameter); the noise, 0.25 per parameter, is what the change is made of.
        assert np.std(change) == pytest.approx(z * clip / len(names), rel=0.01)
    status = server.get("/api/status").json()
    assert status["privacy"]["epsilon"] == pytest.approx(rounds[-1]["privacy"]["epsilon"])


def test_secure_aggregation_gives_the_keras_models_weighted_mean(server_factory, split_devices):
    """--secure-aggregation: the server sees only masked sums, and each round's new global model
    is the example-weighted mean of the devices' clipped Keras updates, within one quantization
    step. The devices record what they trained (tests.recording_trainer) to check it."""
    clip, max_weight, names = 0.004, 1000, ["device1", "device2", "device3"]
    root = split_devices(len(names), 300)
    server = server_factory(*COMMON, "--rounds", "2", "--min-devices", "3", "--secure-aggregation",
                            "--secagg-clip", str(clip), "--secagg-max-weight", str(max_weight)).start()
    rounds = run(server, root, names, "--trainer", "tests.recording_trainer:from_folder")
    assert [r["round"] for r in rounds] == [1, 2]
    levels = levels_for(32, len(names), max_weight)
    trained = {name: recorded(root / name) for name in names}
    assert all(len(calls) == 2 for calls in trained.values()), {n: len(c) for n, c in trained.items()}
    clipped_somewhere = False
    for entry in rounds:
        secagg = entry["secagg"]
        assert secagg["enabled"] and secagg["survivors"] == 3 and entry["num_updates"] == 3, secagg
        start, end = checkpoint(server, entry["round"] - 1), checkpoint(server, entry["round"])
        total, weight = {k: np.zeros(a.shape) for k, a in start.items()}, 0
        for name in names:
            began, finished_with = trained[name][entry["round"] - 1]
            for k in start:  # each device trained from this round's global model
                np.testing.assert_array_equal(began[k], start[k])
            w = min(300, max_weight)
            for k in start:
                change = finished_with[k].astype(np.float64) - start[k]
                clipped_somewhere |= bool(np.any(np.abs(change) > clip))
                total[k] += np.clip(change, -clip, clip) * w
            weight += w
        for k in start:
            want = total[k] / weight
            got = end[k].astype(np.float64) - start[k]
            # one quantization step, plus the float32 rounding of the new global model
            np.testing.assert_allclose(got, want, rtol=0, atol=clip / levels + 1e-6, err_msg=k)
        assert max(np.abs(total[k] / weight).max() for k in start) > 10 * clip / levels, "trivially met"
    assert clipped_somewhere, "the clip range should cut some of the Keras updates' changes"
    assert rounds[-1]["test_accuracy"] > 0.3  # chance is 0.1: the masks cancelled into a useful model
    db = sqlite3.connect(server.state_dir / "fedhub.sqlite3")
    assert db.execute("SELECT COUNT(*) FROM updates").fetchone() == (0,)
