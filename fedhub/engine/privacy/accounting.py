"""How much privacy a run has spent: epsilon at a given delta, from ``dp-accounting``'s RDP accountant.

Each round is one Poisson-sampled Gaussian mechanism: every device takes part with probability
``sampling_rate`` (the selected share of the available devices) and the aggregate carries noise
``noise_multiplier`` times the clipping bound. The rounds compose; the accountant's state is only
how many rounds ran with which parameters, so it is saved as a small JSON object and restored
after a restart. FedHub selects a fixed number of devices rather than sampling each one
independently; Poisson sampling is the standard approximation for it, as in TensorFlow
Federated and Flower.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..errors import RunOver


class _DropConvergenceWarnings(logging.Filter):
    """The RDP accountant warns for each fractional order whose series does not converge and
    leaves that order out; the result stands, so the warning would only flood the server log."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "failed to converge" not in record.getMessage()


logging.getLogger("absl").addFilter(_DropConvergenceWarnings())


class BudgetExhausted(RunOver):
    """The next round would spend more privacy than ``--dp-max-epsilon`` allows."""

    code = "privacy_budget_spent"


def round_event(sampling_rate: float, noise_multiplier: float, rounds: int = 1) -> Any:
    """``rounds`` rounds of the Poisson-sampled Gaussian mechanism, as a ``dp-accounting`` event."""
    import dp_accounting  # here, not at the top: devices (local DP) need no accountant and its SciPy

    return dp_accounting.SelfComposedDpEvent(
        dp_accounting.PoissonSampledDpEvent(sampling_rate, dp_accounting.GaussianDpEvent(noise_multiplier)),
        rounds)


@dataclass
class PrivacyAccountant:
    """Epsilon spent at ``delta`` over the rounds recorded so far."""

    delta: float
    # Runs of consecutive rounds with the same parameters: [sampling_rate, noise_multiplier, rounds].
    segments: list[list[float | int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not 0 < self.delta < 1:
            raise ValueError("delta must be in (0, 1)")

    @property
    def rounds(self) -> int:
        return sum(int(s[2]) for s in self.segments)

    def record_round(self, sampling_rate: float, noise_multiplier: float) -> float:
        """Count one completed round; returns epsilon spent so far."""
        _check(sampling_rate, noise_multiplier)
        last = self.segments[-1] if self.segments else None
        if last is not None and last[0] == sampling_rate and last[1] == noise_multiplier:
            last[2] = int(last[2]) + 1
        else:
            self.segments.append([float(sampling_rate), float(noise_multiplier), 1])
        return self.epsilon()

    def epsilon(self) -> float:
        """Epsilon spent so far at ``delta`` (0 before any round, infinite if a round had no noise)."""
        return _epsilon(self.segments, self.delta)

    def epsilon_after(self, sampling_rate: float, noise_multiplier: float, rounds: int = 1) -> float:
        """Epsilon once ``rounds`` more rounds with these parameters have run."""
        _check(sampling_rate, noise_multiplier)
        return _epsilon([*self.segments, [sampling_rate, noise_multiplier, rounds]], self.delta)

    def check_budget(self, max_epsilon: float, sampling_rate: float, noise_multiplier: float) -> float:
        """Before a round: its epsilon after, or :class:`BudgetExhausted` if that exceeds the budget."""
        after = self.epsilon_after(sampling_rate, noise_multiplier)
        if after > max_epsilon:
            raise BudgetExhausted(
                f"privacy budget spent: after {self.rounds} rounds epsilon is {self.epsilon():.4g} at "
                f"delta {self.delta:g}; one more round would reach {after:.4g}, over the maximum of "
                f"{max_epsilon:g}", "dp_max_epsilon")
        return after

    def to_dict(self) -> dict[str, Any]:
        return {"delta": self.delta, "segments": [list(s) for s in self.segments]}

    @classmethod
    def from_dict(cls, raw: Mapping[str, Any]) -> PrivacyAccountant:
        segments = [[float(q), float(z), int(n)] for q, z, n in raw["segments"]]
        for q, z, n in segments:
            _check(q, z)
            if n < 1:
                raise ValueError("a segment holds at least one round")
        return cls(delta=float(raw["delta"]), segments=segments)


def _check(sampling_rate: float, noise_multiplier: float) -> None:
    if not 0 <= sampling_rate <= 1:
        raise ValueError("sampling_rate must be from 0 to 1")
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError("noise_multiplier must be a non-negative number")


@functools.lru_cache(maxsize=64)
def _round_rdp(sampling_rate: float, noise_multiplier: float) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """The RDP curve (orders, values) of one round: slow to compute for a sampled mechanism (a
    series per fractional order), so computed once per parameter pair. RDP adds up over rounds."""
    from dp_accounting import rdp

    accountant = rdp.RdpAccountant()
    accountant.compose(round_event(sampling_rate, noise_multiplier))
    return tuple(accountant.orders), tuple(accountant.rdp)


def _epsilon(segments: list[list[float | int]], delta: float) -> float:
    spent = [s for s in segments if s[0] > 0 and int(s[2]) > 0]
    if not spent:
        return 0.0
    if any(s[1] == 0 for s in spent):
        return math.inf
    total = None
    for q, z, n in spent:
        orders, curve = _round_rdp(float(q), float(z))
        total = np.asarray(curve) * int(n) + (0 if total is None else total)
    from dp_accounting import rdp

    return float(rdp.compute_epsilon(orders, total, delta)[0])
