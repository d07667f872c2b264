"""The engine's entry point: each thing a device, an admin or a dashboard does is one method.

The :class:`Coordinator` ties the parts together and is all the HTTP layer (and the
Python API) sees: the device registry and lifecycle, device logs and storage stay
behind it. Requests read and change the shared round state
(:mod:`.round_state`) under its lock; one driver thread (:mod:`.driver`) opens and
closes rounds; completed rounds' history entries are built once
(:mod:`.history`); round hooks run on their own thread (:mod:`.round_hooks`).

Completed rounds are durable (checkpoint and strategy state first, then the
database rows); an unfinished round is simply forgotten on restart and opened
again, so no completed round is lost and none is counted twice. The strategy's
state (FedAvgM's velocity, FedAdam's moments) is restored with the global model
and forgotten on reset.
"""

from __future__ import annotations

import hashlib
import logging
import threading
import time
from collections.abc import Callable, Container, Mapping
from typing import Any

import numpy as np

from . import compression, federated_eval, partials, runs, wire
from .async_rounds import AsyncRounds
from .config import FederationConfig
from .device_logs import DeviceLogs
from .devices import MAX_DEVICES_PAGE, DeviceRegistry, device_filter
from .driver import Evaluate, RoundPolicy, Upload
from .errors import Conflict, FedHubError, InvalidInput, NotFound, RunMismatch
from .evaluations import Evaluations
from .history import RoundHistory
from .lifecycle import check_report
from .plural import plural
from .privacy import describe_dp
from .relays import RelayRegistry, parse_devices, parse_reports
from .round_hooks import RoundHook, RoundHooks
from .round_state import STATUSES, RoundState
from .storage import Storage
from .strategies import Strategy
from .sync_rounds import SyncRounds

log = logging.getLogger("fedhub.rounds")

Weights = dict[str, np.ndarray]
__all__ = ["STATUSES", "Coordinator", "Evaluate", "RoundHook"]
# Seconds a device told "retry_in" waits before polling again (at most the wait it asked for).
RETRY_IN = 2.0
MAX_REVISION = 200
MAX_IDEMPOTENCY_KEY = 200  # characters: a UUID is 32-36, a relay's key 40-100
NEW_RUN = ("To start a new run instead, start without --resume, or give --new-run NAME (a fresh "
           "--state-dir, fedhub.Server: a fresh state_dir, works too).")


