"""One round under secure aggregation: the SecAgg+ stages of :mod:`fedhub.engine.secagg` on the
round's clock, for the round driver.

A secure round goes through four stages: the selected devices advertise keys, deal shares
of their secrets, train and upload their masked change from the global model, then reveal
the shares that unmask the sum. Each stage is open until every device it waits for (and
that is still in the round) has answered, or until its deadline; the driver then closes
it. The masked stage lasts the round's training time, the others a short key-exchange
time. The server only ever holds the running masked sum, never one device's update.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

import numpy as np

from .secagg import MaskedSum, SecAggConfig, SecAggResult, ServerRound
from .secagg.encoding import flatten

Weights = dict[str, np.ndarray]
# Seconds each key-exchange stage (advertise, share, unmask) waits for slow devices.
STAGE_TIMEOUT = 30.0
MASKED = "masked"


class SecureRound:
    """The open round's protocol state; the coordinator's lock guards the deadline, the
    :class:`ServerRound` has its own lock for the messages."""

    def __init__(self, config: SecAggConfig, number: int, devices: Collection[str],
                 weights: Mapping[str, np.ndarray], *, train_timeout: float,
                 stage_timeout: float = STAGE_TIMEOUT, previous_keys: Collection[bytes] = ()) -> None:
        """ConfigError when these devices cannot form a round (fewer than the threshold)."""
        length = int(sum(np.asarray(a).size for a in weights.values()))
        self.server = ServerRound(config.for_round(number, sorted(devices), length),
                                  previous_keys=previous_keys)
        self.train_timeout = train_timeout
        self.stage_timeout = stage_timeout
        self.deadline = time.monotonic() + min(stage_timeout, train_timeout)

    @property
    def stage(self) -> str:
        return self.server.stage

    def waiting(self, selected: Collection[str]) -> frozenset[str]:
        """Who the open stage still waits for among the devices still in the round."""
        return self.server.expected() & frozenset(selected)

    def task(self, name: str, train: Mapping[str, Any]) -> dict[str, Any]:
        """What ``name`` does now: at the masked stage, train (``train`` is the usual task) with
        the shares dealt to it; at the others, answer the stage's message."""
        message = self.server.request(name).to_dict()
        deadline_in = max(0.0, round(self.deadline - time.monotonic(), 1))
        if self.stage == MASKED:
            return {**train, "deadline_in": deadline_in, "secagg": message}
        return {"action": "secagg", "round": self.server.params.round, "stage": self.stage,
                "message": message, "deadline_in": deadline_in}

    def receive(self, name: str, body: bytes) -> str:
        """Take ``name``'s message for the open stage (refused with a SecAggError, nothing
        changed); the stage it was for."""
        stage = self.stage
        self.server.receive_bytes(name, body)
        return stage

    def receive_sum(self, relay: str, body: bytes,
                    vouch: Callable[[MaskedSum], None]) -> tuple[tuple[str, ...], bool]:
        """Take relay ``relay``'s sum of its devices' masked inputs (``vouch`` checks its devices'
        tokens, and that each may report now, before anything changes); its devices, and whether
        it was the same sum again."""
        message = MaskedSum.from_bytes(body, self.server.params, relay)
        vouch(message)
        return message.devices, self.server.receive_sum(message)

    def next_stage(self) -> str:
        """Close the open stage (TooFewSurvivors if the round cannot go on) and open the next."""
        stage = self.server.close_stage()
        timeout = self.train_timeout if stage == MASKED else self.stage_timeout
        self.deadline = time.monotonic() + timeout
        return stage

    def finish(self, global_weights: Mapping[str, np.ndarray]) -> tuple[Weights, SecAggResult]:
        """Unmask the sum (outside the coordinator's lock: a mask expansion per device); the
        weighted mean of the survivors' models, in float64, and what the protocol saw."""
        result = self.server.finish()
        spec = {n: (np.shape(a), "float64") for n, a in global_weights.items()}
        delta = result.weights(spec)
        return {n: np.asarray(a, dtype=np.float64) + delta[n] for n, a in global_weights.items()}, result

    def view(self, selected: Collection[str]) -> dict[str, Any]:
        p = self.server.params
        return {"stage": self.stage, "threshold": p.threshold, "shares": p.shares,
                "expected": sorted(self.waiting(selected))}


def summary(result: SecAggResult) -> dict[str, Any]:
    """What a round's history entry records of its secure aggregation."""
    return {"enabled": True, "threshold": result.threshold, "shares": result.shares, "bits": result.bits,
            **({"quantization": result.quantization} if result.quantization else {}),
            "survivors": len(result.survivors), "recovered": list(result.recovered),
            "dropped": list(result.dropped), "total_weight": result.total_weight,
            "refused": sorted({v.device for v in result.violations if v.device}),
            "complaints": {d: list(c) for d, c in result.complaints.items()}}


def update_vector(trained: Mapping[str, np.ndarray], start: Mapping[str, np.ndarray]) -> np.ndarray:
    """What a device masks: its change from the global model, flattened in name order."""
    return flatten({n: np.asarray(trained[n], dtype=np.float64) - np.asarray(start[n], dtype=np.float64)
                    for n in start})
