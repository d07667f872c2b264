"""The one parser for JSON that comes from outside: request bodies, safetensors headers, metrics.

Python's ``json`` recurses once per nesting level, so ``[[[[...]]]]`` a few thousand levels
deep raises ``RecursionError`` (a 500) before any validation runs. Here the nesting depth is
measured first, by a scan that does not recurse (strings removed by one regular expression,
then a running count of the brackets that are left), and too deep a document is refused with
an :class:`InvalidInput` naming the field before the parser ever sees it. Anything else that is
not RFC 8259 JSON is refused the same way: bytes that are not UTF-8, ``NaN`` and ``Infinity``,
integers too long for Python to convert.

Text, too, must be Unicode that UTF-8 can carry. JSON may spell a lone UTF-16 surrogate
(``"\\ud800"``), and Python's parser turns it into a ``str`` that cannot be encoded: the
request then failed with a 500 wherever the string reached SQLite or a log file, sometimes
after the route had already changed state. Every string (keys too) is checked here, once,
so a request carrying one is refused with 400 naming the string's place before any route
acts on it. This is the only way such text reaches the server: the URL path, the query
string, headers and form fields are decoded by Werkzeug from bytes (invalid UTF-8 becomes
U+FFFD or stays percent-encoded; headers are Latin-1), and no surrogate survives that.
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
# A JSON escape of a UTF-16 surrogate, or a surrogate itself in text given as ``str``: only a
# document with one of these can decode to a lone surrogate, so only such documents are walked.
_MAYBE_SURROGATE = re.compile(r"\\u[dD][89a-fA-F]|[\ud800-\udfff]")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


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
        value = json.loads(text, parse_constant=_refuse_constant)
    except ValueError as exc:  # JSONDecodeError, NaN/Infinity, integers of thousands of digits
        reason = str(exc).split("; use sys.set_int_max_str_digits")[0]
        raise InvalidInput(f"{field} is not valid JSON: {reason}", field) from None
    if _MAYBE_SURROGATE.search(text):
        _refuse_lone_surrogates(value, field)
    return value


def _refuse_lone_surrogates(value: Any, where: str) -> None:
    """Refuse the first string in ``value`` (``body.lines[2].message``, or a key) that holds a
    lone surrogate. Recursion is bounded: the depth was checked before parsing."""
    if isinstance(value, str):
        if _SURROGATE.search(value):
            raise InvalidInput(f"{where} is not valid Unicode text: it holds a lone UTF-16 surrogate "
                               "(a \\ud800-\\udfff escape without its pair), which UTF-8 cannot carry",
                               where)
    elif isinstance(value, dict):
        for key, item in value.items():
            if _SURROGATE.search(key):
                raise InvalidInput(f"a key of {where} holds a lone UTF-16 surrogate (a \\ud800-\\udfff "
                                   "escape without its pair), which UTF-8 cannot carry", where)
            _refuse_lone_surrogates(item, f"{where}.{key}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            _refuse_lone_surrogates(item, f"{where}[{i}]")
