"""Typed settings read from a dataclass's fields: one parser for every ``KEY=VALUE`` option.

Strategies (``--strategy-arg``) and device attacks (``--attack-arg``) declare their
settings as dataclass fields with a type, a default and a ``help`` text. This module
derives the allowed keys, converts strings or Python values to the declared type, and
turns every refusal into one line that names the allowed keys, so no table of
parameters is kept by hand anywhere.

The run's own settings (``fedhub.engine.config``, ``server.ServerConfig``, ``DPConfig``,
``SecAggConfig``) are declared the same way (:func:`setting`, :func:`number`, :func:`group`):
default, help, range and choices, once; ``fedhub.settings`` derives the command-line flags, the
configuration file's keys, the Python keyword arguments and the README's table from them.
:func:`check_numbers` refuses,
for every caller alike (``server.py``, ``fedhub.Server``, ``fedhub.simulate``), a number that
is not finite or out of its range: a setting that would leave the server unusable (no
worker threads, every round discarded at its deadline, every update too large) never starts.
"""

from __future__ import annotations

import dataclasses
import math
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}
_NONE = {"none", "null"}


class ParamError(ValueError):
    """A setting that cannot be used; the message is one line and names the allowed keys."""


@dataclass(frozen=True)
class Param:
    """One constructor argument: its name, type, default and what it does."""

    name: str
    kind: type  # int, float, bool, str, Path or dict (object: anything, from Python only)
    optional: bool  # None is also allowed
    default: Any
    help: str

    @property
    def type_name(self) -> str:
        return self.kind.__name__ + (" or none" if self.optional else "")

    @property
    def expected(self) -> str:
        words = {int: "an integer", float: "a number", bool: "true or false", str: "a string",
                 Path: "a path", dict: "a table"}
        return words.get(self.kind, "a value") + (" or none" if self.optional else "")

    def convert(self, value: Any) -> Any:
        """A Python value of the declared type, or ValueError saying what was expected."""
        if value is None:
            if self.optional:
                return None
            raise ValueError(f"must be {self.expected}, got none")
        if self.kind is bool:
            if isinstance(value, bool):
                return value
        elif self.kind is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif self.kind is float:
            if isinstance(value, int | float) and not isinstance(value, bool):
                if not math.isfinite(value):
                    raise ValueError(f"must be a finite number, got {value!r}")
                return float(value)
        elif self.kind is str and isinstance(value, str):
            return value
        elif self.kind is Path and isinstance(value, str | Path):
            return Path(value)
        elif self.kind is dict and isinstance(value, Mapping):
            return dict(value)
        elif self.kind is object:
            return value
        raise ValueError(f"must be {self.expected}, got {value!r}")

    def parse(self, text: str) -> Any:
        """Convert the text of a ``KEY=VALUE`` option."""
        low = text.strip().lower()
        if self.optional and low in _NONE:
            return None
        if self.kind is bool:
            if low in _TRUE | _FALSE:
                return low in _TRUE
            raise ValueError(f"must be {self.expected}, got {text!r}")
        if self.kind is int:
            try:
                return int(text.strip(), 10)
            except ValueError:
                raise ValueError(f"must be {self.expected}, got {text!r}") from None
        if self.kind is float:
            try:
                value = float(text)
            except ValueError:
                raise ValueError(f"must be {self.expected}, got {text!r}") from None
            return self.convert(value)
        if self.kind is Path:
            return Path(text)
        return text


