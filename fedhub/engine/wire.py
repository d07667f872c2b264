"""The one codec for weights on the wire and on disk: safetensors plus metadata.

safetensors is a flat binary layout (an 8-byte little-endian header length, a
JSON header, raw little-endian tensor bytes) that cannot execute code, unlike
pickle. The same function encodes the server's global model and a device's
update, and the same function decodes and validates both.
"""

from __future__ import annotations

import json
import math
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from . import untrusted_json
from .errors import InvalidInput, TooLarge

FORMAT = "fedhub/1"
DEFAULT_MAX_BYTES = 64 * 1024 * 1024
# A real header is a few kilobytes; refusing big ones early bounds the JSON parse.
MAX_HEADER_BYTES = 1024 * 1024
# The largest count or round number accepted from outside: exact in every JSON parser (I-JSON,
# RFC 7493) and within SQLite's 64-bit INTEGER, where a larger one would fail mid-write.
MAX_INTEGER = 2**53 - 1
# Metrics travel in every update and come back in every /api/history answer: keep them few and short.
MAX_METRICS = 100
MAX_METRIC_NAME = 100

Weights = dict[str, np.ndarray]
Spec = Mapping[str, tuple[tuple[int, ...], str]]


@dataclass(frozen=True)
class Meta:
    """What travels beside the tensors: which round, from which model, how much data."""

    round: int = 0
    model_version: int = 0
    num_examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)

    def to_strings(self) -> dict[str, str]:
        return {
            "format": FORMAT,
            "round": str(self.round),
            "model_version": str(self.model_version),
            "num_examples": str(self.num_examples),
            "metrics": json.dumps(self.metrics, allow_nan=False),
        }


def spec_of(weights: Mapping[str, np.ndarray]) -> dict[str, tuple[tuple[int, ...], str]]:
    """The names, shapes and dtypes that a peer's tensors must match."""
    return {name: (tuple(int(d) for d in a.shape), str(a.dtype)) for name, a in weights.items()}


def encode(weights: Mapping[str, np.ndarray], meta: Meta,
           extra: Mapping[str, str] | None = None) -> bytes:
    """Serialise weights and metadata (plus ``extra`` metadata strings) to safetensors bytes."""
    # np.require keeps a scalar a scalar (np.ascontiguousarray would make it a 1-element array).
    tensors = {name: np.require(a, requirements="C") for name, a in weights.items()}
    return st_save(tensors, metadata={**(extra or {}), **meta.to_strings()})


def header(body: bytes, *, max_header: int = MAX_HEADER_BYTES, max_bytes: int | None = None) -> dict:
    """The safetensors JSON header of ``body``, bounded and checked before it is parsed."""
    if max_bytes is not None and len(body) > max_bytes:
        raise TooLarge(f"body of {len(body)} bytes exceeds the limit of {max_bytes}", "body")
    if len(body) < 8:
        raise InvalidInput("body is truncated: shorter than the 8-byte safetensors header length", "body")
    (n,) = struct.unpack("<Q", body[:8])
    if n > max_header:
        raise InvalidInput(f"safetensors header of {n} bytes exceeds {max_header}", "body")
    if 8 + n > len(body):
        raise InvalidInput("body is truncated: the safetensors header runs past the end", "body")
    parsed = untrusted_json.loads(body[8 : 8 + n], field="body")
    if not isinstance(parsed, dict):
        raise InvalidInput("safetensors header must be a JSON object", "body")
    return parsed


def int_meta(raw: Mapping[str, str], key: str) -> int:
    value = raw.get(key, "0")
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"metadata {key!r} must be an integer, got {value!r}", key) from None
    if not 0 <= number <= MAX_INTEGER:
        raise InvalidInput(f"metadata {key!r} must be between 0 and {MAX_INTEGER}", key)
    return number


def _metrics(text: str) -> dict[str, float]:
    """The ``metrics`` metadata: a JSON object of names to finite float64 numbers."""
    return check_metrics(untrusted_json.loads(text, field="metrics"))


