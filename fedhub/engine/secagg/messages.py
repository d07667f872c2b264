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
:class:`MaskedSum`         relay→server  its devices' masked vectors summed, each one's refusals
:class:`UnmaskRequest`     server→device which neighbours survived and which dropped
:class:`UnmaskResponse`    device→server per neighbour, the key that opens one of its shares
=========================  ============  =================================================

Every message names its stage and round, and a device's messages name the device, so a
replayed, misrouted or impersonating message is refused. All are JSON objects (bytes in
base64) except :class:`MaskedInput` and :class:`MaskedSum`, which are safetensors: one uint32 or
uint64 tensor, or in a quantized round one uint8 tensor of its ``bits``-bit values packed end to end.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

import numpy as np
from safetensors.numpy import save as st_save

from .. import wire
from ..errors import InvalidInput
from .codec import MAX_DEVICES, Reader, check_name, decode_bytes, dumps, encode_bytes, loads
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
        return _save_vector(self.vector, params, {
            "format": PROTOCOL, "stage": self.STAGE, "round": str(self.round), "device": self.device,
            "refused": json.dumps(list(self.refused))})

    @staticmethod
    def wire_tensor(params: RoundParams) -> tuple[tuple[int, ...], str]:
        """The shape and dtype of the ``masked`` tensor in ``params``' round."""
        count = params.length + 1
        if params.packed:
            return (packed_size(count, params.bits),), "uint8"
        return (count,), "uint32" if params.bits <= 32 else "uint64"

    @classmethod
    def from_bytes(cls, body: bytes, params: RoundParams, device: str | None = None) -> MaskedInput:
        meta, vector = _load_vector(body, params, cls.STAGE, device, ("device", "refused"))
        r = Reader(meta, cls.STAGE, device)
        if not isinstance(meta["refused"], str):
            raise r.refuse("'refused' must be a JSON list of device names", "refused")
        refused = loads(meta["refused"], device, max_bytes=max_json_bytes(params), field="refused")
        fields = Reader({"stage": cls.STAGE, "device": meta["device"], "refused": refused}, cls.STAGE, device)
        return cls(round=meta["round"], device=fields.name("device"), vector=vector,
                   refused=fields.names("refused", MAX_DEVICES))


# A relay sums at most this many devices' inputs in one message (as in a partial sum of
# updates); its metadata (names, tokens, refused dealers) stays within MAX_SUM_HEADER.
MAX_SUM_DEVICES = 256
MAX_SUM_HEADER = 4 * 1024 * 1024
MAX_TOKEN_CHARS = 200


