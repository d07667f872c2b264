"""Synchronous rounds: the round policy that opens, closes and fails rounds.

Each turn of the driver looks at the shared :class:`~.round_state.RoundState` under its lock
and decides; the slow parts run outside the lock: opening a round's aggregator
(:meth:`Strategy.begin`), aggregating (:meth:`RoundAggregator.result`) and publishing
(:meth:`.driver.DriverThread._publish`). A round closes when every selected device has
reported, or at its deadline with enough updates (the quorum, and at least what the
strategy needs); below that it is discarded and opened again. A round whose aggregation
fails (too few usable updates, a non-finite result) or cannot be saved is recorded as
failed, with its reason, and runs again; the driver never dies of it. Secure aggregation is
a part of an open round: its stages (:mod:`.secure_round`) run before the round closes.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np

from . import compression, wire
from .driver import RETRY_AFTER_FAILURE, TICK, NotPublished, RoundPolicy, Upload, release_devices
from .errors import Conflict, RunOver
from .partials import Partial
from .plural import plural
from .round_state import OpenRound, RoundState
from .secagg import MaskedSum, SecAggError
from .secure_round import SecureRound, summary
from .strategies import AggregationError, RoundPlan

log = logging.getLogger("fedhub.rounds")

Weights = dict[str, np.ndarray]


def _senders(upload: Upload) -> list[tuple[str, int, Mapping[str, float]]]:
    """The devices an upload speaks for: its own device, or each device of a relay's partial sum."""
    shares = upload.extra.get("shares")
    if shares is None:
        return [(upload.device, upload.meta.num_examples, upload.meta.metrics)]
    return [(s.name, s.num_examples, s.metrics) for s in shares]


