"""Partial sums: many devices' updates folded into one before they reach the server.

A relay (:mod:`fedhub.relay`, or a pool's worker for its virtual devices) takes its devices'
updates as the server would, folds each into a float64 sum of ``num_examples * weights`` and
sends that sum once, with each device's name, example count, metrics and token (a relay speaks
for a device only with the device's own token, which it saw on the device's requests), so the
server counts and records every device as if it had sent its own update. Only a strategy that needs the
weighted sum alone (FedAvg and its server optimizers: ``Strategy.sums_only``) can take one, and
central DP, whose sum is of each device's change clipped to the round's norm, each counting once
(``clipping_norm``, as the server clips each update); the others get each update passed through.

:class:`PartialSum` is the relay's side (fold, encode), :func:`decode` the server's; the body is
safetensors like every other weight on the wire: float64 sums, and in its metadata the round,
the model version and the devices.
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from . import untrusted_json, wire
from .devices import check_name
from .errors import InvalidInput
from .privacy.mechanisms import clip_by_norm, difference

FORMAT = "fedhub-partial/1"
# Devices in one partial sum: bounds its header (each device's metrics travel in it); a relay
# with more devices in a round sends several.
MAX_DEVICES = 256
MAX_HEADER_BYTES = 4 * 1024 * 1024
MAX_TOKEN_CHARS = 200  # a device's token, as a relay vouches with it

Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class Share:
    """One device's part of a partial sum."""

    name: str
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)
    token: str = field(default="", repr=False)  # the device's own: the server checks it is its


@dataclass(frozen=True)
class Partial:
    """A decoded partial sum: ``sums`` is ``sum(num_examples * weights)`` over ``shares``."""

    round: int
    model_version: int
    shares: tuple[Share, ...]
    sums: Weights
    clipping_norm: float | None = None  # set: the sums are of changes clipped to it (central DP)
    unclipped: int = 0  # and how many of them were within it

    @property
    def total_examples(self) -> int:
        return sum(s.num_examples for s in self.shares)


class PartialSum:
    """The devices' updates of one round, folded as they arrive (O(model) memory).

    ``fold`` refuses a device twice; ``encode`` gives the body to send and ``key`` a stable
    idempotency key for it (the same devices and sums give the same key, so a relay that
    sends it again after a restart is acknowledged, not counted twice).
    """

    def __init__(self, round_number: int, model_version: int, clipping_norm: float | None = None) -> None:
        self.round = round_number
        self.model_version = model_version
        self.clipping_norm = clipping_norm
        self.unclipped = 0
        self.shares: dict[str, Share] = {}
        self._sums: Weights | None = None
        self._dtypes: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self.shares)

    def fold(self, name: str, weights: Mapping[str, np.ndarray], num_examples: int,
             metrics: Mapping[str, float] | None = None, *, token: str,
             reference: Mapping[str, np.ndarray] | None = None) -> None:
        """Add one device's update: ``num_examples * weights``, or with a ``clipping_norm`` its
        change from ``reference`` (the global model it trained from) clipped to that norm, as the
        server clips each update under central DP."""
        if name in self.shares:
            raise ValueError(f"device {name!r} is already in this partial sum")
        if num_examples <= 0:
            raise ValueError("num_examples must be positive")
        if self._sums is not None and set(weights) != set(self._sums):
            raise ValueError("the update's tensors are not those of the others in this partial sum")
        if self.clipping_norm is not None:
            if reference is None:
                raise ValueError("a sum of clipped changes needs the model the update was trained from")
            clipped = clip_by_norm(difference(weights, reference), self.clipping_norm)
            part, scale = clipped.tensors, 1.0
        else:
            part, scale = weights, float(num_examples)
        if self._sums is None:
            self._sums = {n: np.zeros(np.shape(a), dtype=np.float64) for n, a in weights.items()}
        for n, total in self._sums.items():
            np.add(total, np.multiply(part[n], scale, dtype=np.float64), out=total)
        if self.clipping_norm is not None:
            self.unclipped += not clipped.clipped
        self.shares[name] = Share(name, int(num_examples), dict(metrics or {}), token)

    def encode(self, extra: Mapping[str, str] | None = None) -> bytes:
        """The body to send (``extra``: more metadata, for a relay's own copy on disk)."""
        if self._sums is None:
            raise ValueError("an empty partial sum is not sent")
        devices = [{"name": s.name, "num_examples": s.num_examples, "metrics": s.metrics, "token": s.token}
                   for s in self.shares.values()]
        metadata = {**(extra or {}), "format": FORMAT, "round": str(self.round),
                    "model_version": str(self.model_version), "devices": json.dumps(devices, allow_nan=False)}
        if self.clipping_norm is not None:
            metadata.update(clipping_norm=repr(float(self.clipping_norm)), unclipped=str(self.unclipped))
        return st_save({n: np.ascontiguousarray(a) for n, a in self._sums.items()}, metadata=metadata)


    @classmethod
    def restore(cls, body: bytes) -> tuple[PartialSum, dict[str, Any]]:
        """A relay's own copy on disk (:meth:`encode` with ``extra={"keys": ...}``) as it was,
        and the keys it held."""
        head = wire.header(body, max_header=MAX_HEADER_BYTES)
        raw = head.get("__metadata__") or {}
        shares = _shares(raw.get("devices", "[]"))
        clipping_norm, unclipped = _clipping(raw, len(shares))
        partial = cls(wire.int_meta(raw, "round"), wire.int_meta(raw, "model_version"), clipping_norm)
        partial.shares, partial.unclipped = {s.name: s for s in shares}, unclipped
        partial._sums = dict(st_load(bytes(body)))
        return partial, json.loads(raw.get("keys", "{}"))


