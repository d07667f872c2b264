"""The ``--dp`` settings of a run and the wrapper they build; their defaults live here, once."""

from __future__ import annotations

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

    # --dp MODE turns it on (the group's switch); the rest are --dp-NAME.
    mode: str = params.setting(
        "central-fixed", "differential privacy: central-fixed / central-adaptive (the server clips "
        "each update, to a fixed bound or one that follows a quantile of the norms, and noises the "
        "mean), local (each device clips and noises its own update) or distributed (with secure "
        "aggregation: each device clips and adds its share of the noise before masking)",
        choices=DP_MODES, flag="--dp", metavar="MODE")
    noise_multiplier: float = params.number(1.0, 0, 100,
                                            help="noise standard deviation over the clipping bound")
    clipping_norm: float = params.number(1.0, above=0, high=1e6, aliases=("--dp-clip",),
                                         help="L2 clipping bound of each update's change; the first "
                                              "bound for central-adaptive")
    delta: float = params.number(1e-5, above=0, high=0.5, help="delta at which epsilon is reported")
    max_epsilon: float | None = params.number(None, above=0, high=1e6,
                                              help="privacy budget: the run stops before a round that "
                                                   "would spend more (default: none)")
    target_quantile: float = params.number(0.5, 0, 1,
                                           help="central-adaptive: share of updates left unclipped")
    clip_norm_lr: float = params.number(0.2, 0, 10, aliases=("--dp-clip-lr",),
                                        help="central-adaptive: learning rate of the bound")
    clipped_count_stddev: float | None = params.number(
        None, 0, 1e6, help="central-adaptive: noise on the count of unclipped updates (default: "
                           "devices per round / 20)")

    ADAPTIVE_ONLY = ("target_quantile", "clip_norm_lr", "clipped_count_stddev")

    def wrap(self, strategy: Strategy, devices_per_round: int) -> Strategy:
        """``strategy`` behind the DP wrapper; :class:`params.SettingError` (one line, naming the
        setting as ``dp.NAME``) for settings that cannot work."""
        if self.mode not in DP_MODES:
            raise params.SettingError(f"{{0}} must be one of {', '.join(DP_MODES)}, got {self.mode!r}",
                                      "dp.mode")
        params.check_numbers(self, "dp.")
        if self.mode != "central-adaptive":
            default = DPConfig()
            for name in self.ADAPTIVE_ONLY:
                if getattr(self, name) != getattr(default, name):
                    raise params.SettingError("{0} applies to {1}=central-adaptive only", f"dp.{name}",
                                              "dp.mode")
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
