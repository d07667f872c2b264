"""FedAvg and its streaming relatives: FedAvgM and FedProx.

They need only the sample-weighted mean of the updates, so each update is folded
into a float64 running sum as it arrives (:class:`~fedhub.engine.aggregation.WeightedSum`)
and memory stays O(model) however many devices report. A server optimizer then
turns the mean into the next global model (:meth:`Averaging.server_step`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..aggregation import WeightedSum
from ..params import setting
from .base import DEFAULT_MEMORY_BUDGET, RoundAggregator, Strategy, Weights

if TYPE_CHECKING:  # partials clips with the privacy mechanisms, which import the strategies
    from ..partials import Share


class StreamingAggregator(RoundAggregator):
    """Folds each update into a float64 weighted sum; the strategy steps from the mean."""

    def __init__(self, strategy: Averaging, global_weights: Mapping[str, np.ndarray],
                 state: Mapping[str, np.ndarray]) -> None:
        super().__init__(strategy, global_weights, state)
        self._sum = WeightedSum(self.template)

    def _fold(self, device: str, weights: Mapping[str, np.ndarray], num_examples: int, *,
              metrics: Mapping[str, Any]) -> None:
        self._sum.add(weights, num_examples)

    def add_secure_mean(self, devices: Sequence[str], mean: Mapping[str, np.ndarray], weight: int) -> None:
        """The weighted mean of ``devices``' models, summed under secure aggregation: the server
        never saw them one by one, so it is folded in whole, with their summed weight."""
        self._check_tensors(mean)
        with self._lock:
            if self._closed:
                raise RuntimeError("this round's aggregator is closed")
            self._sum.add(mean, weight)
            self._record_secure(devices, weight)

    def _fold_partial(self, shares: Sequence[Share], sums: Mapping[str, np.ndarray], unclipped: int) -> None:
        self._sum.add_sums(sums, sum(s.num_examples for s in shares), len(shares))

    def _combine(self) -> tuple[Weights, Weights, dict[str, dict[str, Any]]]:
        mean = self._sum.mean()
        current = {n: a.astype(np.float64) for n, a in self.template.items()}
        weights, state = self.strategy.server_step(current, mean, self._state)
        return weights, state, {}


class Averaging(Strategy):
    """A strategy built on the weighted mean; subclasses override :meth:`server_step`."""

    sums_only = True

    def begin(self, global_weights: Mapping[str, np.ndarray], *, spill_dir: str | Path | None = None,
              memory_budget: int = DEFAULT_MEMORY_BUDGET) -> RoundAggregator:
        return StreamingAggregator(self, global_weights, self._state_for(global_weights))

    def server_step(self, current: Weights, mean: Weights, state: Weights) -> tuple[Weights, Weights]:
        """The next global model (float64) and state, from the current model and the mean update.
        Pure: returns new arrays and never changes its arguments."""
        return mean, {}


@dataclass
class FedAvg(Averaging):
    """Federated averaging (McMahan et al. 2017): the mean of the updates weighted by examples."""

    name = "fedavg"


@dataclass
class FedProx(FedAvg):
    """FedProx (Li et al. 2020): FedAvg on the server; each device adds the proximal term
    (mu/2)·||w - w_global||² to its local loss, with mu sent as proximal_mu in the task config."""

    name = "fedprox"
    proximal_mu: float = setting(0.01, "weight of the proximal term in each device's loss (0 is FedAvg)")

    def validate(self) -> None:
        if self.proximal_mu < 0:
            raise ValueError(f"proximal_mu must be 0 or more, got {self.proximal_mu}")

    def task_config(self) -> dict[str, Any]:
        return {"proximal_mu": self.proximal_mu}


@dataclass
class FedAvgM(Averaging):
    """FedAvg with server momentum (Hsu et al. 2019): SGD with momentum on the pseudo-gradient
    (current model minus the mean); the velocity is state saved with each checkpoint."""

    name = "fedavgm"
    state_tensors = ("velocity",)
    server_learning_rate: float = setting(1.0, "server step size on the pseudo-gradient")
    server_momentum: float = setting(0.9, "momentum factor (0 with rate 1 is FedAvg)")

    def validate(self) -> None:
        if self.server_learning_rate <= 0:
            raise ValueError(f"server_learning_rate must be positive, got {self.server_learning_rate}")
        if not 0 <= self.server_momentum < 1:
            raise ValueError(f"server_momentum must be in [0, 1), got {self.server_momentum}")

    def server_step(self, current: Weights, mean: Weights, state: Weights) -> tuple[Weights, Weights]:
        weights, new_state = {}, {}
        for name, x in current.items():
            key = f"velocity/{name}"
            velocity = self.server_momentum * state.get(key, 0.0) + (x - mean[name])
            new_state[key] = velocity
            weights[name] = x - self.server_learning_rate * velocity
        return weights, new_state
