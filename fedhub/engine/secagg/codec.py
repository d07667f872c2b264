"""JSON-safe coding of message fields, strict on the way in.

Every message travels as a JSON object of strings, integers and lists (bytes as base64), never
as pickle. Reading one checks each field's type, length and range; a refusal is a
:class:`ProtocolViolation` naming the field and, when known, the device that sent it.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
from collections.abc import Mapping
from typing import Any

from .. import untrusted_json
from ..devices import NAME_RE
from ..errors import InvalidInput
from .errors import ProtocolViolation

# Upper bounds that keep a hostile message small to parse; far above any real round.
MAX_DEVICES = 10_000
MAX_MESSAGE_BYTES = 16 * 1024 * 1024


class Reader:
    """Reads one message's fields, naming the sender in every refusal."""

    def __init__(self, raw: object, kind: str, device: str | None = None) -> None:
        self.device = device
        if not isinstance(raw, Mapping):
            raise self.refuse(f"a {kind} message must be a JSON object", "message")
        self.raw = raw
        if raw.get("stage") != kind:
            raise self.refuse(f"expected a {kind!r} message, got stage {raw.get('stage')!r}", "stage")

    def refuse(self, message: str, field: str) -> ProtocolViolation:
        who = f"device {self.device!r}: " if self.device else ""
        return ProtocolViolation(who + message, field, device=self.device)

    def exact_keys(self, *keys: str) -> None:
        extra = sorted(set(self.raw) - {"stage", *keys})
        missing = sorted({*keys} - set(self.raw))
        if extra:
            raise self.refuse(f"unknown field {extra[0]!r}", extra[0])
        if missing:
            raise self.refuse(f"missing field {missing[0]!r}", missing[0])

    def integer(self, key: str, low: int, high: int) -> int:
        value = self.raw.get(key)
        if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
            raise self.refuse(f"{key!r} must be an integer from {low} to {high}", key)
        return value

    def number(self, key: str) -> float:
        value = self.raw.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value):
            raise self.refuse(f"{key!r} must be a finite number", key)
        return float(value)

    def name(self, key: str) -> str:
        return check_name(self.raw.get(key), key, self)

    def names(self, key: str, limit: int = MAX_DEVICES) -> tuple[str, ...]:
        value = self.raw.get(key)
        if not isinstance(value, list) or len(value) > limit:
            raise self.refuse(f"{key!r} must be a list of at most {limit} device names", key)
        names = tuple(check_name(v, key, self) for v in value)
        if len(set(names)) != len(names):
            raise self.refuse(f"{key!r} names a device twice", key)
        return names

    def blob(self, key: str, size: int) -> bytes:
        return decode_bytes(self.raw.get(key), size, key, self)

    def table(self, key: str, limit: int = MAX_DEVICES) -> Mapping[str, Any]:
        """A JSON object keyed by device names."""
        value = self.raw.get(key)
        if not isinstance(value, Mapping) or len(value) > limit:
            raise self.refuse(f"{key!r} must be an object of at most {limit} entries", key)
        for name in value:
            check_name(name, key, self)
        return value


def check_name(value: object, field: str, reader: Reader) -> str:
    if not isinstance(value, str) or not NAME_RE.fullmatch(value):
        raise reader.refuse(f"{field!r} holds {str(value)[:80]!r}, which is not a device name", field)
    return value


def encode_bytes(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def decode_bytes(value: object, size: int, field: str, reader: Reader) -> bytes:
    if not isinstance(value, str) or len(value) > 4 * (size // 3 + 1):
        raise reader.refuse(f"{field!r} must be {size} bytes in base64", field)
    try:
        data = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise reader.refuse(f"{field!r} is not valid base64", field) from None
    if len(data) != size:
        raise reader.refuse(f"{field!r} must be {size} bytes, got {len(data)}", field)
    return data


def dumps(message: Mapping[str, Any]) -> bytes:
    return json.dumps(message, separators=(",", ":"), allow_nan=False, sort_keys=True).encode()


def loads(body: bytes | str, device: str | None = None, *, max_bytes: int = MAX_MESSAGE_BYTES,
          field: str = "body") -> Any:
    """Parse a JSON message through the one parser for untrusted JSON (bounded nesting, no NaN,
    no giant integers), after refusing more than ``max_bytes``: what a round's stage can hold
    (:func:`.messages.max_json_bytes`), so that parsing costs what a real message costs."""
    who = f"device {device!r}: " if device else ""
    if len(body) > max_bytes:
        raise ProtocolViolation(f"{who}message of {len(body)} bytes exceeds the {max_bytes} bytes it "
                                "can hold", field, device=device)
    try:
        return untrusted_json.loads(body, field=field)
    except InvalidInput as exc:
        raise ProtocolViolation(who + exc.message, exc.field, device=device) from None
