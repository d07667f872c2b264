"""Distributed differential privacy: each device clips its change and adds its share of the noise
before secure aggregation masks it, so the server only ever unmasks a noisy sum.

Pure checks of the share (its std is z x C / sqrt(n), the clip holds, the task carries both),
then a real server with real device processes (``tests.seeded_digits``' deterministic softmax
trainer, so the test can train each update again and know the noiseless mean): epsilon per
round as the accountant counts it, the budget ending the run, the aggregate off the noiseless
mean by noise of the expected size, and the start-up refusals of wrong combinations.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from examples import digits
from fedhub.device.launcher import stop
from fedhub.engine.config import FederationConfig
from fedhub.engine.privacy import (
    DistributedDP,
    DPConfig,
    PrivacyAccountant,
    add_noise_share,
    distributed_dp_task,
    l2_norm,
)
from fedhub.engine.secagg import SecAggConfig
from fedhub.engine.strategies import FedAvg
from tests.seeded_digits import SeededSoftmaxTrainer

from .conftest import ServerProcess, launch_devices, wait_until
from .test_secagg_live import checkpoint, history
from .test_strategies_live import run_cli

Z, C = 1.0, 0.05
NAMES = ["digits1", "digits2", "digits3"]
TRAINING = {"learning_rate": 0.5, "epochs": 1, "batch_size": 16}


# pure -------------------------------------------------------------------------------------------
def test_the_noise_share_has_std_z_c_over_sqrt_n_and_the_change_is_clipped():
    strategy = DPConfig(mode="distributed", noise_multiplier=2.0, clipping_norm=0.5).wrap(FedAvg(), 4)
    assert isinstance(strategy, DistributedDP)
    clip, std = distributed_dp_task(strategy.task_config())
    assert clip == 0.5 and std == pytest.approx(2.0 * 0.5 / math.sqrt(4))
    change = np.full(200_000, 0.01)  # L2 norm about 4.5, far above the bound
    noised, clipped = add_noise_share(change, clip, std, np.random.default_rng(1))
    assert clipped.clipped and clipped.norm == pytest.approx(l2_norm({"v": change}))
    clipped_change = change * (0.5 / clipped.norm)
    assert l2_norm({"v": clipped_change}) == pytest.approx(0.5)
    noise = noised - clipped_change
    assert abs(noise.mean()) < 5 * std / math.sqrt(noise.size)
    assert noise.std() == pytest.approx(std, rel=0.01)
    # The sum of n shares carries noise of std z x C, as central DP adds.
    shares = sum(add_noise_share(np.zeros(50_000), clip, std)[0] for _ in range(4))
    assert shares.std() == pytest.approx(2.0 * 0.5, rel=0.02)
    # Without noise, only the clip: a change under the bound goes through unchanged.
    small = np.full(10, 0.01)
    same, record = add_noise_share(small, clip, 0.0)
    assert not record.clipped and np.array_equal(same, small)


def test_fewer_survivors_than_n_are_counted_with_the_noise_they_added():
    strategy = DistributedDP(FedAvg(), 1.2, 0.1, 4)
    assert strategy.accounted(0.5) == (0.5, 1.2)
    assert strategy.accounted(0.5, 6) == (0.5, 1.2)  # more noise than counted: never less private
    assert strategy.accounted(0.5, 3) == (0.5, pytest.approx(1.2 * math.sqrt(3 / 4)))


def test_the_accountant_is_strategy_state_restored_and_reset():
    """What a restart restores (the state saved beside a checkpoint) and what --reset clears."""
    template = {"w": np.zeros(3, dtype=np.float32)}
    first = DistributedDP(FedAvg(), 1.0, 0.1, 3, max_epsilon=50.0)
    for survivors in (3, 2):  # two rounds, the second with only 2 of the 3 devices surviving
        aggregator = first.begin(template)
        aggregator.add_secure_mean(["a", "b", "c"][:survivors], {"w": np.full(3, 0.01)}, survivors)
        result = aggregator.result()
        first.load_state(result.state)  # adopted once the round is durable
    accountant = PrivacyAccountant(delta=1e-5)
    accountant.record_round(1.0, 1.0)
    want = accountant.record_round(1.0, math.sqrt(2 / 3))
    assert result.metrics["privacy"]["epsilon"] == pytest.approx(want, rel=1e-9)
    assert result.metrics["privacy"]["noise_multiplier"] == pytest.approx(math.sqrt(2 / 3))
    restarted = DistributedDP(FedAvg(), 1.0, 0.1, 3, max_epsilon=50.0)
    restarted.load_state(first.state())
    assert restarted.privacy()["epsilon"] == pytest.approx(want, rel=1e-9)
    assert restarted.privacy()["rounds"] == 2
    restarted.reset()
    assert restarted.privacy()["epsilon"] == 0 and restarted.privacy()["rounds"] == 0


@pytest.mark.parametrize("task, message", [
    ({"dp_share_clipping_norm": 1.0}, "dp_share_noise_std must be a number"),
    ({"dp_share_clipping_norm": "1", "dp_share_noise_std": 0.1}, "dp_share_clipping_norm must be a number"),
    ({"dp_share_clipping_norm": 0, "dp_share_noise_std": 0.1}, "must be a positive number"),
    ({"dp_share_clipping_norm": 1, "dp_share_noise_std": -1}, "must be a non-negative number"),
])
def test_a_malformed_noise_share_task_is_refused(task, message):
    with pytest.raises(ValueError, match=message):
        distributed_dp_task(task)


@pytest.mark.parametrize("settings, message", [
    ({"dp": {"mode": "distributed"}}, "dp.mode=distributed needs secagg"),
    ({"dp": {"mode": "central-fixed"}, "secagg": SecAggConfig()},
     "dp.mode=central-fixed cannot be used with secagg"),
    ({"dp": {"mode": "local"}, "secagg": SecAggConfig()},
     "dp.mode=local cannot be used with secagg"),
    ({"dp": {"mode": "distributed", "clipping_norm": 0.5}, "secagg": SecAggConfig(clip_range=1.0)},
     "secagg.clip_range 1 is too small for dp.mode=distributed: raise it to at least 1.655"),
    ({"dp": {"mode": "distributed"}, "secagg": SecAggConfig(), "strategy": "fedmedian"},
     "distributed DP wraps an averaging strategy"),
])
def test_wrong_combinations_are_refused(settings, message):
    config = FederationConfig(min_devices=3, **settings)
    with pytest.raises(ValueError, match=message):
        config.validate()


# real processes ----------------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("args, message", [
    (["--dp", "distributed"], "error: --dp=distributed needs --secure-aggregation"),
    (["--secure-aggregation", "--min-devices", "3", "--dp", "central-fixed"],
     "error: --dp=central-fixed cannot be used with --secure-aggregation: central DP clips"),
    (["--secure-aggregation", "--min-devices", "2", "--dp", "distributed"],
     "error: --secagg-clip-range 0.5 is too small for --dp=distributed: raise it to at least 3.828"),
])
def test_the_real_server_refuses_wrong_combinations_with_one_line(args, message):
    out = run_cli("server.py", *args)
    assert out.returncode == 2 and out.stderr.startswith(message), out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def noiseless_mean(root, start: dict[str, np.ndarray], names=NAMES) -> dict[str, np.ndarray]:
    """The plain mean of the devices' changes from ``start``, each clipped to L2 norm C."""
    changes = []
    for name in names:
        trained = SeededSoftmaxTrainer(root / name / "data").train(start, TRAINING).weights
        change = {k: trained[k].astype(np.float64) - start[k] for k in start}
        scale = min(1.0, C / l2_norm(change))
        changes.append({k: v * scale for k, v in change.items()})
    return {k: sum(c[k] for c in changes) / len(changes) for k in start}