def key_of(relay: str, body: bytes) -> str:
    """The idempotency key of ``body`` sent by ``relay``: the same bytes, the same key."""
    return f"{relay}-{hashlib.sha256(body).hexdigest()[:32]}"


def _shares(text: str) -> tuple[Share, ...]:
    devices = untrusted_json.loads(text, field="devices")
    if not isinstance(devices, list) or not 1 <= len(devices) <= MAX_DEVICES:
        raise InvalidInput(f"metadata 'devices' must be a list of 1 to {MAX_DEVICES} devices", "devices")
    shares, seen = [], set()
    for i, entry in enumerate(devices):
        where = f"devices[{i}]"
        if not isinstance(entry, dict) or set(entry) - {"name", "num_examples", "metrics", "token"}:
            raise InvalidInput(f"{where} must be an object with name, num_examples, metrics and token", where)
        try:
            name = check_name(entry.get("name"))
        except InvalidInput as exc:
            raise exc.within(where) from None
        if name in seen:
            raise InvalidInput(f"{where}: device {name!r} is named twice", f"{where}.name")
        seen.add(name)
        n = entry.get("num_examples")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= wire.MAX_INTEGER:
            raise InvalidInput(f"{where}.num_examples must be an integer from 1 to {wire.MAX_INTEGER}",
                               f"{where}.num_examples")
        metrics = entry.get("metrics", {})
        if not isinstance(metrics, dict):
            raise InvalidInput(f"{where}.metrics must be an object", f"{where}.metrics")
        token = entry.get("token")
        if not isinstance(token, str) or not 1 <= len(token) <= MAX_TOKEN_CHARS:
            raise InvalidInput(f"{where}.token must be the device's token (1-{MAX_TOKEN_CHARS} characters)",
                               f"{where}.token")
        shares.append(Share(name, n, wire.check_metrics(metrics), token))
    return tuple(shares)


def decode(body: bytes, spec: wire.Spec, *, max_bytes: int = wire.DEFAULT_MAX_BYTES) -> Partial:
    """Parse and check a partial sum against the model's ``spec``: every tensor, float64, its
    shape, finite; the devices, each once, with a positive count. :class:`InvalidInput` naming
    the field otherwise."""
    head = wire.header(body, max_header=MAX_HEADER_BYTES, max_bytes=max_bytes)
    raw = head.get("__metadata__") or {}
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise InvalidInput("safetensors __metadata__ must map strings to strings", "metadata")
    if raw.get("format") != FORMAT:
        raise InvalidInput(f"metadata 'format' must be {FORMAT!r}", "format")
    shares = _shares(raw.get("devices", "[]"))
    clipping_norm, unclipped = _clipping(raw, len(shares))
    sums, _ = wire.decode(body, {n: (shape, "float64") for n, (shape, _) in spec.items()},
                          max_bytes=max_bytes, max_header=MAX_HEADER_BYTES)
    return Partial(round=wire.int_meta(raw, "round"), model_version=wire.int_meta(raw, "model_version"),
                   shares=shares, sums=sums, clipping_norm=clipping_norm, unclipped=unclipped)


def _clipping(raw: Mapping[str, str], devices: int) -> tuple[float | None, int]:
    """The metadata's ``clipping_norm`` (a positive number) and ``unclipped`` (0 to the number
    of devices), both or neither."""
    if "clipping_norm" not in raw and "unclipped" not in raw:
        return None, 0
    try:
        norm = float(raw.get("clipping_norm", ""))
    except ValueError:
        norm = math.nan
    if not (math.isfinite(norm) and norm > 0):
        raise InvalidInput("metadata 'clipping_norm' must be a positive number", "clipping_norm")
    count = raw.get("unclipped", "")
    if not (count.isdigit() and int(count) <= devices):
        raise InvalidInput(f"metadata 'unclipped' must be an integer from 0 to {devices} (the devices)",
                           "unclipped")
    return norm, int(count)
