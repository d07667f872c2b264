"""FedBuff's arithmetic (Nguyen et al. 2022): staleness weights and the buffer of deltas.

In asynchronous mode each update is the difference between the weights a device sends
and the global model version it trained from. It enters a float64 running sum weighted
by its example count times its staleness weight, and after K updates the next global
model is ``x + sum(n_i * s(tau_i) * delta_i) / sum(n_i)``: with no stale update that is
exactly FedAvg's mean, and a stale update pulls the model less. Pure NumPy, no locks,
no storage (:mod:`.async_rounds` drives it).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

Weights = dict[str, np.ndarray]
DEFAULT_STALENESS_EXPONENT = 0.5  # s(tau) = (1 + tau) ** -0.5, FedBuff's 1/sqrt(1 + staleness)


def staleness_weight(staleness: int | np.ndarray, exponent: float = DEFAULT_STALENESS_EXPONENT
                     ) -> np.ndarray:
    """``(1 + staleness) ** -exponent``: 1 for a fresh update, smaller the older it is
    (exponent 0 weighs every update alike)."""
    tau = np.asarray(staleness, dtype=np.float64)
    if np.any(tau < 0):
        raise ValueError("staleness must be 0 or more")
    return np.power(1.0 + tau, -float(exponent))


class DeltaBuffer:
    """Streaming float64 sum of weighted deltas; O(model) memory however many updates.

    Not thread-safe: its owner folds updates in one at a time."""

    def __init__(self, template: Mapping[str, np.ndarray]) -> None:
        self._sums = {n: np.zeros(np.shape(a), dtype=np.float64) for n, a in template.items()}
        self.count = 0
        self.total_examples = 0

    def add(self, weights: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray],
            num_examples: int, weight: float) -> None:
        """Fold in ``num_examples * weight * (weights - base)``."""
        if num_examples <= 0:
            raise ValueError("num_examples must be positive")
        scale = float(num_examples) * float(weight)
        for name, total in self._sums.items():
            delta = np.subtract(weights[name], base[name], dtype=np.float64)
            np.add(total, np.multiply(delta, scale, out=delta), out=total)
        self.count += 1
        self.total_examples += int(num_examples)

    def step(self, current: Mapping[str, np.ndarray]) -> Weights:
        """The float64 model the buffer moves ``current`` to (what a server optimizer steps from)."""
        if self.total_examples == 0:
            raise ValueError("no update to aggregate")
        return {n: np.asarray(current[n], dtype=np.float64) + s / self.total_examples
                for n, s in self._sums.items()}
