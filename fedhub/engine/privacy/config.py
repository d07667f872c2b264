"""The ``--dp`` settings of a run and the wrapper they build; their defaults live here, once."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .. import params
from ..strategies.base import Strategy
from .strategy import DistributedDP, DPAdaptiveClipping, DPFixedClipping, LocalDP

DP_MODES = ("central-fixed", "central-adaptive", "local", "distributed")


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
    # Ranges: fedhub.engine.params.check_numbers (FederationConfig.validate) refuses the rest at start-up.
    noise_multiplier: float = params.number(1.0, 0, 100)
    clipping_norm: float = params.number(1.0, above=0, high=1e6)
    delta: float = params.number(1e-5, above=0, high=0.5)
    max_epsilon: float | None = params.number(None, above=0, high=1e6)
    target_quantile: float = params.number(0.5, 0, 1)
    clip_norm_lr: float = params.number(0.2, 0, 10)
    clipped_count_stddev: float | None = params.number(None, 0, 1e6)

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
        if self.mode == "distributed":
            return DistributedDP(strategy, self.noise_multiplier, self.clipping_norm, devices_per_round,
                                 **common)
        cls = DPFixedClipping if self.mode == "central-fixed" else LocalDP
        return cls(strategy, self.noise_multiplier, self.clipping_norm, **common)


def describe_dp(settings: Mapping[str, Any]) -> str:
    """DP settings (``Strategy.privacy_settings()``) in words, for a message: "central-fixed
    with noise multiplier 1.1, clipping norm 0.5, delta 1e-05, max epsilon none"."""
    rest = ", ".join(f"{key.replace('_', ' ')} {'none' if value is None else format(value, 'g')}"
                     for key, value in settings.items() if key != "mode")
    return f"{settings.get('mode')}{' with ' + rest if rest else ''}"
