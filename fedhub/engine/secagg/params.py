"""What the server and the devices agree on for one round: the graph, the threshold, the field.

Field and overflow. Updates are summed as integers modulo 2^bits, read back as signed. Each
device clips every coordinate of its update to [-clip_range, clip_range], quantizes it to an
integer in [-levels, levels] and multiplies it by its weight w <= max_weight (its example
count, capped). With N devices the true sum is at most N * max_weight * levels in magnitude,
and the summed weights at most N * max_weight, so both are exact when

    N * max_weight * levels <= 2^(bits - 1) - 1.

The server picks ``levels`` as the largest value that satisfies this for the round's N (the
finest quantization the field allows) and refuses a round where that is below
:data:`MIN_LEVELS`; a device refuses parameters that break the bound, so no configuration can
overflow silently. 32 bits is the default: uploads are as large as float32 weights, and with
10 devices of at most 10,000 examples a coordinate still has 21,474 steps on each side.

Quantized uploads (``--compression q8`` or ``q4``). The device quantizes each coordinate to
``quantization`` bits instead: ``levels`` is fixed at 2^(quantization - 1) - 1 (127 or 7, as
:mod:`fedhub.engine.compression`'s codes), and the server picks the smallest field that holds
the round's sum, ``bits`` = bit_length(N * max_weight * levels) + 1, which is the bound above
solved for ``bits``. The masked input then travels bit-packed, ``bits`` bits per value (a
uniform mask over 2^bits leaves nothing to save below that): quantization bits plus
log2(N * max_weight) per coordinate, smaller than the default's 32 but never 8, since every
device's masked value fills the whole field. Sparse uploads (top-k) cannot be masked at all
without losing their saving: each device keeps different coordinates, while the masks that
cancel in the sum cover every coordinate, so each upload would be dense again.

Graph (SecAgg+, Bell et al. 2020). Devices sit on a ring in an order the server shuffles
with a cryptographic generator; each one's secrets are split into ``shares`` shares held by
itself and its ``shares - 1`` nearest ring neighbours (all devices, when ``shares`` >= N), any
``threshold`` of which rebuild them. The threshold must be more than half the shares, so that
no two disjoint groups of neighbours can rebuild both a device's mask seed and its mask key.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import cached_property
from typing import Any

from ..params import number
from .codec import MAX_DEVICES, Reader, dumps, loads
from .errors import ConfigError, ProtocolViolation

MIN_BITS, MAX_BITS = 16, 64
QUANTIZATIONS = (8, 4)  # bits per coordinate of a quantized upload (--compression q8, q4)
MIN_PACKED_BITS = 2  # a quantized round's field: 2 devices of weight 1 at 4 bits need 5
MIN_LEVELS = 16
MAX_LEVELS = 2**52  # float64 tells integers apart up to 2^53: finer steps would be noise
MAX_LENGTH = 2**31  # coordinates in one update (8 GiB of float32: far past any model here)
MAX_WEIGHT = 2**31


def levels_for(bits: int, devices: int, max_weight: int) -> int:
    """The most quantization steps per side for which ``devices`` weighted updates cannot overflow."""
    return min(MAX_LEVELS, ((1 << (bits - 1)) - 1) // (devices * max_weight))


def quantized_levels(quantization: int) -> int:
    """The steps per side of a ``quantization``-bit code: 127 for 8 bits, 7 for 4."""
    return (1 << (quantization - 1)) - 1


def field_bits(devices: int, max_weight: int, levels: int) -> int:
    """The fewest bits whose signed range holds ``devices`` sums of weight x ``levels``, and the
    weights' sum: N * max_weight * levels <= 2^(bits - 1) - 1."""
    return (devices * max_weight * levels).bit_length() + 1


def default_threshold(shares: int) -> int:
    """The smallest threshold that keeps a device's two secrets apart: a strict majority."""
    return shares // 2 + 1


