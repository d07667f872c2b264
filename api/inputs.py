"""Reading request input with clear refusals (the field and the problem)."""

from __future__ import annotations

from typing import Any

from flask import request

from fedcore.errors import InvalidInput


def json_body(optional: bool = False) -> dict[str, Any]:
    """The JSON object in the body; an empty body counts as {} when ``optional``."""
    if optional and not request.get_data(cache=True):
        return {}
    if not request.is_json:
        raise InvalidInput("body must be JSON (Content-Type: application/json)", "Content-Type")
    data = request.get_json(silent=True)
    if not isinstance(data, dict):
        raise InvalidInput("body must be a JSON object", "body")
    return data


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
    return request.get_data(cache=False)
