"""Differential privacy: clipping and Gaussian noise, strategy wrappers, and the privacy spent.

- :mod:`.mechanisms` -- pure functions: clip an update's L2 norm, add Gaussian noise, and the
  noise each form of DP needs (central, distributed with secure aggregation, local);
- :mod:`.central` -- :class:`DPFixedClipping` and :class:`DPAdaptiveClipping`, wrapping any
  strategy that combines weights;
- :mod:`.accounting` -- :class:`PrivacyAccountant`: epsilon at a given delta, saved and
  restored, and the ``--dp-max-epsilon`` check.
"""

from .accounting import BudgetExhausted, PrivacyAccountant, round_event
from .central import DPAdaptiveClipping, DPFixedClipping, RoundAggregator, WeightsStrategy
from .mechanisms import (
    Clipped,
    add_gaussian_noise,
    central_noise_std,
    clip_and_noise,
    clip_by_norm,
    difference,
    distributed_noise_std,
    l2_norm,
)

__all__ = [
    "BudgetExhausted",
    "Clipped",
    "DPAdaptiveClipping",
    "DPFixedClipping",
    "PrivacyAccountant",
    "RoundAggregator",
    "WeightsStrategy",
    "add_gaussian_noise",
    "central_noise_std",
    "clip_and_noise",
    "clip_by_norm",
    "difference",
    "distributed_noise_std",
    "l2_norm",
    "round_event",
]
