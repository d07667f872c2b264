"""q-FedAvg (q-FFL, Li et al. 2020) against an independent NumPy reference written here.

The reference follows the paper's and Flower's ``QFedAvg`` layout: every device's update
flattened into one vector, the scaled deltas kept in a list and summed at the end. The engine
streams: two running sums, no update kept. Agreement on random rounds (several devices,
tensors of different shapes and dtypes, random losses, q in {0, 0.5, 2}) is the evidence.
Also: an update without a usable ``start_loss`` is refused and changes nothing, the round's
memory does not grow with its updates, bad settings are one-line errors, and secure
aggregation is refused at start-up.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest

from fedhub.engine import params
from fedhub.engine.config import FederationConfig
from fedhub.engine.privacy import LocalDP
from fedhub.engine.secagg import SecAggConfig
from fedhub.engine.strategies import (
    STRATEGIES,
    AggregationError,
    InvalidUpdate,
    ParamError,
    QFedAvg,
    make_strategy,
    parse_strategy_args,
)

SHAPES = {"conv/kernel": ((3, 3, 2, 4), np.float32), "conv/bias": ((4,), np.float32),
          "dense/kernel": ((5, 3), np.float64), "dense/bias": ((3,), np.float64), "scale": ((), np.float64)}


def model(rng, zero=False):
    return {n: (np.zeros(s) if zero else rng.normal(size=s)).astype(t) for n, (s, t) in SHAPES.items()}


def updates(rng, glob, k):
    """``k`` devices' (name, weights, examples, start_loss): some steps large, some small, and
    losses from near zero to several."""
    out = []
    for i in range(k):
        w = {n: (a + rng.normal(scale=rng.uniform(0.01, 0.5), size=a.shape)).astype(a.dtype)
             for n, a in glob.items()}
        out.append((f"dev{i:02d}", w, int(rng.integers(1, 500)), float(rng.uniform(0, 4) ** 2)))
    return out


def run(strategy, glob, ups):
    agg = strategy.begin(glob)
    for device, w, n, loss in ups:
        agg.add(device, w, n, {"start_loss": loss, "loss": loss / 2})
    return agg.result()


# the independent reference ---------------------------------------------------------------------
def ref_qffl(glob, ups, q, learning_rate):
    """w - sum(F^q dw) / sum(q F^(q-1) |dw|^2 + L F^q), on flat vectors, deltas kept in a list."""
    names = list(glob)
    flat = lambda w: np.concatenate([np.ravel(w[n]).astype(np.float64) for n in names])  # noqa: E731
    before = flat(glob)
    lipschitz = 1.0 / learning_rate
    deltas, hs = [], []
    for _, w, _, loss in ups:
        f = loss + 1e-10
        grad = lipschitz * (before - flat(w))
        deltas.append(np.float_power(f, q) * grad)
        hs.append(q * np.float_power(f, q - 1) * np.sum(np.square(grad)) + lipschitz * np.float_power(f, q))
    denominator = np.sum(np.asarray(hs))
    after = before - sum(d / denominator for d in deltas)
    out, i = {}, 0
    for n in names:
        size = int(np.prod(glob[n].shape))
        out[n] = after[i:i + size].reshape(glob[n].shape)
        i += size
    return out


def assert_matches(got, ref64, glob):
    for name, t in glob.items():
        assert got[name].dtype == t.dtype and got[name].shape == t.shape, name
        np.testing.assert_allclose(got[name].astype(np.float64), ref64[name], rtol=1e-6, atol=1e-6,
                                   err_msg=name)


@pytest.mark.parametrize("q", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("seed", range(4))
def test_qfedavg_matches_the_reference(q, seed):
    rng = np.random.default_rng(seed)
    glob = model(rng)
    ups = updates(rng, glob, 2 + seed * 3)
    learning_rate = [0.1, 0.01, 0.5, 1.0][seed]
    result = run(make_strategy("qfedavg", q=q, learning_rate=learning_rate), glob, ups)
    assert_matches(result.weights, ref_qffl(glob, ups, q, learning_rate), glob)
    assert result.state == {}
    m = result.metrics
    assert m["strategy"] == "qfedavg" and m["params"] == {"q": q, "learning_rate": learning_rate}
    assert m["num_used"] == len(ups)
    total = sum(n for _, _, n, _ in ups)
    expected = sum(loss * n for _, _, n, loss in ups) / total
    assert m["fit_metrics"]["start_loss"] == pytest.approx(expected)


@pytest.mark.parametrize("q", [0.0, 0.5, 2.0])
def test_from_a_zero_model_as_asynchronous_buffers_use_it(q):
    """Asynchronous mode hands the aggregator staleness-weighted changes over a zero model."""
    rng = np.random.default_rng(40)
    zero = model(rng, zero=True)
    ups = updates(rng, zero, 5)
    result = run(make_strategy("qfedavg", q=q), zero, ups)
    assert_matches(result.weights, ref_qffl(zero, ups, q, 0.1), zero)


def test_q_zero_is_the_unweighted_mean_and_q_favours_the_worst_fitted_device():
    rng = np.random.default_rng(41)
    glob = model(rng)
    ups = updates(rng, glob, 4)
    result = run(make_strategy("qfedavg", q=0), glob, ups)
    mean = {n: sum(w[n].astype(np.float64) for _, w, _, _ in ups) / len(ups) for n in glob}
    assert_matches(result.weights, mean, glob)  # examples and losses play no part at q = 0

    # Two small steps in opposite directions (h_k is then about L F_k^q): the larger q, the
    # nearer the new model to the worse-fitted device's, as the mean weighted by F_k^q.
    glob = {"w": np.zeros(3)}
    pair = [("fit", {"w": np.full(3, -1e-3)}, 10, 0.1), ("unfit", {"w": np.full(3, 1e-3)}, 10, 2.0)]
    positions = [float(run(make_strategy("qfedavg", q=q), glob, pair).weights["w"][0]) for q in (0, 1, 3)]
    assert positions[0] == pytest.approx(0.0, abs=1e-12) and positions[0] < positions[1] < positions[2]
    assert positions[2] == pytest.approx(1e-3 * (8 - 1e-3) / (8 + 1e-3), rel=1e-3)


def test_the_task_config_asks_devices_for_their_start_loss():
    strategy = make_strategy("qfedavg")
    assert strategy.task_config() == {"start_loss": True}
    plan = strategy.configure([f"d{i}" for i in range(6)], rng=random.Random(0), fraction=0.5)
    assert len(plan.devices) == 3 and plan.config == {d: {"start_loss": True} for d in plan.devices}


def test_local_dp_passes_each_devices_start_loss_through():
    rng = np.random.default_rng(42)
    glob = model(rng)
    ups = updates(rng, glob, 3)
    strategy = LocalDP(make_strategy("qfedavg", q=0.5), noise_multiplier=1.0, clipping_norm=1.0)
    assert strategy.task_config()["start_loss"] is True
    assert_matches(run(strategy, glob, ups).weights, ref_qffl(glob, ups, 0.5, 0.1), glob)
    agg = strategy.begin(glob)
    with pytest.raises(InvalidUpdate) as err:
        agg.add("dev", ups[0][1], 10, {"loss": 1.0})
    assert err.value.field == "start_loss"


# refusals ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("metrics,message", [
    (None, "no start_loss"), ({}, "no start_loss"), ({"loss": 1.0}, "no start_loss"),
    ({"start_loss": -0.5}, "start_loss must be a finite number, 0 or more, got -0.5"),
    ({"start_loss": float("nan")}, "got nan"), ({"start_loss": float("inf")}, "got inf"),
    ({"start_loss": 10 ** 400}, "got inf"), ({"start_loss": np.float32(-1)}, "got -1.0"),
    ({"start_loss": "1.0"}, "start_loss must be a number, got '1.0'"),
    ({"start_loss": True}, "start_loss must be a number, got True"),
])
def test_an_update_without_a_usable_start_loss_is_refused_and_changes_nothing(metrics, message):
    rng = np.random.default_rng(43)
    glob = model(rng)
    ups = updates(rng, glob, 4)
    agg = make_strategy("qfedavg", q=2).begin(glob)
    for device, w, n, loss in ups[:2]:
        agg.add(device, w, n, {"start_loss": loss})
    sums = {n: s.copy() for n, s in agg._sums.items()}
    h = agg._h
    with pytest.raises(InvalidUpdate) as err:
        agg.add("dev-bad", ups[2][1], 7, metrics)
    assert err.value.field == "start_loss" and message in err.value.message
    assert "\n" not in err.value.message
    assert agg.count == 2 and agg.total_examples == sum(n for _, _, n, _ in ups[:2])
    assert agg._h == h and all(np.array_equal(sums[n], s) for n, s in agg._sums.items())
    # The aggregator still works, and the device may send a good update after its refused one.
    agg.add("dev-bad", ups[2][1], ups[2][2], {"start_loss": ups[2][3]})
    agg.add(*ups[3][:3], {"start_loss": ups[3][3]})
    result = agg.result()
    assert "dev-bad" in result.metrics["updates"] and result.metrics["num_used"] == 4
    assert_matches(result.weights, ref_qffl(glob, [*ups[:2], ("dev-bad", *ups[2][1:]), ups[3]], 2, 0.1),
                   glob)


def test_a_zero_start_loss_is_used():
    glob = {"w": np.zeros(2)}
    ups = [("a", {"w": np.ones(2)}, 1, 0.0), ("b", {"w": -np.ones(2)}, 1, 1.0)]
    for q in (0.0, 0.5, 2.0):
        result = run(make_strategy("qfedavg", q=q), glob, ups)
        np.testing.assert_allclose(result.weights["w"], ref_qffl(glob, ups, q, 0.1)["w"], rtol=1e-9)


def test_nan_in_the_weights_is_refused_as_by_any_plain_strategy():
    rng = np.random.default_rng(44)
    glob = model(rng)
    bad = {n: a.copy() for n, a in glob.items()}
    bad["dense/kernel"][0, 0] = np.nan
    agg = make_strategy("qfedavg").begin(glob)
    with pytest.raises(InvalidUpdate) as err:
        agg.add("a", bad, 1, {"start_loss": 1.0})
    assert err.value.field == "dense/kernel" and agg.count == 0


def test_a_loss_that_overflows_its_weight_is_refused_and_an_empty_step_fails_the_round():
    glob = {"w": np.zeros(2)}
    agg = make_strategy("qfedavg", q=400).begin(glob)
    with pytest.raises(InvalidUpdate, match="overflows") as err:
        agg.add("a", {"w": np.ones(2)}, 1, {"start_loss": 1e300})
    assert err.value.field == "start_loss" and agg.count == 0
    # With q = 400 a loss of 0 leaves h = L (1e-10)^400, which is 0 in float64: no step from that.
    agg.add("b", {"w": np.ones(2)}, 1, {"start_loss": 0.0})
    with pytest.raises(AggregationError, match="qfedavg: the updates' h_k add up to 0"):
        agg.result()


# memory -----------------------------------------------------------------------------------------
def _arrays(obj, seen=None):
    """Every NumPy array reachable from ``obj``'s attributes, dicts, lists and tuples."""
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return []
    seen.add(id(obj))
    if isinstance(obj, np.ndarray):
        return [obj]
    if isinstance(obj, dict):
        items = list(obj.values())
    elif isinstance(obj, list | tuple | set):
        items = list(obj)
    elif hasattr(obj, "__dict__") and not isinstance(obj, type):
        items = [v for k, v in vars(obj).items() if k != "strategy"]
    else:
        return []
    return [a for item in items for a in _arrays(item, seen)]


