"""Compressed updates: a device sends the delta from the global model, quantized or sparsified.

Schemes (``--compression``):

* ``none``: the weights themselves, as always;
* ``q8`` / ``q4``: each tensor's delta quantized to 8 or 4 bits (levels -127..127 or -7..7)
  with stochastic rounding, which is unbiased (E[decoded] = delta), and one float32 scale
  per block of ``BLOCK`` values (``q8:tensor``: one per tensor; ``q8:block=N``: blocks of N).
  4-bit codes are packed two to a byte (low nibble first, stored as code + 8);
* ``topk:FRACTION``: per tensor the ``ceil(FRACTION x size)`` largest-magnitude entries of
  the delta plus the device's residual (error feedback: what was not sent is added to the
  next round's delta, so nothing is lost, only delayed).

On the wire a compressed tensor ``NAME`` is ``NAME`` (the codes or the kept values, flat)
plus ``NAME::scales`` or ``NAME::indices``; the metadata ``compression`` names the scheme.
:func:`wire_spec` gives the exact names, shapes and dtypes a body must have, so
:func:`fedhub.engine.wire.decode` refuses a wrong scale shape, a sparsity that does not match or a
wrong dtype field by field; :func:`decompress` then checks what a spec cannot (indices in
range and strictly increasing, codes within the levels, scales non-negative).

:class:`Downlink` compresses the global model download the same way: the server keeps the
model the devices hold (the broadcast model) and sends its change; what quantization left
out stays in the next change, as the device-side residual does for updates.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load as st_load
from safetensors.numpy import save as st_save

from . import wire
from .errors import InvalidInput
from .files import atomic_write_bytes

BLOCK = 512  # values per quantization scale: 4 bytes per 512 codes, +0.8% over q8's 0.25x
SEP = "::"
LEVELS = {8: 127, 4: 7}
KINDS = ("none", "q8", "q4", "topk")
Weights = dict[str, np.ndarray]


@dataclass(frozen=True)
class Scheme:
    """A compression scheme: ``kind`` with its block size (quantization; 0: one scale per
    tensor) or kept fraction (top-k)."""

    kind: str = "none"
    block: int = BLOCK
    fraction: float = 1.0

    @property
    def bits(self) -> int:
        return 8 if self.kind == "q8" else 4

    @property
    def active(self) -> bool:
        return self.kind != "none"

    def __str__(self) -> str:
        if self.kind == "topk":
            return f"topk:{self.fraction:g}"
        if self.kind in ("q8", "q4"):
            return self.kind + ("" if self.block == BLOCK else ":tensor" if self.block == 0
                                else f":block={self.block}")
        return self.kind


NONE = Scheme()


def parse(text: object) -> Scheme:
    """``none``, ``q8``, ``q4`` (``:tensor`` or ``:block=N`` after it), ``topk:FRACTION``;
    ValueError in one line for anything else."""
    if not isinstance(text, str):
        raise ValueError(f"compression must be a string, got {type(text).__name__}")
    kind, _, arg = text.strip().partition(":")
    usage = "use none, q8, q4, q8:tensor, q8:block=N or topk:FRACTION (0 < FRACTION < 1)"
    if kind == "none" and not arg:
        return NONE
    if kind in ("q8", "q4"):
        if not arg:
            return Scheme(kind)
        if arg == "tensor":
            return Scheme(kind, block=0)
        key, _, value = arg.partition("=")
        if key == "block" and value.isdigit() and 2 <= int(value) <= 2**20 and int(value) % 2 == 0:
            return Scheme(kind, block=int(value))
        raise ValueError(f"compression {text!r}: the block must be an even number from 2 to "
                         f"{2**20} (q8:block=512), or q8:tensor for one scale per tensor")
    if kind == "topk":
        try:
            fraction = float(arg)
        except ValueError:
            raise ValueError(f"compression {text!r}: FRACTION must be a number; {usage}") from None
        if not 0 < fraction < 1:
            raise ValueError(f"compression {text!r}: FRACTION must be between 0 and 1 (exclusive)")
        return Scheme("topk", fraction=fraction)
    raise ValueError(f"unknown compression {text!r}; {usage}")


def kept(size: int, fraction: float) -> int:
    """Entries top-k keeps of a tensor of ``size``: ceil(fraction x size), at least 1."""
    return min(size, max(1, math.ceil(round(fraction * size, 9))))


def _blocks(size: int, block: int) -> int:
    return 1 if block == 0 else max(1, -(-size // block))


def wire_spec(spec: wire.Spec, scheme: Scheme) -> dict[str, tuple[tuple[int, ...], str]]:
    """The tensors a body compressed with ``scheme`` must hold for a model of ``spec``."""
    if not scheme.active:
        return dict(spec)
    out: dict[str, tuple[tuple[int, ...], str]] = {}
    for name, (shape, _dtype) in spec.items():
        size = math.prod(shape)
        if scheme.kind == "topk":
            k = kept(size, scheme.fraction)
            out[name] = ((k,), "float32")
            out[name + SEP + "indices"] = ((k,), "uint32")
        else:
            out[name] = ((size,), "int8") if scheme.bits == 8 else (((size + 1) // 2,), "uint8")
            out[name + SEP + "scales"] = ((_blocks(size, scheme.block),), "float32")
    return out


# --------------------------------------------------------------------------- the codecs
def stochastic_round(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """floor(x) + 1 with probability x - floor(x): unbiased, E[result] = x."""
    low = np.floor(x)
    return low + (rng.random(x.shape) < (x - low))


def quantize(x: np.ndarray, bits: int, block: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Codes (int8 in -L..L, L = 127 or 7) and float32 scales (max |x| / L per block) of the
    flat array ``x``; the decoded value code x scale is within one scale of x."""
    levels = LEVELS[bits]
    x = np.asarray(x, dtype=np.float32).ravel()
    width = x.size if block == 0 else block
    rows = _blocks(x.size, block)
    padded = np.zeros(rows * max(width, 1), dtype=np.float32)
    padded[: x.size] = x
    padded = padded.reshape(rows, -1)
    scales = (np.abs(padded).max(axis=1) / np.float32(levels)).astype(np.float32)
    safe = np.where(scales > 0, scales, np.float32(1))[:, None]
    codes = np.clip(stochastic_round(padded / safe, rng), -levels, levels).astype(np.int8)
    return codes.ravel()[: x.size], scales


