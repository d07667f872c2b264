"""q-FedAvg (Li et al. 2020, "Fair Resource Allocation in Federated Learning"): fairness by loss.

q-FFL minimises sum_k F_k^(q+1) / (q+1) instead of the mean loss, so the devices whose data
the global model fits worst weigh most in the next step and accuracy spreads less across
devices: the larger ``q``, the fairer (and the slower); q = 0 is a plain unweighted average
of the updates. Each round, from global weights w, with device k's new weights w_k, its loss
F_k and L = 1 / learning_rate (the Lipschitz constant the paper estimates from the devices'
learning rate):

    Δw_k = L (w - w_k)                             device k's update, as a gradient
    Δ_k  = F_k^q Δw_k
    h_k  = q F_k^(q-1) ||Δw_k||² + L F_k^q         ||.||² over all tensors together
    w'   = w - Σ_k Δ_k / Σ_k h_k

F_k is the loss of the global model w on device k's own training data, measured before it
trains: the task config asks for it (``start_loss: true``) and the device reports it as the
fit metric ``start_loss``. Flower's ``QFedAvg`` puts the server's own evaluation loss in
every F_k; the paper's per-device loss is what makes the step fair. As in Flower, F_k + 1e-10
stands for F_k, so a device that fits its data perfectly still has a step.

Streaming: Σ_k F_k^q (w - w_k) is folded into float64 sums and Σ_k h_k into one number as
each update arrives, so memory stays O(model) however many devices report. Being a formula
in w and w_k, it works as it is in asynchronous mode, where w is zero and each w_k a
staleness-weighted change. It needs each device's own update and loss, so it cannot run
under secure aggregation (the server sees only the sum) nor central DP (one private mean).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..params import setting
from .base import (
    DEFAULT_MEMORY_BUDGET,
    AggregationError,
    InvalidUpdate,
    RoundAggregator,
    Strategy,
    Weights,
)

# The fit metric a device reports with its update: the global model's loss on its training data.
START_LOSS = "start_loss"
# Added to every loss, as in Flower: F^(q-1) stays finite at a zero loss.
LOSS_EPSILON = 1e-10


def start_loss(metrics: Mapping[str, Any]) -> float:
    """The ``start_loss`` an update's metrics report; :class:`InvalidUpdate` naming it when it is
    missing, not a number, negative, NaN or infinite (metrics may come from anywhere)."""
    if START_LOSS not in metrics:
        raise InvalidUpdate(f"the update's metrics have no {START_LOSS}: qfedavg weighs each update by "
                            "the global model's loss on the device's data before it trained (the task "
                            f"config asks for it with {START_LOSS}: true)", START_LOSS)
    value = metrics[START_LOSS]
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise InvalidUpdate(f"{START_LOSS} must be a number, got {value!r}", START_LOSS)
    try:
        loss = float(value)
    except OverflowError:  # an integer beyond float64
        loss = math.inf
    if not (math.isfinite(loss) and loss >= 0):
        raise InvalidUpdate(f"{START_LOSS} must be a finite number, 0 or more, got {loss!r}", START_LOSS)
    return loss


class FairAggregator(RoundAggregator):
    """Folds each update into q-FFL's two running sums: F_k^q (w - w_k) per tensor, in float64,
    and h_k as one number. No update is kept, and the example counts play no part (q-FFL
    weighs a device by its loss alone)."""

    strategy: QFedAvg

    def __init__(self, strategy: QFedAvg, global_weights: Mapping[str, np.ndarray]) -> None:
        super().__init__(strategy, global_weights, {})
        self._sums = {n: np.zeros(a.shape, dtype=np.float64) for n, a in self.template.items()}
        self._h = 0.0

    def _fold(self, device: str, weights: Mapping[str, np.ndarray], num_examples: int, *,
              metrics: Mapping[str, Any]) -> None:
        q, lipschitz = self.strategy.q, 1.0 / self.strategy.learning_rate
        loss = start_loss(metrics) + LOSS_EPSILON
        # What can refuse the update comes before the sums change: ||w - w_k||² first, one tensor
        # at a time (one tensor-sized temporary, never a copy of the update).
        with np.errstate(over="ignore", invalid="ignore"):
            squared = 0.0
            for name, base in self.template.items():
                diff = np.subtract(base, weights[name], dtype=np.float64)
                squared += float(np.vdot(diff, diff))
            scale = float(np.float_power(loss, q))
            h = q * float(np.float_power(loss, q - 1)) * lipschitz * lipschitz * squared + lipschitz * scale
        if not (math.isfinite(scale) and math.isfinite(h)):
            raise InvalidUpdate(f"{START_LOSS} {loss - LOSS_EPSILON:g} with q={q:g} (or the update's "
                                "size) overflows q-FFL's weights", START_LOSS)
        for name, total in self._sums.items():
            diff = np.subtract(self.template[name], weights[name], dtype=np.float64)
            diff *= scale  # in place: no second temporary (a 0-d tensor's diff is a scalar)
            total += diff
        self._h += h

    def _combine(self) -> tuple[Weights, Weights, dict[str, dict[str, Any]]]:
        if not (self._h > 0 and math.isfinite(self._h)):
            raise AggregationError(f"{self.strategy.name}: the updates' h_k add up to {self._h:g}, "
                                   "no step can be taken from that")
        # Σ_k Δ_k / Σ_k h_k = L Σ_k F_k^q (w - w_k) / Σ_k h_k
        step = (1.0 / self.strategy.learning_rate) / self._h
        with np.errstate(over="ignore", invalid="ignore"):  # result() refuses NaN or infinity
            weights = {n: np.subtract(base, step * self._sums[n], dtype=np.float64)
                       for n, base in self.template.items()}
        return weights, {}, {}


@dataclass
class QFedAvg(Strategy):
    """q-FedAvg (Li et al. 2020): fair federated learning, each update weighted by its device's loss
    to the power q (q-FFL), so the devices the global model fits worst count most.

    Each device reports start_loss, the global model's loss on its training data before it trains
    (asked for in the task config); an update without it is refused.
    """

    name = "qfedavg"
    q: float = setting(0.2, "fairness: each update weighs by its device's loss to the power q "
                            "(0: a plain average of the updates, larger: fairer)")
    learning_rate: float = setting(0.1, "the devices' learning rate as q-FFL assumes it: "
                                        "L = 1 / learning_rate bounds the step (Flower's qffl_learning_rate)")

    def validate(self) -> None:
        if not (math.isfinite(self.q) and self.q >= 0):
            raise ValueError(f"q must be 0 or more, got {self.q}")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"learning_rate must be positive, got {self.learning_rate}")

    def task_config(self) -> dict[str, Any]:
        return {START_LOSS: True}

    def begin(self, global_weights: Mapping[str, np.ndarray], *, spill_dir: str | Path | None = None,
              memory_budget: int = DEFAULT_MEMORY_BUDGET) -> RoundAggregator:
        return FairAggregator(self, global_weights)