def test_the_round_keeps_two_arrays_per_tensor_however_many_updates_arrive():
    rng = np.random.default_rng(45)
    glob = model(rng)
    ups = updates(rng, glob, 30)
    agg = make_strategy("qfedavg").begin(glob)
    agg.add(*ups[0][:3], {"start_loss": ups[0][3]})
    after_one = _arrays(agg)
    for device, w, n, loss in ups[1:]:
        agg.add(device, w, n, {"start_loss": loss})
    after_all = _arrays(agg)
    assert len(after_all) == len(after_one) == 2 * len(glob)  # the model and the sum, per tensor
    assert sum(a.nbytes for a in after_all) == sum(a.nbytes for a in after_one)
    assert not any(any(a is w[n] for _, w, _, _ in ups for n in w) for a in after_all)


def test_a_hundred_updates_never_sit_in_ram_together():
    """100 updates of a 50,000-weight model are 20 MB; the round's peak stays a few model sizes."""
    import tracemalloc

    rng = np.random.default_rng(46)
    glob = {"w": rng.normal(size=50_000).astype(np.float32)}
    noise = rng.normal(size=(8, 50_000)).astype(np.float32)  # made before tracing: not the round's
    tracemalloc.start()
    try:
        agg = make_strategy("qfedavg", q=1).begin(glob)
        for i in range(100):
            agg.add(f"d{i}", {"w": glob["w"] + noise[i % 8] * np.float32(0.01 * (1 + i % 3))}, 10,
                    {"start_loss": 0.5 + i % 5})
        result = agg.result()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert np.isfinite(result.weights["w"]).all() and result.metrics["num_updates"] == 100
    assert peak < 3 * 2**20, peak  # a float64 sum, a float64 temporary, the result: ~1.2 MB


