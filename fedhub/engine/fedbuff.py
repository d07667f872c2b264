"""FedBuff's staleness weights (Nguyen et al. 2022).

In asynchronous mode each update is the difference between the weights a device sends
and the global model version it trained from. It enters the float64 running sum of
:class:`.aggregation.WeightedSum` weighted by its example count times its staleness weight,
and after K updates the next global model is ``x + sum(n_i * s(tau_i) * delta_i) / sum(n_i)``:
with no stale update that is exactly FedAvg's mean, and a stale update pulls the model less.
"""

from __future__ import annotations

import numpy as np

DEFAULT_STALENESS_EXPONENT = 0.5  # s(tau) = (1 + tau) ** -0.5, FedBuff's 1/sqrt(1 + staleness)


def staleness_weight(staleness: int | np.ndarray, exponent: float = DEFAULT_STALENESS_EXPONENT
                     ) -> np.ndarray:
    """``(1 + staleness) ** -exponent``: 1 for a fresh update, smaller the older it is
    (exponent 0 weighs every update alike)."""
    tau = np.asarray(staleness, dtype=np.float64)
    if np.any(tau < 0):
        raise ValueError("staleness must be 0 or more")
    return np.power(1.0 + tau, -float(exponent))