def dequantize(codes: np.ndarray, scales: np.ndarray, block: int) -> np.ndarray:
    """float32 values code x scale of each code's block."""
    codes = np.asarray(codes)
    per = scales[0] if block == 0 else np.repeat(scales, block)[: codes.size]
    with np.errstate(over="ignore", invalid="ignore"):
        return (codes.astype(np.float32) * per).astype(np.float32, copy=False)


def pack4(codes: np.ndarray) -> np.ndarray:
    """Codes in -7..7, two to a byte (code + 8, low nibble first; an odd tail pads with 0)."""
    u = (np.asarray(codes, dtype=np.int16) + 8).astype(np.uint8)
    if u.size % 2:
        u = np.append(u, np.uint8(8))
    return (u[0::2] | (u[1::2] << 4)).astype(np.uint8)


def unpack4(packed: np.ndarray, size: int) -> np.ndarray:
    """The ``size`` int16 codes (nibble - 8) of :func:`pack4`'s bytes."""
    packed = np.asarray(packed, dtype=np.uint8)
    out = np.empty(packed.size * 2, dtype=np.int16)
    out[0::2] = packed & 0x0F
    out[1::2] = packed >> 4
    return out[:size] - 8


def top_k(x: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` largest-magnitude entries of flat ``x``: increasing uint32 indices, float32 values."""
    x = np.asarray(x, dtype=np.float32).ravel()
    index = np.sort(np.argpartition(np.abs(x), x.size - k)[x.size - k:]).astype(np.uint32)
    return index, x[index]


def compress(delta: Mapping[str, np.ndarray], scheme: Scheme,
             rng: np.random.Generator) -> Weights:
    """The wire tensors (see :func:`wire_spec`) for ``delta`` (float tensors by name)."""
    out: Weights = {}
    for name, d in delta.items():
        flat = np.asarray(d, dtype=np.float32).ravel()
        if scheme.kind == "topk":
            out[name + SEP + "indices"], out[name] = top_k(flat, kept(flat.size, scheme.fraction))
        else:
            codes, out[name + SEP + "scales"] = quantize(flat, scheme.bits, scheme.block, rng)
            out[name] = codes if scheme.bits == 8 else pack4(codes)
    return out


def decompress(tensors: Mapping[str, np.ndarray], spec: wire.Spec, scheme: Scheme) -> Weights:
    """The float32 delta of each tensor of ``spec``, from tensors that already match
    :func:`wire_spec`. InvalidInput naming the field for what a spec cannot check."""
    out: Weights = {}
    for name, (shape, _dtype) in spec.items():
        size = math.prod(shape)
        if scheme.kind == "topk":
            index = tensors[name + SEP + "indices"]
            if index.size and int(index.max()) >= size:
                raise InvalidInput(f"tensor {name!r}: index {int(index.max())} is out of range for "
                                   f"{size} values", name + SEP + "indices")
            if np.any(np.diff(index.astype(np.int64)) <= 0):
                raise InvalidInput(f"tensor {name!r}: indices must be strictly increasing",
                                   name + SEP + "indices")
            flat = np.zeros(size, dtype=np.float32)
            flat[index] = tensors[name]
        else:
            scales = tensors[name + SEP + "scales"]
            if np.any(scales < 0):
                raise InvalidInput(f"tensor {name!r}: scales must not be negative", name + SEP + "scales")
            levels = LEVELS[scheme.bits]
            codes = tensors[name] if scheme.bits == 8 else unpack4(tensors[name], size)
            if codes.size and int(np.abs(codes.astype(np.int16)).max()) > levels:
                raise InvalidInput(f"tensor {name!r}: codes must be within -{levels}..{levels}", name)
            flat = dequantize(codes, scales, scheme.block)
            if not np.isfinite(flat).all():
                raise InvalidInput(f"tensor {name!r}: scales overflow float32", name + SEP + "scales")
        out[name] = flat.reshape(shape)
    return out


def apply(reference: Mapping[str, np.ndarray], delta: Mapping[str, np.ndarray]) -> Weights:
    """reference + delta, in each reference tensor's dtype (server and device alike)."""
    return {name: (np.asarray(r) + delta[name]).astype(np.asarray(r).dtype, copy=False)
            for name, r in reference.items()}


# --------------------------------------------------------------------------- bodies
def _metadata(body: bytes) -> dict:
    metadata = wire.header(body).get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise InvalidInput("safetensors __metadata__ must map strings to strings", "metadata")
    return metadata


def scheme_of(body: bytes) -> Scheme:
    """The scheme a body says it uses (metadata ``compression``; none if absent)."""
    raw = _metadata(body).get("compression", "none")
    try:
        return parse(raw)
    except ValueError as exc:
        raise InvalidInput(str(exc), "compression") from None


def encode_update(weights: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                  scheme: Scheme, meta: wire.Meta, *, residual: Mapping[str, np.ndarray] | None = None,
                  rng: np.random.Generator | None = None) -> tuple[bytes, Weights]:
    """A device's update body, and the residual to keep for the next round (top-k's error
    feedback: everything of delta + residual that was not sent; empty for other schemes)."""
    if not scheme.active:
        return wire.encode(weights, meta), {}
    rng = rng or np.random.default_rng()
    delta = {n: np.asarray(weights[n], np.float32) - np.asarray(reference[n], np.float32)
             for n in reference}
    if scheme.kind == "topk" and residual:
        delta = {n: d + residual[n] if n in residual and residual[n].shape == d.shape else d
                 for n, d in delta.items()}
    tensors = compress(delta, scheme, rng)
    left: Weights = {}
    if scheme.kind == "topk":
        for n, d in delta.items():
            rest = d.ravel().copy()
            rest[tensors[n + SEP + "indices"]] = 0
            left[n] = rest.reshape(d.shape)
    return wire.encode(tensors, meta, {"compression": str(scheme)}), left


def decode_update(body: bytes, spec: wire.Spec, scheme: Scheme, *, round_number: int | None = None,
                  max_bytes: int = wire.DEFAULT_MAX_BYTES) -> tuple[Weights, wire.Meta]:
    """Validate an update compressed with ``scheme`` (the server's): its float32 delta per
    tensor (with ``none``: its weights), and its metadata, whose round must be ``round_number``
    (the URL's) when given. The one decoder of uploads, in every mode. Everything a hostile body
    can get wrong is an InvalidInput naming the field: the scheme, a tensor's name, shape or
    dtype, an index, a code, a scale, the round."""
    sent = scheme_of(body) if len(body) <= max_bytes else scheme  # too large: decode says so
    if sent != scheme:
        raise InvalidInput(f"update is compressed with {sent}, the server announced {scheme}",
                           "compression")
    tensors, meta = wire.decode(body, wire_spec(spec, scheme), max_bytes=max_bytes,
                                require_examples=True)
    if round_number is not None:
        wire.check_round(meta, round_number)
    return (decompress(tensors, spec, scheme) if scheme.active else tensors), meta


# --------------------------------------------------------------------------- error feedback
class Residual:
    """A device's top-k residual, kept in its folder (atomically) across rounds and restarts."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def load(self, scheme: Scheme) -> Weights:
        """The saved residual if it was made with ``scheme``, else none (a new start)."""
        try:
            body = self.path.read_bytes()
            saved = st_load(body)
            made_with = _metadata(body).get("compression")
        except (OSError, SafetensorError, ValueError, InvalidInput):
            return {}
        return saved if made_with == str(scheme) else {}

    def save(self, residual: Mapping[str, np.ndarray], scheme: Scheme) -> None:
        if not residual:
            return
        tensors = {n: np.ascontiguousarray(a, dtype=np.float32) for n, a in residual.items()}
        atomic_write_bytes(self.path, st_save(tensors, metadata={"compression": str(scheme)}))


# --------------------------------------------------------------------------- downlink
class Downlink:
    """The global model download, compressed: each version after the first goes out as the
    change from the previous one, applied by the device to what it holds.

    ``model`` is the broadcast model every device holds (the global model up to compression
    error); uploads are deltas from it. Quantizing ``global - model`` each time carries what
    the last change left out into the next, so the broadcast model keeps tracking the global
    one. Each server start has its own ``epoch`` in the ETags: a device's copy from before a
    restart is never taken for this run's broadcast model.
    """

    def __init__(self, scheme: Scheme, rng: np.random.Generator | None = None) -> None:
        self.scheme = scheme
        self.epoch = secrets.token_hex(4)
        self._rng = rng or np.random.default_rng()
        self.version: int | None = None
        self.model: Weights = {}
        self.full = b""
        self.change = b""  # from version - 1 to version (empty when there is none)

    def etag(self, version: int) -> str:
        return f"v{version}-{self.epoch}"

    def install(self, version: int, weights: Mapping[str, np.ndarray]) -> None:
        """Make ``weights`` (the new global model) the next version to broadcast."""
        if self.version is None or version != self.version + 1 or not self.scheme.active:
            self.model = {n: np.array(a) for n, a in weights.items()}
            self.change = b""
        else:
            delta = {n: np.asarray(weights[n], np.float32) - np.asarray(m, np.float32)
                     for n, m in self.model.items()}
            tensors = compress(delta, self.scheme, self._rng)
            self.model = apply(self.model, decompress(tensors, wire.spec_of(self.model), self.scheme))
            self.change = wire.encode(tensors, wire.Meta(round=version, model_version=version),
                                      {"compression": str(self.scheme), "base_version": str(self.version)})
        self.version = version
        self.full = wire.encode(self.model, wire.Meta(round=version, model_version=version))

    def body_for(self, have: object) -> bytes:
        """The change when the device holds the previous version (``have`` its ETags), else the
        whole broadcast model."""
        if self.change and self.version is not None and self.etag(self.version - 1) in have:
            return self.change
        return self.full


def decode_download(body: bytes, held: tuple[int, Mapping[str, np.ndarray]] | None) -> tuple[int, Weights]:
    """A device's side of :class:`Downlink`: the model version and weights from a download,
    a whole model or a change applied to ``held`` (its version and weights)."""
    head = _metadata(body)
    if "base_version" not in head:
        weights, meta = wire.decode(body, max_bytes=2**34)
        return meta.model_version, weights
    scheme = scheme_of(body)
    if held is None or str(held[0]) != head["base_version"]:
        raise InvalidInput(f"the server sent a change from version {head['base_version']}, "
                           f"this device holds {None if held is None else held[0]}", "base_version")
    spec = wire.spec_of(held[1])
    tensors, meta = wire.decode(body, wire_spec(spec, scheme), max_bytes=2**34)
    return meta.model_version, apply(held[1], decompress(tensors, spec, scheme))
