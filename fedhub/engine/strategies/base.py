"""The strategy interface: configure a round, aggregate its updates, keep optimizer state.

Flower's stages in FedHub's form. A :class:`Strategy` holds only its settings (the
dataclass fields, which are its constructor arguments) and, for the server optimizers,
a small state (momentum, moments, a step counter). Each round the coordinator asks it
which devices to select (:meth:`Strategy.configure`), opens a :class:`RoundAggregator`
with :meth:`Strategy.begin`, feeds it each update as it arrives and finally calls
:meth:`RoundAggregator.result`, which returns the new global weights, what happened to
each update, and the strategy state after the round. That state is adopted with
:meth:`Strategy.load_state` once the round is durable: the same call restores it after
a restart, so a round that fails to save leaves the strategy exactly as it was.

No HTTP, no TensorFlow, no storage: NumPy arrays in, NumPy arrays out.
"""

from __future__ import annotations

import math
import random
import threading
from abc import ABC, abstractmethod
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from .. import federated_eval, params
from ..errors import InvalidInput

Weights = dict[str, np.ndarray]

# Bytes of buffered updates a robust strategy keeps in RAM before it spills them to disk.
DEFAULT_MEMORY_BUDGET = 256 * 1024 * 1024


class AggregationError(Exception):
    """This round cannot produce a global model; the coordinator fails it and runs it again."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class NotEnoughUpdates(AggregationError):
    """Fewer usable updates than the strategy's settings need (for example Krum with n <= 2f+2)."""

    def __init__(self, strategy: str, needed: int, got: int, detail: str = "") -> None:
        super().__init__(f"{strategy} needs at least {needed} usable updates, got {got}"
                         + (f" ({detail})" if detail else ""))
        self.needed = needed
        self.got = got


class InvalidUpdate(InvalidInput):
    """An update a plain strategy cannot fold in (NaN or infinity); it is refused, not counted."""

    code = "invalid_update"


@dataclass(frozen=True)
class RoundPlan:
    """Who trains this round, and what each selected device adds to its task config."""

    devices: tuple[str, ...]
    config: Mapping[str, Mapping[str, Any]]


@dataclass(frozen=True)
class RoundResult:
    """The outcome of one round.

    ``metrics`` is JSON-ready: ``strategy``, ``params``, ``num_updates``, ``num_used``,
    ``num_examples``, ``fit_metrics`` (device-reported metrics averaged over the used
    updates, weighted by examples) and ``updates``: for each device ``num_examples``,
    ``status`` (``used`` or ``rejected``), and where it applies ``reason``, ``score``
    (Krum), ``trimmed_share`` (share of coordinates cut by a coordinate-wise rule) and
    ``distance`` (L2 distance of the update from the new global model).
    ``state`` is the strategy's state after this round; pass it to
    :meth:`Strategy.load_state` once the round is saved.
    """

    weights: Weights
    metrics: dict[str, Any]
    state: Weights


def first_nonfinite(weights: Mapping[str, np.ndarray]) -> str | None:
    """The name of the first tensor holding NaN or infinity, if any."""
    for name, a in weights.items():
        if a.dtype.kind in "fc" and not np.isfinite(a).all():
            return name
    return None


def cast_like(values: Mapping[str, np.ndarray], template: Mapping[str, np.ndarray]) -> Weights:
    """Each float64 result back in the dtype the model uses for that tensor."""
    with np.errstate(over="ignore"):  # an overflow shows as infinity, which the caller refuses
        return {name: np.asarray(values[name]).astype(t.dtype, copy=False) for name, t in template.items()}