def params_of(cls: type) -> tuple[Param, ...]:
    """The settings of a dataclass: its ``init`` fields, in declaration order."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init:
            continue
        if "group" in f.metadata:
            continue
        kind, optional = _kind(hints[f.name], f"{cls.__name__}.{f.name}")
        kind = f.metadata.get("kind", kind)
        default = (f.default if f.default is not dataclasses.MISSING
                   else f.default_factory() if f.default_factory is not dataclasses.MISSING else None)
        out.append(Param(f.name, kind, optional, default, f.metadata.get("help", "")))
    return tuple(out)


def _kind(annotation: Any, where: str) -> tuple[type, bool]:
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(annotation)) == 2:
            return _kind(args[0], where)[0], True
    if annotation in (int, float, bool, str, Path, dict):
        return annotation, False
    if annotation is Any or typing.get_origin(annotation) is dict:
        return (dict if annotation is not Any else object), False
    raise TypeError(f"{where}: settings must be int, float, bool, str or a path (or one of them or None)")


def _allowed(what: str, params: tuple[Param, ...]) -> str:
    if not params:
        return f"{what} takes no parameters"
    return "allowed keys: " + ", ".join(p.name for p in params)


def _split(args: Iterable[str], what: str, params: tuple[Param, ...]) -> dict[str, str]:
    """``["k=v", ...]`` as a dict of strings; a malformed or repeated key is a :class:`ParamError`."""
    out: dict[str, str] = {}
    for arg in args:
        key, sep, value = str(arg).partition("=")
        key = key.strip()
        if not sep or not key:
            raise ParamError(f"{what}: expected KEY=VALUE, got {arg!r} ({_allowed(what, params)})")
        if key in out:
            raise ParamError(f"{what}: {key} is given twice")
        out[key] = value
    return out


def _typed(cls: type, values: Mapping[str, Any], what: str,
           convert: Callable[[Param, Any], Any]) -> dict[str, Any]:
    params = params_of(cls)
    by_name = {p.name: p for p in params}
    out = {}
    for key, value in values.items():
        if key not in by_name:
            raise ParamError(f"{what}: unknown key {key!r} ({_allowed(what, params)})")
        try:
            out[key] = convert(by_name[key], value)
        except ValueError as exc:
            raise ParamError(f"{what}: {key} {exc} ({_allowed(what, params)})") from None
    return out


def parse_assignments(cls: type, args: Iterable[str], what: str) -> dict[str, Any]:
    """Typed keyword arguments for ``cls`` from ``KEY=VALUE`` strings (ranges are the
    constructor's to check, see :func:`build`)."""
    return _typed(cls, _split(args, what, params_of(cls)), what, Param.parse)


def build(cls: type, kwargs: Mapping[str, Any], what: str) -> Any:
    """``cls(**kwargs)`` with each value checked against its declared type; the constructor's
    own range checks (ValueError) come back as one-line :class:`ParamError` naming the keys."""
    checked = _typed(cls, kwargs, what, Param.convert)
    try:
        return cls(**checked)
    except ValueError as exc:
        raise ParamError(f"{what}: {exc} ({_allowed(what, params_of(cls))})") from None


def values_of(obj: Any) -> dict[str, Any]:
    """The settings an instance was built with, for logs, dashboards and round records."""
    return {p.name: getattr(obj, p.name) for p in params_of(type(obj))}


def describe(cls: type) -> list[dict[str, Any]]:
    """Each setting of ``cls`` as ``{"name", "type", "default", "help"}`` (for ``--list-...``)."""
    return [{"name": p.name, "type": p.type_name, "default": p.default, "help": p.help}
            for p in params_of(cls)]


def setting(default: Any = dataclasses.MISSING, help: str = "", *, factory: Callable[[], Any] | None = None,
            low: float | None = None, high: float | None = None, above: float | None = None,
            flag: str | None = None, aliases: tuple[str, ...] = (), choices: Iterable[str] | None = None,
            metavar: str | None = None, kind: type | None = None) -> Any:
    """A dataclass field that is a setting: its default, the help text every front end shows
    (``--help``, ``--list-strategies``, the README's tables), its range (:class:`Range`, checked
    by :func:`check_numbers`) and, for the run's settings, how the command line spells it.

    The flag is ``--`` + the name with hyphens (``fedhub.settings``); ``flag`` declares another
    one only where the field is a switch (``--dp MODE``); ``aliases`` are older spellings still
    accepted but not shown; ``kind`` is what a file or the command line gives where the field
    also takes Python objects (``test_data``: a path, or arrays from Python)."""
    metadata: dict[str, Any] = {"help": help}
    if low is not None or high is not None or above is not None:
        metadata[RANGE_KEY] = Range(low, high, above)
    extra = {"flag": flag, "aliases": tuple(aliases) or None, "choices": tuple(choices) if choices else None,
             "metavar": metavar, "kind": kind}
    metadata.update({key: value for key, value in extra.items() if value is not None})
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=default, metadata=metadata)


