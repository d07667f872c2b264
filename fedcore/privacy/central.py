"""Central differential privacy as strategy wrappers: clip each update, noise the mean.

After Flower's ``DifferentialPrivacyServerSideFixedClipping`` and ``...AdaptiveClipping``,
written against the streaming strategy interface (:class:`WeightsStrategy`): ``begin(global)``
gives an aggregator that takes updates one by one and returns ``(weights, round_metrics)``.
Three things differ from Flower, each for the guarantee:

- the wrapper averages the clipped changes itself, each device counting once, and adds the
  noise to that mean. Weighting by example counts would let one device move the mean by more
  than C / n, which the noise does not cover;
- the inner strategy then receives one update, the private mean, so a server optimizer
  (FedAvgM, FedAdam...) steps on the private mean, as in DP-FedAvg and DP-FedAdam, and the
  guarantee holds whatever it does (post-processing). Strategies that compare updates (median,
  Krum) have nothing left to compare: robust aggregation and central DP do not combine;
- adaptive clipping (Andrew et al. 2021) counts the updates at or below C, as in the paper,
  and the noise uses the bound the updates were clipped with.

Memory stays O(model): the clipped changes are summed as they arrive.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, Protocol

import numpy as np

from .mechanisms import Weights, add_gaussian_noise, central_noise_std, clip_by_norm, difference


class RoundAggregator(Protocol):
    """One round's aggregation, fed one update at a time."""

    def add(self, device: str, weights: Mapping[str, np.ndarray], num_examples: int,
            metrics: Mapping[str, float]) -> None: ...

    def result(self) -> tuple[Weights, dict[str, Any]]: ...


class WeightsStrategy(Protocol):
    """A strategy that combines weights: ``begin`` starts a round from the global model."""

    name: str

    def begin(self, global_weights: Mapping[str, np.ndarray]) -> RoundAggregator: ...


# The name under which the private mean reaches the inner strategy.
PRIVATE_MEAN = "dp-mean"


def _check_noise(noise_multiplier: float) -> None:
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError("noise_multiplier must be a non-negative number")


def _check_norm(clipping_norm: float, what: str = "clipping_norm") -> None:
    if not (math.isfinite(clipping_norm) and clipping_norm > 0):
        raise ValueError(f"{what} must be a positive number")


class _PrivateRound:
    """Sums clipped changes; at the end noises their mean and hands it to the inner strategy."""

    def __init__(self, owner: _DPStrategy, global_weights: Mapping[str, np.ndarray]) -> None:
        self._owner = owner
        self._clipping_norm = owner.clipping_norm  # fixed for the round, even if adapted after
        self._global = {n: np.asarray(a) for n, a in global_weights.items()}
        self._sum = {n: np.zeros(a.shape, dtype=np.float64) for n, a in self._global.items()}
        self._inner = owner.strategy.begin(global_weights)
        self._count = 0
        self._examples = 0
        self._clipped: list[str] = []

    def add(self, device: str, weights: Mapping[str, np.ndarray], num_examples: int,
            metrics: Mapping[str, float]) -> None:
        clipped = clip_by_norm(difference(weights, self._global), self._clipping_norm)
        for name, total in self._sum.items():
            np.add(total, clipped.tensors[name], out=total)
        self._count += 1
        self._examples += num_examples
        if clipped.clipped:
            self._clipped.append(device)

    def result(self) -> tuple[Weights, dict[str, Any]]:
        if self._count == 0:
            raise ValueError("no update to aggregate")
        n = self._count
        std = central_noise_std(self._owner.update_noise_multiplier, self._clipping_norm, n)
        mean = add_gaussian_noise({k: s / n for k, s in self._sum.items()}, std, self._owner.rng)
        private = {k: (g.astype(np.float64) + mean[k]).astype(g.dtype) for k, g in self._global.items()}
        self._inner.add(PRIVATE_MEAN, private, self._examples, {})
        weights, metrics = self._inner.result()
        unclipped = n - len(self._clipped)
        metrics = {**metrics, "dp_clipping_norm": self._clipping_norm,
                   "dp_noise_multiplier": self._owner.noise_multiplier, "dp_noise_std": std,
                   "dp_updates": n, "dp_clipped": len(self._clipped),
                   "dp_clipped_devices": sorted(self._clipped)}
        self._owner.round_closed(unclipped, n, metrics)
        return weights, metrics