@dataclass(frozen=True)
class SecAggConfig:
    """The run's secure-aggregation settings (``--secagg-*`` options)."""

    # Declared once with their help and ranges (fedhub.engine.params); validate() checks the rest.
    shares: int = number(11, 2, MAX_DEVICES, help="shares of each device's secrets, its own included "
                         "(odd: it and its ring neighbours hold them)")
    threshold: int | None = number(None, 1, MAX_DEVICES, help="shares that rebuild a dropped device's "
                                   "masks (default: a strict majority)")
    bits: int = number(32, MIN_BITS, MAX_BITS, help="masked sums are integers modulo 2^BITS")
    clip_range: float = number(0.5, above=0, high=1e6, aliases=("--secagg-clip",),
                               help="each coordinate of an update (change from the global model) is "
                                    "clipped to +-CLIP_RANGE")
    max_weight: int = number(10_000, 1, MAX_WEIGHT,
                             help="a device's weight (its example count) is capped here")
    # Bits per coordinate a device quantizes its change to: 8 or 4 (--compression q8 / q4; the
    # field is then the smallest that holds the round's sum, not ``bits``), 0: as finely as
    # ``bits`` allows. Not a setting of its own: FederationConfig derives it from the compression
    # (:meth:`quantized`), so the two cannot disagree.
    quantization: int = field(default=0, init=False)

    def validate(self) -> None:
        """Refuse settings that cannot work, at start-up, with the reason."""
        if not isinstance(self.shares, int) or self.shares < 2:
            raise ConfigError("secagg shares must be an integer of at least 2", "shares")
        if self.shares % 2 == 0:
            raise ConfigError(
                "secagg shares must be odd (the device and the same number of ring neighbours on "
                "each side), or the round's device count or more for a complete graph", "shares")
        threshold = self.threshold_for(self.shares)
        if not default_threshold(self.shares) <= threshold <= self.shares:
            raise ConfigError(
                f"secagg threshold must be more than half the shares and at most the shares: "
                f"from {default_threshold(self.shares)} to {self.shares}", "threshold")
        if not MIN_BITS <= self.bits <= MAX_BITS:
            raise ConfigError(f"secagg bits must be from {MIN_BITS} to {MAX_BITS}", "bits")
        if not (math.isfinite(self.clip_range) and self.clip_range > 0):
            raise ConfigError("secagg clip range must be a positive number", "clip_range")
        if not 1 <= self.max_weight <= MAX_WEIGHT:
            raise ConfigError(f"secagg max weight must be from 1 to {MAX_WEIGHT}", "max_weight")
        if self.quantization not in (0, *QUANTIZATIONS):
            raise ConfigError("secagg quantization must be 8 or 4 bits a coordinate, or 0 for as "
                              "fine as the field allows", "quantization")

    def quantized(self, quantization: int) -> SecAggConfig:
        """These settings with devices quantizing to ``quantization`` bits (0: as the field allows)."""
        copy = replace(self)
        object.__setattr__(copy, "quantization", quantization)  # frozen, and derived, not given
        return copy

    def threshold_for(self, shares: int) -> int:
        return default_threshold(shares) if self.threshold is None else self.threshold

    def max_devices(self) -> int:
        """The most devices one round can sum without the quantization falling below MIN_LEVELS."""
        return ((1 << (self.bits - 1)) - 1) // (self.max_weight * MIN_LEVELS)

    def field_for(self, devices: int) -> tuple[int, int]:
        """(bits, levels) of a round of ``devices``: the configured field with the finest steps
        it allows, or for quantized uploads the fixed steps in the smallest field that holds them
        (at most 53 bits: MAX_DEVICES x MAX_WEIGHT x 127 < 2^52)."""
        if self.quantization:
            levels = quantized_levels(self.quantization)
            return max(MIN_PACKED_BITS, field_bits(devices, self.max_weight, levels)), levels
        return self.bits, levels_for(self.bits, devices, self.max_weight)

    def for_round(self, round_number: int, devices: Sequence[str], length: int) -> RoundParams:
        """The parameters of one round over ``devices``, in a freshly shuffled ring order."""
        self.validate()
        n = len(devices)
        if n < 2:
            raise ConfigError("secure aggregation needs at least 2 devices in a round", "devices")
        shares = n if self.shares >= n else self.shares
        threshold = default_threshold(shares) if self.threshold is None else self.threshold
        if threshold > shares:
            raise ConfigError(
                f"round {round_number} has {n} devices, too few for a threshold of {threshold}; "
                f"select at least {threshold}", "threshold")
        bits, levels = self.field_for(n)
        if levels < MIN_LEVELS and not self.quantization:
            raise ConfigError(
                f"{n} devices of weight up to {self.max_weight} leave {levels} quantization steps in "
                f"{self.bits} bits (at least {MIN_LEVELS} needed): use more bits, a lower max weight "
                f"or fewer devices per round (at most {self.max_devices()})", "bits")
        order = list(devices)
        secrets.SystemRandom().shuffle(order)
        params = RoundParams(round=round_number, order=tuple(order), shares=shares, threshold=threshold,
                             bits=bits, clip_range=float(self.clip_range), levels=levels,
                             max_weight=self.max_weight, length=length, quantization=self.quantization)
        params.validate()
        return params


