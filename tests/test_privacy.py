"""Differential privacy (fedhub.engine.privacy): clipping bounds, noise scale, adaptive clipping, epsilon."""

from __future__ import annotations

import json
import math
import random

import dp_accounting
import numpy as np
import pytest
from dp_accounting import rdp

from fedhub.engine.privacy import (
    BudgetExhausted,
    DPAdaptiveClipping,
    DPFixedClipping,
    LocalDP,
    PrivacyAccountant,
    clip_and_noise,
    clip_by_norm,
    difference,
    distributed_noise_std,
    l2_norm,
    local_dp_task,
    privatize_update,
)
from fedhub.engine.strategies import FedAvg, FedAvgM, Krum, NotEnoughUpdates


def _model(rng, sizes=(("dense/kernel", (8, 5)), ("dense/bias", (5,)))):
    return {n: rng.normal(size=s).astype(np.float32) for n, s in sizes}


def _run(strategy, global_weights, updates):
    """One round as the coordinator runs it: the strategy adopts its state once it is done."""
    agg = strategy.begin(global_weights)
    for device, weights in updates.items():
        agg.add(device, weights, 100, {"loss": 1.0})
    result = agg.result()
    strategy.load_state(result.state)
    return result.weights, {**result.metrics, **result.metrics.get("privacy", {})}


def _with_change(global_weights, change):
    return {n: (g.astype(np.float64) + change[n]).astype(g.dtype) for n, g in global_weights.items()}


# clipping --------------------------------------------------------------------------------

@pytest.mark.parametrize("seed", range(10))
def test_clipping_bounds_hold_and_keep_the_direction(seed):
    rng = np.random.default_rng(seed)
    bound = float(rng.uniform(0.01, 5))
    update = {"a": rng.normal(scale=rng.uniform(1e-3, 10), size=(7, 3)), "b": rng.normal(size=4)}
    clipped = clip_by_norm(update, bound)
    assert clipped.norm == pytest.approx(l2_norm(update))
    assert l2_norm(clipped.tensors) <= bound * (1 + 1e-12)
    assert clipped.clipped == (clipped.norm > bound)
    scale = min(1.0, bound / clipped.norm)
    for name in update:
        np.testing.assert_allclose(clipped.tensors[name], update[name] * scale, rtol=1e-12)
    zero = clip_by_norm({"a": np.zeros(3)}, bound)  # no division by a zero norm
    assert zero.norm == 0 and not zero.clipped and not zero.tensors["a"].any()
    with pytest.raises(ValueError, match="NaN"):
        clip_by_norm({"a": np.array([np.inf])}, bound)


def test_one_device_moves_the_private_mean_by_at_most_twice_c_over_n():
    """The sensitivity the noise is calibrated to: replacing one device's update, even by 1e30-valued
    weights, moves the clipped mean by at most 2C/n; without DP it takes the model with it."""
    rng = np.random.default_rng(1)
    g = _model(rng)
    bound, n = 0.5, 5
    updates = {f"d{i}": _with_change(g, {k: rng.normal(scale=0.3, size=v.shape) for k, v in g.items()})
               for i in range(n)}
    honest, metrics = _run(DPFixedClipping(FedAvg(), 0.0, bound), g, updates)
    # The result is exactly the global model plus the plain mean of the clipped changes.
    changes = [clip_by_norm({k: w[k].astype(np.float64) - g[k] for k in g}, bound).tensors
               for w in updates.values()]
    for k in g:
        np.testing.assert_allclose(honest[k], g[k] + sum(c[k] for c in changes) / n, rtol=1e-5, atol=1e-6)
    attacked_updates = {**updates, "d0": {k: np.full(v.shape, 1e30, np.float32) for k, v in g.items()}}
    attacked, metrics = _run(DPFixedClipping(FedAvg(), 0.0, bound), g, attacked_updates)
    moved = l2_norm({k: attacked[k].astype(np.float64) - honest[k] for k in g})
    assert moved <= 2 * bound / n + 1e-5
    assert metrics["num_used"] == n
    plain, _ = _run(FedAvg(), g, attacked_updates)
    assert l2_norm({k: plain[k].astype(np.float64) - honest[k] for k in g}) > 1e20


# noise -----------------------------------------------------------------------------------

