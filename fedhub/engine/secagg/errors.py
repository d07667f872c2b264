"""Secure-aggregation refusals, each naming the device at fault where there is one.

A refused message changes nothing, so the HTTP layer answers 4xx and the round
goes on for the others; a failed round (:class:`RoundFailed`) is discarded by
the coordinator and opened again with whoever is there.
"""

from __future__ import annotations

from ..errors import Conflict, FedHubError, InvalidInput


class SecAggError(FedHubError):
    """Base class; ``device`` names the device whose message or secret is at fault, if any."""

    code = "secagg_error"

    def __init__(self, message: str, field: str | None = None, *, device: str | None = None) -> None:
        super().__init__(message, field)
        self.device = device

    def to_dict(self) -> dict[str, str | None]:
        return {**super().to_dict(), "device": self.device}


class ConfigError(SecAggError, ValueError):
    """Settings that cannot work: a threshold the graph cannot meet, a field that could overflow."""

    code = "secagg_config"


class ProtocolViolation(SecAggError, InvalidInput):
    """A message that breaks the protocol: malformed, sent in another's name, a reused key,
    a revealed key that does not open the share it claims to."""

    code = "secagg_violation"


class ShareAuthenticationError(ProtocolViolation):
    """An encrypted share that does not authenticate for this sender, recipient and round."""

    code = "secagg_bad_share"


class StaleMessage(SecAggError, Conflict):
    """A message for another round or stage, or one already received: replayed, late or repeated."""

    code = "secagg_stale"


class RoundFailed(SecAggError):
    """The round cannot be completed; the coordinator discards it and runs it again."""

    code = "secagg_round_failed"


class TooFewSurvivors(RoundFailed):
    """Fewer devices than the threshold are left to rebuild the masks."""

    code = "secagg_too_few_survivors"


class ReconstructionFailed(RoundFailed):
    """A device's secret could not be rebuilt from the shares its neighbours revealed."""

    code = "secagg_reconstruction_failed"
