"""Runs: which run a server drives when it starts, and what a run's settings are.

A state directory keeps every run it has held (:meth:`.storage.Storage.create_run`): its id, its
name, its complete settings, its rounds, history and files. Starting never destroys a run; the
one decision (:func:`choose`, used by ``server.py``, ``fedhub.Server`` and ``fedhub.simulate``
alike, through the :class:`~.rounds.Coordinator`) is whether the current run goes on or a new
one starts:

* the current run goes on only if it is unfinished and its settings are these (crash recovery);
* otherwise (it is finished, or the settings differ) a new run starts, and the line that says
  so names why;
* ``resume``: that run goes on (finished or stopped), for more rounds; refused, naming each
  differing setting, when the settings differ (a run that used differential privacy never goes
  on without it);
* ``new_run``: a new run with that name.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import re
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

from .config import FederationConfig
from .errors import InvalidInput, RunMismatch
from .plural import plural
from .storage import Storage

# Settings that say how this server behaves, not what a run computes: never a run's.
NOT_OF_THE_RUN = ("start", "auto_activate", "strategy_memory_mb")
# A run's settings that may change when it goes on: how many rounds, and how they are formed
# from the devices there are (not what a device trains, nor how updates are aggregated).
MAY_CHANGE = ("rounds", "min_devices", "quorum", "fraction", "round_timeout", "device_timeout")
MAX_NAME = 100
# The settings of a new run that POST /api/runs may change: the training's, not the model's.
RUN_SETTINGS = ("rounds", "min_devices", "quorum", "round_timeout", "device_timeout", "fraction",
                "strategy", "strategy_params", "seed", "compress_downlink", "buffer_size",
                "max_staleness", "staleness_exponent", "epochs", "batch_size", "learning_rate",
                "compression", "dp", "secagg", "fed_eval_every", "fed_eval_fraction",
                "personalization", "personal_layers", "ditto_lambda")
# The settings of RUN_SETTINGS that travel with each task (TrainingConfig's).
TRAINING_SETTINGS = ("epochs", "batch_size", "learning_rate", "compression", "personalization",
                     "personal_layers", "ditto_lambda")


def run_settings(config: FederationConfig, identity: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """A run's complete settings, as plain JSON values keyed like a ``--config`` file: the
    federation's (strategy and its parameters, training, DP, secure aggregation, compression,
    mode, seed), the network and framework, and ``identity`` (the data set, the split)."""
    values = asdict(config)
    training = values.pop("training")
    for key in NOT_OF_THE_RUN:
        values.pop(key, None)
    values.update(training)
    values.update(identity or {})
    return json.loads(json.dumps(values, default=str))


def differences(recorded: Mapping[str, Any], wanted: Mapping[str, Any],
                ignore: tuple[str, ...] = MAY_CHANGE) -> list[tuple[str, Any, Any]]:
    """``(setting, recorded, wanted)`` for each setting that differs (a group's, such as ``dp``,
    by its own settings: ``dp.noise_multiplier``), in a stable order."""
    out: list[tuple[str, Any, Any]] = []
    for key in sorted(set(recorded) | set(wanted)):
        if key in ignore:
            continue
        old, new = recorded.get(key), wanted.get(key)
        if old == new:
            continue
        if isinstance(old, Mapping) and isinstance(new, Mapping) and key != "strategy_params":
            out += [(f"{key}.{k}", a, b) for k, a, b in differences(old, new, ())]
        else:
            out.append((key, old, new))
    return out


def describe(diffs: list[tuple[str, Any, Any]]) -> str:
    """``strategy fedavg -> krum, dp central-fixed -> off``: a group by its mode (or ``on``), the
    strategy's parameters as JSON."""
    def text(key: str, value: Any) -> str:
        if value is None:
            return "off"
        if isinstance(value, Mapping) and key != "strategy_params":
            return str(value.get("mode") or "on")
        if isinstance(value, Mapping):
            return json.dumps(dict(value), sort_keys=True)
        return str(value)
    return ", ".join(f"{key} {text(key, old)} -> {text(key, new)}" for key, old, new in diffs)


def label(settings: Mapping[str, Any]) -> str:
    """What a run's default name starts with: its strategy, and ``dp`` or ``async`` if so."""
    parts = [str(settings.get("strategy") or "run")]
    if settings.get("dp"):
        parts.append("dp")
    if settings.get("mode") == "async":
        parts.append("async")
    return "-".join(parts)


