"""The run's settings, declared once, and everything derived from them.

Every setting is a field of the config dataclasses (``ServerConfig``, ``FederationConfig``,
``TrainingConfig``, ``DPConfig``, ``SecAggConfig``) with its default, type, range, choices and help
(:func:`fedhub.engine.params.setting`). From those fields come:

* the command-line flags of ``server.py`` and ``python -m fedhub.simulate`` (:func:`add_options`):
  ``--`` + the name with hyphens; a named group's settings are ``--GROUP-NAME`` (``--dp-delta``);
* the keys of a configuration file (``--config run.toml``, :func:`read_file`) and of
  ``--print-config`` (:func:`dump`): the names themselves, a named group's in a ``[GROUP]`` table;
* the keyword arguments of ``fedhub.Server`` and ``fedhub.simulate`` (:func:`build`);
* the README's options table (:func:`markdown_table`, checked against the README by a test).

A *path* names a setting everywhere: ``"max_staleness"``, ``"dp.clipping_norm"``, and ``"secagg"``
for the switch of secure aggregation. A refusal is a :class:`~fedhub.engine.params.SettingError`
carrying the paths it names; the command line shows them as flags (:func:`flag`), Python and a
file as the paths.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import functools
import json
import os
import re
import sys
import tomllib
import typing
import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedhub.engine import params
from fedhub.engine.params import Param, SettingError


@dataclass(frozen=True)
class Setting:
    """One setting: where it lives, how each front end spells it, and what it takes."""

    path: str  # "buffer_size", "dp.clipping_norm"; "secagg": a named group's switch
    attrs: tuple[str, ...]  # attribute chain from the root config: ("federation", "buffer_size")
    param: Param  # kind, optional, default, help
    flag: str
    aliases: tuple[str, ...] = ()
    choices: tuple[str, ...] | None = None
    metavar: str | None = None
    cli_kind: type | None = None  # what the command line and a file give, where not the field's type
    group: str | None = None  # the named group it belongs to (or switches on)
    switch: bool = False  # giving it turns its group on (dp.mode, secagg)

    @property
    def kind(self) -> type:
        return self.cli_kind or self.param.kind

    def default_text(self, default: Any) -> str:
        if default is None:
            return "none"
        if isinstance(default, bool):
            return "on" if default else "off"
        if isinstance(default, dict):
            return "the strategy's defaults"
        if isinstance(default, float):
            return f"{default:g}"
        return str(default)


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _inner(annotation: Any) -> type:
    """The dataclass of a group field (``DPConfig | None`` is ``DPConfig``)."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    return args[0] if args else annotation


@functools.cache
def settings_of(cls: type, prefix: str = "", attrs: tuple[str, ...] = (),
                group: str | None = None, switch: str | None = None) -> tuple[Setting, ...]:
    """Every setting of the dataclass ``cls`` and of the groups it holds, in declaration order."""
    hints = _hints(cls)
    by_name = {p.name: p for p in params.params_of(cls)}
    out: list[Setting] = []
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if meta.get("group") == "flat":
            out += settings_of(_inner(hints[f.name]), prefix, (*attrs, f.name), group)
        elif meta.get("group") == "named":
            name = prefix + f.name
            if meta.get("flag"):  # a switch of its own: --secure-aggregation
                out.append(Setting(name, (*attrs, f.name), Param(name, bool, False, False, meta["help"]),
                                   meta["flag"], group=name, switch=True))
            out += settings_of(_inner(hints[f.name]), f"{name}.", (*attrs, f.name), name,
                               meta.get("switch"))
        elif "help" in meta and f.init:
            path = prefix + f.name
            derived = "--" + path.replace(".", "-").replace("_", "-")
            out.append(Setting(path, (*attrs, f.name), by_name[f.name], meta.get("flag", derived),
                               meta.get("aliases", ()), meta.get("choices"), meta.get("metavar"),
                               meta.get("kind"), group, f.name == switch))
    return tuple(out)


def _groups(cls: type) -> dict[str, tuple[type, str | None]]:
    """The named groups of ``cls`` (through its flat ones): name -> (dataclass, switch setting)."""
    hints, out = _hints(cls), {}
    for f in dataclasses.fields(cls):
        if f.metadata.get("group") == "flat":
            out.update(_groups(_inner(hints[f.name])))
        elif f.metadata.get("group") == "named":
            out[f.name] = (_inner(hints[f.name]), f.metadata.get("switch"))
    return out


def flag(path: str, cls: type | None = None) -> str:
    """The command-line spelling of a setting (``dp.clipping_norm``: ``--dp-clipping-norm``)."""
    from fedhub.serve import ServerConfig

    for setting in settings_of(cls or ServerConfig):
        if setting.path == path:
            return setting.flag
    return "--" + path.replace(".", "-").replace("_", "-")