@dataclass(frozen=True, eq=False)
class MaskedSum:
    """Several devices' masked inputs summed modulo 2^bits by a relay: the vector the server's
    own sum would gain from adding each, in one message (a relay sees masked vectors only, as the
    server does). ``inputs`` names each device with the dealers it refused; ``tokens`` are the
    devices' own, with which the relay speaks for them: the transport checks them, not this layer."""

    STAGE: ClassVar[str] = "masked_sum"

    round: int
    inputs: tuple[tuple[str, tuple[str, ...]], ...]
    vector: np.ndarray
    tokens: tuple[str, ...] = field(default=(), repr=False)

    @property
    def devices(self) -> tuple[str, ...]:
        return tuple(name for name, _ in self.inputs)

    def to_bytes(self, params: RoundParams, extra: Mapping[str, str] | None = None) -> bytes:
        """The body to send (``extra``: more metadata, for a relay's own copy on disk)."""
        devices = [{"name": name, "refused": list(refused), "token": token}
                   for (name, refused), token in zip(self.inputs, self.tokens, strict=True)]
        return _save_vector(self.vector, params, {**(extra or {}), "format": PROTOCOL, "stage": self.STAGE,
                                                  "round": str(self.round), "devices": json.dumps(devices)})

    @classmethod
    def from_bytes(cls, body: bytes, params: RoundParams, relay: str | None = None, *,
                   extra: tuple[str, ...] = ()) -> MaskedSum:
        """Parse and check a sum of ``params``' round (``extra``: metadata keys also allowed, in a
        relay's own copy); a refusal names ``relay`` and the field, ``devices[i]...`` for a device's."""
        try:
            return cls._parse(body, params, extra)
        except ProtocolViolation as exc:
            if relay is None:
                raise
            raise ProtocolViolation(f"relay {relay!r}: {exc.message}", exc.field) from None

    @classmethod
    def _parse(cls, body: bytes, params: RoundParams, extra: tuple[str, ...]) -> MaskedSum:
        meta, vector = _load_vector(body, params, cls.STAGE, None, ("devices", *extra),
                                    max_header=MAX_SUM_HEADER)
        r = Reader(meta, cls.STAGE)
        entries = (loads(meta["devices"], max_bytes=MAX_SUM_HEADER, field="devices")
                   if isinstance(meta["devices"], str) else None)
        if not isinstance(entries, list) or not 1 <= len(entries) <= MAX_SUM_DEVICES:
            raise r.refuse(f"'devices' must be a JSON list of 1 to {MAX_SUM_DEVICES} devices", "devices")
        inputs, tokens = [], []
        for i, entry in enumerate(entries):
            where = f"devices[{i}]"
            if not isinstance(entry, dict) or set(entry) != {"name", "refused", "token"}:
                raise r.refuse(f"{where} must be an object with name, refused and token", where)
            name = check_name(entry["name"], f"{where}.name", r)
            refused = entry["refused"]
            if not isinstance(refused, list) or len(refused) > params.shares:
                raise r.refuse(f"{where}.refused must be a list of at most {params.shares} device names",
                               f"{where}.refused")
            token = entry["token"]
            if not isinstance(token, str) or not 1 <= len(token) <= MAX_TOKEN_CHARS:
                raise r.refuse(f"{where}.token must be the device's token (1-{MAX_TOKEN_CHARS} characters)",
                               f"{where}.token")
            inputs.append((name, tuple(check_name(v, f"{where}.refused", r) for v in refused)))
            tokens.append(token)
        names = [name for name, _ in inputs]
        twice = next((n for i, n in enumerate(names) if n in names[:i]), None)
        if twice is not None:
            raise r.refuse(f"'devices' names device {twice!r} twice", "devices")
        return cls(round=meta["round"], inputs=tuple(inputs), vector=vector, tokens=tuple(tokens))


def _save_vector(vector: np.ndarray, params: RoundParams, meta: Mapping[str, str]) -> bytes:
    if params.packed:
        return st_save({"masked": pack(vector, params.bits)}, metadata=dict(meta))
    dtype = "<u4" if params.bits <= 32 else "<u8"
    return st_save({"masked": np.ascontiguousarray(vector, dtype=dtype)}, metadata=dict(meta))


def _load_vector(body: bytes, params: RoundParams, stage: str, sender: str | None, keys: tuple[str, ...],
                 *, max_header: int = wire.MAX_HEADER_BYTES) -> tuple[dict[str, Any], np.ndarray]:
    """A masked message's metadata (format and round checked, ``round`` made an int, exactly
    ``keys`` besides) and its field vector (uint64, every value below the modulus)."""
    shape, dtype = MaskedInput.wire_tensor(params)
    limit = shape[0] * np.dtype(dtype).itemsize + max_header
    try:
        tensors, _ = wire.decode(body, {"masked": (shape, dtype)}, max_bytes=limit, max_header=max_header)
        meta = dict(wire.header(body, max_header=max_header).get("__metadata__") or {})
    except InvalidInput as exc:
        raise ProtocolViolation(exc.message, exc.field, device=sender) from None
    r = Reader({**meta, "stage": stage}, stage, sender)
    if meta.get("stage") != stage:
        raise r.refuse(f"expected a {stage!r} message, got stage {meta.get('stage')!r}", "stage")
    r.exact_keys("format", "round", *keys)
    if meta["format"] != PROTOCOL:
        raise r.refuse(f"format must be {PROTOCOL!r}", "format")
    try:
        meta["round"] = int(meta["round"])
    except (TypeError, ValueError):
        raise r.refuse("'round' must be an integer", "round") from None
    if not 0 <= meta["round"] <= ROUND_MAX:
        raise r.refuse(f"'round' must be an integer from 0 to {ROUND_MAX}", "round")
    if params.packed:
        try:
            vector = unpack(tensors["masked"], params.length + 1, params.bits)
        except ValueError as exc:
            raise r.refuse(f"the masked vector: {exc}", "masked") from None
    else:
        vector = tensors["masked"].astype(np.uint64)
    if params.bits < 64 and int(vector.max(initial=0)) > params.modulus_mask:
        raise r.refuse(f"the masked vector holds values of {params.bits} bits or more", "masked")
    return meta, vector


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
