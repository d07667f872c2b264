"""Secure aggregation through the real server and real device processes, on small digits data.

The devices train ``tests.seeded_digits``' deterministic softmax regression, so the test can
train each one's update again from the same global model and check what the server made of
the masked uploads: the weighted mean of the clipped updates, within one quantization step.
"""

from __future__ import annotations

import re
import sqlite3

import numpy as np

from device.launcher import stop
from examples import digits
from fedcore import wire
from fedcore.secagg.params import levels_for
from tests.seeded_digits import SeededSoftmaxTrainer

from .conftest import ServerProcess, launch_devices, wait_until

TRAINING = {"learning_rate": 0.5, "epochs": 1, "batch_size": 16}
CLIP = 0.05  # small enough that digits' updates are clipped: the check covers the clipping too
MAX_WEIGHT = 1000
NAMES = ["digits1", "digits2", "digits3", "digits4"]


def secagg_server(tmp_path, data_dir, root, *args: str) -> ServerProcess:
    return ServerProcess(
        tmp_path, data_dir, "--model-factory", "tests.seeded_digits:build_model",
        "--test-data", str(root / "test.npz"), "--min-devices", str(len(NAMES)), "--quorum", "1",
        "--learning-rate", str(TRAINING["learning_rate"]), "--epochs", str(TRAINING["epochs"]),
        "--batch-size", str(TRAINING["batch_size"]), "--auto-activate", "--start", "--no-tensorboard",
        "--round-timeout", "20", "--secure-aggregation", "--secagg-clip", str(CLIP),
        "--secagg-max-weight", str(MAX_WEIGHT), *args)


def checkpoint(server: ServerProcess, number: int) -> dict[str, np.ndarray]:
    weights, _ = wire.decode((server.state_dir / "saved" / f"round_{number:05d}.safetensors").read_bytes())
    return weights


def history(server: ServerProcess) -> list[dict]:
    return server.get("/api/history").json()["rounds"]


def finished(server: ServerProcess) -> bool:
    return server.get("/api/status").json()["status"] == "finished"


def expected_mean(root, names, start: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The example-weighted mean of the named devices' clipped updates from ``start``."""
    total, weight = None, 0
    for name in names:
        result = SeededSoftmaxTrainer(root / name / "data").train(start, TRAINING)
        w = min(result.num_examples, MAX_WEIGHT)
        clipped = {k: np.clip(result.weights[k].astype(np.float64) - start[k], -CLIP, CLIP) * w
                   for k in start}
        total = clipped if total is None else {k: total[k] + clipped[k] for k in total}
        weight += w
    return {k: v / weight for k, v in total.items()}


def test_masked_rounds_give_the_weighted_mean_and_recover_a_dropout(tmp_path, data_dir):
    root = tmp_path / "devices"
    digits.split(root, len(NAMES), limit=120)
    server = secagg_server(tmp_path, data_dir, root, "--rounds", "2").start()
    trainer = ("--trainer", "tests.seeded_digits:SeededSoftmaxTrainer")
    procs = launch_devices(server, root, NAMES[:3], *trainer)
    procs += launch_devices(server, root, NAMES[3:], *trainer, "--secagg-dropout", "1")
    try:
        assert server.get("/api/status").json()["secure_aggregation"]["clip_range"] == CLIP
        wait_until(lambda: finished(server), 50, "two secure rounds")
        rounds = history(server)
    finally:
        stop(procs)
        server.stop()
    assert [r["round"] for r in rounds] == [1, 2]
    levels = levels_for(32, len(NAMES), MAX_WEIGHT)
    for entry in rounds:
        secagg = entry["secagg"]
        assert secagg["enabled"] and secagg["threshold"] == 3 and secagg["shares"] == 4
        assert secagg["survivors"] == 3 and secagg["recovered"] == ["digits4"], secagg
        assert entry["num_updates"] == 3
        start, end = checkpoint(server, entry["round"] - 1), checkpoint(server, entry["round"])
        want = expected_mean(root, NAMES[:3], start)
        for k in start:
            got = end[k].astype(np.float64) - start[k]
            # one quantization step, plus float32 rounding of the new global model
            np.testing.assert_allclose(got, want[k], rtol=0, atol=CLIP / levels + 1e-6)
            assert np.abs(want[k]).max() > 10 * CLIP / levels, "the check is not trivially met"

    # Nothing the server keeps holds one device's update: not its database, checkpoints or log.
    update = SeededSoftmaxTrainer(root / "digits1" / "data").train(checkpoint(server, 0), TRAINING).weights
    kept = b"".join(p.read_bytes() for p in server.state_dir.rglob("*") if p.is_file())
    kept += server.log_path.read_bytes()
    for k, a in update.items():
        assert a.tobytes()[:64] not in kept, f"{k} of digits1's update is stored"
    db = sqlite3.connect(server.state_dir / "fedhub.sqlite3")
    assert db.execute("SELECT COUNT(*) FROM updates").fetchone() == (0,)
    assert re.search(r"round 2: secure aggregation stage 'unmask'", server.log())