def test_noise_scale_matches_the_noise_multiplier():
    rng = np.random.default_rng(2)
    g = {"w": np.zeros(200_000, np.float64)}
    z, bound, n = 1.3, 0.5, 4
    updates = {f"d{i}": {"w": g["w"].copy()} for i in range(n)}  # no change: what is left is noise
    out, metrics = _run(DPFixedClipping(FedAvg(), z, bound, rng=rng), g, updates)
    assert metrics["noise_std"] == pytest.approx(z * bound / n)
    assert np.std(out["w"]) == pytest.approx(z * bound / n, rel=0.02)
    assert abs(np.mean(out["w"])) < 0.01 * z * bound / n * 10
    # Adaptive clipping spends part of the budget on the count: the updates get more noise.
    adaptive = DPAdaptiveClipping(FedAvg(), z, n, initial_clipping_norm=bound,
                                  clipped_count_stddev=2.0, rng=rng)
    z_updates = (z ** -2 - 4.0 ** -2) ** -0.5
    out, metrics = _run(adaptive, g, updates)
    assert np.std(out["w"]) == pytest.approx(z_updates * bound / n, rel=0.02)
    assert metrics["clipping_norm"] == bound  # the noise uses the bound the updates were clipped with
    assert metrics["next_clipping_norm"] == adaptive.clipping_norm != bound


def test_local_and_distributed_noise_scales():
    rng = np.random.default_rng(3)
    z, bound = 0.8, 2.0
    update = {"w": np.full(100_000, 1.0)}  # norm 316: clipped to 2
    private, clipped = clip_and_noise(update, bound, z * bound, rng)
    assert clipped.clipped and clipped.norm == pytest.approx(math.sqrt(100_000))
    assert np.std(private["w"]) == pytest.approx(z * bound, rel=0.02)
    assert np.mean(private["w"]) == pytest.approx(bound / math.sqrt(100_000), abs=0.02)
    # Distributed: each of n devices adds its share; their sum carries z * C, as central DP would.
    n = 9
    share = distributed_noise_std(z, bound, n)
    total = sum(clip_and_noise({"w": np.zeros(100_000)}, bound, share, rng)[0]["w"] for _ in range(n))
    assert np.std(total) == pytest.approx(z * bound, rel=0.02)


# adaptive clipping ------------------------------------------------------------------------

@pytest.mark.parametrize(("quantile", "start", "low", "high"), [
    (0.5, 0.1, 5, 6), (0.5, 100.0, 5, 6), (0.8, 0.1, 8, 9),
])
def test_adaptive_clipping_moves_the_bound_to_the_target_quantile(quantile, start, low, high):
    """Ten updates of norms 1..10: the bound settles where the target share of them is at or below it."""
    rng = np.random.default_rng(4)
    g = {"w": np.zeros(20)}
    directions = [rng.normal(size=20) for _ in range(10)]
    updates = {f"d{i}": {"w": d / np.linalg.norm(d) * (i + 1)} for i, d in enumerate(directions)}
    dp = DPAdaptiveClipping(FedAvg(), 0.0, 10, initial_clipping_norm=start,
                            target_quantile=quantile, clip_norm_lr=0.2, rng=rng)
    bounds = [dp.clipping_norm]
    for _ in range(200):
        _run(dp, g, updates)
        bounds.append(dp.clipping_norm)
    assert low <= bounds[-1] < high
    steps = np.diff(bounds[: bounds.index(next(b for b in bounds if low <= b < high)) + 1])
    assert (steps > 0).all() if start < low else (steps < 0).all()  # it moves toward it, every round


def test_adaptive_clipping_with_noise_still_finds_the_quantile():
    rng = np.random.default_rng(5)
    g = {"w": np.zeros(20)}
    updates = {f"d{i}": {"w": np.full(20, (i + 1) / math.sqrt(20))} for i in range(10)}
    dp = DPAdaptiveClipping(FedAvg(), 1.0, 10, initial_clipping_norm=0.1,
                            clipped_count_stddev=1.0, rng=rng)
    tail = []
    for r in range(300):
        _run(dp, g, updates)
        if r >= 200:
            tail.append(dp.clipping_norm)
    assert 3.5 < np.median(tail) < 7.5


