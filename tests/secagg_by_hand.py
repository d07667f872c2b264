"""A device's honest answers in secure aggregation, made by hand: for tests that play devices
over HTTP (lying ones among them) without training, uploading a known change instead."""

from __future__ import annotations

import numpy as np

from fedhub.engine.secagg import DeviceRound, KeyDirectory, RoundParams, ShareBundle, UnmaskRequest


def answer(name: str, task: dict, rounds: dict[str, DeviceRound], delta: float,
           weight: int) -> tuple[bytes, str] | None:
    """The body and content type that answer ``task`` (None if it asks for nothing); the masked
    update is ``delta`` everywhere, weighted by ``weight``. ``rounds`` keeps each device's round."""
    if task["action"] == "secagg":
        stage, message = task["stage"], task["message"]
        if stage == "advertise":
            rounds[name] = DeviceRound(name, RoundParams.from_dict(message))
            return rounds[name].advertise().to_bytes(), "application/json"
        if stage == "share":
            return rounds[name].share_keys(KeyDirectory.from_dict(message)).to_bytes(), "application/json"
        return rounds[name].unmask(UnmaskRequest.from_dict(message)).to_bytes(), "application/json"
    if task["action"] == "train":
        r = rounds[name]
        bundle = ShareBundle.from_dict(task["secagg"])
        masked = r.masked_input(bundle, np.full(r.params.length, delta), weight)
        return masked.to_bytes(r.params), "application/octet-stream"
    return None
