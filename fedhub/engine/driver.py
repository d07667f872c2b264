"""The one driver loop, the one publisher of global models, and the round policy interface.

A :class:`RoundPolicy` is how rounds are formed: synchronous rounds (:mod:`.sync_rounds`,
secure aggregation being a part of an open round) or buffered asynchronous versions
(:mod:`.async_rounds`). Each is one thread that takes :meth:`~DriverThread._turn` after turn
and outlives any error; each makes its new global models through :meth:`DriverThread._publish`
(test, finite checks, checkpoint and strategy state, one transaction, history, install,
hooks); and each answers the few questions the coordinator's one upload intake asks
(:meth:`RoundPolicy.duplicate`, :meth:`~RoundPolicy.admit`, :meth:`~RoundPolicy.take`,
:meth:`~RoundPolicy.record`, :meth:`~RoundPolicy.release`, :meth:`~RoundPolicy.acknowledge`),
so the coordinator itself never asks which mode it is in.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from . import wire
from .config import FederationConfig
from .devices import DeviceRegistry
from .errors import Conflict
from .evaluations import Evaluations
from .history import RoundHistory
from .partials import Partial
from .plural import plural
from .round_hooks import RoundHooks
from .round_state import OpenRound, RoundState
from .storage import Storage
from .strategies import Strategy
from .strategies.base import first_nonfinite

log = logging.getLogger("fedhub.rounds")

Weights = dict[str, np.ndarray]
Evaluate = Callable[[Mapping[str, np.ndarray]], Mapping[str, float]]
# Seconds before a failed round is tried again (a full disk, a strategy short of updates).
RETRY_AFTER_FAILURE = 2.0
TICK = 0.25  # seconds between the driver's looks at the state when nothing wakes it


class NotPublished(Exception):
    """A candidate global model was not published; ``reason`` says why in words for the log and
    status, ``saving`` whether it failed on the way to disk (then the same model may be tried again)."""

    def __init__(self, reason: str, *, saving: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.saving = saving


def release_devices(devices: DeviceRegistry, r: OpenRound, why: str) -> None:
    """Selected devices that never reported are no longer training in round ``r``."""
    for name in r.pending():
        devices.set_activity(name, "idle")  # a silent device is not "training" for ever
        if devices.lifecycle.get(name)["state"] == "training":
            devices.lifecycle.set(name, "waiting", reason=why, round_number=r.number)


class DriverThread:
    """One thread that takes :meth:`_turn` after turn until stopped, and outlives any error:
    :meth:`_failed` records it (under the state's lock), then the thread waits and goes on."""

    thread_name = "fedhub-rounds"

    def __init__(self, state: RoundState, *, storage: Storage, devices: DeviceRegistry,
                 history: RoundHistory, hooks: RoundHooks, strategy: Strategy,
                 config: FederationConfig, evaluate: Evaluate | None,
                 evaluations: Evaluations | None = None, efficiency: Mapping[str, Any] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        """``evaluations`` keeps each round's own test evaluation for later requests.
        ``efficiency``: one process's training rate (``s_per_image``, :mod:`fedhub.efficiency`)
        that each published model's entry is measured against."""
        self._state = state
        self._storage = storage
        self._devices = devices
        self._history = history
        self._hooks = hooks
        self._strategy = strategy
        self._config = config
        self._evaluate = evaluate
        self._evaluations = evaluations
        self._efficiency = efficiency
        self._clock = clock
        self._rng = random.Random(config.seed)  # device selection, and DP's sampling
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def use_efficiency(self, reference: dict[str, Any] | None) -> None:
        """The efficiency reference for the models published from now on (lock held)."""
        self._efficiency = reference

    def start(self) -> None:
        if self._thread is None:
            self._thread = threading.Thread(target=self._drive, name=self.thread_name, daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._state.cond:
            self._state.cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    def _drive(self) -> None:
        while not self._stop.is_set():
            try:
                self._turn()
            except Exception as exc:  # the driver must outlive anything a round does
                log.exception("%s error", self.thread_name)
                with self._state.cond:
                    self._failed(f"{type(exc).__name__}: {exc}")
                    self._state.cond.wait(RETRY_AFTER_FAILURE)

    def _turn(self) -> None:
        raise NotImplementedError

    def all_done(self) -> bool:
        """The run's last round (or version) is made: no other follows it."""
        return bool(self._config.rounds) and self._state.version >= self._config.rounds

    def check_finished(self) -> None:
        """All rounds done, nothing open or being made, the last one's hooks run: the run is
        over (lock held)."""
        s = self._state
        if (self.all_done() and s.status in ("running", "paused") and s.open is None
                and not s.busy and self._hooks.idle()):
            s.reason = ""
            s.set_status("finished")
            log.info("the run is over: %s done", plural(self._config.rounds, "round"))

    def _failed(self, error: str) -> None:
        self._state.last_error = f"round driver error: {error}"
        self._state.retry_at = time.monotonic() + RETRY_AFTER_FAILURE

    def _publish(self, what: str, number: int, started_at: float, weights: Weights, state: Any, *,
                 counts: tuple[int, int], entry: Callable[[dict[str, Any]], dict[str, Any]],
                 installed: Callable[[], None],
                 record: Callable[[dict[str, Any]], None] | None = None,
                 ) -> tuple[dict[str, Any], Mapping[str, float]]:
        """Make ``weights`` (with the strategy's ``state``) global model ``number``: the one way
        a synchronous round and an asynchronous version become the model devices train from.

        Outside the lock: the test on the held-out data, a refusal of a model that is not finite,
        then durability in order (checkpoint and strategy state, then the row and the history
        ``entry`` in one transaction, with what ``record`` adds). Then the strategy, history and
        evaluations learn it, it is installed under the lock (with ``installed``, what the mode
        adds there), and the round hooks get it. ``what`` names it in messages (``round 3``,
        ``model version 3``); ``counts`` is (updates, examples). Raises :class:`NotPublished`:
        the model in use stays as it was."""
        bad = first_nonfinite(weights)
        if bad is not None:
            raise NotPublished(f"{what}'s weights are not finite (NaN or infinity, in {bad})", saving=False)
        metrics: Mapping[str, float] = {}
        test_s = None
        if self._evaluate is not None:
            tested = time.perf_counter()
            try:
                metrics = self._evaluate(weights)
            except Exception:
                log.exception("evaluation of %s failed", what)
            test_s = time.perf_counter() - tested
        for key in ("loss", "accuracy"):  # finite weights can still give a model that is not
            value = metrics.get(key)
            if value is not None and not math.isfinite(value):
                raise NotPublished(f"the new global model's test {key} is {value}: its outputs are not "
                                   "finite (NaN or infinity)", saving=False)
        try:
            path = self._storage.write_checkpoint(number, weights)
            self._storage.write_strategy_state(number, state, self._strategy.saved_by())
            row: dict[str, Any] = {
                "number": number, "started_at": started_at, "closed_at": self._clock(),
                "num_updates": counts[0], "num_examples": counts[1],
                "test_loss": metrics.get("loss"), "test_accuracy": metrics.get("accuracy")}
            made = entry(row)
            with self._state.cond:
                made["bytes_up"], made["bytes_down"] = self._state.take_traffic()
                reports = dict(self._state.evaluations)
            made["federated_evaluation"] = self._strategy.aggregate_evaluate(
                reports, model_version=number - 1, personalization=self._config.training.personalization)
            if self._efficiency is not None:
                made["efficiency"] = efficiency_of(made, self._efficiency["s_per_image"],
                                                   self._config.training.epochs, test_s=test_s)
            with self._storage.transaction():
                if record is not None:
                    record(row)
                self._storage.complete_round(
                    number, closed_at=row["closed_at"], num_updates=row["num_updates"],
                    num_examples=row["num_examples"], test_loss=row["test_loss"],
                    test_accuracy=row["test_accuracy"], checkpoint=str(path))
                self._history.store(made)
        except Exception as exc:  # a full disk must not take the server down
            log.exception("%s could not be saved", what)
            raise NotPublished(f"{what} could not be saved: {exc}", saving=True) from exc
        self._strategy.load_state(state)  # durable now: what comes next starts from it
        self._history.remember(made)
        if metrics and self._evaluations is not None:  # what test_evaluation() answers for it
            self._evaluations.remember((number, row["closed_at"]), metrics)
        s = self._state
        with s.cond:
            installed()
            for name, report in reports.items():  # summarized: the next model's reports start afresh
                if s.evaluations.get(name) is report:
                    del s.evaluations[name]
            s.install(number, weights)
            s.closing = None
            s.last_error = None
            s.cond.notify_all()
        self._hooks.submit(made, weights)
        return made, metrics




def efficiency_of(entry: Mapping[str, Any], s_per_image: float, epochs: int,
                  test_s: float | None = None) -> dict[str, Any]:
    """How close a published model came to the compute limit: the time one process takes to
    train its images (examples times epochs, at ``s_per_image``) over the time it took, from
    the round's (or the buffer's) start to its result. ``test_s``: how much of that the server
    spent testing the new model on its test set (None without one), which one process training
    the same images does not do: with few images a round it bounds the figure on its own."""
    images = int(entry["num_examples"] or 0) * epochs
    took = max(float(entry["closed_at"]) - float(entry["started_at"]), 1e-9)
    centralized = images * s_per_image
    return {"images": images, "round_s": took, "centralized_s": centralized, "ratio": centralized / took,
            "test_s": test_s}


@dataclass
class Upload:
    """An admitted upload on its way in: what the coordinator's intake carries from admission
    (under the lock) through aggregation (outside it) and the transaction to the answer."""

    device: str
    round_number: int  # as the upload's URL names it
    upload_id: str | None
    digest: str | None  # of the body, kept with the idempotency key
    meta: wire.Meta
    body: bytes
    into: Any  # what the policy folds it into: the open round, or a buffer
    sent: str  # the device's lifecycle reason once it is in ("update for round 3 sent")
    extra: dict[str, Any]  # the policy's own: a delta's reference, a buffer slot's staleness


class RoundPolicy(DriverThread):
    """How rounds are formed; see the module's docstring. Methods marked "lock held" run
    with the round state's lock; the others must not take long under it."""

    durable_uploads = False  # whether an upload's row is on disk before it is acknowledged

    def recover(self) -> None:
        """After a restart, what the policy kept on disk besides completed rounds (lock held)."""

    def task_for(self, name: str, active: bool) -> dict[str, Any]:
        """What device ``name`` should do now (lock held)."""
        raise NotImplementedError

    def view(self) -> dict[str, Any]:
        """What ``GET /api/status`` adds for this mode (lock held)."""
        raise NotImplementedError

    def revision(self) -> str:
        """This mode's part of the status revision that long polls wait on (lock held)."""
        return ""

    @property
    def uploading(self) -> bool:
        """An upload is being folded in (a reset waits for it)."""
        raise NotImplementedError

    def reset(self) -> None:
        """Forget what is open or buffered (lock held; the coordinator forgets the rounds)."""
        raise NotImplementedError

    def late_error(self, entry: Mapping[str, Any]) -> None:
        """A device's ERROR naming a completed round (lock held)."""

    def evaluation(self, name: str, report: Mapping[str, Any]) -> None:
        """Keep device ``name``'s evaluation report (:func:`.federated_eval.parse_report`) for
        the next published model's history entry, or Conflict when it was not asked for (lock held)."""
        raise Conflict(f"device {name!r} was not asked to evaluate in round {report['round']}", "round")

    def secure_message(self, name: str, round_number: int, body: bytes) -> dict[str, Any]:
        """A message of a secure-aggregation stage (see :meth:`.rounds.Coordinator.secagg_message`)."""
        raise Conflict(f"round {round_number} is not an open secure-aggregation round", "round")

    def secure_sum(self, relay: str, round_number: int, body: bytes,
                   vouch: Callable[[list[tuple[str, str]]], None]) -> dict[str, Any]:
        """A relay's sum of masked updates (see :meth:`.rounds.Coordinator.submit_masked_sum`)."""
        raise Conflict(f"round {round_number} is not an open secure-aggregation round", "round")

    # the one upload intake (:meth:`.rounds.Coordinator.submit`) ---------------
    def check_upload(self, name: str, round_number: int) -> None:
        """Refuse at once, before reading the body, an upload this mode never takes."""

    def takes_partial_sums(self) -> str | None:
        """None when a relay's partial sum can be folded in now; otherwise why not (its devices'
        updates then go through one by one). Shown in the status (lock held)."""
        return "asynchronous versions weigh each update by its staleness"

    def admit_partial(self, relay: str, partial: Partial, key: str, digest: str) -> Upload:
        """Where a relay's partial sum goes, or Conflict naming the device or field at fault (lock held)."""
        raise Conflict(f"round {partial.round} takes no partial sums: {self.takes_partial_sums()}", "round")

    def partial_duplicate(self, partial: Partial, key: str, digest: str) -> dict[str, Any] | None:
        """The answer to a partial sum sent again (same key, same bytes), None for a new one."""
        return None

    def duplicate(self, name: str, round_number: int, upload_id: str | None,
                  digest: str | None) -> dict[str, Any] | None:
        """The answer to a retry of an upload already taken (same key, same bytes), None for a
        new one; Conflict for the same key with other bytes."""
        raise NotImplementedError

    def admit(self, name: str, round_number: int, meta: wire.Meta, body: bytes,
              upload_id: str | None, digest: str | None) -> Upload:
        """Where the upload goes, or Conflict saying why it cannot (lock held)."""
        raise NotImplementedError

    def take(self, upload: Upload, weights: Mapping[str, Any]) -> None:
        """Fold the decoded upload in (outside the lock: it takes O(model) time); an error
        leaves nothing folded."""
        raise NotImplementedError

    def record(self, upload: Upload) -> None:
        """The upload's row, in the intake's transaction."""
        raise NotImplementedError

    def release(self, upload: Upload, broken: str | None) -> None:
        """The upload did not get in (lock held). ``broken``: it was folded in but could not
        be recorded, so what it went into cannot be trusted and is made again."""
        raise NotImplementedError

    def acknowledge(self, upload: Upload) -> dict[str, Any]:
        """The upload is in (lock held): the answer the device gets."""
        raise NotImplementedError
