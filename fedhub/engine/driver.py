"""The round driver: the one thread that opens, closes and fails rounds.

Each turn it looks at the shared :class:`~.round_state.RoundState` under its lock
and decides; the slow parts run outside the lock: opening a round's aggregator
(:meth:`Strategy.begin`), aggregating (:meth:`RoundAggregator.result`), evaluating,
writing the checkpoint and the strategy's state. A round closes when every
selected device has reported, or at its deadline with enough updates (the quorum,
and at least what the strategy needs); below that it is discarded and opened
again. A round whose aggregation fails (too few usable updates, a non-finite
result) or cannot be saved is recorded as failed, with its reason, and runs
again; the driver never dies of it. Completed rounds are durable: checkpoint and
strategy state first, then the round's row and history entry in one transaction.
The round hooks run on their own thread (:mod:`.round_hooks`).
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from .config import FederationConfig
from .devices import DeviceRegistry
from .errors import RunOver
from .evaluations import Evaluations
from .history import RoundHistory
from .plural import plural
from .round_hooks import RoundHooks
from .round_state import OpenRound, RoundState
from .secagg import SecAggError
from .secure_round import SecureRound, summary
from .storage import Storage
from .strategies import AggregationError, RoundPlan, Strategy
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
                 evaluations: Evaluations | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        """``evaluations`` keeps each round's own test evaluation for later requests."""
        self._state = state
        self._storage = storage
        self._devices = devices
        self._history = history
        self._hooks = hooks
        self._strategy = strategy
        self._config = config
        self._evaluate = evaluate
        self._evaluations = evaluations
        self._clock = clock
        self._rng = random.Random(config.seed)  # device selection, and DP's sampling
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._previous_keys: frozenset[bytes] = frozenset()  # refused if a device advertises one again

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
        if self._evaluate is not None:
            try:
                metrics = self._evaluate(weights)
            except Exception:
                log.exception("evaluation of %s failed", what)
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
            s.install(number, weights)
            s.closing = None
            s.last_error = None
            s.cond.notify_all()
        self._hooks.submit(made, weights)
        return made, metrics