def test_state_is_saved_beside_the_checkpoint_restored_and_reset(tmp_path):
    """The adaptive bound, the accountant and the inner optimizer's state go through the
    storage's strategy-state file; a round is counted only once its state is adopted."""
    from fedhub.engine.storage import Storage

    g = {"w": np.zeros(3, np.float32)}
    dp = DPAdaptiveClipping(FedAvgM(), 1.0, 10, initial_clipping_norm=0.1, clipped_count_stddev=1.0)
    for _ in range(2):
        dp.configure(["a", "b", "c", "d"], rng=random.Random(0), fraction=0.5)
        _run(dp, g, {"a": {"w": np.ones(3, np.float32)}, "b": {"w": np.ones(3, np.float32)}})
    agg = dp.begin(g)  # a third round that fails to be saved is not counted
    agg.add("a", {"w": np.ones(3, np.float32)}, 1)
    assert agg.result().metrics["privacy"]["rounds"] == 3
    assert dp.privacy()["rounds"] == 2 and dp.accountant.segments == [[0.5, 1.0, 2]]
    storage = Storage(tmp_path)
    storage.write_strategy_state(2, dp.state(), dp.describe())
    state, saved_by = storage.read_strategy_state(2)
    assert saved_by["name"] == dp.name == "dp-central-adaptive(fedavgm)"
    assert set(state) == {"dp_clipping_norm", "dp_accountant", "velocity/w"}
    fresh = DPAdaptiveClipping(FedAvgM(), 1.0, 10, initial_clipping_norm=0.1, clipped_count_stddev=1.0)
    fresh.load_state(state)
    assert fresh.clipping_norm == dp.clipping_norm != 0.1
    assert fresh.privacy()["epsilon"] == dp.privacy()["epsilon"] > 0
    np.testing.assert_array_equal(fresh.strategy.state()["velocity/w"], dp.strategy.state()["velocity/w"])
    fresh.reset()
    assert fresh.clipping_norm == 0.1 and fresh.privacy()["epsilon"] == 0 and not fresh.strategy.state()
    with pytest.raises(ValueError, match="rows of 3"):
        fresh.load_state({"dp_accountant": np.ones(4)})
    storage.close()


def test_settings_are_checked():
    with pytest.raises(ValueError, match="noise_multiplier"):
        DPFixedClipping(FedAvg(), -1.0, 1.0)
    with pytest.raises(ValueError, match="clipping_norm"):
        DPFixedClipping(FedAvg(), 1.0, 0.0)
    with pytest.raises(ValueError, match=r"below 2 x dp\.clipped_count_stddev"):
        DPAdaptiveClipping(FedAvg(), 1.0, 10)  # default stddev 10/20: 1.0 is not below 1.0
    with pytest.raises(ValueError, match="averaging strategy"):
        DPFixedClipping(Krum(), 1.0, 1.0)
    with pytest.raises(NotEnoughUpdates):
        DPFixedClipping(FedAvg(), 1.0, 1.0).begin({"w": np.zeros(2)}).result()


def test_server_optimizer_steps_on_the_private_mean():
    """The inner strategy receives one update, the private mean: FedAvgM under DP (no noise, a
    bound above every norm) is FedAvgM on the unweighted mean."""
    rng = np.random.default_rng(6)
    g = _model(rng)
    dp = DPFixedClipping(FedAvgM(server_learning_rate=1.0, server_momentum=0.9), 0.0, 1e6)
    reference = FedAvgM(server_learning_rate=1.0, server_momentum=0.9)
    gd, gr = g, g
    for _ in range(3):
        updates = {f"d{i}": _with_change(gd, {k: rng.normal(scale=0.1, size=v.shape) for k, v in g.items()})
                   for i in range(4)}
        gd, _ = _run(dp, gd, updates)
        agg = reference.begin(gr)
        for device, w in updates.items():
            agg.add(device, w, 1)
        res = agg.result()
        reference.load_state(res.state)
        gr = res.weights
        for k in g:
            np.testing.assert_allclose(gd[k], gr[k], rtol=1e-5, atol=1e-6)


# accounting ------------------------------------------------------------------------------

@pytest.mark.parametrize(("q", "z", "rounds", "delta"), [
    (0.1, 1.1, 100, 1e-5), (1.0, 2.0, 20, 1e-5), (0.5, 0.8, 30, 1e-6),
])
def test_epsilon_matches_the_accountants_own_figure(q, z, rounds, delta):
    acc = PrivacyAccountant(delta=delta)
    for _ in range(rounds):
        spent = acc.record_round(q, z)
    reference = rdp.RdpAccountant()
    reference.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    assert spent == pytest.approx(reference.get_epsilon(delta), rel=1e-12)
    assert acc.rounds == rounds and len(acc.segments) == 1
    # RDP is an upper bound: the tighter PLD accountant never reports more.
    pld = dp_accounting.pld.PLDAccountant()
    pld.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), rounds)
    assert pld.get_epsilon(delta) <= spent * 1.001