# settings ---------------------------------------------------------------------------------------
def test_registered_with_flowers_defaults():
    assert STRATEGIES["qfedavg"] is QFedAvg
    assert make_strategy("qfedavg").params() == {"q": 0.2, "learning_rate": 0.1}
    assert parse_strategy_args("qfedavg", ["q=2", "learning_rate=0.05"]) == {"q": 2.0, "learning_rate": 0.05}
    assert make_strategy("qfedavg").min_updates() == 1


@pytest.mark.parametrize("settings,message", [
    ({"q": -1}, "strategy qfedavg: q must be 0 or more, got -1.0 (allowed keys: q, learning_rate)"),
    ({"learning_rate": 0}, "strategy qfedavg: learning_rate must be positive, got 0.0"),
    ({"learning_rate": -0.1}, "learning_rate must be positive"),
    ({"q": math.nan}, "q must be a finite number"),
    ({"q": "big"}, "q must be a number, got 'big'"),
    ({"qffl_learning_rate": 0.1}, "unknown key 'qffl_learning_rate' (allowed keys: q, learning_rate)"),
])
def test_bad_settings_are_one_line_errors(settings, message):
    with pytest.raises(ParamError) as err:
        make_strategy("qfedavg", **settings)
    assert message in str(err.value), str(err.value)
    assert "\n" not in str(err.value)


