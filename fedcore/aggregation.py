"""Aggregation strategies: small pure functions over NumPy arrays, apart from transport.

As in Flower, a strategy only says how updates combine; it knows nothing of
HTTP, rounds or storage. Aggregation streams: each update is folded into a
float64 running sum as it arrives and then dropped, so the server's memory is
O(model size) however many devices report.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Protocol

import numpy as np

Weights = dict[str, np.ndarray]


class Accumulator(Protocol):
    """Folds in one round's updates, one at a time."""

    def add(self, weights: Mapping[str, np.ndarray], num_examples: int) -> None: ...

    @property
    def count(self) -> int: ...

    @property
    def total_examples(self) -> int: ...

    def result(self) -> Weights: ...


class Strategy(Protocol):
    """One small interface per strategy: start an accumulator for a round."""

    name: str

    def accumulator(self, global_weights: Mapping[str, np.ndarray]) -> Accumulator: ...


class WeightedSum:
    """Streaming sample-weighted mean in float64; the result is cast back to each tensor's dtype."""

    def __init__(self, template: Mapping[str, np.ndarray]) -> None:
        self._dtypes = {name: a.dtype for name, a in template.items()}
        self._sums = {name: np.zeros(a.shape, dtype=np.float64) for name, a in template.items()}
        self._count = 0
        self._total = 0

    def add(self, weights: Mapping[str, np.ndarray], num_examples: int) -> None:
        if num_examples <= 0:
            raise ValueError("num_examples must be positive")
        for name, total in self._sums.items():
            # Multiply-add in place: no second model-sized temporary per update.
            np.add(total, np.multiply(weights[name], num_examples, dtype=np.float64), out=total)
        self._count += 1
        self._total += num_examples

    @property
    def count(self) -> int:
        return self._count

    @property
    def total_examples(self) -> int:
        return self._total

    def result(self) -> Weights:
        if self._total == 0:
            raise ValueError("no update to aggregate")
        return {
            name: (total / self._total).astype(self._dtypes[name])
            for name, total in self._sums.items()
        }


class FedAvg:
    """Federated averaging (McMahan et al. 2017): the mean weighted by each device's examples."""

    name = "fedavg"

    def accumulator(self, global_weights: Mapping[str, np.ndarray]) -> Accumulator:
        return WeightedSum(global_weights)


class _MomentumSum(WeightedSum):
    def __init__(self, global_weights: Mapping[str, np.ndarray], velocity: Weights,
                 lr: float, momentum: float) -> None:
        super().__init__(global_weights)
        self._global = {n: np.asarray(a, dtype=np.float64) for n, a in global_weights.items()}
        self._velocity = velocity
        self._lr = lr
        self._momentum = momentum

    def result(self) -> Weights:
        mean = super().result()
        out: Weights = {}
        for name, g in self._global.items():
            step = g - mean[name].astype(np.float64)
            v = self._momentum * self._velocity.get(name, 0.0) + step
            self._velocity[name] = v
            out[name] = (g - self._lr * v).astype(self._dtypes[name])
        return out


class FedAvgM:
    """FedAvg with server momentum (Hsu et al. 2019), as in Flower's FedAvgM."""

    name = "fedavgm"

    def __init__(self, server_learning_rate: float = 1.0, momentum: float = 0.9) -> None:
        self.server_learning_rate = server_learning_rate
        self.momentum = momentum
        self._velocity: Weights = {}

    def accumulator(self, global_weights: Mapping[str, np.ndarray]) -> Accumulator:
        return _MomentumSum(global_weights, self._velocity, self.server_learning_rate, self.momentum)


STRATEGIES = {"fedavg": FedAvg, "fedavgm": FedAvgM}


def make_strategy(name: str) -> Strategy:
    """Build a strategy by name; unknown names list the known ones."""
    try:
        return STRATEGIES[name]()
    except KeyError:
        raise ValueError(f"unknown strategy {name!r}; choose from {sorted(STRATEGIES)}") from None


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