def test_accountant_state_survives_a_restart():
    acc = PrivacyAccountant(delta=1e-5)
    for _ in range(5):
        acc.record_round(0.2, 1.0)
    for _ in range(3):
        acc.record_round(0.5, 1.5)
    restored = PrivacyAccountant.from_dict(json.loads(json.dumps(acc.to_dict())))
    assert restored.rounds == 8 and restored.segments == [[0.2, 1.0, 5], [0.5, 1.5, 3]]
    assert restored.epsilon() == acc.epsilon()
    assert restored.record_round(0.5, 1.5) == acc.record_round(0.5, 1.5)


def test_budget_check_stops_the_run_before_the_budget_is_exceeded():
    acc = PrivacyAccountant(delta=1e-5)
    assert acc.epsilon() == 0.0
    with pytest.raises(BudgetExhausted) as err:
        for _ in range(1000):
            acc.check_budget(8.0, 0.3, 1.2)
            acc.record_round(0.3, 1.2)
    assert 0 < acc.epsilon() <= 8.0 < acc.epsilon_after(0.3, 1.2)
    assert 10 < acc.rounds < 30
    assert f"after {acc.rounds} rounds" in err.value.message and err.value.code == "privacy_budget_spent"
    assert PrivacyAccountant(delta=1e-5).epsilon_after(1.0, 0.0) == math.inf  # no noise, no privacy
    assert PrivacyAccountant(delta=1e-5).epsilon_after(0.0, 1.0) == 0.0  # nobody sampled
    with pytest.raises(ValueError, match="delta"):
        PrivacyAccountant(delta=0)


def test_distributed_noise_through_secure_aggregation():
    """Each device clips and adds its share of the noise before masking; the unmasked mean of the
    n survivors carries at least what central DP with the threshold's worth of devices would."""
    from fedhub.engine.secagg import DeviceRound, SecAggConfig, ServerRound

    z, bound, length = 1.0, 0.2, 50_000
    names = [f"d{i}" for i in range(5)]
    rng = np.random.default_rng(7)
    config = SecAggConfig(shares=5, threshold=3, clip_range=10 * bound, max_weight=1)
    params = config.for_round(1, names, length)
    share = distributed_noise_std(z, bound, params.threshold)
    server = ServerRound(params)
    devices = {n: DeviceRound(n, params, rng=rng) for n in names}
    for n, d in devices.items():
        server.receive(n, d.advertise())
    server.close_stage()
    for n, d in devices.items():
        server.receive(n, d.share_keys(server.request(n)))
    server.close_stage()
    for n, d in devices.items():
        update = {"w": rng.normal(size=length)}  # norm ~224: clipped to 0.2
        private, clipped = clip_and_noise(update, bound, share, rng)
        assert clipped.clipped
        server.receive(n, d.masked_input(server.request(n), private, weight=1))
    server.close_stage()
    for n, d in devices.items():
        server.receive(n, d.unmask(server.request(n)))
    result = server.finish()
    assert result.total_weight == 5
    assert np.std(result.mean) == pytest.approx(z * bound * math.sqrt(5 / 3) / 5, rel=0.03)


# local DP and the wrapper's budget ------------------------------------------------------------

@pytest.mark.parametrize("seed", range(5))
def test_local_dp_on_the_device_clips_then_noises(seed):
    rng = np.random.default_rng(seed)
    g = {"k": rng.normal(size=(300, 100)).astype(np.float32), "b": np.zeros(100, np.float32)}
    trained = {n: (a + rng.normal(scale=rng.uniform(0.01, 1), size=a.shape)).astype(np.float32)
               for n, a in g.items()}
    bound = float(rng.uniform(0.1, 3))
    without_noise, clipped = privatize_update(trained, g, bound, 0.0, rng)
    assert {n: a.dtype for n, a in without_noise.items()} == {"k": np.float32, "b": np.float32}
    assert l2_norm(difference(without_noise, g)) <= bound * (1 + 1e-5)
    assert clipped.norm == pytest.approx(l2_norm(difference(trained, g)))
    noised, _ = privatize_update(trained, g, bound, 1.7, rng)
    noise = np.concatenate([(noised[n].astype(np.float64) - without_noise[n]).ravel() for n in g])
    assert np.std(noise) == pytest.approx(1.7 * bound, rel=0.02)


