"""The messages of one SecAgg+ round, in the order they travel.

=========================  ============  =================================================
message                    direction     carries
=========================  ============  =================================================
:class:`RoundParams`       server→all    ring order, shares, threshold, field, length
:class:`AdvertiseKeys`     device→server two X25519 public keys (share encryption, masks)
:class:`KeyDirectory`      server→device its neighbours' public keys
:class:`ShareKeys`         device→server a commitment to its seed; per neighbour, the
                                         encrypted shares of its seed and its mask key
:class:`ShareBundle`       server→device the encrypted shares its neighbours dealt it
:class:`MaskedInput`       device→server its masked vector (safetensors), shares it refused
:class:`UnmaskRequest`     server→device which neighbours survived and which dropped
:class:`UnmaskResponse`    device→server per neighbour, the key that opens one of its shares
=========================  ============  =================================================

Every message names its stage and round, and a device's messages name the device, so a
replayed, misrouted or impersonating message is refused. All are JSON objects (bytes in
base64) except :class:`MaskedInput`, which is safetensors: one uint32 or uint64 tensor, or in a
quantized round one uint8 tensor of its ``bits``-bit values packed end to end.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
from safetensors.numpy import save as st_save

from .. import wire
from ..errors import InvalidInput
from .codec import MAX_DEVICES, Reader, decode_bytes, dumps, encode_bytes, loads
from .crypto import CIPHERTEXT_BYTES, KEY_BYTES, KINDS, MASK_KEY, PROTOCOL, SEED
from .encoding import pack, packed_size, unpack
from .errors import ProtocolViolation
from .params import RoundParams

ROUND_MAX = wire.MAX_INTEGER


class _Json:
    """``to_bytes``/``from_bytes`` for the messages that travel as JSON."""

    STAGE: ClassVar[str]

    def to_dict(self) -> dict[str, Any]:
        raise NotImplementedError

    def to_bytes(self) -> bytes:
        return dumps(self.to_dict())

    @classmethod
    def from_dict(cls, raw: object, device: str | None = None) -> Any:
        raise NotImplementedError

    @classmethod
    def from_bytes(cls, body: bytes, device: str | None = None) -> Any:
        """``device`` is who sent it, as authenticated by the transport; refusals name it."""
        return cls.from_dict(loads(body, device), device)


# The longest device name (fedhub.engine.devices.NAME_RE) and room for what a message's fixed fields
# and a client's own JSON layout (spaces, line breaks) add.
_NAME_CHARS = 64
_SLACK = 4096


def max_json_bytes(params: RoundParams) -> int:
    """The most bytes a device's JSON message can take in this round, twice over: its shares
    message, one pair of encrypted shares per holder (``params.shares`` of them). A body above
    it is refused before parsing, so parsing costs what a real message of the round costs, not
    what the HTTP limit allows (a 15 MiB body of tiny JSON values is over 100 MiB parsed)."""
    entry = len(dumps({"x" * _NAME_CHARS: {SEED: encode_bytes(bytes(CIPHERTEXT_BYTES)),
                                            MASK_KEY: encode_bytes(bytes(CIPHERTEXT_BYTES))}}))
    return 2 * params.shares * entry + _SLACK


def _pairs(r: Reader, key: str, size: int) -> dict[str, tuple[bytes, bytes]]:
    """{name: {"seed": b64, "mask_key": b64}} -> {name: (seed, mask_key)}."""
    out = {}
    for name, entry in r.table(key).items():
        if not isinstance(entry, Mapping) or set(entry) != set(KINDS):
            raise r.refuse(f"{key!r}[{name!r}] must hold exactly {list(KINDS)}", key)
        out[name] = (decode_bytes(entry[SEED], size, key, r), decode_bytes(entry[MASK_KEY], size, key, r))
    return out


def _pairs_dict(pairs: Mapping[str, tuple[bytes, bytes]]) -> dict[str, dict[str, str]]:
    return {name: {SEED: encode_bytes(a), MASK_KEY: encode_bytes(b)} for name, (a, b) in pairs.items()}


def _keys(r: Reader, key: str) -> dict[str, bytes]:
    return {name: decode_bytes(v, KEY_BYTES, key, r) for name, v in r.table(key).items()}


@dataclass(frozen=True)
class AdvertiseKeys(_Json):
    STAGE = "advertise"

    round: int
    device: str
    cipher_key: bytes  # X25519 public key for the encryption of shares
    mask_key: bytes  # X25519 public key for pairwise masks

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.STAGE, "round": self.round, "device": self.device,
                "cipher_key": encode_bytes(self.cipher_key), "mask_key": encode_bytes(self.mask_key)}

    @classmethod
    def from_dict(cls, raw: object, device: str | None = None) -> AdvertiseKeys:
        r = Reader(raw, cls.STAGE, device)
        r.exact_keys("round", "device", "cipher_key", "mask_key")
        return cls(round=r.integer("round", 0, ROUND_MAX), device=r.name("device"),
                   cipher_key=r.blob("cipher_key", KEY_BYTES), mask_key=r.blob("mask_key", KEY_BYTES))


@dataclass(frozen=True)
class KeyDirectory(_Json):
    STAGE = "keys"

    round: int
    keys: Mapping[str, tuple[bytes, bytes]]  # neighbour (the device included) -> (cipher, mask)

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.STAGE, "round": self.round,
                "keys": {n: {"cipher_key": encode_bytes(c), "mask_key": encode_bytes(m)}
                         for n, (c, m) in self.keys.items()}}

    @classmethod
    def from_dict(cls, raw: object, device: str | None = None) -> KeyDirectory:
        r = Reader(raw, cls.STAGE, device)
        r.exact_keys("round", "keys")
        keys = {}
        for name, entry in r.table("keys").items():
            if not isinstance(entry, Mapping) or set(entry) != {"cipher_key", "mask_key"}:
                raise r.refuse(f"'keys'[{name!r}] must hold exactly 'cipher_key' and 'mask_key'", "keys")
            keys[name] = (decode_bytes(entry["cipher_key"], KEY_BYTES, "keys", r),
                          decode_bytes(entry["mask_key"], KEY_BYTES, "keys", r))
        return cls(round=r.integer("round", 0, ROUND_MAX), keys=keys)


@dataclass(frozen=True)
class ShareKeys(_Json):
    STAGE = "share"

    round: int
    device: str
    commitment: bytes  # SHA-256 commitment to the self-mask seed
    shares: Mapping[str, tuple[bytes, bytes]]  # recipient -> (encrypted seed share, encrypted key share)

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.STAGE, "round": self.round, "device": self.device,
                "commitment": encode_bytes(self.commitment), "shares": _pairs_dict(self.shares)}

    @classmethod
    def from_dict(cls, raw: object, device: str | None = None) -> ShareKeys:
        r = Reader(raw, cls.STAGE, device)
        r.exact_keys("round", "device", "commitment", "shares")
        return cls(round=r.integer("round", 0, ROUND_MAX), device=r.name("device"),
                   commitment=r.blob("commitment", KEY_BYTES), shares=_pairs(r, "shares", CIPHERTEXT_BYTES))


@dataclass(frozen=True)
class ShareBundle(_Json):
    STAGE = "shares"

    round: int
    shares: Mapping[str, tuple[bytes, bytes]]  # dealer -> (encrypted seed share, encrypted key share)

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.STAGE, "round": self.round, "shares": _pairs_dict(self.shares)}

    @classmethod
    def from_dict(cls, raw: object, device: str | None = None) -> ShareBundle:
        r = Reader(raw, cls.STAGE, device)
        r.exact_keys("round", "shares")
        return cls(round=r.integer("round", 0, ROUND_MAX), shares=_pairs(r, "shares", CIPHERTEXT_BYTES))


@dataclass(frozen=True, eq=False)
class MaskedInput:
    """The masked field vector (uint64 in memory; on the wire uint32 when bits <= 32, uint64
    above, and in a quantized round ``bits`` bits a value, packed into bytes)."""

    STAGE: ClassVar[str] = "masked"

    round: int
    device: str
    vector: np.ndarray
    refused: tuple[str, ...] = ()  # dealers whose shares did not authenticate

    def to_bytes(self, params: RoundParams) -> bytes:
        meta = {"format": PROTOCOL, "stage": self.STAGE, "round": str(self.round), "device": self.device,
                "refused": json.dumps(list(self.refused))}
        if params.packed:
            return st_save({"masked": pack(self.vector, params.bits)}, metadata=meta)
        dtype = "<u4" if params.bits <= 32 else "<u8"
        return st_save({"masked": np.ascontiguousarray(self.vector, dtype=dtype)}, metadata=meta)

    @staticmethod
    def wire_tensor(params: RoundParams) -> tuple[tuple[int, ...], str]:
        """The shape and dtype of the ``masked`` tensor in ``params``' round."""
        count = params.length + 1
        if params.packed:
            return (packed_size(count, params.bits),), "uint8"
        return (count,), "uint32" if params.bits <= 32 else "uint64"

    @classmethod
    def from_bytes(cls, body: bytes, params: RoundParams, device: str | None = None) -> MaskedInput:
        shape, dtype = cls.wire_tensor(params)
        limit = shape[0] * np.dtype(dtype).itemsize + wire.MAX_HEADER_BYTES
        try:
            tensors, _ = wire.decode(body, {"masked": (shape, dtype)}, max_bytes=limit)
            meta = wire.header(body).get("__metadata__") or {}
        except InvalidInput as exc:
            raise ProtocolViolation(exc.message, exc.field, device=device) from None
        r = Reader(meta, cls.STAGE, device)
        r.exact_keys("format", "round", "device", "refused")
        if meta["format"] != PROTOCOL:
            raise r.refuse(f"format must be {PROTOCOL!r}", "format")
        try:
            number = int(meta["round"])
        except (TypeError, ValueError):
            raise r.refuse("'round' must be an integer", "round") from None
        if not isinstance(meta["refused"], str):
            raise r.refuse("'refused' must be a JSON list of device names", "refused")
        refused = loads(meta["refused"], device, max_bytes=max_json_bytes(params), field="refused")
        fields = Reader({"stage": cls.STAGE, "round": number, "device": meta["device"], "refused": refused},
                        cls.STAGE, device)
        if params.packed:
            try:
                vector = unpack(tensors["masked"], params.length + 1, params.bits)
            except ValueError as exc:
                raise r.refuse(f"the masked vector: {exc}", "masked") from None
        else:
            vector = tensors["masked"].astype(np.uint64)
        if params.bits < 64 and int(vector.max(initial=0)) > params.modulus_mask:
            raise r.refuse(f"the masked vector holds values of {params.bits} bits or more", "masked")
        return cls(round=fields.integer("round", 0, ROUND_MAX), device=fields.name("device"),
                   vector=vector, refused=fields.names("refused", MAX_DEVICES))