# --------------------------------------------------------------------------- the command line


def add_options(parser: argparse.ArgumentParser, settings: Iterable[Setting],
                defaults: Mapping[str, Any] | None = None) -> None:
    """A flag for each setting; nothing given stays out of the namespace (``SUPPRESS``), so a
    file's value, else the declared default, applies (:func:`given`). ``defaults`` are a
    command's own defaults, only for the help text."""
    defaults = defaults or {}
    sections: dict[str | None, Any] = {None: parser}
    for s in settings:
        if s.group not in sections:
            sections[s.group] = parser.add_argument_group(f"{s.group} ({s.group}.NAME in a file)")
        target = sections[s.group]
        default = defaults.get(s.path, s.param.default)
        kw: dict[str, Any] = {"dest": s.path, "default": argparse.SUPPRESS}
        if s.kind is bool:
            kw["action"] = argparse.BooleanOptionalAction
        elif s.kind is dict:
            kw.update(action="append", metavar=s.metavar)
        else:
            kw.update(type=s.kind, choices=s.choices, metavar=s.metavar or (None if s.choices else
                                                                            s.path.split(".")[-1].upper()))
        help_text = s.param.help.replace("%", "%%")
        if "(default" not in help_text:
            help_text += f" (default {s.default_text(default)})"
        target.add_argument(s.flag, help=help_text, **kw)
        for alias in s.aliases:  # an older spelling: still read, no longer shown
            target.add_argument(alias, help=argparse.SUPPRESS, **kw)