class RoundDriver(DriverThread):
    """Owns the driver thread; the coordinator starts and stops it."""

    def all_done(self) -> bool:
        """The run's last round is complete (no round opens after it)."""
        return bool(self._config.rounds) and self._state.version >= self._config.rounds

    def check_finished(self) -> None:
        """All rounds done, nothing open and the last round's hooks run: the run is over."""
        s = self._state
        if (self.all_done() and s.status in ("running", "paused") and s.open is None
                and not s.busy and self._hooks.idle()):
            s.reason = ""
            s.set_status("finished")
            log.info("the run is over: %s done", plural(self._config.rounds, "round"))

    # the loop -------------------------------------------------------------
    def _turn(self) -> None:
        s = self._state
        closing = plan = None
        with s.cond:
            self.check_finished()
            r = s.open
            now = time.monotonic()
            if r is not None:
                closing = self._decide(r, now)
                if closing is not None:
                    s.open = None
                    s.closing = r.number
            elif s.status == "running" and now >= s.retry_at and not s.busy and not self.all_done():
                plan = self._plan()
            if closing is None and plan is None:
                s.cond.wait(TICK)
                return
        if closing is not None:
            self._close(closing)
        else:
            self._open(*plan)

    def _decide(self, r: OpenRound, now: float) -> OpenRound | None:
        """The round to close now, or None (it goes on, or was discarded)."""
        if r.uploading:
            return None  # an update is being folded in: decide once it is in
        if r.broken is not None:
            self._fail(r, r.broken)
            return None
        if r.secure is not None:
            return self._decide_secure(r, r.secure, now)
        if r.all_in():
            return r
        if now < r.deadline and r.selected:
            return None
        if r.reported and len(r.reported) >= r.needed:
            return r
        if not r.selected:
            self._abort(r, f"every device selected for round {r.number} left or was dropped "
                           "before reporting")
        else:
            self._abort(r, f"round {r.number} reached its deadline with {len(r.reported)} of "
                           f"{r.needed} needed updates")
        return None

    def _decide_secure(self, r: OpenRound, secure: SecureRound, now: float) -> OpenRound | None:
        """Close the open stage once everyone still in the round answered, or at its deadline;
        after the unmask stage, the round closes. Too few left fails the round: it runs again."""
        if secure.waiting(r.selected) and now < secure.deadline:
            return None
        if secure.stage == "unmask":
            return r
        try:
            stage = secure.next_stage()
        except SecAggError as exc:
            self._fail(r, f"round {r.number} failed: {exc.message}")
            return None
        r.deadline = secure.deadline  # what the status shows: the open stage's deadline
        log.info("round %d: secure aggregation stage %r", r.number, stage)
        self._state.cond.notify_all()
        return None

    # opening --------------------------------------------------------------
    def _plan(self) -> tuple[int, Weights, RoundPlan] | None:
        """Under the lock: who trains the next round, if enough devices are there."""
        s = self._state
        available = self._devices.available()
        if len(available) < self._config.min_devices:
            s.reason = (f"waiting for devices: {len(available)} active and online, "
                        f"{self._config.min_devices} needed")
            return None
        s.reason = ""
        try:
            plan = self._strategy.configure(available, rng=self._rng, fraction=self._config.fraction,
                                            min_devices=self._config.min_devices)
        except RunOver as exc:  # a spent privacy budget: no round after this one
            log.warning("the run is over: %s", exc.message)
            s.reason = exc.message
            s.set_status("finished")
            return None
        s.opening = True
        return s.version, s.weights, plan

    def _open(self, version: int, weights: Weights, plan: RoundPlan) -> None:
        """Open the round's aggregator outside the lock, then the round under it."""
        s = self._state
        try:
            aggregator = self._strategy.begin(weights, spill_dir=self._storage.state_dir,
                                              memory_budget=self._config.memory_budget)
        except Exception as exc:  # e.g. a restored state that does not fit the model
            log.exception("round %d could not open", version + 1)
            with s.cond:
                s.opening = False
                s.last_error = f"round {version + 1} could not open: {exc}"
                s.retry_at = time.monotonic() + RETRY_AFTER_FAILURE
                s.cond.notify_all()
            return
        with s.cond:
            s.opening = False
            if s.status != "running" or s.version != version or s.open is not None:
                aggregator.close()  # paused or reset meanwhile
                s.cond.notify_all()
                return
            number = version + 1
            secure = None
            if self._config.secagg is not None:
                try:
                    secure = SecureRound(self._config.secagg, number, plan.devices, weights,
                                         train_timeout=self._config.round_timeout,
                                         previous_keys=self._previous_keys)
                except SecAggError as exc:
                    aggregator.close()
                    s.last_error = f"round {number} could not open: {exc.message}"
                    s.retry_at = time.monotonic() + RETRY_AFTER_FAILURE
                    s.cond.notify_all()
                    return
            base = self._config.training.task()
            started_at = self._clock()
            self._storage.insert_round(number, started_at=started_at, selected=list(plan.devices),
                                       config={**base, **self._strategy.task_config()})
            k = len(plan.devices)
            s.open = OpenRound(
                number=number, base_version=version, started_at=started_at,
                selected=set(plan.devices),
                needed=max(1, math.ceil(self._config.quorum * k), self._strategy.min_updates()),
                deadline=time.monotonic() + self._config.round_timeout,
                config={d: {**base, **plan.config.get(d, {})} for d in plan.devices},
                aggregator=aggregator, secure=secure)
            if secure is not None:
                s.open.deadline = secure.deadline
            log.info("round %d opened with %s", number, ", ".join(plan.devices))
            s.cond.notify_all()

    # discarding -----------------------------------------------------------
    def _abort(self, r: OpenRound, why: str) -> None:
        """Below quorum at the deadline, or everyone gone: discard the round and open it again."""
        log.warning("%s; discarding it and opening it again", why)
        s = self._state
        s.reason = why
        s.open = None
        r.aggregator.close()
        release_devices(self._devices, r, f"round {r.number} was discarded")
        self._storage.discard_round(r.number)
        s.cond.notify_all()

    def _fail(self, r: OpenRound, why: str) -> None:
        """The round cannot produce a durable global model: record why, discard it, run it again
        after a short pause. Called with the lock held."""
        why = f"{why}; the previous global model stays and the round runs again"
        log.error("%s", why)
        s = self._state
        r.aggregator.close()
        if s.open is r:
            s.open = None
        if s.closing == r.number:
            s.closing = None
        s.last_error = why
        release_devices(self._devices, r, why)
        self._storage.discard_round(r.number)
        self._history.failed(r.number, started_at=r.started_at, failed_at=self._clock(), reason=why)
        s.retry_at = time.monotonic() + RETRY_AFTER_FAILURE
        s.cond.notify_all()

    # closing --------------------------------------------------------------
    def _close(self, r: OpenRound) -> None:
        """Aggregate, evaluate, save, record: outside the lock, as it takes a while."""
        s = self._state
        secured = None
        try:
            if r.secure is not None:
                self._previous_keys = r.secure.server.public_keys()
                mean, secured = r.secure.finish(r.aggregator.template)
                r.aggregator.add_secure_mean(secured.survivors, mean, secured.total_weight)
            result = r.aggregator.result()
        except SecAggError as exc:
            with s.cond:
                self._fail(r, f"round {r.number} failed: {exc.message}")
            return
        except AggregationError as exc:
            with s.cond:
                self._fail(r, f"round {r.number} failed: {exc.reason}")
            return
        except Exception as exc:
            log.exception("aggregation of round %d failed", r.number)
            with s.cond:
                self._fail(r, f"round {r.number} failed: {type(exc).__name__}: {exc}")
            return
        aggregated = result.metrics if secured is None else {**result.metrics, "secagg": summary(secured)}
        try:
            _, metrics = self._publish(
                f"round {r.number}", r.number, r.started_at, result.weights, result.state,
                counts=(aggregated["num_updates"], aggregated["num_examples"]),
                entry=lambda row: self._history.build(row, aggregated),
                installed=lambda: release_devices(
                    self._devices, r, f"round {r.number} closed without this device's update"))
        except NotPublished as exc:
            with s.cond:
                self._fail(r, exc.reason if exc.saving else f"round {r.number} failed: {exc.reason}")
            return
        log.info("round %d complete: %s (%d used), %s, test accuracy %s", r.number,
                 plural(aggregated["num_updates"], "update"), aggregated["num_used"],
                 plural(aggregated["num_examples"], "example"), metrics.get("accuracy"))