class SyncRounds(RoundPolicy):
    """Synchronous rounds: the driver opens a round for a selection of devices, each selected
    device uploads once, and the round closes when all are in or at its deadline."""

    def __init__(self, state: RoundState, *, reference: Callable[[], Weights], **parts: Any) -> None:
        """``reference()`` (lock held) is the model devices trained from, that a compressed
        update is a change to: the global model, or what a compressed download rebuilt."""
        super().__init__(state, **parts)
        if self._config.secagg is not None:  # a strategy given to the coordinator is checked here
            self._config.check_secagg(self._strategy)
        self._reference = reference
        self._compression = compression.parse(self._config.training.compression)
        self._previous_keys: frozenset[bytes] = frozenset()  # refused if a device advertises one again

    def task_for(self, name: str, active: bool) -> dict[str, Any]:
        return self._state.task_for(name, active)

    def view(self) -> dict[str, Any]:
        c = self._config.secagg
        return {"mode": "sync", "secure_aggregation": None if c is None else {
            "shares": c.shares, "threshold": c.threshold, "bits": c.bits, "clip_range": c.clip_range,
            "max_weight": c.max_weight, "quantization": c.quantization or None},
            "partial_sums": self.takes_partial_sums() is None,
            # what a relay sums for the open round: None, num_examples x weights; a number, the
            # devices' changes clipped to that L2 norm (central DP clips each at the server)
            "partial_clipping_norm": None if self._state.open is None
            else self._state.open.aggregator.partial_clipping_norm}

    def revision(self) -> str:
        r = self._state.open
        return r.secure.stage if r is not None and r.secure is not None else ""

    @property
    def uploading(self) -> bool:
        return self._state.open is not None and bool(self._state.open.uploading)

    def reset(self) -> None:
        r, self._state.open = self._state.open, None
        self._state.evaluations.clear()
        if r is not None:
            r.aggregator.close()
            release_devices(self._devices, r, f"round {r.number} was discarded: the run was reset")

    def evaluation(self, name: str, report: Mapping[str, Any]) -> None:
        """Kept when ``name`` was asked to evaluate in the open round; the same report again is
        a retry (accepted), another one a Conflict."""
        r, number = self._state.open, report["round"]
        if r is None or r.number != number or not r.config.get(name, {}).get("evaluate"):
            super().evaluation(name, report)
        kept = self._state.evaluations.get(name)
        if kept is not None and kept != report:
            raise Conflict(f"device {name!r} already sent another evaluation for round {number}", "round")
        self._state.evaluations[name] = report

    def late_error(self, entry: Mapping[str, Any]) -> None:
        self._history.late_error(entry)

    def secure_message(self, name: str, round_number: int, body: bytes) -> dict[str, Any]:
        """A device's answer to the open secure-aggregation stage (see the coordinator's)."""
        r = self._secure_round(round_number)
        with self._receiving(r, [(name, "round")]):  # outside the lock: a masked update takes O(model)
            stage = r.secure.receive(name, body)
        if stage == "masked":
            self._masked_in(r, [name])
        return {"accepted": True, "round": round_number, "stage": stage}

    def secure_sum(self, relay: str, round_number: int, body: bytes,
                   vouch: Callable[[list[tuple[str, str]]], None]) -> dict[str, Any]:
        """A relay's sum of its devices' masked updates (see the coordinator's): each device
        vouched for (``vouch``: its token, and that it may report) and counted as if it had sent
        its own; the same sum again is acknowledged as a duplicate."""
        r = self._secure_round(round_number)
        with contextlib.ExitStack() as receiving:
            def check(message: MaskedSum) -> None:
                vouch(list(zip(message.devices, message.tokens, strict=True)))
                receiving.enter_context(self._receiving(
                    r, [(name, f"devices[{i}].name") for i, name in enumerate(message.devices)]))

            devices, duplicate = r.secure.receive_sum(relay, body, check)
        self._masked_in(r, devices)
        return {"accepted": True, "duplicate": duplicate, "round": round_number, "stage": "masked",
                "devices": len(devices), "relay": relay}

    def _secure_round(self, round_number: int) -> OpenRound:
        with self._state.cond:
            r = self._state.open
            if r is None or r.number != round_number or r.secure is None:
                raise Conflict(f"round {round_number} is not an open secure-aggregation round", "round")
            return r

    @contextlib.contextmanager
    def _receiving(self, r: OpenRound, devices: list[tuple[str, str]]) -> Iterator[None]:
        """Devices of the round (each with the field that names it), one message each at a time."""
        with self._state.cond:
            for name, field in devices:
                if name not in r.selected:
                    raise Conflict(f"device {name!r} is not in round {r.number}", field)
                if name in r.uploading:
                    raise Conflict(f"device {name!r} is already sending a message", field)
            r.uploading.update(name for name, _ in devices)
        try:
            yield
        finally:
            with self._state.cond:
                r.uploading.difference_update(name for name, _ in devices)
                self._state.cond.notify_all()

    def _masked_in(self, r: OpenRound, devices: Iterable[str]) -> None:
        """The devices' masked updates are in the round's sum: they have reported."""
        with self._state.cond:
            for name in devices:
                r.reported[name] = None
                self._devices.set_activity(name, "idle")
                self._devices.lifecycle.set(name, "waiting", reason=f"masked update for round {r.number} "
                                            "sent", round_number=r.number)

    # intake ---------------------------------------------------------------
    def check_upload(self, name: str, round_number: int) -> None:
        if self._config.secagg is not None:  # every round is secure: the server sees only sums
            raise Conflict(
                f"round {round_number} is a secure-aggregation round: it takes only the secure "
                "stages' messages (keys, shares, the masked update, unmasking keys), never plain "
                "weights", "round")

    def takes_partial_sums(self) -> str | None:
        if self._config.secagg is not None:
            return "secure aggregation: a relay sums its devices' masked updates instead"
        if not self._strategy.sums_only:
            return f"strategy {self._strategy.name} needs each update"
        if self._compression.active:
            return "compressed updates are changes from the model each device trained from"
        return None

    def partial_duplicate(self, partial: Partial, key: str, digest: str) -> dict[str, Any] | None:
        row = self._storage.get_update(partial.round, partial.shares[0].name)
        if row is None or row["upload_id"] != key:
            return None
        if row["body_sha256"] != digest:
            raise Conflict(f"Idempotency-Key {key!r} was already used for round {partial.round} with a "
                           "different body; a retry must send the same bytes", "Idempotency-Key")
        return {"accepted": True, "duplicate": True, "round": partial.round, "devices": len(partial.shares)}

    def admit_partial(self, relay: str, partial: Partial, key: str, digest: str) -> Upload:
        why = self.takes_partial_sums()
        if why is not None:
            raise Conflict(f"round {partial.round} takes no partial sums: {why}; a relay passes each "
                           "update through", "round")
        r = self._open_round(partial.round)
        for i, share in enumerate(partial.shares):
            self._check_admissible(r, share.name, partial.round, f"devices[{i}].name")
        if partial.model_version != r.base_version:
            raise Conflict(f"partial sum was trained from model version {partial.model_version}, round "
                           f"{r.number} starts from version {r.base_version}", "model_version")
        wanted = r.aggregator.partial_clipping_norm
        if partial.clipping_norm != wanted:
            raise Conflict(f"round {r.number} takes " + ("sums of num_examples x weights" if wanted is None
                           else f"sums of changes clipped to L2 norm {wanted!r}")
                           + " (the status' partial_clipping_norm)", "clipping_norm")
        names = [share.name for share in partial.shares]
        r.uploading.update(names)
        meta = wire.Meta(round=r.number, model_version=partial.model_version,
                         num_examples=partial.total_examples)
        return Upload(relay, r.number, key, digest, meta, b"", into=r,
                      sent=f"update for round {r.number} sent through relay {relay}",
                      extra={"shares": partial.shares, "reference": None, "unclipped": partial.unclipped})

    def duplicate(self, name: str, round_number: int, upload_id: str | None,
                  digest: str | None) -> dict[str, Any] | None:
        if not upload_id:
            return None
        r = self._state.open  # read without the lock: a hint; the check under the lock decides
        if r is not None and r.number == round_number and name not in r.reported and name not in r.uploading:
            return None  # its first upload to the open round: no row to look up
        row = self._storage.get_update(round_number, name)
        if row is None or row["upload_id"] != upload_id:
            return None
        if row["body_sha256"] not in (None, digest):  # None: stored before digests were kept
            raise Conflict(f"Idempotency-Key {upload_id!r} was already used for round {round_number} "
                           "with a different body; a retry must send the same bytes", "Idempotency-Key")
        return {"accepted": True, "duplicate": True, "round": round_number}

    def _open_round(self, round_number: int) -> OpenRound:
        s = self._state
        r = s.open
        if r is None or r.number != round_number:
            current = r.number if r else s.closing
            state = "closed" if round_number <= s.version or (
                current is not None and round_number < current) else "not open"
            raise Conflict(f"round {round_number} is {state}", "round")
        return r

    @staticmethod
    def _check_admissible(r: OpenRound, name: str, round_number: int, field: str) -> None:
        if name in r.reported or name in r.uploading:
            raise Conflict(f"device {name!r} already reported for round {round_number}", field)
        if name not in r.selected:
            raise Conflict(f"device {name!r} was not selected for round {round_number}", field)

    def admit(self, name: str, round_number: int, meta: wire.Meta, body: bytes,
              upload_id: str | None, digest: str | None) -> Upload:
        r = self._open_round(round_number)
        self._check_admissible(r, name, round_number, "round")
        if meta.model_version != r.base_version:
            raise Conflict(
                f"update was trained from model version {meta.model_version}, "
                f"round {round_number} starts from version {r.base_version}", "model_version")
        r.uploading.add(name)  # the round does not close until this update is in or out
        reference = self._reference() if self._compression.active else None
        return Upload(name, round_number, upload_id, digest, meta, body, into=r,
                      sent=f"update for round {round_number} sent", extra={"reference": reference})

    def take(self, upload: Upload, weights: Mapping[str, Any]) -> None:
        if "shares" in upload.extra:
            upload.into.aggregator.add_partial(upload.extra["shares"], weights, upload.device,
                                               upload.extra["unclipped"])
            return
        reference = upload.extra["reference"]
        if reference is not None:  # a delta: the weights are the model it was trained from + it
            weights = compression.apply(reference, weights)
        meta = upload.meta
        upload.into.aggregator.add(upload.device, weights, meta.num_examples, meta.metrics)

    def record(self, upload: Upload) -> None:
        # One commit per upload, not waiting for the disk: a restart forgets an open round.
        for name, num_examples, metrics in _senders(upload):
            self._storage.add_update(upload.round_number, name, num_examples=num_examples,
                                     metrics=metrics, upload_id=upload.upload_id,
                                     now=self._clock(), body_sha256=upload.digest)

    def release(self, upload: Upload, broken: str | None) -> None:
        r: OpenRound = upload.into
        r.uploading.difference_update(name for name, _, _ in _senders(upload))
        if broken is not None:
            r.broken = f"round {r.number} failed: {broken}"

    def acknowledge(self, upload: Upload) -> dict[str, Any]:
        r: OpenRound = upload.into
        for name, _, _ in _senders(upload):
            r.uploading.discard(name)
            r.reported[name] = upload.upload_id
        return {"accepted": True, "duplicate": False, "round": r.number,
                "reported": len(r.reported), "selected": len(r.selected)}

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
            aggregator = self._strategy.begin(weights, spill_dir=self._storage.run_dir,
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
            evaluators = set(self._strategy.configure_evaluate(
                plan.devices, number, every=self._config.fed_eval_every,
                fraction=self._config.fed_eval_fraction, rng=self._rng))
            s.evaluations.clear()  # a failed attempt's reports: this one asks again
            started_at = self._clock()
            self._storage.insert_round(number, started_at=started_at, selected=list(plan.devices),
                                       config={**base, **self._strategy.task_config()})
            k = len(plan.devices)
            s.open = OpenRound(
                number=number, base_version=version, started_at=started_at,
                selected=set(plan.devices),
                needed=max(1, math.ceil(self._config.quorum * k), self._strategy.min_updates()),
                deadline=time.monotonic() + self._config.round_timeout,
                config={d: {**base, **plan.config.get(d, {}),
                            **({"evaluate": True} if d in evaluators else {})} for d in plan.devices},
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