@dataclass(frozen=True)
class UnmaskRequest(_Json):
    STAGE = "unmask_request"

    round: int
    survivors: tuple[str, ...]  # neighbours whose masked input counts: reveal their seed share
    dropped: tuple[str, ...]  # neighbours that dealt shares but sent no input: reveal their key share

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.STAGE, "round": self.round, "survivors": list(self.survivors),
                "dropped": list(self.dropped)}

    @classmethod
    def from_dict(cls, raw: object, device: str | None = None) -> UnmaskRequest:
        r = Reader(raw, cls.STAGE, device)
        r.exact_keys("round", "survivors", "dropped")
        return cls(round=r.integer("round", 0, ROUND_MAX), survivors=r.names("survivors"),
                   dropped=r.names("dropped"))


@dataclass(frozen=True)
class UnmaskResponse(_Json):
    """The device reveals, for each neighbour, the AES key of the share it holds, not the share:
    the server opens the ciphertext it relayed, so a revealed share is exactly what the dealer
    sent, and a wrong key is caught and blamed on the device that revealed it."""

    STAGE = "unmask"

    round: int
    device: str
    seed_keys: Mapping[str, bytes]  # survivor -> key of its seed share held by this device
    mask_keys: Mapping[str, bytes]  # dropped -> key of its mask-key share held by this device

    def to_dict(self) -> dict[str, Any]:
        return {"stage": self.STAGE, "round": self.round, "device": self.device,
                "seed_keys": {n: encode_bytes(k) for n, k in self.seed_keys.items()},
                "mask_keys": {n: encode_bytes(k) for n, k in self.mask_keys.items()}}

    @classmethod
    def from_dict(cls, raw: object, device: str | None = None) -> UnmaskResponse:
        r = Reader(raw, cls.STAGE, device)
        r.exact_keys("round", "device", "seed_keys", "mask_keys")
        return cls(round=r.integer("round", 0, ROUND_MAX), device=r.name("device"),
                   seed_keys=_keys(r, "seed_keys"), mask_keys=_keys(r, "mask_keys"))
