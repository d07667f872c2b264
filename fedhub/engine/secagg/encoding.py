"""From a float update to integers modulo 2^bits and back: clip, quantize, weight, and decode.

The device clips each coordinate to [-clip_range, clip_range], scales it to [-levels, levels]
and rounds stochastically (up with probability equal to the fraction), so the quantized value
is unbiased and the error of the decoded mean shrinks as devices are added. It multiplies the
result by its weight and appends the weight itself, so the server recovers the sample-weighted
mean from two masked sums. :mod:`.params` explains why the field cannot overflow.

A quantized round's field is narrower than a machine word: :func:`pack` writes its values
``bits`` bits each, end to end (least significant bit first), and :func:`unpack` reads them
back, so an upload is as small as its field.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from .errors import RoundFailed
from .params import RoundParams

Weights = dict[str, np.ndarray]
# Values packed or unpacked at a time: a multiple of 8, so each chunk fills whole bytes, and
# small enough that its 64 bytes of bits per value stay a few MiB.
_CHUNK = 1 << 16
Spec = Mapping[str, tuple[tuple[int, ...], str]]


def flatten(weights: Mapping[str, np.ndarray]) -> np.ndarray:
    """One float64 vector of every tensor, in name order (the order both sides use)."""
    if not weights:
        return np.zeros(0)
    return np.concatenate([np.asarray(weights[n], dtype=np.float64).ravel() for n in sorted(weights)])


def unflatten(vector: np.ndarray, spec: Spec) -> Weights:
    """Tensors of ``spec`` (name -> (shape, dtype)) from a vector made by :func:`flatten`."""
    out: Weights = {}
    at = 0
    for name in sorted(spec):
        shape, dtype = spec[name]
        size = int(np.prod(shape, dtype=np.int64))
        out[name] = vector[at:at + size].reshape(shape).astype(dtype)
        at += size
    if at != vector.size:
        raise ValueError(f"vector of {vector.size} values does not match the spec's {at}")
    return out


def quantize(vector: np.ndarray, clip_range: float, levels: int, rng: np.random.Generator) -> np.ndarray:
    """Clip to [-clip_range, clip_range] and round stochastically to integers in [-levels, levels]."""
    scaled = np.clip(np.asarray(vector, dtype=np.float64), -clip_range, clip_range) * (levels / clip_range)
    rounded = np.floor(scaled + rng.random(scaled.shape))
    return np.clip(rounded, -levels, levels).astype(np.int64)


def dequantize(values: np.ndarray, clip_range: float, levels: int) -> np.ndarray:
    return np.asarray(values, dtype=np.float64) * (clip_range / levels)


def encode(vector: np.ndarray, weight: int, params: RoundParams, rng: np.random.Generator) -> np.ndarray:
    """The device's plaintext field vector: weight x quantized update, then the weight; uint64
    values modulo 2^bits."""
    vector = np.asarray(vector, dtype=np.float64).ravel()
    if vector.size != params.length:
        raise ValueError(f"the update has {vector.size} values, the round expects {params.length}")
    if not np.isfinite(vector).all():
        raise ValueError("the update holds NaN or infinity")
    if not 1 <= weight <= params.max_weight:
        raise ValueError(f"weight must be from 1 to {params.max_weight}")
    q = quantize(vector, params.clip_range, params.levels, rng)
    out = np.empty(params.length + 1, dtype=np.uint64)
    # int64 -> uint64 wraps two's complement, which is already the residue modulo 2^64.
    out[:-1] = (q * weight).astype(np.uint64)
    out[-1] = weight
    np.bitwise_and(out, np.uint64(params.modulus_mask), out=out)
    return out


def to_signed(values: np.ndarray, bits: int) -> np.ndarray:
    """Residues modulo 2^bits read as signed integers in [-2^(bits-1), 2^(bits-1))."""
    values = np.asarray(values, dtype=np.uint64)
    if bits == 64:
        return values.view(np.int64)
    signed = values.astype(np.int64)
    signed[signed >= (1 << (bits - 1))] -= 1 << bits
    return signed


def decode(total: np.ndarray, params: RoundParams) -> tuple[np.ndarray, int]:
    """The sample-weighted mean of the summed updates, and the summed weight."""
    signed = to_signed(total, params.bits)
    weight = int(signed[-1])
    if weight < 1:
        raise RoundFailed(f"round {params.round}: the unmasked weights sum to {weight}; "
                          "a device sent a malformed masked input")
    return dequantize(signed[:-1], params.clip_range, params.levels) / weight, weight


def packed_size(count: int, bits: int) -> int:
    """Bytes that ``count`` values of ``bits`` bits take packed end to end."""
    return -(-count * bits // 8)


def pack(values: np.ndarray, bits: int) -> np.ndarray:
    """``values`` (each below 2^bits) as ``bits``-bit fields end to end, least significant bit
    first, in bytes; the last byte's unused high bits are zero."""
    words = np.ascontiguousarray(values, dtype="<u8")
    out = np.zeros(packed_size(words.size, bits), dtype=np.uint8)
    for start in range(0, words.size, _CHUNK):
        chunk = words[start:start + _CHUNK]
        fields = np.unpackbits(chunk.view(np.uint8).reshape(-1, 8), axis=1, bitorder="little")[:, :bits]
        data = np.packbits(fields.ravel(), bitorder="little")
        at = start * bits // 8  # whole bytes: start is a multiple of 8
        out[at:at + data.size] = data
    return out


def unpack(data: np.ndarray, count: int, bits: int) -> np.ndarray:
    """The ``count`` values :func:`pack` wrote (uint64); ValueError if ``data`` is not exactly
    their bytes or its padding bits are not zero."""
    data = np.ascontiguousarray(data, dtype=np.uint8).ravel()
    if data.size != packed_size(count, bits):
        raise ValueError(f"{count} values of {bits} bits take {packed_size(count, bits)} bytes, "
                         f"not {data.size}")
    spare = data.size * 8 - count * bits
    if spare and int(data[-1]) >> (8 - spare):
        raise ValueError("the padding bits after the last value are not zero")
    out = np.empty(count, dtype=np.uint64)
    for start in range(0, count, _CHUNK):
        n = min(_CHUNK, count - start)
        at = start * bits // 8
        fields = np.unpackbits(data[at:at + packed_size(n, bits)], count=n * bits,
                               bitorder="little").reshape(n, bits)
        whole = np.zeros((n, 64), dtype=np.uint8)
        whole[:, :bits] = fields
        out[start:start + n] = np.packbits(whole, axis=1, bitorder="little").view("<u8").ravel()
    return out
