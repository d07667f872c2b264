import numpy as np
import pytest

from fedhub.engine.aggregation import WeightedSum, weighted_mean
from fedhub.engine.strategies import make_strategy


def _random_updates(rng, k):
    shapes = {f"t{i}": tuple(rng.integers(1, 6, size=rng.integers(0, 4))) for i in range(4)}
    updates = []
    for _ in range(k):
        w = {n: rng.normal(scale=rng.uniform(0.1, 10), size=s).astype(np.float32)
             for n, s in shapes.items()}
        updates.append((w, int(rng.integers(1, 10_000))))
    return updates


def _reference(updates):
    total = sum(n for _, n in updates)
    return {name: sum(w[name].astype(np.float64) * n for w, n in updates) / total
            for name in updates[0][0]}


@pytest.mark.parametrize("seed", range(20))
def test_fedavg_is_the_exact_weighted_mean(seed):
    rng = np.random.default_rng(seed)
    updates = _random_updates(rng, int(rng.integers(1, 12)))
    expected = _reference(updates)
    acc = WeightedSum(updates[0][0])
    for w, n in updates:
        acc.add(w, n)
    got = acc.result()
    assert acc.count == len(updates)
    assert acc.total_examples == sum(n for _, n in updates)
    for name, ref in expected.items():
        assert got[name].dtype == np.float32
        assert got[name].shape == ref.shape
        np.testing.assert_allclose(got[name], ref.astype(np.float32), rtol=1e-6, atol=1e-6)


def test_one_call_form_matches_streaming():
    updates = _random_updates(np.random.default_rng(7), 5)
    a = weighted_mean(updates)
    acc = WeightedSum(updates[0][0])
    for w, n in updates:
        acc.add(w, n)
    b = acc.result()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name])


def test_weights_matter():
    a = {"w": np.zeros(2, np.float32)}
    b = {"w": np.ones(2, np.float32)}
    np.testing.assert_allclose(weighted_mean([(a, 1), (b, 3)])["w"], [0.75, 0.75])


def test_refusals():
    with pytest.raises(ValueError):
        weighted_mean([])
    acc = WeightedSum({"w": np.zeros(2, np.float32)})
    with pytest.raises(ValueError):
        acc.result()
    with pytest.raises(ValueError):
        acc.add({"w": np.zeros(2, np.float32)}, 0)
    with pytest.raises(ValueError, match="fedavg"):
        make_strategy("nope")


def test_fedbuff_deltas_fold_into_the_same_sum_weighted_by_staleness():
    """Asynchronous mode's sum: each update's delta from its base version, times examples and
    staleness weight, divided by the examples alone (a stale update pulls less)."""
    base = {"w": np.array([1.0, 2.0], np.float32)}
    acc = WeightedSum(base)
    acc.add({"w": np.array([2.0, 2.0], np.float32)}, 10, base=base)  # delta (1, 0), fresh
    acc.add({"w": np.array([1.0, 6.0], np.float32)}, 30, base=base, weight=0.5)  # delta (0, 4)
    np.testing.assert_allclose(acc.mean()["w"], [10 * 1 / 40, 30 * 0.5 * 4 / 40])
    assert acc.total_examples == 40 and acc.count == 2
    plain = WeightedSum(base)  # no base: the weights themselves, FedAvg's mean
    plain.add({"w": np.array([2.0, 2.0], np.float32)}, 10)
    np.testing.assert_allclose(plain.mean()["w"], [2.0, 2.0])