class _DPStrategy:
    """What the fixed and adaptive wrappers share."""

    def __init__(self, strategy: WeightsStrategy, noise_multiplier: float, clipping_norm: float,
                 rng: np.random.Generator | None) -> None:
        _check_noise(noise_multiplier)
        _check_norm(clipping_norm)
        self.strategy = strategy
        self.noise_multiplier = float(noise_multiplier)
        self.update_noise_multiplier = float(noise_multiplier)
        self.clipping_norm = float(clipping_norm)
        self.rng = rng or np.random.default_rng()

    def begin(self, global_weights: Mapping[str, np.ndarray]) -> RoundAggregator:
        return _PrivateRound(self, global_weights)

    def round_closed(self, unclipped: int, count: int, metrics: dict[str, Any]) -> None:
        """Called once per round with how many updates were at or below the bound."""

    def get_state(self) -> dict[str, Any]:
        """What must survive a restart, beside each round's checkpoint (the inner strategy's too)."""
        inner = getattr(self.strategy, "get_state", None)
        return {"clipping_norm": self.clipping_norm, "inner": inner() if inner else None}

    def set_state(self, state: Mapping[str, Any]) -> None:
        norm = float(state["clipping_norm"])
        _check_norm(norm)
        self.clipping_norm = norm
        inner = getattr(self.strategy, "set_state", None)
        if inner is not None and state.get("inner") is not None:
            inner(state["inner"])


class DPFixedClipping(_DPStrategy):
    """Central DP with a fixed clipping bound C: each change clipped to L2 norm C, and Gaussian
    noise of standard deviation noise_multiplier * C / n on the mean of the n updates."""

    def __init__(self, strategy: WeightsStrategy, noise_multiplier: float, clipping_norm: float, *,
                 rng: np.random.Generator | None = None) -> None:
        super().__init__(strategy, noise_multiplier, clipping_norm, rng)
        self.name = f"dp-fixed-clipping({strategy.name})"


class DPAdaptiveClipping(_DPStrategy):
    """Central DP whose bound follows a quantile of the update norms (Andrew et al. 2021).

    Each round, with b the share of updates whose norm is at most C, noised with standard
    deviation ``clipped_count_stddev`` / n, the bound moves geometrically:
    C <- C * exp(-clip_norm_lr * (b - target_quantile)). The count is private too: the updates'
    noise multiplier is raised to (z^-2 - (2 sigma_b)^-2)^-1/2 so that both together spend what
    ``noise_multiplier`` z alone would.
    """

    def __init__(self, strategy: WeightsStrategy, noise_multiplier: float, num_sampled: int, *,
                 initial_clipping_norm: float = 0.1, target_quantile: float = 0.5,
                 clip_norm_lr: float = 0.2, clipped_count_stddev: float | None = None,
                 rng: np.random.Generator | None = None) -> None:
        super().__init__(strategy, noise_multiplier, initial_clipping_norm, rng)
        if num_sampled < 1:
            raise ValueError("num_sampled must be at least 1")
        if not 0 <= target_quantile <= 1:
            raise ValueError("target_quantile must be from 0 to 1")
        if not (math.isfinite(clip_norm_lr) and clip_norm_lr > 0):
            raise ValueError("clip_norm_lr must be a positive number")
        if noise_multiplier == 0:
            count_stddev = 0.0 if clipped_count_stddev is None else clipped_count_stddev
        else:
            # Andrew et al. suggest the expected number of updates / 20.
            count_stddev = num_sampled / 20 if clipped_count_stddev is None else clipped_count_stddev
            if not noise_multiplier < 2 * count_stddev:
                raise ValueError(
                    f"noise_multiplier {noise_multiplier} must be below 2 x clipped_count_stddev "
                    f"({2 * count_stddev}): raise clipped_count_stddev or num_sampled")
            self.update_noise_multiplier = (noise_multiplier ** -2 - (2 * count_stddev) ** -2) ** -0.5
        if not (math.isfinite(count_stddev) and count_stddev >= 0):
            raise ValueError("clipped_count_stddev must be a non-negative number")
        self.name = f"dp-adaptive-clipping({strategy.name})"
        self.target_quantile = target_quantile
        self.clip_norm_lr = clip_norm_lr
        self.clipped_count_stddev = count_stddev

    def round_closed(self, unclipped: int, count: int, metrics: dict[str, Any]) -> None:
        share = (unclipped + self.rng.normal(0.0, self.clipped_count_stddev)) / count
        self.clipping_norm *= math.exp(-self.clip_norm_lr * (share - self.target_quantile))
        metrics["dp_next_clipping_norm"] = self.clipping_norm