class Coordinator:
    """The federation's engine. Thread-safe; owns the driver thread."""

    def __init__(self, storage: Storage, devices: DeviceRegistry, *,
                 initial_weights: Mapping[str, np.ndarray], config: FederationConfig,
                 evaluate: Evaluate | None = None, strategy: Strategy | None = None,
                 max_upload_bytes: int = wire.DEFAULT_MAX_BYTES,
                 clock: Callable[[], float] = time.time, identity: Mapping[str, Any] | None = None,
                 resume: str | None = None, new_run: str | None = None,
                 efficiency: Mapping[str, Any] | None = None) -> None:
        """``efficiency``: one process's training rate on the same network
        (:meth:`fedhub.efficiency.Reference.describe`), for each round's efficiency figure.

        ValueError (one line) for settings that cannot work, such as ``min_devices`` below
        what the strategy needs in a round, or a run that cannot go on (:mod:`.runs`).

        Which run it drives is decided once, here (:func:`.runs.choose`): the state directory's
        current run if it is unfinished and has these settings, ``resume``'s, or a new one
        (``new_run``: its name); :attr:`run_message` is the line that says which and why.
        ``identity``: what the run's settings hold besides the federation's (the data set)."""
        config.validate()
        strategy = strategy or config.make_strategy()
        config.check_strategy(strategy)
        self.max_upload_bytes = max_upload_bytes
        self._storage = storage
        self._devices = devices
        self._clock = clock
        self._identity = dict(identity or {})
        choice = runs.choose(storage, config, self._identity, resume=resume, new_run=new_run, now=clock())
        config.rounds = choice.rounds
        self.run_message = choice.message
        self._current = self._run_ref()
        self._evaluate = evaluate
        self._evaluations = Evaluations(evaluate) if evaluate is not None else None
        self._efficiency = dict(efficiency) if efficiency else None
        self._initial = {k: np.array(v) for k, v in initial_weights.items()}
        self.spec = wire.spec_of(self._initial)
        self._logs = DeviceLogs(storage, clock=clock)
        self._relays = RelayRegistry(storage, devices.check_enroll_secret, clock=clock)
        self._hooks = RoundHooks()
        self._state = RoundState(storage)
        self._cond = self._state.cond
        self._run_listeners: list[Callable[[dict[str, Any]], None]] = []
        self._switching = threading.Lock()  # one run switch at a time
        self._started = False
        self._use(config, strategy)
        # Long polls allowed to wait at once (None: no limit); the HTTP server sets it below
        # its worker thread count, as each waiting poll holds a worker thread.
        self.max_waiters: int | None = None
        self._waiters = 0
        self._recover()

    def _use(self, config: FederationConfig, strategy: Strategy) -> None:
        """Drive the storage's current run with ``config`` and ``strategy``: its compression, its
        history and a round policy of its own (the policy's thread is not started here)."""
        self.config = config
        self.strategy = strategy
        self.compression = compression.parse(config.training.compression)
        self._downlink = compression.Downlink(self.compression) if config.compress_downlink else None
        self._history = RoundHistory(self._storage, self._logs)
        parts = {"storage": self._storage, "devices": self._devices, "history": self._history,
                 "hooks": self._hooks, "strategy": strategy, "config": config, "evaluate": self._evaluate,
                 "evaluations": self._evaluations, "efficiency": self._efficiency, "clock": self._clock}
        policies: dict[str, Callable[[], RoundPolicy]] = {
            "sync": lambda: SyncRounds(self._state, reference=self._reference, **parts),
            "async": lambda: AsyncRounds(self._state, spec=self.spec, **parts)}
        self._policy = policies[config.mode]()

    # start-up -------------------------------------------------------------
    def _recover(self) -> None:
        dropped = self._storage.discard_unfinished_rounds()
        if dropped:
            log.warning("discarded unfinished round(s) %s from before the restart; they run again",
                        dropped)
        last = self._storage.last_complete_round()
        with self._cond:
            if last is None:
                self._install_initial()
            else:
                weights = self._storage.read_checkpoint(last["number"])
                if wire.spec_of(weights) != self.spec:
                    raise ValueError(
                        f"checkpoint of round {last['number']} does not match the configured model; "
                        "start a new run beside it (--new-run NAME), or use another state directory")
                self._state.install(last["number"], weights)
                self._restore_strategy_state(last["number"])
                log.info("resuming after completed round %d", last["number"])
            default = "running" if self.config.start else "idle"
            status = self._storage.run_status() or default
            if status == "stopped":
                status = "idle"
            if self.config.start and status in ("idle", "paused"):
                status = "running"
            self._state.set_status(status)
            spent = (self.strategy.privacy() or {}).get("budget_spent")
            if status == "finished" and spent:  # why the run ended, after a restart too
                self._state.reason = spent
            self._policy.recover()
            self._policy.check_finished()

    def _restore_strategy_state(self, number: int) -> None:
        saved = self._storage.read_strategy_state(number)
        self._check_privacy(number, saved[1] if saved is not None else {})
        if saved is None:
            return
        state, saved_by = saved
        private = self.strategy.privacy_settings() is not None
        if saved_by.get("name") != self.strategy.name:
            log.warning("the strategy state saved with round %d is %s's; %s starts afresh",
                        number, saved_by.get("name"), self.strategy.name)
            return
        try:
            self.strategy.load_state(state)
            self.strategy.begin(self._state.weights).close()  # its shapes fit the model
        except ValueError as exc:
            if private:  # the accountant's state is the epsilon already spent: never forgotten
                raise RunMismatch(
                    f"the strategy state saved with round {number} is unusable ({exc}); it holds "
                    f"the privacy accountant of this run, which cannot go on without it. "
                    f"{NEW_RUN}") from None
            log.warning("the strategy state saved with round %d is unusable (%s); %s starts afresh",
                        number, exc, self.strategy.name)
            self.strategy.reset()
            return
        log.info("restored %s's state from round %d", self.strategy.name, number)

    def _check_privacy(self, number: int, saved_by: Mapping[str, Any]) -> None:
        """Refuse (RunMismatch) to continue a run that used differential privacy without the same
        strategy, the same DP settings and its accountant's state: it would go on with the
        epsilon it spent forgotten, or with noise its guarantee was not computed for."""
        entries = self._history.entries()
        recorded = entries[-1].get("privacy") if entries and entries[-1]["round"] == number else None
        settings = saved_by.get("privacy")
        name = str(saved_by.get("name") or "")
        if not (settings or name.startswith("dp-") or recorded):
            return  # the run used no DP
        now = self.strategy.privacy_settings()
        if name == self.strategy.name and settings in (None, now):  # None: saved before settings were
            return
        mode = (recorded or {}).get("mode") or name[3:].split("(")[0]
        used = f"{name or 'dp'}: {describe_dp(settings or {'mode': mode})}"
        if not saved_by:
            why = f"the privacy accountant's state saved with round {number} is missing"
        else:
            have = f"{self.strategy.name}: {describe_dp(now)}" if now else f"{self.strategy.name}, no --dp"
            why = f"this server has {have}"
        raise RunMismatch(f"the run in this state directory used differential privacy for {number} "
                          f"round(s) ({used}), but {why}; it cannot go on without the epsilon it spent "
                          f"and the settings it was computed for. {NEW_RUN}")

    def _install_initial(self) -> None:
        self._storage.remove_checkpoints()
        path = self._storage.write_checkpoint(0, self._initial)
        now = self._clock()
        with self._storage.transaction():
            self._storage.insert_round(0, started_at=now, selected=[], config={}, status="complete")
            self._storage.complete_round(0, closed_at=now, num_updates=0, num_examples=0,
                                         test_loss=None, test_accuracy=None, checkpoint=str(path))
        self._state.install(0, {k: v.copy() for k, v in self._initial.items()})

    def start(self) -> None:
        """Start the driver thread (idempotent)."""
        self._started = True
        self._policy.start()

    def stop(self) -> None:
        """Stop the driver, let the queued round hooks run, persist last-seen times."""
        self._started = False  # a run switched to from now on does not start its driver
        self._policy.stop()
        self._hooks.stop()
        self._devices.flush()

    def add_run_listener(self, listener: Callable[[dict[str, Any]], None]) -> None:
        """Call ``listener(run)`` (:meth:`run`'s answer) when another run becomes current (a
        reset, ``POST /api/runs``): what follows the run (the history CSV, the predictor, a
        tracker) starts again with it."""
        self._run_listeners.append(listener)

    def add_hook(self, hook: RoundHook) -> None:
        """Call ``hook(history_entry, global_weights)`` after each completed round, on the
        hooks' own thread (the next round does not wait for it)."""
        self._hooks.add(hook)

    # devices --------------------------------------------------------------
    def check_enroll_secret(self, enroll_secret: str | None) -> None:
        """Refuse a missing or wrong enrollment secret (checked before the body is read)."""
        self._devices.check_enroll_secret(enroll_secret)

    def register(self, name: object, enroll_secret: str | None, *, num_examples: object = None,
                 auto_activate: object = None, validation: object = None, attack: object = None,
                 token: str | None = None, admin: bool = False) -> dict[str, Any]:
        """Enroll a device; see :meth:`DeviceRegistry.register`."""
        return self._devices.register(name, enroll_secret, num_examples=num_examples,
                                      auto_activate=auto_activate, validation=validation,
                                      attack=attack, token=token, admin=admin)

    def set_efficiency(self, reference: Mapping[str, Any] | None) -> None:
        """One process's training rate (:meth:`fedhub.efficiency.Reference.describe`) for the
        rounds published from now on: measured again when nothing else runs beside it."""
        with self._cond:
            self._efficiency = dict(reference) if reference else None
            self._policy.use_efficiency(self._efficiency)

    def authenticate(self, token: str | None) -> str:
        """The device a bearer token belongs to."""
        return self._devices.authenticate(token)

    def register_relay(self, name: object, enroll_secret: str | None, *, token: str | None = None,
                       admin: bool = False) -> dict[str, Any]:
        """Enroll a relay; see :meth:`.relays.RelayRegistry.register`."""
        return self._relays.register(name, enroll_secret, token=token, admin=admin)

    def authenticate_relay(self, token: str | None, name: str) -> str:
        return self._relays.authenticate(token, name)

    def report_validation(self, name: str, raw: object, *, attack: object = None,
                          declares_attack: bool = False) -> dict[str, Any]:
        """A device's new data validation report (with, when ``declares_attack``, the attack it
        declares, as at enrollment); invalid data drops it from the open round at once."""
        report = check_report(raw)
        if declares_attack:
            self._devices.declare_attack(name, attack)
        state = self._devices.lifecycle.report(name, report)
        if not report["ok"]:
            with self._cond:
                if self._state.drop(name):
                    self._devices.set_activity(name, "idle")
        return {"name": name, "lifecycle": state["state"], "lifecycle_reason": state["reason"]}

    def signal(self, name: str) -> dict[str, Any]:
        """What a training device must know now: whether to stop its local training."""
        return self._devices.lifecycle.signal(name)

    def global_model(self) -> tuple[int, bytes]:
        """The current global model version and its safetensors bytes (encoded once per round)."""
        with self._cond:
            return self._state.version, self._state.encoded

    def model_download(self, have: Container[str] = ()) -> tuple[int, bytes | None, str]:
        """The global model version, the bytes to send a device holding the ETags ``have`` (None:
        it holds this version already, a 304), and their ETag: with ``compress_downlink``, only
        the change when it holds the previous version. The bytes sent count in the round's traffic."""
        with self._cond:
            if self._downlink is None:
                # the run in it too: version numbers start again in each run, and a device's copy
                # of another run's version 3 is not this run's
                etag = f"v{self._state.version}-{self._current['id']:x}"
                body = self._state.encoded
            else:
                self._sync_downlink()
                etag = self._downlink.etag(self._state.version)
                body = None if etag in have else self._downlink.body_for(have)
            if etag in have:
                return self._state.version, None, etag
            self._state.bytes_down += len(body)
            return self._state.version, body, etag

    def _sync_downlink(self) -> None:
        if self._downlink is not None and self._downlink.version != self._state.version:
            self._downlink.install(self._state.version, self._state.weights)

    def _reference(self) -> Weights:
        """What devices trained from, that compressed deltas are added to (under the lock)."""
        self._sync_downlink()
        return self._downlink.model if self._downlink is not None else self._state.weights

    def global_weights(self) -> tuple[int, Weights]:
        with self._cond:
            return self._state.version, self._state.weights

    def round_weights(self, number: int | None = None) -> tuple[int, Weights]:
        """The global weights of completed round ``number`` (None: the current global model)."""
        if number is None:
            return self.global_weights()
        self._completed_round(number)
        return number, self._checkpoint(number)

    def _completed_round(self, number: int) -> dict[str, Any]:
        row = self._storage.get_round(number) if 0 <= number <= wire.MAX_INTEGER else None
        if row is None:
            raise NotFound(f"no round {number}", "round")
        if row["status"] != "complete":
            raise Conflict(f"round {number} is not complete yet", "round")
        return row

    def _checkpoint(self, number: int) -> Weights:
        try:
            return self._storage.read_checkpoint(number)
        except FileNotFoundError:  # a reset removed it since its row was read
            raise NotFound(f"no round {number}", "round") from None

    def next_task(self, name: str, wait: float = 0.0) -> dict[str, Any]:
        """What the device should do now; waits up to ``wait`` seconds for something to do.

        A waiting poll holds one of the HTTP server's worker threads. With more idle devices
        than threads, their polls would take every thread and the downloads and uploads of
        the devices that are training would queue behind them for minutes. So at most
        ``max_waiters`` polls wait at once; beyond that the answer "wait" comes at once with
        ``retry_in``, the seconds the device should wait on its side before asking again.
        """
        end = time.monotonic() + max(0.0, wait)
        refusal = self._devices.lifecycle.refusal(name)  # invalid data: no tasks at all
        if refusal is not None:
            raise refusal
        self._devices.touch(name)
        with self._cond:
            crowded = wait > 0 and self.max_waiters is not None and self._waiters >= self.max_waiters
            if crowded:
                end = time.monotonic()
            while True:
                active = self._devices.is_active(name)
                task = self._policy.task_for(name, active)
                remaining = end - time.monotonic()
                if task["action"] != "wait" or remaining <= 0 or self._policy.stopped:
                    if task["action"] == "train":
                        self._devices.set_activity(name, "training")
                        self._devices.lifecycle.set(name, "training", round_number=task["round"])
                    elif task["action"] == "finish":
                        self._devices.lifecycle.set(name, "finished", reason="the run is over",
                                                    round_number=self._state.version)
                    elif crowded:
                        task["retry_in"] = round(min(wait, RETRY_IN), 2)
                    return task
                self._wait_as_long_poll(remaining)
                self._devices.touch(name)

    def _wait_as_long_poll(self, remaining: float) -> None:
        """Wait (under the lock) for a change, at most a second at a time, counted among the
        ``max_waiters`` long polls."""
        self._waiters += 1
        try:
            self._cond.wait(min(remaining, 1.0))
        finally:
            self._waiters -= 1

    def submit(self, name: str, round_number: int, body: bytes,
               upload_id: str | None = None) -> dict[str, Any]:
        """Validate an update and fold it in: the one intake of every mode. Bounds, the body's
        digest, one idempotency lookup, decoding (compressed or not), admission under the lock
        (the round policy says where it goes, or why not), aggregation outside it, one
        transaction, the answer. Idempotent per ``upload_id``: the same key with the same bytes
        is acknowledged once more, with other bytes refused. A refused update changes nothing,
        not even the device's activity."""
        policy = self._policy
        with self._devices.busy(name, "uploading"):
            if not 0 <= round_number <= wire.MAX_INTEGER:  # no such round; too large even to look up
                raise Conflict(f"round {round_number} is not open", "round")
            if upload_id is not None and len(upload_id) > MAX_IDEMPOTENCY_KEY:
                raise InvalidInput(f"Idempotency-Key must be at most {MAX_IDEMPOTENCY_KEY} characters",
                                   "Idempotency-Key")
            policy.check_upload(name, round_number)
            digest = hashlib.sha256(body).hexdigest() if upload_id else None
            done = policy.duplicate(name, round_number, upload_id, digest)
            if done is not None:
                return done
            self._devices.check_admitted(name)
            weights, meta = compression.decode_update(body, self.spec, self.compression,
                                                      round_number=round_number,
                                                      max_bytes=self.max_upload_bytes)
            return self._intake(
                lambda: policy.duplicate(name, round_number, upload_id, digest)
                or policy.admit(name, round_number, meta, body, upload_id, digest),
                weights, [(name, meta.num_examples)], len(body))

    def submit_partial(self, relay: str, round_number: int, body: bytes, key: str | None) -> dict[str, Any]:
        """A relay's partial sum of its devices' updates (:mod:`.partials`): every device counted
        and recorded as if it had sent its own, through the same intake as an update. Idempotent
        per ``key``, which it needs; refused whole (nothing counted) if any device cannot report
        now, naming it."""
        policy = self._policy
        if not key or len(key) > MAX_IDEMPOTENCY_KEY:
            raise InvalidInput(f"a partial sum needs an Idempotency-Key header of 1-{MAX_IDEMPOTENCY_KEY} "
                               "characters", "Idempotency-Key")
        if not 0 <= round_number <= wire.MAX_INTEGER:
            raise Conflict(f"round {round_number} is not open", "round")
        with self._cond:
            why = policy.takes_partial_sums()
        if why is not None:
            raise Conflict(f"round {round_number} takes no partial sums: {why}; a relay passes each "
                           "update through", "round")
        digest = hashlib.sha256(body).hexdigest()
        partial = partials.decode(body, self.spec, max_bytes=2 * self.max_upload_bytes)
        if partial.round != round_number:
            raise InvalidInput(f"metadata round {partial.round} does not match the URL's round "
                               f"{round_number}", "round")
        done = policy.partial_duplicate(partial, key, digest)
        if done is not None:
            return done
        self._vouch([(s.name, s.token) for s in partial.shares])
        return self._intake(
            lambda: policy.partial_duplicate(partial, key, digest)
            or policy.admit_partial(relay, partial, key, digest),
            partial.sums, [(s.name, s.num_examples) for s in partial.shares], len(body))

    def _vouch(self, devices: list[tuple[str, str]]) -> None:
        """A relay speaks for each device (name, token) with the device's own token, and only for
        a device that may report now; the error names ``devices[i]``."""
        for i, (name, token) in enumerate(devices):
            self._devices.vouched(name, token, f"devices[{i}]")
            refusal = self._devices.refusal(name)
            if refusal is not None:
                raise Conflict(refusal.message, f"devices[{i}].name")

    def submit_masked_sum(self, relay: str, round_number: int, body: bytes) -> dict[str, Any]:
        """A relay's sum of its devices' masked updates in a secure round (safetensors, its
        devices with their tokens in the metadata; :class:`.secagg.MaskedSum`): each device counted
        as if it had sent its own masked update. The same sum again is a duplicate; a sum naming a
        device already in another is refused whole, naming it, and changes nothing."""
        if not 0 <= round_number <= wire.MAX_INTEGER:
            raise Conflict(f"round {round_number} is not open", "round")
        answer = self._policy.secure_sum(relay, round_number, body, self._vouch)
        with self._cond:
            self._state.bytes_up += len(body)
        return answer

    def _intake(self, admit: Callable[[], Upload | dict[str, Any]], weights: Mapping[str, np.ndarray],
                senders: list[tuple[str, int]], size: int) -> dict[str, Any]:
        """The steps after decoding, for an update and a partial sum alike: admission under the
        lock (or the answer to a retry), folding in outside it, one transaction, the answer."""
        policy = self._policy
        with self._cond:
            upload = admit()
        if isinstance(upload, dict):  # a retry of what is already in
            return upload
        try:  # outside the lock: the aggregator has its own, and folding in takes O(model) time
            policy.take(upload, weights)
        except BaseException:
            with self._cond:
                policy.release(upload, None)
                self._cond.notify_all()
            raise
        try:
            with self._storage.transaction(durable=policy.durable_uploads):
                policy.record(upload)
                for name, num_examples in senders:
                    self._devices.set_examples(name, num_examples)
                    self._devices.lifecycle.set(name, "waiting", reason=upload.sent,
                                                round_number=upload.round_number)
        except BaseException as exc:  # folded in but not recorded: what it went into cannot be trusted
            with self._cond:
                policy.release(upload, f"the update of {upload.device} could not be recorded: {exc}")
                self._cond.notify_all()
            raise
        with self._cond:
            answer = policy.acknowledge(upload)
            self._state.bytes_up += size
            for name, _ in senders:
                self._devices.set_activity(name, "idle")
            self._cond.notify_all()
            return answer

    def secagg_message(self, name: str, round_number: int, body: bytes) -> dict[str, Any]:
        """A device's answer to the open secure-aggregation stage: its keys, its encrypted shares,
        its masked update (safetensors) or the share keys that unmask the sum. A refused message
        (malformed, replayed, another device's key) changes nothing and the round goes on."""
        answer = self._policy.secure_message(name, round_number, body)
        with self._cond:
            self._state.bytes_up += len(body)
        return answer

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
            r = self._state.open
            if r is None or r.number != round_number or not r.expects(name):
                raise Conflict(f"device {name!r} is not training in round {round_number}", "round")
            r.progress[name] = {"done": done, "total": total}
            return {"round": round_number, "done": done, "total": total}

    def report_evaluation(self, name: str, raw: object) -> dict[str, Any]:
        """Device ``name``'s evaluation, on its held-out data, of the global model it trains from
        (and of its personal model): kept for the next published model's history entry. Only
        shown and summarized: it never changes a model."""
        return self._keep_evaluation(name, federated_eval.parse_report(raw))

    def _keep_evaluation(self, name: str, report: dict[str, Any]) -> dict[str, Any]:
        """Keep a checked report (:meth:`report_evaluation`); Conflict when it was not asked for."""
        with self._cond:
            self._policy.evaluation(name, report)
        return {"round": report["round"], "accepted": True}

    def interrupted(self, name: str, round_number: object, detail: object = None) -> dict[str, Any]:
        """The device confirms it stopped training ``round_number``: at most the next round
        after the last completed one (open, or stopped before completing)."""
        with self._cond:
            state = self._devices.lifecycle.interrupted(name, round_number, detail,
                                                        latest=self._state.version + 1)
            r = self._state.open
            if r is not None and r.number == round_number:
                self._state.drop(name)
            self._devices.set_activity(name, "idle")
            return {"name": name, "lifecycle": state["state"], "lifecycle_reason": state["reason"]}

    def leave(self, name: str) -> None:
        """The device says goodbye: it is no longer waited for."""
        with self._cond:
            self._devices.leave(name)
            self._state.drop(name)

    def relay_tasks(self, relay: str, raw: object) -> dict[str, Any]:
        """The tasks of a relay's devices (``{"devices": [{"name", "token"}]}``), each what
        :meth:`next_task` answers the device without waiting, or the refusal its own request
        would get (``error``): a pool worker asks for its cohort's tasks in one request."""
        answers: list[dict[str, Any]] = []
        for where, who, _ in parse_devices(raw):
            try:
                self._devices.vouched(who.name, who.token, where)
                answers.append({"name": who.name, "task": self.next_task(who.name)})
            except FedHubError as exc:
                answers.append({"name": who.name, "error": exc.to_dict()})
        return {"relay": relay, "tasks": answers}

    def relay_reports(self, relay: str, raw: object) -> dict[str, Any]:
        """A relay's reports for its devices (:func:`.relays.parse_reports`), in one request and
        one transaction: each device's evaluation as :meth:`report_evaluation` takes it, its log
        lines as :meth:`add_logs` does. Checked whole first (a malformed part, or a token that is
        not its device's, refuses all of it); an evaluation the round did not ask for is answered
        ``accepted: false`` with why, as the device's own request would be refused (409)."""
        reports = parse_reports(raw, self._clock())
        for i, item in enumerate(reports):
            self._devices.vouched(item.name, item.token, f"devices[{i}]")
        answers: list[dict[str, Any]] = []
        for item in reports:
            answer: dict[str, Any] = {"name": item.name}
            if item.evaluation is not None:
                try:
                    answer["evaluation"] = self._keep_evaluation(item.name, item.evaluation)
                except Conflict as exc:
                    answer["evaluation"] = {"round": item.evaluation["round"], "accepted": False,
                                            "message": exc.message}
            answers.append(answer)
        with self._storage.transaction():  # every device's lines in one commit
            for item in reports:
                if item.logs:
                    self._logs.keep(item.name, item.logs)
        for item, answer in zip(reports, answers, strict=True):
            if item.logs:
                answer["logs"] = self._log_effects(item.name, item.logs)
        return {"relay": relay, "devices": answers}

    def add_logs(self, name: str, raw: object) -> dict[str, Any]:
        """Store a device's log lines; an ERROR naming the open round drops the device from it,
        one naming a completed round marks its update failed in the history."""
        return self._log_effects(name, self._logs.add(name, raw))

    def _log_effects(self, name: str, entries: list[dict[str, Any]]) -> dict[str, Any]:
        """What stored log lines do to the rounds: see :meth:`add_logs`."""
        now = self._clock()
        dropped = []
        with self._cond:
            for e in entries:
                if e["level"] != "ERROR" or e["round"] is None:
                    continue
                r = self._state.open
                if r is not None and e["round"] == r.number and self._state.drop(name):
                    self._devices.set_activity(name, "idle")
                    self._devices.lifecycle.set(name, "waiting", reason=f"round {r.number} failed: "
                                                f"{e['message'][:200]}", round_number=r.number)
                    dropped.append(r.number)
                elif e["round"] <= self._state.version:
                    self._policy.late_error({**e, "device": name, "received_at": now})
        return {"stored": len(entries), "dropped_from_rounds": dropped}

    # admin ----------------------------------------------------------------
    def set_active(self, name: str, active: bool) -> dict[str, Any]:
        with self._cond:
            self._devices.set_active(name, active)
            if not active:
                self._state.drop(name)
            self._cond.notify_all()
        return {"name": name, "active": active}

    def interrupt(self, name: str) -> dict[str, Any]:
        """Admin: stop one device's local training; the round goes on without it at once."""
        self._devices.require(name)
        with self._cond:
            r = self._state.open
            if r is None or not r.expects(name):
                raise Conflict(f"device {name!r} is not training in an open round", "name")
            self._devices.lifecycle.request_interrupt(name, r.number)
            self._state.drop(name)
            self._devices.set_activity(name, "idle")
            return {"name": name, "round": r.number, "interrupted": True}

    def start_training(self, rounds: object = None) -> dict[str, Any]:
        with self._cond:
            if rounds is not None:
                if (not isinstance(rounds, int) or isinstance(rounds, bool)
                        or not 0 <= rounds <= wire.MAX_INTEGER):
                    raise InvalidInput(f"rounds must be an integer from 0 to {wire.MAX_INTEGER}", "rounds")
                self.config.rounds = rounds
                run = self._storage.get_run(self._current["id"])
                if run is not None and run["settings"] is not None:  # a restart goes on with them
                    self._storage.set_run_settings({**run["settings"], "rounds": rounds})
            if self.config.rounds and self._state.version >= self.config.rounds:
                raise Conflict(
                    f"the run is over ({plural(self.config.rounds, 'round')} done); "
                    "start with a larger 'rounds' or reset", "rounds")
            spent = (self.strategy.privacy() or {}).get("budget_spent")
            if spent:  # no round fits the budget: running again would only finish again
                raise Conflict(f"the privacy budget is spent, so the run is over ({spent}); reset "
                               "to start a new run", "dp_max_epsilon")
            self._state.set_status("running")
            return self.status()

    def pause(self) -> dict[str, Any]:
        """No new round opens; a round in progress still completes."""
        with self._cond:
            if self._state.status == "running":
                self._state.set_status("paused")
            return self.status()

    def reset(self) -> dict[str, Any]:
        """A new run with the same settings, from the initial model, idle (devices stay enrolled
        and get its tasks when it starts). The run before it is kept, with everything it
        recorded; deleting a run is :meth:`delete_run`."""
        self.start_run()
        return self.status()

    def start_run(self, name: object = None, settings: object = None) -> dict[str, Any]:
        """Admin: make a new run current, with the current run's settings and ``settings`` over
        them (the training's: :data:`.runs.RUN_SETTINGS`, checked as the flags are), idle. A refusal
        (InvalidInput naming the setting, Conflict for a name in use) changes nothing. The run
        before it stays, ``stopped`` if it was not finished. Devices stay enrolled and get the new
        run's tasks; an open round is discarded."""
        with self._switching:
            config = runs.configure(self.config, settings)
            strategy = config.make_strategy()
            if name is not None:
                name = runs.check_name(name)
                taken = self._storage.find_run(name)
                if taken is not None and taken["name"] == name:
                    raise Conflict(f"a run named {name!r} exists already (run {taken['id']})", "name")
            old, previous = self._policy, self._storage.get_run(self._storage.run_id)
            old.stop()  # its thread ends its turn; a round being aggregated is published first
            try:
                with self._cond:
                    while self._state.busy or old.uploading:
                        self._cond.wait(0.5)
                    old.reset()
                    self._storage.discard_pending_async_updates()  # their files went with the buffers
                    now = self._clock()
                    settings_now = runs.run_settings(config, self._identity)
                    run_id = self._storage.create_run(name, settings_now, label=runs.label(settings_now),
                                                      now=now)
                    self._storage.use_run(run_id)
                    self._install_initial()
                    if previous["status"] not in ("finished", "stopped"):
                        self._storage.set_run_status("stopped", now=now, run_id=previous["id"])
                    self._current = self._run_ref()
                    self._use(config, strategy)
                    self._devices.set_timeout(config.device_timeout)
                    s = self._state
                    s.open, s.closing, s.last_error, s.reason, s.retry_at = None, None, None, "", 0.0
                    s.set_status("idle")
            except BaseException:  # a full disk: the run before it goes on as it was
                log.exception("a new run could not be started")
                with self._cond:
                    self._storage.use_run(previous["id"])
                    self._use(self.config, self.strategy)
                    last = self._storage.last_complete_round()
                    if last is not None:
                        self._state.install(last["number"], self._storage.read_checkpoint(last["number"]))
                    self._policy.recover()
                raise
            finally:
                if self._started:
                    self._policy.start()
            run = self.run()
            log.info("started run %d %r; %s is kept", run["id"], run["name"], runs.title(previous))
        for listener in self._run_listeners:
            try:
                listener(run)
            except Exception:  # a tracker's failure must not undo the switch
                log.exception("a run listener failed")
        return run

    def delete_run(self, key: object) -> dict[str, Any]:
        """Admin: remove a run that is not the current one, its rows and its folder."""
        run = self._find_run(key)
        with self._switching:
            if run["id"] == self._storage.run_id:
                raise Conflict(f"run {run['id']} is the current run; start another run first", "id")
            self._storage.delete_run(run["id"])
        return {"deleted": run["id"], "name": run["name"]}

    def _find_run(self, key: object) -> dict[str, Any]:
        if isinstance(key, bool) or not isinstance(key, int | str) or (
                isinstance(key, str) and not 0 < len(key) <= runs.MAX_NAME):
            raise InvalidInput("a run is named by its id or its name", "id")
        run = self._storage.find_run(key)
        if run is None:
            raise NotFound(f"no run {key!r}", "id")
        return run

    def query_logs(self, *, device: str | None = None, level: str | None = None,
                   round_number: int | None = None, after: int = 0, limit: int = 500) -> dict[str, Any]:
        """Stored log lines, oldest first, from id ``after`` on, and the id to ask after next."""
        logs = self._logs.query(device=device, level=level, round_number=round_number, after=after,
                                limit=limit)
        return {"logs": logs, "next_after": logs[-1]["id"] if logs else after}

    def test_evaluation(self, number: int | None = None) -> tuple[int, dict[str, Any]]:
        """A completed round's global model (None: the current one) on the server's test set.

        What the per-round evaluation gives (for the Keras global model: loss, accuracy,
        per-class accuracy and the confusion matrix), made once per round and outside the
        engine's lock: the round's own evaluation is kept when it closes.
        """
        if number is None:
            with self._cond:
                number = self._state.version
        row = self._completed_round(number)
        metrics = {}
        if self._evaluations is not None:  # keyed by when it closed: numbers repeat after a reset
            metrics = self._evaluations.get((number, row["closed_at"]),
                                            lambda: self._checkpoint(number))
        if not metrics:
            raise Conflict("this server has no test set to evaluate its models on", "round")
        return number, metrics

    # reading --------------------------------------------------------------
    def status(self, wait: float = 0.0, since: object = None) -> dict[str, Any]:
        """The run, the open round, the strategy and how many devices are in each state.

        ``revision`` changes whenever the run's status, the model version, the open round or
        its stage does. Given back as ``since`` with ``wait``, the answer waits up to ``wait``
        seconds for such a change: a pool worker hosting hundreds of devices learns of the
        next round at once instead of at its next poll. These waits count among the
        ``max_waiters`` long polls that tasks count in; beyond them the answer comes at once
        (and a device whose task poll finds no room waits on its side, as ever).
        """
        if since is not None and not (isinstance(since, str) and len(since) <= MAX_REVISION):
            raise InvalidInput(f"since must be a revision from a status answer (at most {MAX_REVISION} "
                               "characters)", "since")
        end = time.monotonic() + max(0.0, wait)
        with self._cond:
            while (since is not None and since == self._revision() and not self._policy.stopped
                   and (self.max_waiters is None or self._waiters < self.max_waiters)):
                remaining = end - time.monotonic()
                if remaining <= 0:
                    break
                self._wait_as_long_poll(remaining)
        counts = self._devices.counts()
        with self._cond:
            return {**self._state.view(), **self._policy.view(), "revision": self._revision(),
                    "run": dict(self._current),
                    "total_rounds": self.config.rounds,
                    "strategy": self.strategy.describe(), "privacy": self.strategy.privacy(),
                    "devices": counts,
                    "compression": {"uplink": str(self.compression),
                                    "downlink": self._downlink is not None},
                    "efficiency": self._efficiency}

    def _revision(self) -> str:
        """What :meth:`status` waits on (under the lock): the run's status, the model version,
        the open (or closing) round, and the policy's part (a secure stage, the async buffer)."""
        s = self._state
        r = s.open
        # Each attempt at a round has its own start: a round that runs again is news too.
        number = f"{r.number}@{r.started_at:.3f}" if r is not None else (
            f"{s.closing}c" if s.closing is not None else "")
        return f"{s.status}.{s.version}.{number}.{self._policy.revision()}"

    def list_devices(self) -> list[dict[str, Any]]:
        """Enrolled devices, their state, lifecycle and part in the latest round they were in."""
        return self.devices_page()["devices"]

    def devices_page(self, *, name: object = None, lifecycle: object = None, active: object = None,
                     offset: int = 0, limit: int | None = None) -> dict[str, Any]:
        """The devices :meth:`list_devices` shows, filtered (``name``: a part of the name;
        ``lifecycle``: a state; ``active``: true or false) and one page of them, with how many
        match: a dashboard of a thousand devices draws a page, not every row."""
        keep = device_filter(name, lifecycle, active)
        if not 0 <= offset <= wire.MAX_INTEGER:
            raise InvalidInput(f"offset must be from 0 to {wire.MAX_INTEGER}", "offset")
        if limit is not None and not 1 <= limit <= MAX_DEVICES_PAGE:
            raise InvalidInput(f"limit must be from 1 to {MAX_DEVICES_PAGE}", "limit")
        rows = [row for row in self._devices.list() if keep(row)]
        page = rows[offset:None if limit is None else offset + limit]
        latest = self._history.latest()
        for row in page:
            row["latest"] = latest.get(row["name"])
        return {"devices": page, "total": len(rows), "offset": offset, "limit": limit}

    def history(self) -> list[dict[str, Any]]:
        """Completed rounds, oldest first: test metrics, the strategy, and per device its metrics,
        what the strategy did with its update, and whether it failed."""
        return [e for e in self._history.entries() if e["round"] > 0]

    # runs -----------------------------------------------------------------
    @property
    def run_id(self) -> int | None:
        return self._storage.run_id

    @property
    def run_dir(self):
        """The current run's folder (its checkpoints under ``saved/``)."""
        return self._storage.run_dir

    def run(self, key: object = None) -> dict[str, Any]:
        """A run (None: the current one) as ``GET /api/runs/ID`` shows it: id, name, status,
        created_at, finished_at, completed_rounds, total_rounds, current, settings, and its
        history (the entries ``/api/history`` gives for the current run)."""
        run = self._storage.get_run(self._storage.run_id) if key is None else self._find_run(key)
        view = self._run_view(run)
        view["history"] = self.history() if view["current"] else self._storage.run_history(run["id"])
        return view

    def list_runs(self) -> dict[str, Any]:
        """Every run of the state directory, newest first (without their histories)."""
        return {"runs": [self._run_view(r) for r in self._storage.list_runs()]}

    def _run_ref(self) -> dict[str, Any]:
        """The current run's id and name, kept in memory: a status poll reads no row for them."""
        run = self._storage.get_run(self._storage.run_id)
        return {"id": run["id"], "name": run["name"]}

    def _run_view(self, run: Mapping[str, Any]) -> dict[str, Any]:
        current = run["id"] == self._storage.run_id
        settings = run["settings"] or {}
        if current:
            with self._cond:
                status, done, total = self._state.status, self._state.version, self.config.rounds
        else:
            status = run["status"]
            done = run.get("last_round")
            done = self._storage.last_round(run["id"]) if done is None else done
            total = settings.get("rounds")
        return {"id": run["id"], "name": run["name"], "status": status, "created_at": run["created_at"],
                "finished_at": run["finished_at"], "completed_rounds": done, "total_rounds": total,
                "current": current, "settings": settings}

    def round_failures(self) -> list[dict[str, Any]]:
        """The latest failed attempts at rounds (each ran again), with their reasons."""
        return self._history.failures()

