"""The device's side of secure aggregation (SecAgg+): answer each stage the server asks for.

The server's tasks drive it: ``secagg`` tasks carry the stage's message (the round's
parameters, the neighbours' keys, the unmask request), and the round's ``train`` task
carries the shares dealt to this device. The protocol itself is :class:`DeviceRound`'s;
this module moves its messages over HTTP and keeps one round's state between tasks.
After training, the change from the global model is clipped, quantized with stochastic
rounding, multiplied by the example count and masked before it leaves the device. Under
distributed DP the change is first clipped to the task's L2 bound and noised with this
device's share of the noise, and counts with weight 1 (each device once, as DP needs).
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from fedhub.engine.privacy import add_noise_share, distributed_dp_task
from fedhub.engine.secagg import (
    DeviceRound,
    KeyDirectory,
    RoundParams,
    SecAggError,
    ShareBundle,
    UnmaskRequest,
)
from fedhub.engine.secure_round import update_vector

from .client import Client, ServerError

Say = Callable[..., None]


class SecureDevice:
    """One device's secure-aggregation rounds; ``dropout`` is the chance (a simulation) that it
    drops out of a round right after dealing its shares, before its masked update."""

    def __init__(self, client: Client, say: Say, *, dropout: float = 0.0) -> None:
        self.client = client
        self._say = say
        self.dropout = dropout
        self._round: DeviceRound | None = None
        self._dropping: int | None = None
        # Seeded with the name: a repeated simulation drops the same devices in the same rounds,
        # so a run (or a test) that is meant to exercise a recovery always does.
        self._random = random.Random(f"secagg-dropout {client.name}")
        self._rng = np.random.default_rng()

    def step(self, task: Mapping[str, Any]) -> None:
        """Answer a ``secagg`` task: advertise keys, deal shares, or reveal share keys."""
        number, stage = task["round"], task.get("stage")
        try:
            if stage == "advertise":  # a new round (or the same one again after a restart)
                self._dropping = None
                self._round = DeviceRound(self.client.name, RoundParams.from_dict(task["message"]))
                self._send(number, self._round.advertise().to_bytes())
            elif stage == "share":
                shares = self._current(number).share_keys(KeyDirectory.from_dict(task["message"]))
                self._send(number, shares.to_bytes())
                if self._random.random() < self.dropout:
                    self._dropping = number
            elif stage == "unmask":
                answer = self._current(number).unmask(UnmaskRequest.from_dict(task["message"]))
                self._send(number, answer.to_bytes())
                self._round = None
                self._say(f"round {number}: secure aggregation done, shares revealed", logging.INFO, number)
            else:
                raise SecAggError(f"unknown secure-aggregation stage {stage!r}", "stage")
        except SecAggError as exc:  # an ERROR naming the round takes the device out of it
            self._round = None
            self._say(f"round {number}: secure aggregation refused: {exc.message}", logging.ERROR, number)
        except ServerError as exc:  # late for the stage, or the round is gone: the next task says
            if exc.status != 409:
                raise
            self._say(f"round {number}: the server did not take this device's {stage} message: "
                      f"{exc.body.get('message')}", logging.WARNING, number)

    def drops(self, number: int) -> bool:
        """Whether this device drops out of round ``number`` now (after dealing its shares)."""
        return self._dropping == number

    def masked_upload(self, task: Mapping[str, Any], trained: Mapping[str, np.ndarray],
                      start: Mapping[str, np.ndarray], num_examples: int) -> dict[str, Any]:
        """Mask the change from ``start`` to ``trained``, weighted by ``num_examples`` (or, under
        distributed DP, clipped and noised first, with weight 1), and send it."""
        number = task["round"]
        device_round = self._current(number)
        bundle = ShareBundle.from_dict(task["secagg"])
        vector = update_vector(trained, start)
        try:
            share = distributed_dp_task(task.get("config") or {})
        except ValueError as exc:
            raise SecAggError(f"the task's distributed DP settings: {exc}", "dp") from None
        if share is not None:  # the server only ever sees sums that carry the noise
            vector, _ = add_noise_share(vector, *share, self._rng)
            num_examples = 1
            self._say(f"round {number}: distributed DP: change clipped to L2 norm {share[0]:g}, "
                      f"noise share of std {share[1]:.4g} added before masking", round_number=number)
        masked = device_round.masked_input(bundle, vector, num_examples)
        params = device_round.params
        if params.quantization:  # --compression q8 / q4: the upload is as small as the sum allows
            self._say(f"round {number}: change quantized to {params.quantization} bits a coordinate, "
                      f"masked in a {params.bits}-bit field", round_number=number)
        for refusal in device_round.refused:
            self._say(f"round {number}: {refusal.message}", logging.WARNING, number)
        return self._send(number, masked.to_bytes(device_round.params), masked=True)

    def _current(self, number: int) -> DeviceRound:
        if self._round is None or self._round.params.round != number:
            raise SecAggError(f"this device holds no keys for round {number} (it restarted, or missed "
                              "the start of the round)", "round")
        return self._round

    def _send(self, number: int, body: bytes, masked: bool = False) -> dict[str, Any]:
        return self.client.secagg(number, body, masked=masked)