def number(default: Any, low: float | None = None, high: float | None = None, *,
           above: float | None = None, help: str = "", **more: Any) -> Any:
    """A setting holding a number: its default, its range (:class:`Range`) and its help."""
    field = setting(default, help, low=low, high=high, above=above, **more)
    field.metadata = types.MappingProxyType({**field.metadata, RANGE_KEY: Range(low, high, above)})
    return field


def group(*, factory: Callable[[], Any] | None = None, flat: bool = False, switch: str | None = None,
          flag: str | None = None, help: str = "") -> Any:
    """A field holding another dataclass of settings. ``flat``: its settings are named as this
    one's own (the training's ``epochs`` is ``epochs``); otherwise they are ``NAME.setting``
    (a ``[NAME]`` table, ``--NAME-setting`` flags) and the group is optional (None: off). An
    optional group is on when its ``switch`` setting is given (``dp.mode``: ``--dp MODE``), or,
    without one, by the group's own ``flag`` (``--secure-aggregation``) or a ``[NAME]`` table."""
    metadata = {"group": "flat" if flat else "named", "switch": switch, "flag": flag, "help": help}
    if factory is not None:
        return dataclasses.field(default_factory=factory, metadata=metadata)
    return dataclasses.field(default=None, metadata=metadata)


class SettingError(ParamError):
    """A run setting refused. ``settings`` are the paths of the settings the message names
    (``"max_staleness"``, ``"dp.clipping_norm"``), written ``{0}``, ``{1}`` in ``template``: the
    message is written once and each front end renders the names its own way (:meth:`render`:
    ``--max-staleness`` on the command line, ``max_staleness`` in Python and in a file)."""

    def __init__(self, template: str, *settings: str) -> None:
        self.template = template
        self.settings = settings
        self.setting = settings[0] if settings else None
        super().__init__(self.render())

    def render(self, name: Callable[[str], str] = str) -> str:
        text = self.template
        for i, path in enumerate(self.settings):
            text = text.replace(f"{{{i}}}", name(path))
        return text


@dataclass(frozen=True)
class Range:
    """Where a numeric setting may lie: ``low``/``high`` included, ``above`` excluded."""

    low: float | None = None
    high: float | None = None
    above: float | None = None

    def problem(self, value: float) -> str | None:
        """Why ``value`` cannot be used, or None."""
        if isinstance(value, float) and not math.isfinite(value):
            return f"must be a finite number, got {value!r}"
        too_low = ((self.low is not None and value < self.low)
                   or (self.above is not None and value <= self.above))
        if too_low or (self.high is not None and value > self.high):
            return f"must be {self.text()}, got {_shown(value)}"
        return None

    def text(self) -> str:
        """The range in words."""
        parts = [f"more than {_shown(self.above)}" if self.above is not None else
                 f"at least {_shown(self.low)}" if self.low is not None else "",
                 f"at most {_shown(self.high)}" if self.high is not None else ""]
        return " and ".join(part for part in parts if part) or "a finite number"


def _shown(x: float) -> str:
    if isinstance(x, int):
        return str(x)
    return str(int(x)) if x.is_integer() and abs(x) < 1e15 else f"{x:g}"


RANGE_KEY = "fedhub_range"


def check_numbers(obj: Any, prefix: str = "") -> None:
    """:class:`SettingError` (one line, naming the setting by its path) for the first number of
    the dataclass ``obj``, or of a dataclass it holds, that is not finite or outside its declared
    range. ``None`` (an optional setting left out) passes; a number field without a declared
    range must still be finite."""
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value) and not isinstance(value, type):
            check_numbers(value, prefix if f.metadata.get("group") == "flat" else f"{prefix}{f.name}.")
            continue
        if isinstance(value, bool) or not isinstance(value, int | float):
            continue
        why = (f.metadata.get(RANGE_KEY) or Range()).problem(value)
        if why is not None:
            raise SettingError(f"{{0}} {why}", prefix + f.name)
def unbounded(cls: type) -> list[str]:
    """The numeric ``init`` fields of the dataclass ``cls`` that declare no range (a test keeps
    this empty for the run's settings)."""
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        kinds = typing.get_args(hints[f.name]) or (hints[f.name],)
        if f.init and any(k in (int, float) for k in kinds) and RANGE_KEY not in f.metadata:
            out.append(f.name)
    return out
