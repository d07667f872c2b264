"""The streaming sample-weighted mean that FedAvg, the server optimizers and FedBuff build on.

Each update is folded into a float64 running sum as it arrives and then dropped,
so the server's memory is O(model size) however many devices report. The
strategies themselves live in :mod:`fedhub.engine.strategies`; asynchronous mode
folds each update's delta from the version it trained from, with its staleness weight.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import numpy as np

Weights = dict[str, np.ndarray]


class WeightedSum:
    """Streaming sample-weighted mean in float64; :meth:`result` casts back to each tensor's dtype."""

    def __init__(self, template: Mapping[str, np.ndarray]) -> None:
        self._dtypes = {name: a.dtype for name, a in template.items()}
        self._sums = {name: np.zeros(a.shape, dtype=np.float64) for name, a in template.items()}
        self._count = 0
        self._total = 0

    def add(self, weights: Mapping[str, np.ndarray], num_examples: int, *,
            base: Mapping[str, np.ndarray] | None = None, weight: float = 1.0) -> None:
        """Fold in ``num_examples * weight * (weights - base)`` (no ``base``: the weights
        themselves); the mean divides by the examples alone, so a ``weight`` below 1 (a stale
        update's) pulls less."""
        if num_examples <= 0:
            raise ValueError("num_examples must be positive")
        scale = float(num_examples) * float(weight)
        for name, total in self._sums.items():
            # Multiply-add in place: no second model-sized temporary per update.
            if base is None:
                np.add(total, np.multiply(weights[name], scale, dtype=np.float64), out=total)
            else:
                delta = np.subtract(weights[name], base[name], dtype=np.float64)
                np.add(total, np.multiply(delta, scale, out=delta), out=total)
        self._count += 1
        self._total += num_examples

    def add_sums(self, sums: Mapping[str, np.ndarray], num_examples: int, count: int) -> None:
        """Fold in a sum already weighted (``sum(n_i * w_i)`` over ``count`` updates of
        ``num_examples`` in all), as a relay sends it: the same result as each update on its own,
        within float64 round-off."""
        if num_examples <= 0 or count <= 0:
            raise ValueError("a partial sum needs a positive count and examples")
        for name, total in self._sums.items():
            np.add(total, sums[name], out=total)
        self._count += count
        self._total += num_examples

    @property
    def count(self) -> int:
        return self._count

    @property
    def total_examples(self) -> int:
        return self._total

    def mean(self) -> Weights:
        """The weighted mean in float64 (what server optimizers step from)."""
        if self._total == 0:
            raise ValueError("no update to aggregate")
        return {name: total / self._total for name, total in self._sums.items()}

    def result(self) -> Weights:
        return {name: m.astype(self._dtypes[name]) for name, m in self.mean().items()}


def weighted_mean(updates: Iterable[tuple[Mapping[str, np.ndarray], int]]) -> Weights:
    """FedAvg over a list of (weights, num_examples): the one-call form of :class:`WeightedSum`."""
    acc: WeightedSum | None = None
    for weights, n in updates:
        if acc is None:
            acc = WeightedSum(weights)
        acc.add(weights, n)
    if acc is None:
        raise ValueError("no update to aggregate")
    return acc.result()