def check_name(name: object, field: str = "name") -> str:
    """A run's name as given (``--new-run``, ``POST /api/runs``): a short line of text that is
    not a number (a number is a run's id)."""
    if not isinstance(name, str) or not name.strip():
        raise InvalidInput(f"{field} must be a non-empty string", field)
    if len(name) > MAX_NAME or not name.isprintable() or "/" in name or "\\" in name:
        raise InvalidInput(f"{field} must be at most {MAX_NAME} printable characters, no / or \\ "
                           "(it names the run in a URL)", field)
    if re.fullmatch(r"[0-9]+", name):
        raise InvalidInput(f"{field} cannot be a number (a number names a run by its id)", field)
    return name.strip()


def title(run: Mapping[str, Any]) -> str:
    return f"run {run['id']} {run['name']!r}"


@dataclass
class Choice:
    """What :func:`choose` decided: the run to drive, whether it is new, the one line that says
    so, and the rounds it runs for (a run that goes on keeps its own unless resumed)."""

    run_id: int
    new: bool
    message: str
    rounds: int


def choose(storage: Storage, config: FederationConfig, identity: Mapping[str, Any] | None = None, *,
           resume: str | None = None, new_run: str | None = None, now: float) -> Choice:
    """The run a starting server drives (see the module's docstring); the storage is scoped to
    it on return. :class:`~.errors.RunMismatch` (a ValueError: one ``error:`` line on the command
    line) for a ``resume`` that cannot go on or a ``new_run`` name in use."""
    wanted = run_settings(config, identity)
    current = storage.get_run(storage.run_id) if storage.run_id is not None else None
    if new_run is not None:
        name = _free_name(storage, new_run)
        return _start(storage, name, wanted, config, now, lambda new: f"starting {title(new)}")
    if resume is not None:
        return _resume(storage, resume, wanted, config, now)
    if current is None:
        return _start(storage, None, wanted, config, now, lambda new: f"starting {title(new)}")
    done = _completed(storage)
    if current["settings"] is None:  # a run from before runs were kept: it takes these settings
        if current["status"] != "finished":
            storage.set_run_settings(wanted)
            return Choice(current["id"], False, f"continuing {title(current)} after round {done} "
                          "(its settings were not recorded: these are now)", config.rounds)
        current = {**current, "settings": wanted}
    rounds = int(current["settings"].get("rounds", config.rounds))
    hint = f"--resume {current['id']} continues it"
    if current["status"] == "finished":
        return _start(storage, None, wanted, config, now,
                      lambda new: f"{title(current)} is finished: starting {title(new)} "
                                  f"({hint}, with a larger --rounds)")
    diffs = differences(current["settings"], wanted)
    if diffs:
        _stop(storage, current["id"], now)
        return _start(storage, None, wanted, config, now,
                      lambda new: f"settings differ from {title(current)} ({describe(diffs)}): starting "
                                  f"{title(new)} ({title(current)} is kept; {hint} with its own settings)")
    storage.set_run_settings({**current["settings"], **{k: wanted[k] for k in MAY_CHANGE if k != "rounds"}})
    message = f"continuing {title(current)} after round {done}" + (f" of {rounds}" if rounds else "")
    if rounds != config.rounds:
        message += f" (its own {plural(rounds, 'round')}; --resume {current['id']} --rounds N changes them)"
    return Choice(current["id"], False, message, rounds)


def _completed(storage: Storage) -> int:
    return storage.last_round(storage.run_id) if storage.run_id is not None else 0


def _free_name(storage: Storage, name: str) -> str:
    try:
        name = check_name(name, "new_run")
    except InvalidInput as exc:
        raise RunMismatch(exc.message, "new_run") from None
    taken = storage.find_run(name)
    if taken is not None and taken["name"] == name:
        raise RunMismatch(f"new_run: a run named {name!r} exists already (run {taken['id']}); choose "
                          "another name, or resume it", "new_run")
    return name


def _stop(storage: Storage, run_id: int, now: float) -> None:
    """A run left unfinished for another: ``stopped`` (resumable), never deleted."""
    storage.set_run_status("stopped", now=now, run_id=run_id)


def _start(storage: Storage, name: str | None, wanted: dict[str, Any], config: FederationConfig,
           now: float, message: Callable[[dict[str, Any]], str]) -> Choice:
    if storage.run_id is not None:
        current = storage.get_run(storage.run_id)
        if current is not None and current["status"] not in ("finished", "stopped"):
            _stop(storage, current["id"], now)
    run_id = storage.create_run(name, wanted, label=label(wanted), now=now)
    storage.use_run(run_id)
    run = storage.get_run(run_id)
    return Choice(run_id, True, message(run), config.rounds)


