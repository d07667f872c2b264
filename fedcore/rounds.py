"""Round coordination: select devices, hand out tasks, fold in updates, close rounds.

One driver thread opens and closes rounds; request threads only read state or
fold an update into the open round's accumulator. A round closes when every
selected device has reported, or at its deadline with at least a quorum;
otherwise it is discarded and opened again with whoever is there. Completed
rounds are durable (checkpoint first, then the database row); an unfinished
round is simply forgotten on restart and opened again, so no completed round
is lost and none is counted twice.
"""

from __future__ import annotations

import hashlib
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import wire
from .aggregation import Accumulator, Strategy, make_strategy
from .config import FederationConfig
from .device_logs import DeviceLogs
from .devices import DeviceRegistry
from .errors import Conflict, InvalidInput, NotFound
from .evaluations import Evaluations
from .plural import plural
from .storage import Storage

log = logging.getLogger("fedhub.rounds")

Weights = dict[str, np.ndarray]
Evaluate = Callable[[Mapping[str, np.ndarray]], Mapping[str, float]]
RoundHook = Callable[[dict[str, Any], Mapping[str, np.ndarray]], None]

STATUSES = ("idle", "running", "paused", "finished")
# Seconds a device told "retry_in" waits before polling again (at most the wait it asked for).
RETRY_IN = 2.0


class RoundRefused(Exception):
    """The aggregated model is unusable (not finite); it must not replace the global model."""


@dataclass
class _OpenRound:
    number: int
    base_version: int
    selected: set[str]
    needed: int
    deadline: float
    config: dict[str, Any]
    accumulator: Accumulator
    reported: dict[str, str | None] = field(default_factory=dict)
    progress: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> batches done, total