@pytest.mark.parametrize("config, message", [
    ({"dp_clipping_norm": 1.0}, "dp_noise_multiplier must be a number"),
    ({"dp_clipping_norm": "1", "dp_noise_multiplier": 1}, "dp_clipping_norm must be a number"),
    ({"dp_clipping_norm": 0, "dp_noise_multiplier": 1}, "dp_clipping_norm must be a positive number"),
    ({"dp_clipping_norm": 1, "dp_noise_multiplier": float("nan")}, "noise_multiplier must be a non-negative"),
    ({"dp_clipping_norm": True, "dp_noise_multiplier": 1}, "must be a number"),
])
def test_the_devices_refuse_malformed_local_dp_settings(config, message):
    assert local_dp_task({"epochs": 1}) is None
    assert local_dp_task({"dp_clipping_norm": 2, "dp_noise_multiplier": 0.5}) == (2.0, 0.5)
    with pytest.raises(ValueError, match=message):
        local_dp_task(config)


def test_local_dp_wrapper_announces_counts_and_keeps_a_robust_strategy():
    dp = LocalDP(Krum(num_malicious=1), 2.0, 0.5)
    plan = dp.configure([f"d{i}" for i in range(5)], rng=random.Random(0))
    assert plan.config["d0"] == {"dp_clipping_norm": 0.5, "dp_noise_multiplier": 2.0}
    assert dp.min_updates() == Krum(num_malicious=1).min_updates() and dp.rejects_nonfinite
    g = {"w": np.zeros(4)}
    # d4 is far from the rest; d1 has the one lowest Krum score (two nearest: d2 at 1, d0 at 4)
    values = {"d0": 0.0, "d1": 1.0, "d2": 1.5, "d3": 3.0, "d4": 100.0}
    updates = {name: {"w": np.full(4, value)} for name, value in values.items()}
    new, metrics = _run(dp, g, updates)
    assert metrics["mode"] == "local" and metrics["noise_std"] == 1.0
    # per device, against the server: no sampling amplification, sensitivity 2C (z / 2)
    assert metrics["epsilon"] == pytest.approx(PrivacyAccountant(1e-5).record_round(1.0, 1.0))
    # the wrapped Krum still does its job: it keeps d1 alone and rejects the outlier with its score
    assert {n: u["status"] for n, u in metrics["updates"].items()} == \
        {"d0": "rejected", "d1": "used", "d2": "rejected", "d3": "rejected", "d4": "rejected"}
    assert metrics["updates"]["d1"]["score"] == pytest.approx(5.0)
    assert metrics["updates"]["d4"]["score"] > 1000
    np.testing.assert_array_equal(new["w"], np.full(4, 1.0))


def test_the_wrapper_refuses_a_round_over_the_budget():
    dp = DPFixedClipping(FedAvg(), 1.0, 1.0, max_epsilon=5.0)
    devices = [f"d{i}" for i in range(10)]
    rounds = 0
    with pytest.raises(BudgetExhausted) as err:
        while True:
            dp.configure(devices, rng=random.Random(rounds), fraction=0.3)
            _run(dp, {"w": np.zeros(2)}, {"a": {"w": np.ones(2)}})
            rounds += 1
    assert rounds == dp.privacy()["rounds"] > 1
    assert dp.privacy()["epsilon"] <= 5.0 < dp.accountant.epsilon_after(0.3, 1.0)
    assert err.value.field == "dp_max_epsilon" and dp.privacy()["budget_spent"] == err.value.message


def test_a_round_without_noise_has_no_finite_epsilon_and_the_json_says_null():
    dp = DPFixedClipping(FedAvg(), 0.0, 1.0)
    _, metrics = _run(dp, {"w": np.zeros(2)}, {"a": {"w": np.ones(2)}})
    assert metrics["epsilon"] is None and dp.privacy()["epsilon"] is None
    json.dumps(dp.privacy(), allow_nan=False)
    with pytest.raises(BudgetExhausted):  # with a budget, no round without noise starts at all
        DPFixedClipping(FedAvg(), 0.0, 1.0, max_epsilon=100).configure(["a"], rng=random.Random(0))