def _resume(storage: Storage, key: str, wanted: dict[str, Any], config: FederationConfig,
            now: float) -> Choice:
    run = storage.find_run(key)
    if run is None:
        raise RunMismatch(f"resume: no run {key!r} in {storage.state_dir} (fedhub runs list shows them)",
                          "resume")
    recorded = run["settings"] if run["settings"] is not None else wanted
    diffs = differences(recorded, wanted)
    if diffs:
        what = "; ".join(f"{k}: the run's {_show(a)}, here {_show(b)}" for k, a, b in diffs)
        dp = " (a run that used differential privacy goes on only with its DP settings)" if any(
            k == "dp" or k.startswith("dp.") for k, _, _ in diffs) else ""
        raise RunMismatch(f"cannot resume {title(run)}: its settings differ: {what}{dp}. Give the run's "
                          f"own settings (fedhub runs show {run['id']}), or start a new run", "resume")
    done = storage.last_round(run["id"])
    if config.rounds and config.rounds <= done:
        raise RunMismatch(f"cannot resume {title(run)}: it has {plural(done, 'round')} done and rounds is "
                          f"{config.rounds}; give more rounds (--rounds {done + 1} or more, 0: until "
                          "paused)", "rounds")
    current = storage.get_run(storage.run_id) if storage.run_id is not None else None
    if current is not None and current["id"] != run["id"] and current["status"] not in ("finished",
                                                                                         "stopped"):
        _stop(storage, current["id"], now)
    storage.use_run(run["id"])
    storage.set_run_settings({**recorded, **{k: wanted[k] for k in MAY_CHANGE}})
    storage.set_run_status("idle")
    total = f" of {config.rounds}" if config.rounds else ""
    return Choice(run["id"], False, f"resuming {title(run)} after round {done}{total}", config.rounds)


def _show(value: Any) -> str:
    if value is None:
        return "off"
    if isinstance(value, Mapping):
        return json.dumps(dict(value), sort_keys=True)
    return str(value)


def configure(base: FederationConfig, settings: object) -> FederationConfig:
    """A new run's settings (``POST /api/runs``): ``base`` (the current run's) with ``settings``
    (a mapping of :data:`RUN_SETTINGS`, JSON values) over them, checked as the command line's are:
    InvalidInput naming the setting at fault (``settings.rounds``). ``base`` is not changed."""
    from .params import SettingError

    if settings is None:
        settings = {}
    if not isinstance(settings, Mapping):
        raise InvalidInput("settings must be an object of run settings", "settings")
    for key in settings:
        if key not in RUN_SETTINGS:
            raise InvalidInput(f"settings.{key} is not a setting a new run takes (one of "
                               f"{', '.join(RUN_SETTINGS)})", f"settings.{key}")
    training = dataclasses.replace(base.training)
    values = {f.name: copy.deepcopy(getattr(base, f.name)) for f in dataclasses.fields(base)}
    values["training"] = training
    try:
        for key, value in settings.items():
            config = _typed(key, value, base)
            if key in TRAINING_SETTINGS:
                setattr(training, key, config)
            else:
                values[key] = config
        if "strategy" in settings and "strategy_params" not in settings:
            values["strategy_params"] = {}  # another strategy: its own defaults
        if "strategy" in settings or "strategy_params" in settings:
            from .params import ParamError
            from .strategies import make_strategy

            try:
                make_strategy(values["strategy"], **values["strategy_params"])
            except ParamError as exc:
                field = "strategy_params" if "strategy_params" in settings else "strategy"
                raise InvalidInput(f"settings.{field}: {exc}", f"settings.{field}") from None
        config = FederationConfig(**values)
        config.validate()
    except SettingError as exc:
        field = exc.setting
        raise InvalidInput(exc.render(lambda path: f"settings.{path}"),
                           f"settings.{field}" if field else "settings") from None
    except (TypeError, ValueError) as exc:
        raise InvalidInput(f"settings: {exc}", "settings") from None
    return config


def _typed(key: str, value: Any, base: FederationConfig) -> Any:
    """A new run's setting from JSON, of its declared type (:class:`params.SettingError` naming it)."""
    from .params import SettingError, params_of
    from .privacy import DPConfig
    from .secagg import SecAggConfig

    if key in ("dp", "secagg"):
        cls = DPConfig if key == "dp" else SecAggConfig
        if value is None or value is False:
            return None
        if value is True:
            return cls()
        if not isinstance(value, Mapping):
            raise SettingError(f"{{0}} must be an object of its settings, true or false, got {value!r}", key)
        from .params import ParamError, build

        try:
            return build(cls, value, key)
        except ParamError as exc:
            raise InvalidInput(f"settings.{exc}", f"settings.{key}") from None
    if key == "strategy_params":
        if not isinstance(value, Mapping):
            raise SettingError(f"{{0}} must be an object of the strategy's parameters, got {value!r}", key)
        return dict(value)
    owner = base.training if key in TRAINING_SETTINGS else base
    param = {p.name: p for p in params_of(type(owner))}[key]
    try:
        return param.convert(value)
    except ValueError as exc:
        raise SettingError(f"{{0}} {exc}", key) from None