def given(namespace: argparse.Namespace, settings: Iterable[Setting],
          base: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """The settings given on the command line, as a mapping shaped like a file's (:func:`read_file`),
    over ``base`` (the file's): a group's settings merge key by key. A group's setting given
    without the group switched on, here or by the file, is refused: ``--dp-delta`` needs ``--dp``."""
    values = vars(namespace)
    out: dict[str, Any] = dict(base or {})
    switched: set[str] = set()
    for s in settings:
        if s.path not in values:
            continue
        value = values[s.path]
        if s.group == s.path:  # --secure-aggregation / --no-secure-aggregation
            out[s.path] = (out.get(s.path) or {}) if value else None
            switched.add(s.path)
        elif s.group is not None:
            name = s.path.split(".", 1)[1]
            if s.switch:
                switched.add(s.group)
            out[s.group] = {**(out.get(s.group) or {}), name: value}
        elif s.path == "strategy_params" and isinstance(out.get(s.path), Mapping):
            out[s.path] = (out[s.path], value)  # the file's, then these over them (build)
        else:
            out[s.path] = value
    for s in settings:
        if s.path in values and s.group and s.group != s.path and s.group not in switched \
                and (base or {}).get(s.group) is None:
            switch = next(t.path for t in settings if t.group == s.group and t.switch)
            raise SettingError("{0} needs {1}", s.path, switch)
    return out


# --------------------------------------------------------------------------- files


def read_file(path: Path, cls: type, allowed: Iterable[str] | None = None) -> dict[str, Any]:
    """A TOML file's settings, checked as far as they go alone (unknown keys, types, ranges):
    :class:`SettingError` naming the key. Keys are the settings' names; a named group's
    settings sit in a ``[GROUP]`` table (``[dp]``, ``[secagg]``), the strategy's parameters in
    ``[strategy_params]``."""
    try:
        with open(path, "rb") as f:
            values = tomllib.load(f)
    except OSError as exc:
        raise SettingError(f"cannot read it: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingError(f"not TOML: {exc}") from None
    params.check_numbers(build(cls, values, allowed=allowed))
    return values


def dump(config: Any, settings: Iterable[Setting]) -> str:
    """The resolved settings as TOML that :func:`read_file` reads back to the same settings.

    A small writer of its own: the settings are flat scalars and one level of tables, which
    ``json.dumps`` spells as TOML does, and ``tomli-w`` is not a dependency (the standard
    library reads TOML but does not write it). ``None`` (an optional setting left out) is left
    out, as TOML has no null; a group that is off has no table."""
    top: list[str] = []
    tables: dict[str, list[str]] = {}
    for s in settings:
        off, value = _value(config, s)
        if off or value is None:
            continue
        if s.group == s.path:
            tables.setdefault(s.path, [])
            continue
        if isinstance(value, dict):
            tables[s.path] = [f"{k} = {_toml(v)}" for k, v in value.items() if v is not None]
            continue
        line = f"{s.path.split('.')[-1]} = {_toml(value)}"
        (tables.setdefault(s.group, []) if s.group else top).append(line)
    text = "\n".join(top) + "\n"
    for name, lines in tables.items():
        text += f"\n[{name}]\n" + "".join(line + "\n" for line in lines)
    return text


def _toml(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    return json.dumps(str(value))


# --------------------------------------------------------------------------- building


def build(cls: type, values: Mapping[str, Any], prefix: str = "", allowed: Iterable[str] | None = None,
          **extra: Any) -> Any:
    """``cls`` from a mapping of settings (a file's, the command line's, Python's keywords), each
    checked against its declared type: :class:`SettingError` naming an unknown key (with the
    close matches) or a value of the wrong type. ``allowed``: the top-level keys taken (default:
    every setting of ``cls``); ``extra``: fields that are not settings (``keras_model``). Ranges and
    combinations are the config's ``validate`` to refuse."""
    groups = _groups(cls)
    known = set(allowed) if allowed is not None else {s.path.split(".")[0] for s in settings_of(cls)}
    for key in values:
        if key not in known:
            close = (difflib.get_close_matches(key, sorted(known), n=3)
                     or [name for name in sorted(known) if name.startswith(key)][:3])
            hint = f" (did you mean {' or '.join(close)}?)" if close else ""
            raise SettingError(f"unknown setting {{0}}{hint}", prefix + key)
    return _build(cls, values, prefix, groups, extra)


def _build(cls: type, values: Mapping[str, Any], prefix: str,
           groups: Mapping[str, tuple[type, str | None]], extra: Mapping[str, Any]) -> Any:
    hints = _hints(cls)
    by_name = {p.name: p for p in params.params_of(cls)}
    kwargs: dict[str, Any] = dict(extra)
    strategy = values.get("strategy", getattr(cls, "strategy", None))
    for f in dataclasses.fields(cls):
        meta = f.metadata
        if meta.get("group") == "flat":
            kwargs[f.name] = _build(_inner(hints[f.name]), values, prefix, groups, {})
        elif meta.get("group") == "named":
            kwargs[f.name] = _group(_inner(hints[f.name]), values.get(f.name), prefix + f.name)
        elif "help" in meta and f.name in values:
            value, path = values[f.name], prefix + f.name
            if f.name == "strategy_params":
                kwargs[f.name] = _strategy_params(strategy or "fedavg", value)
                continue
            if isinstance(value, str) and meta.get("kind") is Path:
                value = Path(value)
            elif isinstance(value, os.PathLike) and by_name[f.name].kind is str:
                value = os.fspath(value)  # a folder given as a Path where a string is kept
            try:
                kwargs[f.name] = by_name[f.name].convert(value)
            except ValueError as exc:
                raise SettingError(f"{{0}} {exc}", path) from None
    return cls(**kwargs)


def _group(cls: type, value: Any, path: str) -> Any:
    """A named group from Python (an instance, True, False/None, a mapping) or a table."""
    if value is None or value is False:
        return None
    if value is True:
        return cls()
    if isinstance(value, cls):
        return value
    if isinstance(value, Mapping):
        return build(cls, value, f"{path}.")
    raise SettingError(f"{{0}} must be a {cls.__name__}, a table of its settings, true or false, "
                       f"got {value!r}", path)


def _strategy_params(strategy: str, value: Any) -> dict[str, Any]:
    """The strategy's parameters: a mapping (a file, Python), ``KEY=VALUE`` strings (the command
    line), or both (a file's, then the command line's over them)."""
    from fedhub.engine.strategies import parse_strategy_args

    base: Mapping[str, Any] = {}
    if isinstance(value, tuple):
        base, value = value
    if isinstance(value, list | tuple):
        try:
            return {**base, **parse_strategy_args(strategy, value)}
        except params.ParamError as exc:  # its own message: the strategy, the key, the allowed keys
            raise SettingError(str(exc)) from None
    if isinstance(value, Mapping):
        return {**base, **value}
    raise SettingError(f"{{0}} must be a table of the strategy's parameters, got {value!r}",
                       "strategy_params")


# --------------------------------------------------------------------------- a command's settings


def add_file_options(parser: argparse.ArgumentParser) -> None:
    """``--config FILE`` and ``--print-config``, the same in every command that runs a federation."""
    parser.add_argument("--config", type=Path, metavar="FILE",
                        help="read settings from this TOML file (keys: the settings' names, a group's in "
                             "its [table]); flags given as well override it")
    parser.add_argument("--print-config", action="store_true",
                        help="print the resolved settings as TOML (a file for --config) and exit")


def resolve(parser: argparse.ArgumentParser, namespace: argparse.Namespace, every: Iterable[Setting],
            cls: type, defaults: Mapping[str, Any] | None = None,
            render: Callable[[str], str] = flag) -> Any:
    """``cls`` from the declared defaults, a command's own ``defaults``, ``--config``'s file and the
    flags given, in that order. A refusal is the parser's one ``error:`` line: a file's mistakes
    name its key (``run.toml: unknown setting buffer (did you mean buffer_size?)``), the rest the
    flag (``render``)."""
    every = tuple(every)
    allowed = {s.path.split(".")[0] for s in every}
    base = dict(defaults or {})
    if namespace.config is not None:
        try:
            base.update(read_file(namespace.config, cls, allowed))
        except SettingError as exc:
            parser.error(f"{namespace.config}: {exc.render()}")
    try:
        return build(cls, given(namespace, every, base), allowed=allowed)
    except SettingError as exc:
        parser.error(exc.render(render))


def cli_message(exc: Exception, render: Callable[[str], str] = flag) -> str:
    """A refusal for the command line: a setting named by its flag."""
    return exc.render(render) if isinstance(exc, SettingError) else str(exc)


def print_config(namespace: argparse.Namespace, config: Any, every: Iterable[Setting]) -> None:
    """With ``--print-config``: the resolved settings as TOML on stdout, and exit 0."""
    if namespace.print_config:
        sys.stdout.write(dump(config, every))
        sys.exit(0)


# --------------------------------------------------------------------------- Python


# Older keyword names of fedhub.Server and fedhub.simulate, still accepted (with a warning).
OLD_KEYWORDS = {"privacy": "dp", "secure_aggregation": "secagg"}


def keywords(values: Mapping[str, Any]) -> dict[str, Any]:
    """Python's keyword arguments with an older name (:data:`OLD_KEYWORDS`) under its one name."""
    out = dict(values)
    for old, new in OLD_KEYWORDS.items():
        if old in out:
            warnings.warn(f"{old}= is now {new}=", DeprecationWarning, stacklevel=3)
            if new in out:
                raise SettingError(f"give {{0}} once (not also {old})", new)
            out[new] = out.pop(old)
    return out


def values_of(config: Any) -> dict[str, Any]:
    """A config's settings as the keyword arguments that build it again (:func:`build`): the
    flat ones by name, a named group as its object (None: off)."""
    out: dict[str, Any] = {}
    for s in settings_of(type(config)):
        top = s.path.split(".")[0]
        attrs = s.attrs[:len(s.attrs) - (1 if s.group and s.group != s.path else 0)]
        value = config
        for attr in attrs:
            value = getattr(value, attr)
        out[top] = value
    return out


def _value(config: Any, s: Setting) -> tuple[bool, Any]:
    """``(off, value)``: the setting's value in ``config``, or off when a group on its path is off."""
    value = config
    for attr in s.attrs:
        if value is None:
            return True, None
        value = getattr(value, attr)
    return False, value


def flat_values(config: Any, leave_out: Iterable[str] = ()) -> dict[str, Any]:
    """A config's settings as one flat mapping for experiment trackers (MLflow params,
    TensorBoard HParams): ``"dp.noise_multiplier": 1.0``, ``"strategy_params.num_malicious": 1``,
    ``"dp": False`` for a group that is off. Folders and files are left out (they say where a run
    ran, not what it was, and may name a user's home), as are settings that are None and the
    top-level names in ``leave_out`` (a tracking URI may carry credentials)."""
    skip = set(leave_out)
    out: dict[str, Any] = {}
    for s in settings_of(type(config)):
        if s.path.split(".")[0] in skip or s.kind is Path or s.metavar in ("DIR", "FILE"):
            continue
        off, value = _value(config, s)
        if off:
            out[s.group or s.path] = False
            continue
        if s.group == s.path:  # a group's own switch (secagg): its settings, or None when off
            out[s.path] = value is not None
        elif s.switch:  # dp.mode switches dp on
            out[s.group] = True
            out[s.path] = value
        elif isinstance(value, Mapping):
            out.update({f"{s.path}.{k}": v for k, v in value.items() if v is not None})
        elif value is not None:
            out[s.path] = value
    return out


# --------------------------------------------------------------------------- the README


def markdown_table(settings: Iterable[Setting]) -> str:
    """The options table of the README: one row per setting, from its declaration (a default the
    help explains, "(default: ...)", goes to the default column)."""
    rows = ["| flag | key in `--config` | default | meaning |", "|---|---|---|---|"]
    for s in settings:
        meaning = s.param.help
        default = "off" if s.switch else s.default_text(s.param.default)
        explained = re.search(r"\s*\(default: ([^)]*)\)$", meaning)
        if explained:
            meaning, default = meaning[:explained.start()], explained.group(1)
        if s.choices and len(s.choices) < 8 and not s.switch:
            meaning += f"; one of {', '.join(f'`{c}`' for c in s.choices)}"
        key = f"`[{s.group}]`" if s.group == s.path else f"`{s.path}`"
        rows.append(f"| `{s.flag}` | {key} | {default} | {meaning.replace('|', '/')} |")
    return "\n".join(rows) + "\n"