class Coordinator:
    """The federation's state machine. Thread-safe; owns the driver thread."""

    def __init__(self, storage: Storage, devices: DeviceRegistry, *,
                 initial_weights: Mapping[str, np.ndarray], config: FederationConfig,
                 evaluate: Evaluate | None = None, strategy: Strategy | None = None,
                 max_upload_bytes: int = wire.DEFAULT_MAX_BYTES,
                 clock: Callable[[], float] = time.time) -> None:
        config.validate()
        self.storage = storage
        self.devices = devices
        self.config = config
        self.max_upload_bytes = max_upload_bytes
        self._evaluate = evaluate
        self._evaluations = Evaluations(evaluate) if evaluate is not None else None
        self._strategy = strategy or make_strategy(config.strategy)
        self._initial = {k: np.array(v) for k, v in initial_weights.items()}
        self.spec = wire.spec_of(self._initial)
        self._clock = clock
        self._cond = threading.Condition(threading.RLock())
        self._hooks: list[RoundHook] = []
        self._open: _OpenRound | None = None
        self._closing: int | None = None
        self._retry_at = 0.0
        self._reason = ""
        self.last_error: str | None = None
        self._rng = random.Random(config.seed)
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        # Long polls allowed to wait at once (None: no limit); the HTTP server sets it below
        # its worker thread count, as each waiting poll holds a worker thread.
        self.max_waiters: int | None = None
        self._waiters = 0
        self.logs = DeviceLogs(storage, clock=clock)
        self._recover()

    # start-up -------------------------------------------------------------
    def _recover(self) -> None:
        dropped = self.storage.discard_unfinished_rounds()
        if dropped:
            log.warning("discarded unfinished round(s) %s from before the restart; they run again",
                        dropped)
        last = self.storage.last_complete_round()
        if last is None:
            self._install_initial()
        else:
            self._global = self.storage.read_checkpoint(last["number"])
            self._version = last["number"]
            if wire.spec_of(self._global) != self.spec:
                raise ValueError(
                    f"checkpoint of round {self._version} does not match the configured model; "
                    "use --reset or another state directory")
            log.info("resuming after completed round %d", self._version)
        self._encoded = self._encode_global()
        default = "running" if self.config.start else "idle"
        self._status = self.storage.get_setting("status", default) or default
        if self.config.start and self._status in ("idle", "paused"):
            self._status = "running"
        self._check_finished()
        self.storage.set_setting("status", self._status)

    def _install_initial(self) -> None:
        self.storage.remove_checkpoints()
        path = self.storage.write_checkpoint(0, self._initial)
        now = self._clock()
        with self.storage.transaction():
            self.storage.insert_round(0, started_at=now, selected=[], config={}, status="complete")
            self.storage.complete_round(0, closed_at=now, num_updates=0, num_examples=0,
                                        test_loss=None, test_accuracy=None, checkpoint=str(path))
        self._global = {k: v.copy() for k, v in self._initial.items()}
        self._version = 0

    def _encode_global(self) -> bytes:
        return wire.encode(self._global, wire.Meta(round=self._version, model_version=self._version))

    def start(self) -> None:
        """Start the driver thread (idempotent)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._drive, name="fedhub-rounds", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        with self._cond:
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
        self.devices.flush()

    def add_hook(self, hook: RoundHook) -> None:
        """Call ``hook(round_row, global_weights)`` after each completed round."""
        self._hooks.append(hook)

    # device calls ---------------------------------------------------------
    def global_model(self) -> tuple[int, bytes]:
        """The current global model version and its safetensors bytes (encoded once per round)."""
        with self._cond:
            return self._version, self._encoded

    def global_weights(self) -> tuple[int, Weights]:
        with self._cond:
            return self._version, self._global

    def next_task(self, name: str, wait: float = 0.0) -> dict[str, Any]:
        """What the device should do now; waits up to ``wait`` seconds for something to do.

        A waiting poll holds one of the HTTP server's worker threads. With more idle devices
        than threads, their polls would take every thread and the downloads and uploads of
        the devices that are training would queue behind them for minutes. So at most
        ``max_waiters`` polls wait at once; beyond that the answer "wait" comes at once with
        ``retry_in``, the seconds the device should wait on its side before asking again.
        """
        end = time.monotonic() + max(0.0, wait)
        refusal = self.devices.lifecycle.refusal(name)  # invalid data: no tasks at all
        if refusal is not None:
            raise refusal
        with self._cond:
            crowded = wait > 0 and self.max_waiters is not None and self._waiters >= self.max_waiters
            if crowded:
                end = time.monotonic()
            while True:
                task = self._task_for(name)
                remaining = end - time.monotonic()
                if task["action"] != "wait" or remaining <= 0 or self._stop.is_set():
                    if task["action"] == "train":
                        self.devices.set_activity(name, "training")
                        self.devices.lifecycle.set(name, "training", round_number=task["round"])
                    elif task["action"] == "finish":
                        self.devices.lifecycle.set(name, "finished", reason="the run is over",
                                                   round_number=self._version)
                    elif crowded:
                        task["retry_in"] = round(min(wait, RETRY_IN), 2)
                    return task
                self._waiters += 1
                try:
                    self._cond.wait(min(remaining, 1.0))
                finally:
                    self._waiters -= 1
                self.devices.touch(name)

    def _task_for(self, name: str) -> dict[str, Any]:
        if not self.devices.is_active(name):
            return {"action": "wait", "reason": "inactive: waiting for an admin to activate it"}
        if self._status == "finished":
            return {"action": "finish", "model_version": self._version}
        r = self._open
        if r is not None and name in r.selected and name not in r.reported:
            return {"action": "train", "round": r.number, "model_version": r.base_version,
                    "config": r.config,
                    "deadline_in": max(0.0, round(r.deadline - time.monotonic(), 1))}
        return {"action": "wait", "reason": self._wait_reason(name)}

    def _wait_reason(self, name: str) -> str:
        r = self._open
        if r is not None and name in r.reported:
            return f"update for round {r.number} received; waiting for the round to close"
        if r is not None:
            return f"round {r.number} is in progress without this device"
        if self._closing is not None:
            return f"round {self._closing} is being aggregated"
        if self._status == "idle":
            return "training has not been started"
        if self._status == "paused":
            return "training is paused"
        return self._reason or "waiting for the next round"

    def submit(self, name: str, round_number: int, body: bytes,
               upload_id: str | None = None) -> dict[str, Any]:
        """Validate an update and fold it into the open round. Idempotent per ``upload_id``:
        the same key with the same bytes is acknowledged once more, with other bytes refused.
        A refused update changes nothing, not even the device's activity."""
        with self.devices.busy(name, "uploading"):
            return self._submit(name, round_number, body, upload_id)

    def _submit(self, name: str, round_number: int, body: bytes,
                upload_id: str | None) -> dict[str, Any]:
        if not 0 <= round_number <= wire.MAX_INTEGER:  # no such round; too large even to look up
            raise Conflict(f"round {round_number} is not open", "round")
        digest = hashlib.sha256(body).hexdigest() if upload_id else None
        done = self._duplicate(name, round_number, upload_id, digest)
        if done is not None:
            return done
        weights, meta = wire.decode(body, self.spec, max_bytes=self.max_upload_bytes,
                                    require_examples=True)
        if meta.round != round_number:
            raise InvalidInput(
                f"metadata round {meta.round} does not match the URL's round {round_number}", "round")
        with self._cond:
            done = self._duplicate(name, round_number, upload_id, digest)
            if done is not None:
                return done
            r = self._open
            if r is None or r.number != round_number:
                current = r.number if r else self._closing
                state = "closed" if round_number <= self._version or (
                    current is not None and round_number < current) else "not open"
                raise Conflict(f"round {round_number} is {state}", "round")
            if name not in r.selected:
                raise Conflict(f"device {name!r} was not selected for round {round_number}", "round")
            if name in r.reported:
                raise Conflict(f"device {name!r} already reported for round {round_number}", "round")
            if meta.model_version != r.base_version:
                raise Conflict(
                    f"update was trained from model version {meta.model_version}, "
                    f"round {round_number} starts from version {r.base_version}", "model_version")
            r.accumulator.add(weights, meta.num_examples)
            self.storage.add_update(round_number, name, num_examples=meta.num_examples,
                                    metrics=meta.metrics, upload_id=upload_id, now=self._clock(),
                                    body_sha256=digest)
            r.reported[name] = upload_id
            self.devices.set_activity(name, "idle")
            self.devices.lifecycle.set(name, "waiting", reason=f"update for round {round_number} sent",
                                       round_number=round_number)
            self.devices.set_examples(name, meta.num_examples)
            self._cond.notify_all()
            return {"accepted": True, "duplicate": False, "round": round_number,
                    "reported": len(r.reported), "selected": len(r.selected)}

    def _duplicate(self, name: str, round_number: int, upload_id: str | None,
                   digest: str | None) -> dict[str, Any] | None:
        if not upload_id:
            return None
        row = self.storage.get_update(round_number, name)
        if row is None or row["upload_id"] != upload_id:
            return None
        if row["body_sha256"] not in (None, digest):  # None: stored before digests were kept
            raise Conflict(f"Idempotency-Key {upload_id!r} was already used for round {round_number} "
                           "with a different body; a retry must send the same bytes", "Idempotency-Key")
        return {"accepted": True, "duplicate": True, "round": round_number}

    def report_progress(self, name: str, round_number: object, done: object,
                        total: object) -> dict[str, Any]:
        """A selected device's local training in the open round: ``done`` batches of ``total``.

        Only shown (``status()["round"]["progress"]``); it lives and dies with the open round."""
        for key, value in (("round", round_number), ("done", done), ("total", total)):
            if (not isinstance(value, int) or isinstance(value, bool)
                    or not 0 <= value <= wire.MAX_INTEGER):
                raise InvalidInput(f"{key} must be an integer from 0 to {wire.MAX_INTEGER}", key)
        if total == 0:
            raise InvalidInput("total must be at least 1", "total")
        if done > total:
            raise InvalidInput(f"done ({done}) is more than total ({total})", "done")
        with self._cond:
            r = self._open
            if r is None or r.number != round_number or name not in r.selected or name in r.reported:
                raise Conflict(f"device {name!r} is not training in round {round_number}", "round")
            r.progress[name] = {"done": done, "total": total}
            return {"round": round_number, "done": done, "total": total}

    def leave(self, name: str) -> None:
        """The device says goodbye: it is no longer waited for."""
        with self._cond:
            self.devices.leave(name)
            self._drop_from_round(name)

    # lifecycle calls ------------------------------------------------------
    def interrupt(self, name: str) -> dict[str, Any]:
        """Admin: stop one device's local training; the round goes on without it at once."""
        self.devices.require(name)
        with self._cond:
            r = self._open
            if r is None or name not in r.selected or name in r.reported:
                raise Conflict(f"device {name!r} is not training in an open round", "name")
            self.devices.lifecycle.request_interrupt(name, r.number)
            self._drop_from_round(name)
            self.devices.set_activity(name, "idle")
            return {"name": name, "round": r.number, "interrupted": True}

    def interrupted(self, name: str, round_number: object, detail: object = None) -> dict[str, Any]:
        """The device confirms it stopped training ``round_number``."""
        with self._cond:
            state = self.devices.lifecycle.interrupted(name, round_number, detail)
            if self._open is not None and self._open.number == round_number:
                self._drop_from_round(name)
            self.devices.set_activity(name, "idle")
            return state

    def add_logs(self, name: str, raw: object) -> dict[str, Any]:
        """Store a device's log lines; an ERROR naming the open round drops the device from it."""
        entries = self.logs.add(name, raw)
        dropped = []
        with self._cond:
            for e in entries:
                r = self._open
                if (e["level"] == "ERROR" and r is not None and e["round"] == r.number
                        and name in r.selected and name not in r.reported):
                    self._drop_from_round(name)
                    self.devices.set_activity(name, "idle")
                    self.devices.lifecycle.set(name, "waiting", reason=f"round {r.number} failed: "
                                               f"{e['message'][:200]}", round_number=r.number)
                    dropped.append(r.number)
        return {"stored": len(entries), "dropped_from_rounds": dropped}

    def _settle(self, r: _OpenRound, why: str) -> None:
        """Selected devices that never reported are no longer training in round ``r``."""
        for name in r.selected - set(r.reported):
            self.devices.set_activity(name, "idle")  # a silent device is not "training" for ever
            if self.devices.lifecycle.get(name)["state"] == "training":
                self.devices.lifecycle.set(name, "waiting", reason=why, round_number=r.number)

    def _drop_from_round(self, name: str) -> None:
        r = self._open
        if r is not None and name in r.selected and name not in r.reported:
            r.selected.discard(name)
            self.storage.set_round_selected(r.number, sorted(r.selected))
            self._cond.notify_all()

    # admin calls ----------------------------------------------------------
    def set_active(self, name: str, active: bool) -> None:
        with self._cond:
            self.devices.set_active(name, active)
            if not active:
                self._drop_from_round(name)
            self._cond.notify_all()

    def start_training(self, rounds: int | None = None) -> None:
        with self._cond:
            if rounds is not None:
                if (not isinstance(rounds, int) or isinstance(rounds, bool)
                        or not 0 <= rounds <= wire.MAX_INTEGER):
                    raise InvalidInput(f"rounds must be an integer from 0 to {wire.MAX_INTEGER}", "rounds")
                self.config.rounds = rounds
            if self.config.rounds and self._version >= self.config.rounds:
                raise Conflict(
                    f"the run is over ({plural(self.config.rounds, 'round')} done); "
                    "start with a larger 'rounds' or reset", "rounds")
            self._set_status("running")

    def pause(self) -> None:
        """No new round opens; a round in progress still completes."""
        with self._cond:
            if self._status == "running":
                self._set_status("paused")

    def reset(self) -> None:
        """Forget every round and start again from the initial model (devices stay enrolled)."""
        with self._cond:
            while self._closing is not None:
                self._cond.wait(0.5)
            self._open = None
            self.storage.reset_rounds()
            self._install_initial()
            self._encoded = self._encode_global()
            self.last_error = None
            self._set_status("idle")

    def _set_status(self, status: str) -> None:
        self._status = status
        self.storage.set_setting("status", status)
        self._cond.notify_all()

    # completed rounds' models ---------------------------------------------
    def round_weights(self, number: int | None = None) -> tuple[int, Weights]:
        """The global weights of completed round ``number`` (None: the current global model)."""
        if number is None:
            return self.global_weights()
        return number, self._checkpoint(self._completed_round(number))

    def test_evaluation(self, number: int | None = None) -> tuple[int, dict[str, Any]]:
        """A completed round's global model (None: the current one) on the server's test set.

        What the per-round evaluation gives (for the Keras global model: loss, accuracy,
        per-class accuracy and the confusion matrix), made once per round and outside the
        engine's lock: the round's own evaluation is kept when it closes.
        """
        if number is None:
            with self._cond:
                number = self._version
        row = self._completed_round(number)
        metrics = {}
        if self._evaluations is not None:  # keyed by when it closed: numbers repeat after a reset
            metrics = self._evaluations.get((number, row["closed_at"]), lambda: self._checkpoint(row))
        if not metrics:
            raise Conflict("this server has no test set to evaluate its models on", "round")
        return number, metrics

    def _completed_round(self, number: int) -> dict[str, Any]:
        row = self.storage.get_round(number) if 0 <= number <= wire.MAX_INTEGER else None
        if row is None:
            raise NotFound(f"no round {number}", "round")
        if row["status"] != "complete":
            raise Conflict(f"round {number} is not complete yet", "round")
        return row

    def _checkpoint(self, row: Mapping[str, Any]) -> Weights:
        try:
            return self.storage.read_checkpoint(row["number"])
        except FileNotFoundError:  # a reset removed it since its row was read
            raise NotFound(f"no round {row['number']}", "round") from None

    # reading --------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        with self._cond:
            r = self._open
            out: dict[str, Any] = {
                "status": self._status,
                "model_version": self._version,
                "completed_rounds": self._version,
                "total_rounds": self.config.rounds,
                "round": None,
                "reason": "",
                "last_error": self.last_error,
            }
            if r is not None:
                out["round"] = {
                    "number": r.number,
                    "selected": sorted(r.selected),
                    "reported": sorted(r.reported),
                    "needed": r.needed,
                    "deadline_in": max(0.0, round(r.deadline - time.monotonic(), 1)),
                    # devices still training (an update received needs no progress bar)
                    "progress": {name: dict(p) for name, p in sorted(r.progress.items())
                                 if name in r.selected and name not in r.reported},
                }
            elif self._closing is not None:
                out["round"] = {"number": self._closing, "state": "aggregating"}
            elif self._status == "running":
                out["reason"] = self._reason
            return out

    def history(self) -> list[dict[str, Any]]:
        """Completed rounds with the global test metrics and each device's reported metrics."""
        updates: dict[int, dict[str, Any]] = {}
        for u in self.storage.list_updates():
            updates.setdefault(u["round"], {})[u["device"]] = {
                "num_examples": u["num_examples"], **u["metrics"]}
        out = []
        failures: dict[int, list[dict[str, Any]]] = {}
        for e in self.logs.errors():  # an ERROR line naming a round marks that update failed
            failures.setdefault(e["round"], []).append(e)
        for r in self.storage.list_rounds():
            if r["status"] != "complete" or r["number"] == 0:
                continue
            for e in failures.get(r["number"], []):
                if e["received_at"] >= r["started_at"]:  # not from an earlier run of this number
                    entry = updates.setdefault(r["number"], {}).setdefault(e["device"], {})
                    entry["failed"] = True
                    entry.setdefault("error", e["message"])
            out.append({
                "round": r["number"], "test_loss": r["test_loss"],
                "test_accuracy": r["test_accuracy"], "num_updates": r["num_updates"],
                "num_examples": r["num_examples"], "started_at": r["started_at"],
                "closed_at": r["closed_at"], "devices": updates.get(r["number"], {}),
            })
        return out

    # the driver -----------------------------------------------------------
    def _drive(self) -> None:
        while not self._stop.is_set():
            closing: _OpenRound | None = None
            with self._cond:
                self._check_finished()
                r = self._open
                now = time.monotonic()
                if r is not None:
                    if r.selected and len(r.reported) >= len(r.selected):
                        closing = r
                    elif now >= r.deadline or not r.selected:
                        if r.reported and len(r.reported) >= r.needed:
                            closing = r
                        elif not r.selected:
                            self._abort(r, f"every device selected for round {r.number} left "
                                           "or was dropped before reporting")
                        else:
                            self._abort(r, f"round {r.number} reached its deadline with "
                                           f"{len(r.reported)} of {r.needed} needed updates")
                    if closing is not None:
                        self._open = None
                        self._closing = closing.number
                elif self._status == "running" and now >= self._retry_at:
                    self._try_open()
                if closing is None:
                    self._cond.wait(0.25)
                    continue
            self._close(closing)

    def _check_finished(self) -> None:
        if (self.config.rounds and self._version >= self.config.rounds
                and self._status in ("running", "paused") and self._open is None):
            self._set_status("finished")
            log.info("the run is over: %s done", plural(self.config.rounds, "round"))

    def _try_open(self) -> None:
        available = self.devices.available()
        if len(available) < self.config.min_devices:
            self._reason = (f"waiting for devices: {len(available)} active and online, "
                            f"{self.config.min_devices} needed")
            return
        self._reason = ""
        k = max(self.config.min_devices, math.ceil(self.config.fraction * len(available)))
        selected = sorted(self._rng.sample(sorted(available), min(k, len(available))))
        number = self._version + 1
        config = self.config.training
        task_config = {"model": config.model, "epochs": config.epochs,
                       "batch_size": config.batch_size, "learning_rate": config.learning_rate}
        self.storage.insert_round(number, started_at=self._clock(), selected=selected,
                                  config=task_config)
        self._open = _OpenRound(
            number=number, base_version=self._version, selected=set(selected),
            needed=max(1, math.ceil(self.config.quorum * len(selected))),
            deadline=time.monotonic() + self.config.round_timeout, config=task_config,
            accumulator=self._strategy.accumulator(self._global))
        log.info("round %d opened with %s", number, ", ".join(selected))
        self._cond.notify_all()

    def _abort(self, r: _OpenRound, why: str) -> None:
        log.warning("%s; discarding it and opening it again", why)
        self._reason = why
        self._open = None
        self._settle(r, f"round {r.number} was discarded")
        self.storage.discard_round(r.number)
        self._cond.notify_all()

    def _close(self, r: _OpenRound) -> None:
        """Aggregate, evaluate, checkpoint, record: outside the lock, as it takes a while."""
        try:
            weights = r.accumulator.result()
            bad = wire.first_non_finite(weights)
            if bad is not None:
                raise RoundRefused(f"the aggregated weights hold NaN or infinity (tensor {bad!r})")
            metrics: Mapping[str, float] = {}
            if self._evaluate is not None:
                try:
                    metrics = self._evaluate(weights)
                except Exception:
                    log.exception("evaluation of round %d failed", r.number)
            for key in ("loss", "accuracy"):
                value = metrics.get(key)
                if value is not None and not math.isfinite(value):
                    raise RoundRefused(f"the new global model's test {key} is {value}: its outputs "
                                       "are not finite (NaN or infinity)")
            path = self.storage.write_checkpoint(r.number, weights)
            closed_at = self._clock()
            self.storage.complete_round(
                r.number, closed_at=closed_at, num_updates=r.accumulator.count,
                num_examples=r.accumulator.total_examples, test_loss=metrics.get("loss"),
                test_accuracy=metrics.get("accuracy"), checkpoint=str(path))
            if metrics and self._evaluations is not None:  # what test_evaluation() answers for it
                self._evaluations.remember((r.number, closed_at), metrics)
        except Exception as exc:  # a poisoned round or a full disk must not take the server down
            if isinstance(exc, RoundRefused):
                why = f"failed: {exc}; the previous global model stays and the round runs again"
                log.error("round %d %s", r.number, why)
            else:
                why = f"could not be saved: {exc}"
                log.exception("round %d could not be completed", r.number)
            with self._cond:
                self.last_error = f"round {r.number} {why}"
                self._closing = None
                self.storage.discard_round(r.number)
                self._retry_at = time.monotonic() + 2.0
                self._cond.notify_all()
            return
        with self._cond:
            self._settle(r, f"round {r.number} closed without this device's update")
            self._global = weights
            self._version = r.number
            self._encoded = self._encode_global()
            self._closing = None
            self.last_error = None
            self._check_finished()
            self._cond.notify_all()
        row = self.storage.get_round(r.number) or {}
        log.info("round %d complete: %s, %s, test accuracy %s", r.number,
                 plural(r.accumulator.count, "update"), plural(r.accumulator.total_examples, "example"),
                 metrics.get("accuracy"))
        for hook in self._hooks:
            try:
                hook(row, weights)
            except Exception:
                log.exception("round hook %r failed", hook)