def ddp_server(tmp_path, data_dir, root, devices: int, *args: str) -> ServerProcess:
    digits.split(root, devices, limit=120)
    return ServerProcess(
        tmp_path, data_dir, "--model-factory", "tests.seeded_digits:build_model",
        "--test-data", str(root / "test.npz"), "--min-devices", str(devices), "--quorum", "1",
        "--learning-rate", str(TRAINING["learning_rate"]), "--epochs", str(TRAINING["epochs"]),
        "--batch-size", str(TRAINING["batch_size"]), "--auto-activate", "--start", "--no-tensorboard",
        "--round-timeout", "20", "--secure-aggregation", "--secagg-clip", "0.2",
        "--dp", "distributed", "--dp-noise-multiplier", str(Z), "--dp-clip", str(C), *args).start()


def assert_noise(root, names, start, end, std: float) -> None:
    """The new model is the noiseless mean of ``names``' clipped changes plus noise of about ``std``
    per coordinate (650 of them: within 15 %)."""
    want = noiseless_mean(root, start, names)
    noise = np.concatenate([(end[k].astype(np.float64) - start[k] - want[k]).ravel() for k in start])
    assert 0.85 * std < noise.std() < 1.15 * std, (noise.std(), std)
    assert abs(noise.mean()) < 5 * std / math.sqrt(noise.size)


