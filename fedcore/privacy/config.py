"""The ``--dp`` settings of a run and the wrapper they build; their defaults live here, once."""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..strategies.base import Strategy
from .strategy import DPAdaptiveClipping, DPFixedClipping, LocalDP

DP_MODES = ("central-fixed", "central-adaptive", "local")


@dataclass
class DPConfig:
    """Differential privacy for a run: which form, how much noise, and the budget.

    ``clipping_norm`` is the bound C (the first bound for ``central-adaptive``);
    ``noise_multiplier`` z gives noise of standard deviation z x C on the sum of the clipped
    updates; epsilon is reported at ``delta``; the run stops before a round that would take
    epsilon above ``max_epsilon``. ``target_quantile``, ``clip_norm_lr`` and
    ``clipped_count_stddev`` (default: devices per round / 20) steer adaptive clipping.
    """

    mode: str = "central-fixed"
    noise_multiplier: float = 1.0
    clipping_norm: float = 1.0
    delta: float = 1e-5
    max_epsilon: float | None = None
    target_quantile: float = 0.5
    clip_norm_lr: float = 0.2
    clipped_count_stddev: float | None = None

    def wrap(self, strategy: Strategy, devices_per_round: int) -> Strategy:
        """``strategy`` behind the DP wrapper; ValueError (one line) for settings that cannot work."""
        if self.mode not in DP_MODES:
            raise ValueError(f"dp mode must be one of {', '.join(DP_MODES)}, got {self.mode!r}")
        if not 0 < self.delta < 1:
            raise ValueError(f"dp delta must be in (0, 1), got {self.delta:g}")
        if self.max_epsilon is not None and not (math.isfinite(self.max_epsilon) and self.max_epsilon > 0):
            raise ValueError(f"dp max_epsilon must be a positive number, got {self.max_epsilon:g}")
        common = {"delta": self.delta, "max_epsilon": self.max_epsilon}
        if self.mode == "central-adaptive":
            return DPAdaptiveClipping(
                strategy, self.noise_multiplier, devices_per_round,
                initial_clipping_norm=self.clipping_norm, target_quantile=self.target_quantile,
                clip_norm_lr=self.clip_norm_lr, clipped_count_stddev=self.clipped_count_stddev, **common)
        cls = DPFixedClipping if self.mode == "central-fixed" else LocalDP
        return cls(strategy, self.noise_multiplier, self.clipping_norm, **common)