# start-up ---------------------------------------------------------------------------------------
def _refusal(**settings):
    try:
        FederationConfig(strategy="qfedavg", min_devices=3, **settings).validate()
    except ValueError as exc:
        return str(exc)
    return None


def test_secure_aggregation_is_refused_at_start_up_with_one_line_saying_why():
    said = _refusal(secagg=SecAggConfig(clip_range=1.0))
    assert isinstance(said, str) and "\n" not in said, said
    assert said.startswith("strategy qfedavg cannot be used with secagg: it weighs each device's update "
                           "by that device's own loss, and secure aggregation shows the server only the "
                           "sum of the updates"), said
    with pytest.raises(params.SettingError) as err:
        FederationConfig(strategy="qfedavg", min_devices=3, secagg=SecAggConfig(clip_range=1.0)).validate()
    assert err.value.settings == ("secagg",)
    assert err.value.render(lambda path: "--secure-aggregation").startswith(
        "strategy qfedavg cannot be used with --secure-aggregation: ")


def test_what_else_starts_and_what_does_not():
    dp = {"noise_multiplier": 0.3, "clipping_norm": 0.5}
    assert _refusal() is None
    assert _refusal(mode="async", buffer_size=3) is None
    assert _refusal(dp={"mode": "local", **dp}) is None
    assert "it sees one private mean" in _refusal(dp={"mode": "central-fixed", **dp})
    assert "reveals only the sum" in _refusal(dp={"mode": "distributed", **dp},
                                               secagg=SecAggConfig(clip_range=1.0))
