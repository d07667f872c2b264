"""Server optimizers on the averaged update: FedAdam, FedYogi, FedAdagrad.

After Reddi et al. 2021, "Adaptive Federated Optimization", with Flower's setting
names and defaults. Each round the mean update ``delta = mean - x`` is a
pseudo-gradient step; the server keeps first and second moments ``m`` and ``v``
(and a step counter) as state, saved with each round's checkpoint:

    m = beta_1·m + (1 - beta_1)·delta
    v = (Adam)    beta_2·v + (1 - beta_2)·delta²
        (Yogi)    v - (1 - beta_2)·delta²·sign(v - delta²)
        (Adagrad) v + delta², with m = delta
    x = x + step_size·m / (sqrt(v) + tau)

FedAdam's step size has Adam's bias correction for step ``t`` (Kingma & Ba 2015):
``eta·sqrt(1 - beta_2^t) / (1 - beta_1^t)``; the others use ``eta``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..params import setting
from .averaging import Averaging
from .base import Weights


def _eta(default: float) -> Any:
    return setting(default, "server learning rate")


def _eta_l(default: float | None) -> Any:
    return setting(default, "devices' learning rate, sent as learning_rate in the task config "
                            "(none: the run's --learning-rate)")


def _tau(default: float) -> Any:
    return setting(default, "adaptivity: added to sqrt(v) in the step's denominator")


def _beta(index: int, default: float) -> Any:
    moment = "first" if index == 1 else "second"
    return setting(default, f"decay of the {moment}-moment estimate")


class ServerOptimizer(Averaging):
    """Shared steps of the FedOpt family; a subclass gives :meth:`second_moment` and may change
    :meth:`step_size`. Without a ``beta_1`` setting the first moment is the update itself."""

    state_tensors = ("m", "v")
    state_scalars = ("step",)
    eta: float
    eta_l: float | None
    tau: float
    beta_1: float = 0.0

    def validate(self) -> None:
        if not self.eta > 0:
            raise ValueError(f"eta must be positive, got {self.eta}")
        if self.eta_l is not None and not self.eta_l > 0:
            raise ValueError(f"eta_l must be positive, got {self.eta_l}")
        if not self.tau > 0:
            raise ValueError(f"tau must be positive, got {self.tau}")
        for name in ("beta_1", "beta_2"):
            value = getattr(self, name, 0.0)
            if not 0 <= value < 1:
                raise ValueError(f"{name} must be in [0, 1), got {value}")

    def task_config(self) -> dict[str, Any]:
        return {} if self.eta_l is None else {"learning_rate": self.eta_l}

    def second_moment(self, v: np.ndarray | float, delta: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def step_size(self, t: int) -> float:
        return self.eta

    def server_step(self, current: Weights, mean: Weights, state: Weights) -> tuple[Weights, Weights]:
        t = int(state.get("step", 0)) + 1
        size = self.step_size(t)
        weights: Weights = {}
        new_state: Weights = {"step": np.array(t, dtype=np.float64)}
        for name, x in current.items():
            delta = mean[name] - x
            m = self.beta_1 * state.get(f"m/{name}", 0.0) + (1 - self.beta_1) * delta
            v = self.second_moment(state.get(f"v/{name}", 0.0), delta)
            if "m" in self.state_tensors:
                new_state[f"m/{name}"] = m
            new_state[f"v/{name}"] = v
            weights[name] = x + size * m / (np.sqrt(v) + self.tau)
        return weights, new_state


@dataclass
class FedAdam(ServerOptimizer):
    """FedAdam (Reddi et al. 2021): Adam with bias correction on the mean update."""

    name = "fedadam"
    eta: float = _eta(1e-1)
    eta_l: float | None = _eta_l(None)
    beta_1: float = _beta(1, 0.9)
    beta_2: float = _beta(2, 0.99)
    tau: float = _tau(1e-3)

    def second_moment(self, v, delta):
        return self.beta_2 * v + (1 - self.beta_2) * delta * delta

    def step_size(self, t: int) -> float:
        return self.eta * math.sqrt(1 - self.beta_2 ** t) / (1 - self.beta_1 ** t)


@dataclass
class FedYogi(FedAdam):
    """FedYogi (Reddi et al. 2021): like FedAdam, but the second moment moves additively toward
    delta², which keeps the step from shrinking too fast on noisy (non-IID) updates; no bias
    correction."""

    name = "fedyogi"
    eta: float = _eta(1e-2)

    def second_moment(self, v, delta):
        sq = delta * delta
        return v - (1 - self.beta_2) * sq * np.sign(v - sq)

    def step_size(self, t: int) -> float:
        return self.eta


@dataclass
class FedAdagrad(ServerOptimizer):
    """FedAdagrad (Reddi et al. 2021): Adagrad on the mean update (no first-moment decay)."""

    name = "fedadagrad"
    state_tensors = ("v",)
    eta: float = _eta(1e-1)
    eta_l: float | None = _eta_l(None)
    tau: float = _tau(1e-3)

    def second_moment(self, v, delta):
        return v + delta * delta
