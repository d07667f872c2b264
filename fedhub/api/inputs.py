"""Reading request input with clear refusals (the field and the problem), within bounds.

Every body is read through a limit set before it is read (413 above it), and every JSON body
is parsed by ``fedhub.engine.untrusted_json`` (no nesting deeper than it allows, no NaN, no text that
UTF-8 cannot carry, such as a lone surrogate), so what an unauthenticated request can cost is
bounded by ``MAX_JSON_BYTES``, and every string a route gets from it can be stored.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Iterator
from typing import Any

from flask import request
from werkzeug.exceptions import RequestEntityTooLarge

from fedhub.engine import untrusted_json
from fedhub.engine.errors import InvalidInput, TooLarge

# JSON bodies (enrollment, validation reports, control calls) are small: the largest is a
# validation report of 20 problems of 300 characters and 1,000 class counts, under 64 KiB even
# with every character escaped.
MAX_JSON_BYTES = 64 * 1024


@contextlib.contextmanager
def body_limit(limit: int, what: str) -> Iterator[None]:
    """Read the body inside: above ``limit`` bytes it is refused with 413, before it is read."""
    request.max_content_length = limit
    try:
        yield
    except RequestEntityTooLarge:
        raise TooLarge(f"{what} exceeds the limit of {limit} bytes", "body") from None


def json_body(optional: bool = False, *, kind: type = dict,
              max_bytes: int = MAX_JSON_BYTES) -> Any:
    """The JSON value (an object, or ``kind``) in the body; an empty body counts as {} when
    ``optional``."""
    with body_limit(max_bytes, "the JSON body"):
        data = request.get_data(cache=True)
    if optional and not data:
        return {}
    if not request.is_json:
        raise InvalidInput("body must be JSON (Content-Type: application/json)", "Content-Type")
    value = untrusted_json.loads(data, field="body")
    if not isinstance(value, kind):
        raise InvalidInput(f"body must be a JSON {'object' if kind is dict else 'list'}", "body")
    return value


def _number_arg(name: str, default, low, high, kind: type, noun: str):
    raw = request.args.get(name)
    if raw is None or raw == "":
        return default
    try:
        value = kind(raw)
    except ValueError:
        raise InvalidInput(f"{name} must be {noun}", name) from None
    if not low <= value <= high:  # also refuses NaN
        raise InvalidInput(f"{name} must be between {low:g} and {high:g}", name)
    return value


def float_arg(name: str, default: float, low: float, high: float) -> float:
    """A number from the query string, within [low, high]."""
    return _number_arg(name, default, low, high, float, "a number")


def int_arg(name: str, default: int | None, low: int, high: int) -> int | None:
    """A whole number from the query string, within [low, high]."""
    return _number_arg(name, default, low, high, int, "an integer")


def binary_body() -> bytes:
    ctype = request.mimetype
    if ctype not in ("application/octet-stream", "application/vnd.safetensors"):
        raise InvalidInput(
            "body must be safetensors bytes (Content-Type: application/octet-stream)",
            "Content-Type")
    stream = request.stream  # refuses a body over the size limit (413)
    length = request.content_length
    if length is None:  # chunked
        return request.get_data(cache=False)
    raw = request.environ.get("wsgi.input")
    if isinstance(raw, io.BytesIO) and raw.tell() == 0:  # waitress holds it in memory (fedhub/api/serving.py)
        body = raw.getvalue()  # the buffer itself, not a copy
        if len(body) == length:
            return body
    # One read of the declared length: get_data reads 8 KB at a time (~50 calls per upload).
    return stream.read(length)
