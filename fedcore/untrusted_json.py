"""The one parser for JSON that comes from outside: request bodies, safetensors headers, metrics.

Python's ``json`` recurses once per nesting level, so ``[[[[...]]]]`` a few thousand levels
deep raises ``RecursionError`` (a 500) before any validation runs. Here the nesting depth is
measured first, by a scan that does not recurse (strings removed by one regular expression,
then a running count of the brackets that are left), and too deep a document is refused with
an :class:`InvalidInput` naming the field before the parser ever sees it. Anything else that is
not RFC 8259 JSON is refused the same way: bytes that are not UTF-8, ``NaN`` and ``Infinity``,
integers too long for Python to convert.
"""

from __future__ import annotations

import json
import re
from typing import Any

import numpy as np

from .errors import InvalidInput

# Every legitimate document FedHub reads is 1-3 levels deep (a log batch, a validation report,
# a safetensors header); 32 leaves room for any future field and none for an attack.
MAX_DEPTH = 32
# A JSON string: quotes around anything but quotes and backslashes, or backslash escapes
# (written unrolled, so the regular expression engine never backtracks).
_STRING = re.compile(r'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKET = re.compile(r"[^\[\]{}]+")
_OPEN = (ord("["), ord("{"))


def nesting_depth(text: str) -> int:
    """How deeply arrays and objects nest in ``text``, without parsing it.

    Brackets inside strings do not count. For malformed text (an unterminated string) the
    answer may be too high, never too low, which is the safe side for a limit.
    """
    brackets = _NOT_BRACKET.sub("", _STRING.sub("", text)).encode("ascii")
    if not brackets:
        return 0
    codes = np.frombuffer(brackets, np.uint8)
    steps = np.where((codes == _OPEN[0]) | (codes == _OPEN[1]), 1, -1).astype(np.int64)
    return int(np.cumsum(steps).max())


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def loads(data: bytes | bytearray | str, *, field: str = "body", max_depth: int = MAX_DEPTH) -> Any:
    """Parse untrusted JSON; every refusal is an :class:`InvalidInput` naming ``field``."""
    if isinstance(data, bytes | bytearray):
        try:
            text = bytes(data).decode("utf-8")
        except UnicodeDecodeError:
            raise InvalidInput(f"{field} is not UTF-8 text", field) from None
    else:
        text = data
    # Fewer brackets than the limit cannot nest past it: the scan is for the rest.
    depth = 0 if text.count("[") + text.count("{") <= max_depth else nesting_depth(text)
    if depth > max_depth:
        raise InvalidInput(f"{field} nests JSON {depth} levels deep; at most {max_depth} are allowed",
                           field)
    try:
        return json.loads(text, parse_constant=_refuse_constant)
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, integers of thousands of digits
        reason = str(exc).split("; use sys.set_int_max_str_digits")[0]
        raise InvalidInput(f"{field} is not valid JSON: {reason}", field) from None