class RoundAggregator(ABC):
    """One round's aggregation. ``add`` is thread-safe; ``result`` does the heavy work, so the
    coordinator calls it outside its own lock.

    The base class checks each update (device named once, positive example count, the
    model's tensors and shapes, finite values) and keeps the per-device record; a subclass
    only folds an accepted update in (:meth:`_fold`) and combines them (:meth:`_combine`).
    """

    def __init__(self, strategy: Strategy, global_weights: Mapping[str, np.ndarray],
                 state: Mapping[str, np.ndarray]) -> None:
        self.strategy = strategy
        self.template = {n: np.asarray(a) for n, a in global_weights.items()}
        self._state = dict(state)
        self._lock = threading.Lock()
        self._closed = False
        self._updates: dict[str, dict[str, Any]] = {}
        self._reported: dict[str, dict[str, float]] = {}  # each device's own metrics
        self._total = 0

    @property
    def count(self) -> int:
        """Updates received, used or rejected."""
        return len(self._updates)

    @property
    def total_examples(self) -> int:
        """Examples behind the updates received."""
        return self._total

    def add(self, device: str, weights: Mapping[str, np.ndarray], num_examples: int,
            metrics: Mapping[str, float] | None = None) -> None:
        """Fold in ``device``'s update; raises :class:`InvalidUpdate` (state unchanged) when a
        plain strategy cannot use it. A robust strategy records a rejection instead."""
        if isinstance(num_examples, bool) or not isinstance(num_examples, int | np.integer) \
                or num_examples <= 0:
            raise ValueError("num_examples must be a positive integer")
        self._check_tensors(weights)
        weights = {name: np.asarray(weights[name]) for name in self.template}
        bad = first_nonfinite(weights)
        with self._lock:
            if self._closed:
                raise RuntimeError("this round's aggregator is closed")
            if device in self._updates:
                raise ValueError(f"device {device!r} already sent an update this round")
            entry: dict[str, Any] = {"num_examples": int(num_examples), "status": "used"}
            if bad is not None:
                if not self.strategy.rejects_nonfinite:
                    raise InvalidUpdate(f"tensor {bad!r} holds NaN or infinity", bad)
                entry.update(status="rejected", reason=f"tensor {bad!r} holds NaN or infinity")
            else:
                # The raw metrics: a strategy that weighs an update by what its device reports
                # (q-FFL's start_loss) checks them itself, and refuses the update before it counts.
                self._fold(device, weights, int(num_examples), metrics=metrics or {})
            self._updates[device] = entry
            self._reported[device] = {
                k: float(v) for k, v in (metrics or {}).items()
                if isinstance(v, int | float) and not isinstance(v, bool) and math.isfinite(v)}
            self._total += int(num_examples)

    # What a relay's partial sum holds for this round: None, ``sum(n_i * w_i)``; a number, the
    # devices' changes from the global model clipped to that L2 norm, summed, each counting once.
    partial_clipping_norm: float | None = None

    def add_partial(self, shares: Sequence[Any], sums: Mapping[str, np.ndarray], relay: str,
                    unclipped: int = 0) -> None:
        """A relay's partial sum of ``shares``' updates (:mod:`..partials`; ``unclipped``: how
        many of them were within the clipping norm): folded in whole (:meth:`_fold_partial`),
        and each device recorded with its own count and metrics, as if it had sent its own."""
        self._check_tensors(sums)
        bad = first_nonfinite(sums)
        if bad is not None:
            raise InvalidUpdate(f"tensor {bad!r} holds NaN or infinity", bad)
        total = sum(s.num_examples for s in shares)
        with self._lock:
            if self._closed:
                raise RuntimeError("this round's aggregator is closed")
            twice = next((s.name for s in shares if s.name in self._updates), None)
            if twice is not None:
                raise ValueError(f"device {twice!r} already sent an update this round")
            self._fold_partial(shares, sums, unclipped)
            for s in shares:
                self._updates[s.name] = {"num_examples": s.num_examples, "status": "used", "relay": relay}
                self._reported[s.name] = dict(s.metrics)
            self._total += total

    def _fold_partial(self, shares: Sequence[Any], sums: Mapping[str, np.ndarray], unclipped: int) -> None:
        """Fold a partial sum in, or raise InvalidUpdate with nothing changed (lock held); only
        strategies that take partial sums define it."""
        raise InvalidUpdate(f"strategy {self.strategy.name} takes no partial sums", "round")

    def _record_secure(self, devices: Sequence[str], weight: int) -> None:
        """Record ``devices`` as used with their summed ``weight``, for a mean summed under secure
        aggregation (no device's own update or example count is known). Called with the lock held."""
        for device in devices:
            self._updates[device] = {"num_examples": None, "status": "used"}
            self._reported[device] = {}
        self._total += int(weight)

    def _check_tensors(self, weights: Mapping[str, np.ndarray]) -> None:
        if set(weights) != set(self.template):
            missing = sorted(set(self.template) - set(weights))
            extra = sorted(set(weights) - set(self.template))
            name = (missing or extra)[0]
            raise InvalidUpdate(f"tensor {name!r} is {'missing' if missing else 'unknown'}", name)
        for name, t in self.template.items():
            if np.shape(weights[name]) != t.shape:
                raise InvalidUpdate(f"tensor {name!r} has shape {list(np.shape(weights[name]))}, "
                                    f"expected {list(t.shape)}", name)

    def restate(self, state: Mapping[str, np.ndarray]) -> None:
        """Combine with the strategy's ``state`` as it is now: an asynchronous buffer takes
        updates while the version before it is still being made, whose state (a server
        optimizer's moments) comes after the buffer began."""
        with self._lock:
            self._state = dict(state)

    def used(self) -> list[str]:
        """Devices whose update was accepted for aggregation, in arrival order."""
        return [d for d, e in self._updates.items() if e["status"] == "used"]

    def result(self) -> RoundResult:
        """Combine the round's updates. Raises :class:`NotEnoughUpdates` when the settings need
        more usable updates, :class:`AggregationError` rather than return NaN or infinity."""
        with self._lock:
            if self._closed:
                raise RuntimeError("this round's aggregator is closed")
            self._closed = True
        try:
            usable = len(self.used())
            needed = self.strategy.min_updates()
            if usable < needed:
                rejected = self.count - usable
                raise NotEnoughUpdates(self.strategy.name, needed, usable,
                                       f"{rejected} rejected" if rejected else "")
            weights64, state, per_device = self._combine()
            bad = first_nonfinite(weights64)
            if bad is not None:
                raise AggregationError(f"{self.strategy.name} produced NaN or infinity in {bad!r}")
            weights = cast_like(weights64, self.template)
            bad = first_nonfinite(weights)
            if bad is not None:
                raise AggregationError(f"{self.strategy.name}: {bad!r} overflows its dtype "
                                       f"{self.template[bad].dtype}")
            return RoundResult(weights, self._metrics(per_device), state)
        finally:
            self.close()

    def _metrics(self, per_device: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
        updates = {device: {**entry, **per_device.get(device, {})}
                   for device, entry in self._updates.items()}
        used = [d for d, e in updates.items() if e["status"] == "used"]
        return {
            "strategy": self.strategy.name,
            "params": self.strategy.params(),
            "num_updates": self.count,
            "num_used": len(used),
            "num_examples": self._total,
            "fit_metrics": self._fit_metrics(used),
            "updates": updates,
        }

    def _fit_metrics(self, used: list[str]) -> dict[str, float]:
        """Device-reported metrics, example-weighted over the updates that were used."""
        sums: dict[str, list[float]] = {}
        for device in used:
            n = self._updates[device]["num_examples"]
            for key, value in self._reported[device].items():
                s = sums.setdefault(key, [0.0, 0.0])
                s[0] += value * n
                s[1] += n
        return {k: s / t for k, (s, t) in sums.items()}

    def close(self) -> None:
        """Release the round's buffers (an aborted round calls this instead of :meth:`result`)."""
        with self._lock:
            self._closed = True
        self._release()

    def _release(self) -> None:  # noqa: B027 - an optional hook
        """Free what the subclass holds (files, buffers)."""

    def __enter__(self) -> RoundAggregator:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @abstractmethod
    def _fold(self, device: str, weights: Mapping[str, np.ndarray], num_examples: int, *,
              metrics: Mapping[str, Any]) -> None:
        """Take in one accepted update (called under the aggregator's lock) with the metrics its
        device reported, as sent. Raise :class:`InvalidUpdate` before changing anything to refuse it."""

    @abstractmethod
    def _combine(self) -> tuple[Weights, Weights, dict[str, dict[str, Any]]]:
        """The new global weights in float64, the new strategy state, and per-device details."""


class Strategy(ABC):
    """How a federation picks devices and turns their updates into the next global model.

    Concrete strategies are dataclasses: their fields are their settings, with types,
    defaults and help texts, from which ``make_strategy``, ``parse_strategy_args`` and
    ``--list-strategies`` are derived. Range checks go in :meth:`validate`.
    """

    name: ClassVar[str]
    # Robust strategies record an update holding NaN or infinity as rejected; plain ones refuse it.
    rejects_nonfinite: ClassVar[bool] = False
    # Needs only the example-weighted sum of the updates, so a relay's partial sum will do
    # (fedhub.engine.partials); the others see each update, passed through a relay.
    sums_only: ClassVar[bool] = False
    # State entries: "<slot>/<tensor name>" arrays per tensor, and scalar entries by name.
    state_tensors: ClassVar[tuple[str, ...]] = ()
    state_scalars: ClassVar[tuple[str, ...]] = ()

    def __post_init__(self) -> None:
        self._state = {}
        self.validate()

    def validate(self) -> None:  # noqa: B027 - an optional hook
        """Raise ValueError naming the setting that is out of range."""

    def params(self) -> dict[str, Any]:
        """The settings this strategy was built with."""
        return params.values_of(self)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "params": self.params()}

    def task_config(self) -> dict[str, Any]:
        """What this strategy adds to every selected device's task config."""
        return {}

    def privacy(self) -> dict[str, Any] | None:
        """The privacy spent so far (epsilon at delta), for strategies that add DP noise."""
        return None

    def privacy_settings(self) -> dict[str, Any] | None:
        """The differential-privacy settings behind the guarantee (None: no DP). A run that
        used DP continues only with the same ones, or its epsilon would not hold."""
        return None

    def saved_by(self) -> dict[str, Any]:
        """What each round's saved state records of the strategy that made it (a restart
        checks it against the strategy it runs with)."""
        return {**self.describe(), "privacy": self.privacy_settings()}

    def min_updates(self) -> int:
        """The fewest usable updates a round needs with these settings."""
        return 1

    def check_min_devices(self, min_devices: int, setting: str = "min_devices") -> None:
        """Refuse, at start-up, a federation that could open a round too small to aggregate
        (``setting`` names what bounds it: an asynchronous version has ``buffer_size`` updates)."""
        needed = self.min_updates()
        if min_devices < needed:
            raise ValueError(f"strategy {self.name} with {_settings_text(self.params())} needs at "
                             f"least {needed} updates a round; {setting} is {min_devices}")

    def configure(self, available: Iterable[str], *, rng: random.Random, fraction: float = 1.0,
                  min_devices: int = 1) -> RoundPlan:
        """Select ``max(min_devices, ceil(fraction * n), min_updates())`` of the ``n`` available
        devices at random (at most ``n``), each with :meth:`task_config` added."""
        pool = sorted(available)
        k = min(len(pool), max(min_devices, math.ceil(fraction * len(pool)), self.min_updates()))
        chosen = tuple(sorted(rng.sample(pool, k)))
        extra = self.task_config()
        return RoundPlan(devices=chosen, config={d: dict(extra) for d in chosen})

    def configure_evaluate(self, devices: Sequence[str], round_number: int, *, every: int,
                           fraction: float, rng: random.Random) -> tuple[str, ...]:
        """Which of round ``round_number``'s ``devices`` evaluate the global model on their
        held-out data (Flower's ``configure_evaluate``): every ``every`` rounds, ``fraction`` of them."""
        return federated_eval.choose(devices, round_number, every=every, fraction=fraction, rng=rng)

    def aggregate_evaluate(self, reports: Mapping[str, Mapping[str, Any]], *, model_version: int,
                           personalization: str) -> dict[str, Any] | None:
        """The round's ``federated_evaluation`` from its devices' reports (Flower's
        ``aggregate_evaluate``): per device, and the distribution over them."""
        return federated_eval.summarize(reports, model_version=model_version,
                                        personalization=personalization)

    @abstractmethod
    def begin(self, global_weights: Mapping[str, np.ndarray], *, spill_dir: str | Path | None = None,
              memory_budget: int = DEFAULT_MEMORY_BUDGET) -> RoundAggregator:
        """Open a round that starts from ``global_weights``. Strategies that keep every update
        spill them to files in ``spill_dir`` beyond ``memory_budget`` bytes."""

    # state -------------------------------------------------------------------
    def state(self) -> Weights:
        """The optimizer state to save beside the round's checkpoint (empty when stateless)."""
        return {k: v.copy() for k, v in self._state.items()}

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        """Adopt a state from :meth:`state` or :attr:`RoundResult.state`; ValueError if it is
        not this strategy's (its shapes are checked against the model when a round begins)."""
        loaded = {}
        for key, value in state.items():
            slot, sep, tensor = key.partition("/")
            if not ((sep and tensor and slot in self.state_tensors)
                    or (not sep and key in self.state_scalars)):
                raise ValueError(f"state entry {key!r} does not belong to strategy {self.name}")
            array = np.array(value, dtype=np.float64)
            if not np.isfinite(array).all():
                raise ValueError(f"state entry {key!r} holds NaN or infinity")
            loaded[key] = array
        self._state = loaded

    def reset(self) -> None:
        """Forget the optimizer state (a reset federation starts afresh)."""
        self._state = {}

    def _state_for(self, template: Mapping[str, np.ndarray]) -> Weights:
        """The state checked against the model: every slot for every tensor, or none at all."""
        state = dict(self._state)
        for slot in self.state_tensors:
            for name, t in template.items():
                key = f"{slot}/{name}"
                if key not in state:
                    if any(k.startswith(slot + "/") for k in state):
                        raise ValueError(f"strategy state has no {key!r}: it is from another model")
                    continue
                if state[key].shape != t.shape:
                    raise ValueError(f"strategy state {key!r} has shape {list(state[key].shape)}, "
                                     f"the model's tensor has {list(t.shape)}")
        return state


def _settings_text(values: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in values.items()) or "its defaults"
