"""Differential privacy: clipping and Gaussian noise, the strategy wrapper, and the privacy spent.

- :mod:`.mechanisms` -- pure functions: clip an update's L2 norm, add Gaussian noise, and the
  noise each form of DP needs (central, a device's share for secure aggregation, local);
- :mod:`.strategy` -- :class:`DPFixedClipping`, :class:`DPAdaptiveClipping` (central DP, wrapping
  any averaging strategy), :class:`LocalDP` and :class:`DistributedDP` (with secure
  aggregation), behind the one strategy interface;
- :mod:`.accounting` -- :class:`PrivacyAccountant`: epsilon at a given delta, saved and
  restored, and the ``--dp-max-epsilon`` check;
- :mod:`.config` -- :class:`DPConfig`, the ``--dp`` settings of a run.
"""

from .accounting import BudgetExhausted, PrivacyAccountant, round_event
from .config import DP_MODES, DPConfig, describe_dp
from .mechanisms import (
    Clipped,
    add_gaussian_noise,
    add_noise_share,
    central_noise_std,
    clip_and_noise,
    clip_by_norm,
    difference,
    distributed_noise_std,
    l2_norm,
    privatize_update,
)
from .strategy import (
    DistributedDP,
    DPAdaptiveClipping,
    DPFixedClipping,
    LocalDP,
    distributed_dp_task,
    local_dp_task,
)

__all__ = [
    "DP_MODES",
    "BudgetExhausted",
    "Clipped",
    "DPAdaptiveClipping",
    "DPConfig",
    "DPFixedClipping",
    "DistributedDP",
    "LocalDP",
    "PrivacyAccountant",
    "add_gaussian_noise",
    "add_noise_share",
    "central_noise_std",
    "clip_and_noise",
    "clip_by_norm",
    "describe_dp",
    "difference",
    "distributed_dp_task",
    "distributed_noise_std",
    "l2_norm",
    "local_dp_task",
    "privatize_update",
    "round_event",
]