@pytest.mark.slow
def test_secure_rounds_with_distributed_dp_carry_the_noise_and_count_epsilon(tmp_path, data_dir):
    accountant = PrivacyAccountant(delta=1e-5)
    expected = [accountant.record_round(1.0, Z) for _ in range(3)]
    budget = (expected[1] + expected[2]) / 2  # room for two rounds, not three
    root = tmp_path / "devices"
    server = ddp_server(tmp_path, data_dir, root, len(NAMES), "--rounds", "5",
                        "--dp-max-epsilon", f"{budget}")
    procs = launch_devices(server, root, NAMES, "--trainer", "tests.seeded_digits:SeededSoftmaxTrainer")
    try:
        wait_until(lambda: server.get("/api/status").json()["status"] == "finished", 50,
                   "two rounds and the budget spent")
        status, rounds = server.get("/api/status").json(), history(server)
    finally:
        stop(procs)
        server.stop()
    share_std = Z * C / math.sqrt(len(NAMES))
    assert [r["round"] for r in rounds] == [1, 2]
    assert status["reason"].startswith("privacy budget spent: after 2 rounds epsilon is ")
    assert status["privacy"]["epsilon"] == pytest.approx(expected[1], rel=1e-9)
    assert status["privacy"]["noise_share_std"] == pytest.approx(share_std)
    for entry, eps in zip(rounds, expected, strict=False):
        p = entry["privacy"]
        assert p["epsilon"] == pytest.approx(eps, rel=1e-9)
        assert (p["mode"], p["noise_multiplier"], p["clipping_norm"], p["sampling_rate"]) == (
            "distributed", Z, C, 1.0)
        assert p["survivors"] == 3 and p["noise_std"] == pytest.approx(Z * C / 3)
        assert entry["secagg"]["survivors"] == 3 and entry["secagg"]["total_weight"] == 3  # unweighted
        assert entry["strategy"]["name"] == "dp-distributed(fedavg)"

        # The mean of 3 updates carries noise of std z x C / 3 per coordinate.
        start, end = checkpoint(server, entry["round"] - 1), checkpoint(server, entry["round"])
        assert_noise(root, NAMES, start, end, Z * C / len(NAMES))
    log = (root.parent / "logs" / "digits1.log").read_text()
    assert f"distributed DP: change clipped to L2 norm {C:g}, noise share of std {share_std:.4g}" in log


@pytest.mark.slow
def test_a_dropout_leaves_less_noise_and_the_round_counts_it(tmp_path, data_dir):
    """4 devices a round (n = 4), one drops after dealing its shares: the 3 survivors' noise
    has std z x C x sqrt(3/4), and the round is counted with that noise multiplier."""
    names = [*NAMES, "digits4"]
    root = tmp_path / "devices"
    server = ddp_server(tmp_path, data_dir, root, len(names), "--rounds", "1")
    trainer = ("--trainer", "tests.seeded_digits:SeededSoftmaxTrainer")
    procs = launch_devices(server, root, NAMES, *trainer)
    procs += launch_devices(server, root, names[3:], *trainer, "--secagg-dropout", "1")
    try:
        wait_until(lambda: server.get("/api/status").json()["status"] == "finished", 50, "one round")
        (entry,) = history(server)
    finally:
        stop(procs)
        server.stop()
    assert entry["secagg"]["survivors"] == 3 and entry["secagg"]["recovered"] == ["digits4"]
    z = Z * math.sqrt(3 / 4)
    p = entry["privacy"]
    assert p["survivors"] == 3 and p["min_devices"] == 4 and p["noise_multiplier"] == pytest.approx(z)
    assert p["epsilon"] == pytest.approx(PrivacyAccountant(delta=1e-5).record_round(1.0, z), rel=1e-9)
    assert_noise(root, NAMES, checkpoint(server, 0), checkpoint(server, 1), z * C / 3)