def check_metrics(metrics: object) -> dict[str, float]:
    """Metrics as a device reports them: at most ``MAX_METRICS`` names to finite numbers."""
    if not isinstance(metrics, dict):
        raise InvalidInput("metadata 'metrics' must be a JSON object", "metrics")
    if len(metrics) > MAX_METRICS:
        raise InvalidInput(f"metadata 'metrics' has {len(metrics)} entries; at most {MAX_METRICS}",
                           "metrics")
    out = {}
    for name, value in metrics.items():
        if not 0 < len(name) <= MAX_METRIC_NAME:
            raise InvalidInput(f"metric names must be 1-{MAX_METRIC_NAME} characters", "metrics")
        if not isinstance(value, int | float) or isinstance(value, bool):
            raise InvalidInput(f"metric {name!r} must be a number", "metrics")
        try:
            number = float(value)  # an integer of 2**1024 or more has no float64
        except OverflowError:
            number = math.inf
        if not math.isfinite(number):
            raise InvalidInput(f"metric {name!r} must be a finite number within float64's range",
                               "metrics")
        out[name] = number
    return out


def _meta(raw: Mapping[str, str]) -> Meta:
    if not isinstance(raw, dict) or not all(isinstance(v, str) for v in raw.values()):
        raise InvalidInput("safetensors __metadata__ must map strings to strings", "metadata")
    return Meta(
        round=int_meta(raw, "round"),
        model_version=int_meta(raw, "model_version"),
        num_examples=int_meta(raw, "num_examples"),
        metrics=_metrics(raw.get("metrics", "{}")),
    )


def first_non_finite(weights: Mapping[str, np.ndarray]) -> str | None:
    """The name of the first floating-point tensor holding NaN or infinity, if any."""
    for name, array in weights.items():
        if array.dtype.kind in "fc" and not np.isfinite(array).all():
            return name
    return None


def decode(
    body: bytes,
    spec: Spec | None = None,
    *,
    max_bytes: int = DEFAULT_MAX_BYTES,
    require_examples: bool = False,
    max_header: int = MAX_HEADER_BYTES,
) -> tuple[Weights, Meta]:
    """Parse and validate safetensors bytes.

    With a ``spec`` every tensor must be present with exactly that shape and
    dtype; unknown names, missing names, NaN and infinity are refused. Every
    refusal is an :class:`InvalidInput` naming the field, so the caller can
    answer 4xx and change nothing.
    """
    head = header(body, max_header=max_header, max_bytes=max_bytes)
    meta = _meta(head.get("__metadata__") or {})
    if require_examples and meta.num_examples < 1:
        raise InvalidInput("metadata 'num_examples' must be a positive integer", "num_examples")
    if spec is not None:
        names = set(head) - {"__metadata__"}
        unknown = sorted(names - set(spec))
        missing = sorted(set(spec) - names)
        if unknown:
            raise InvalidInput(f"unknown tensor {unknown[0]!r}", unknown[0])
        if missing:
            raise InvalidInput(f"missing tensor {missing[0]!r}", missing[0])
    try:
        tensors = st_load(bytes(body))
    except (SafetensorError, ValueError, TypeError) as exc:
        raise InvalidInput(f"not a valid safetensors body: {exc}", "body") from None
    # safetensors hands the tensors back in no fixed order (a hash map's): give them in the spec's
    # order, else in the order the body lays them out, so two decodes of the same bytes agree.
    order = list(spec) if spec is not None else sorted(
        tensors, key=lambda name: (head[name]["data_offsets"][0], name))
    tensors = {name: tensors[name] for name in order}
    if spec is not None:
        for name, (shape, dtype) in spec.items():
            array = tensors[name]
            if tuple(array.shape) != tuple(shape):
                raise InvalidInput(
                    f"tensor {name!r} has shape {list(array.shape)}, expected {list(shape)}", name
                )
            if str(array.dtype) != dtype:
                raise InvalidInput(f"tensor {name!r} has dtype {array.dtype}, expected {dtype}", name)
    bad = first_non_finite(tensors)
    if bad is not None:
        raise InvalidInput(f"tensor {bad!r} holds NaN or infinity", bad)
    return tensors, meta


def check_round(meta: Meta, round_number: int) -> None:
    """An update's metadata names the round of the URL it was posted to."""
    if meta.round != round_number:
        raise InvalidInput(
            f"metadata round {meta.round} does not match the URL's round {round_number}", "round")