@dataclass(frozen=True)
class RoundParams:
    """One round's agreed parameters: the first message, server to every selected device."""

    STAGE = "setup"

    round: int
    order: tuple[str, ...]  # the ring
    shares: int
    threshold: int
    bits: int
    clip_range: float
    levels: int
    max_weight: int
    length: int  # coordinates of the update vector (the weight travels as one more)
    # 8 or 4: each coordinate quantized to that many bits (levels 127 or 7), the masked input
    # bit-packed at ``bits`` bits a value; 0: levels as fine as the field allows, whole words.
    # Sent only when set, so a round without it reads as before.
    quantization: int = 0

    @property
    def packed(self) -> bool:
        """Whether the masked input travels as ``bits``-bit values packed end to end."""
        return self.quantization != 0

    def validate(self) -> None:
        """Refuse parameters that could not work or could overflow (a device checks the server)."""
        n = len(self.order)
        if len(set(self.order)) != n or not 2 <= n <= MAX_DEVICES:
            raise ProtocolViolation(f"a round needs 2 to {MAX_DEVICES} distinct devices", "order")
        if not (2 <= self.shares <= n and (self.shares % 2 == 1 or self.shares == n)):
            raise ProtocolViolation("shares must be odd and at most the device count, or equal it",
                                    "shares")
        if not default_threshold(self.shares) <= self.threshold <= self.shares:
            raise ProtocolViolation("threshold must be a strict majority of the shares", "threshold")
        if self.quantization not in (0, *QUANTIZATIONS):
            raise ProtocolViolation("quantization must be 8 or 4", "quantization")
        low = MIN_PACKED_BITS if self.quantization else MIN_BITS
        if not low <= self.bits <= MAX_BITS:
            raise ProtocolViolation(f"bits must be from {low} to {MAX_BITS}", "bits")
        if self.quantization and self.levels != quantized_levels(self.quantization):
            raise ProtocolViolation(f"{self.quantization}-bit quantization has "
                                    f"{quantized_levels(self.quantization)} levels", "levels")
        if not (math.isfinite(self.clip_range) and self.clip_range > 0):
            raise ProtocolViolation("clip_range must be a positive number", "clip_range")
        if not 1 <= self.max_weight <= MAX_WEIGHT or not 1 <= self.levels <= MAX_LEVELS:
            raise ProtocolViolation(f"max_weight must be from 1 to {MAX_WEIGHT} and levels from 1 to "
                                    f"{MAX_LEVELS}", "levels")
        if n * self.max_weight * self.levels > (1 << (self.bits - 1)) - 1:
            raise ProtocolViolation(
                f"{n} devices x weight {self.max_weight} x {self.levels} levels could overflow "
                f"{self.bits} bits", "levels")
        if not 1 <= self.length <= MAX_LENGTH:
            raise ProtocolViolation(f"length must be from 1 to {MAX_LENGTH}", "length")

    @cached_property
    def graph(self) -> Mapping[str, frozenset[str]]:
        """Each device's neighbourhood, itself included; symmetric by construction."""
        n = len(self.order)
        if self.shares >= n:
            everyone = frozenset(self.order)
            return {name: everyone for name in self.order}
        half = (self.shares - 1) // 2
        return {name: frozenset(self.order[(i + o) % n] for o in range(-half, half + 1))
                for i, name in enumerate(self.order)}

    def neighbours(self, name: str) -> frozenset[str]:
        return self.graph[name]

    @property
    def modulus_mask(self) -> int:
        return (1 << self.bits) - 1

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.STAGE, "round": self.round, "order": list(self.order),
                "shares": self.shares, "threshold": self.threshold, "bits": self.bits,
                "clip_range": self.clip_range, "levels": self.levels, "max_weight": self.max_weight,
                "length": self.length, **({"quantization": self.quantization} if self.quantization else {})}

    @classmethod
    def from_dict(cls, raw: object) -> RoundParams:
        r = Reader(raw, cls.STAGE, device=None)
        quantized = isinstance(raw, Mapping) and "quantization" in raw
        r.exact_keys("round", "order", "shares", "threshold", "bits", "clip_range", "levels",
                     "max_weight", "length", *(("quantization",) if quantized else ()))
        params = cls(round=r.integer("round", 0, 2**53 - 1), order=r.names("order"),
                     shares=r.integer("shares", 2, MAX_DEVICES),
                     threshold=r.integer("threshold", 1, MAX_DEVICES),
                     bits=r.integer("bits", MIN_PACKED_BITS if quantized else MIN_BITS, MAX_BITS),
                     clip_range=r.number("clip_range"),
                     levels=r.integer("levels", 1, MAX_LEVELS),
                     max_weight=r.integer("max_weight", 1, MAX_WEIGHT),
                     length=r.integer("length", 1, MAX_LENGTH),
                     quantization=r.integer("quantization", min(QUANTIZATIONS), max(QUANTIZATIONS))
                     if quantized else 0)
        params.validate()
        return params

    def to_bytes(self) -> bytes:
        return dumps(self.to_dict())

    @classmethod
    def from_bytes(cls, body: bytes) -> RoundParams:
        return cls.from_dict(loads(body))
