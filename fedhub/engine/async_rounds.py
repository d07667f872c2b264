"""Asynchronous rounds (FedBuff, Nguyen et al. 2022): the engine's part for ``mode="async"``.

Devices train continuously: every active device asked for a task gets the current global
model version at once. Each upload is the weights trained from some version ``b``; it is
assigned a slot in the buffer that will become version ``t`` (the lowest version still
short of ``buffer_size`` updates), its staleness is ``t - 1 - b`` (versions made since
``b``, counting the one in the making), and one older than ``max_staleness`` is refused
(409). The change from version ``b`` (a compressed upload is that change already), times
the staleness weight (:mod:`.fedbuff`), goes to the strategy's own round aggregator as an
update of the buffer, whose model starts at zero: the weighted mean of the changes is then
FedBuff's step, a server optimizer steps from it, central DP clips and noises the changes
and counts each version with the accountant, a robust strategy screens them. A full buffer
becomes the next version on this module's own thread (evaluated, checkpointed, recorded, by
the publisher synchronous rounds use), off the request lock.

Durable: an accepted update's body is written (atomically) under ``async/`` in the state
directory and its row committed before it is acknowledged; a version's checkpoint comes
first, then its round row, history entry and the "folded" mark of its updates in one
transaction. After a SIGKILL every acknowledged update not yet in a version is folded
in again from its body, with the staleness and weight it was given; none is lost, and
idempotency keys keep a retried upload from counting twice.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import compression, wire
from .config import FederationConfig
from .devices import DeviceRegistry
from .driver import RETRY_AFTER_FAILURE, Evaluate, NotPublished, RoundPolicy, Upload
from .errors import Conflict, RunOver
from .evaluations import Evaluations
from .fedbuff import staleness_weight
from .files import atomic_write_bytes, remove_stale_temporaries
from .history import RoundHistory, build_entry
from .round_hooks import RoundHooks
from .round_state import RoundState
from .storage import Storage
from .strategies import Strategy
from .strategies.base import (
    AggregationError,
    InvalidUpdate,
    RoundAggregator,
    cast_like,
    first_nonfinite,
)

log = logging.getLogger("fedhub.async")

Weights = dict[str, np.ndarray]

TICK = 0.25


@dataclass
class Buffer:
    """The updates that will become model version ``target``. ``reserved`` counts slots given
    to uploads, ``inflight`` those not yet committed; the sum has the committed ones."""

    target: int
    aggregator: RoundAggregator  # the strategy's, over each update's staleness-weighted change
    started_at: float
    reserved: int = 0
    inflight: int = 0
    updates: list[dict[str, Any]] = field(default_factory=list)
    devices: set[str] = field(default_factory=set)  # with a slot, committed or not
    lock: threading.Lock = field(default_factory=threading.Lock)
    broken: str | None = None  # why it cannot become a version (an update folded in, not recorded)

    def full(self, size: int) -> bool:
        return (self.reserved >= size and self.inflight == 0 and len(self.updates) >= size
                and self.broken is None)


class AsyncRounds(RoundPolicy):
    """Tasks, uploads and new model versions in asynchronous mode; the coordinator calls it
    with the round state's lock held for :meth:`task_for`, :meth:`view` and :meth:`reset`."""

    thread_name = "fedhub-async"
    durable_uploads = True

    def __init__(self, state: RoundState, *, storage: Storage, devices: DeviceRegistry,
                 history: RoundHistory, hooks: RoundHooks, strategy: Strategy,
                 config: FederationConfig, spec: wire.Spec, evaluate: Evaluate | None,
                 evaluations: Evaluations | None, efficiency: Mapping[str, Any] | None = None,
                 clock: Callable[[], float] = time.time) -> None:
        super().__init__(state, storage=storage, devices=devices, history=history, hooks=hooks,
                         strategy=strategy, config=config, evaluate=evaluate, evaluations=evaluations,
                         efficiency=efficiency, clock=clock)
        self._spec = spec
        self._compression = compression.parse(config.training.compression)
        self._dir = storage.run_dir / "async"
        self._buffers: dict[int, Buffer] = {}
        self._uploading: set[tuple[str, str]] = set()  # (device, idempotency key) being folded in
        self._versions: dict[int, Weights] = {}  # recent global models, the deltas' bases
        self._versions_lock = threading.Lock()

    # start-up -------------------------------------------------------------
    def recover(self) -> None:
        """Fold the acknowledged updates not yet in a model version in again (lock held)."""
        self._dir.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(self._dir, ".safetensors")
        self._buffers = {}
        rows = self._storage.pending_async_updates()
        for row in rows:
            if row["target"] <= self._state.version:  # cannot happen: folded with its version
                continue
            weights, _ = compression.decode_update(self._body_path(row).read_bytes(), self._spec,
                                                   self._compression, max_bytes=2**40)
            b = self._buffer(row["target"], row["received_at"])
            b.reserved += 1
            b.devices.add(row["device"])
            self._fold(b, row, self._change(weights, self._base(row["base_version"]), row["weight"]))
        kept = {row["body_path"] for row in rows}
        for path in self._dir.glob("*.safetensors"):
            if path.name not in kept:  # written, never committed: its upload was not acknowledged
                path.unlink(missing_ok=True)
        if rows:
            log.info("asynchronous mode: %d buffered update(s) folded in again after the restart",
                     len(rows))

    @property
    def uploading(self) -> bool:
        """An update is being written or folded in (a reset waits for it)."""
        return any(b.inflight for b in self._buffers.values())

    def reset(self) -> None:
        """Forget the buffers and their files (the rows go with the rounds); lock held."""
        self._state.evaluations.clear()
        for b in self._buffers.values():
            if not b.inflight:  # an upload still folding in finds it open; then it is dropped
                b.aggregator.close()
        self._buffers = {}
        with self._versions_lock:
            self._versions = {}
        for path in self._dir.glob("*.safetensors"):
            path.unlink(missing_ok=True)

    # tasks ----------------------------------------------------------------
    def task_for(self, name: str, active: bool) -> dict[str, Any]:
        """Train from the current version now, unless inactive, not started, paused or over."""
        s = self._state
        if not active:
            return {"action": "wait", "reason": "inactive: waiting for an admin to activate it"}
        if s.status == "finished":
            return {"action": "finish", "model_version": s.version}
        if s.status != "running":
            reason = "training has not been started" if s.status == "idle" else "training is paused"
            return {"action": "wait", "reason": reason}
        config = {**self._config.training.task(), **self._strategy.task_config()}
        if self._strategy.configure_evaluate((name,), s.version + 1, every=self._config.fed_eval_every,
                                             fraction=self._config.fed_eval_fraction, rng=self._rng):
            config["evaluate"] = True
        return {"action": "train", "mode": "async", "round": s.version, "model_version": s.version,
                "config": config, "deadline_in": self._config.round_timeout}

    def view(self) -> dict[str, Any]:
        """What ``GET /api/status`` adds: the settings and the buffer being filled."""
        target = self._target()
        filling = self._buffers.get(target)
        return {"mode": "async", "secure_aggregation": None, "buffer_size": self._config.buffer_size,
                "max_staleness": self._config.max_staleness, "partial_sums": False,
                "partial_clipping_norm": None,
                "buffer": {"target": target, "received": len(filling.updates) if filling else 0}}

    def revision(self) -> str:
        return str(self._target())

    def evaluation(self, name: str, report: Mapping[str, Any]) -> None:
        """Kept (a device's latest one) when it evaluated a version still taken as a base."""
        s = self._state
        if s.status not in ("running", "paused") or not (
                s.version - self._config.max_staleness <= report["round"] <= s.version):
            super().evaluation(name, report)
        s.evaluations[name] = report

    # intake ---------------------------------------------------------------
    def duplicate(self, name: str, round_number: int, upload_id: str | None,
                  digest: str | None) -> dict[str, Any] | None:
        if not upload_id:
            return None
        row = self._storage.get_async_update(name, upload_id)
        if row is None:
            return None
        if row["body_sha256"] != digest:
            raise Conflict(f"Idempotency-Key {upload_id!r} was already used with a different body; "
                           "a retry must send the same bytes", "Idempotency-Key")
        return {"accepted": True, "duplicate": True, "round": row["base_version"],
                "model_version": row["target"], "staleness": row["staleness"], "weight": row["weight"]}

    def admit(self, name: str, round_number: int, meta: wire.Meta, body: bytes,
              upload_id: str | None, digest: str | None) -> Upload:
        if upload_id and (name, upload_id) in self._uploading:
            raise Conflict(f"an upload with Idempotency-Key {upload_id!r} is in progress",
                           "Idempotency-Key")
        b, staleness = self._admit(name, meta.model_version)
        b.reserved += 1
        b.inflight += 1
        b.devices.add(name)
        if upload_id:
            self._uploading.add((name, upload_id))
        row = {"device": name, "target": b.target, "base_version": meta.model_version,
               "staleness": staleness,
               "weight": float(staleness_weight(staleness, self._config.staleness_exponent)),
               "num_examples": meta.num_examples, "metrics": meta.metrics,
               "body_path": f"{uuid.uuid4().hex}.safetensors", "received_at": self._clock()}
        return Upload(name, round_number, upload_id, digest, meta, body, into=b,
                      sent=f"update for model version {b.target} sent", extra=row)

    def take(self, upload: Upload, weights: Mapping[str, Any]) -> None:
        """The change, weighted by staleness, into the buffer; its body on disk first, so that
        a restart folds it in again once its row is committed."""
        row = upload.extra
        change = self._change(weights, self._base(row["base_version"]), row["weight"])
        bad = first_nonfinite(change)
        if bad is not None and not self._strategy.rejects_nonfinite:
            raise InvalidUpdate(f"tensor {bad!r} holds NaN or infinity", bad)
        atomic_write_bytes(self._body_path(row), upload.body)
        try:
            self._fold(upload.into, row, change)
        except BaseException:
            self._body_path(row).unlink(missing_ok=True)
            raise

    def record(self, upload: Upload) -> None:
        row = upload.extra
        self._storage.add_async_update(
            upload.device, target=row["target"], base_version=row["base_version"],
            staleness=row["staleness"], weight=row["weight"], num_examples=row["num_examples"],
            metrics=row["metrics"], upload_id=upload.upload_id, body_sha256=upload.digest,
            body_path=row["body_path"], now=row["received_at"])

    def release(self, upload: Upload, broken: str | None) -> None:
        b: Buffer = upload.into
        b.inflight -= 1
        self._uploading.discard((upload.device, upload.upload_id or ""))
        if broken is not None:  # folded in, not on record: the version is made again
            b.broken = f"model version {b.target} cannot be made: {broken}; its updates are dropped"
            return
        b.reserved -= 1
        b.devices.discard(upload.device)
        self._body_path(upload.extra).unlink(missing_ok=True)

    def acknowledge(self, upload: Upload) -> dict[str, Any]:
        b: Buffer = upload.into
        b.inflight -= 1
        self._uploading.discard((upload.device, upload.upload_id or ""))
        row = upload.extra
        return {"accepted": True, "duplicate": False, "round": upload.round_number,
                "model_version": b.target, "staleness": row["staleness"], "weight": row["weight"],
                "reported": len(b.updates), "selected": self._config.buffer_size}

    def _admit(self, name: str, base_version: int) -> tuple[Buffer, int]:
        """The buffer ``name``'s update from ``base_version`` goes into, and its staleness (lock
        held). With DP a device has one update in a version (the noise covers one change per
        device), so a second goes to the next version."""
        s = self._state
        if s.status == "finished":
            raise Conflict("the run is over", "round")
        if s.status == "idle":
            raise Conflict("training has not been started", "round")
        if base_version > s.version:
            raise Conflict(f"model version {base_version} does not exist yet (the latest is "
                           f"{s.version})", "model_version")
        target = self._target(name if self._strategy.privacy_settings() is not None else None)
        if self._config.rounds and target > self._config.rounds:
            raise Conflict(f"the run's last model version ({self._config.rounds}) has all the updates "
                           "it needs", "round")
        staleness = target - 1 - base_version
        if staleness > self._config.max_staleness:
            raise Conflict(
                f"update trained from model version {base_version} is {staleness} versions stale "
                f"(it would go into version {target}); this server takes at most "
                f"{self._config.max_staleness} (--max-staleness)", "model_version")
        return self._buffer(target, self._clock()), staleness

    def _buffer(self, target: int, started_at: float) -> Buffer:
        b = self._buffers.get(target)
        if b is None:
            b = self._buffers[target] = Buffer(target, self._begin(), started_at)
        return b

    def _begin(self) -> RoundAggregator:
        """A new buffer's aggregator (lock held): the strategy's, over changes (its model is
        zero). A DP strategy counts the version as a round that samples ``buffer_size`` of the
        devices available; a spent budget ends the run here."""
        s = self._state
        available = self._devices.available()
        # With no device online (a restart folding its buffered updates in again) the rate
        # counted is the last one: the devices that sent those updates are not back yet.
        if self._strategy.privacy_settings() is not None and available:
            fraction = min(1.0, self._config.buffer_size / len(available))
            try:
                self._strategy.configure(available, rng=self._rng, fraction=fraction, min_devices=1)
            except RunOver as exc:
                log.warning("the run is over: %s", exc.message)
                s.reason = exc.message
                s.set_status("finished")
                raise Conflict(f"the run is over: {exc.message}", "round") from None
        zeros = {n: np.zeros_like(a) for n, a in s.weights.items()}
        return self._strategy.begin(zeros, spill_dir=self._storage.run_dir,
                                    memory_budget=self._config.memory_budget)

    def _target(self, device: str | None = None) -> int:
        """The version the next update goes into: the first one still short of updates (and,
        given ``device``, without an update of that device)."""
        s = self._state
        target = s.version + 1 if s.closing is None else max(s.version, s.closing) + 1
        while target in self._buffers and (self._buffers[target].reserved >= self._config.buffer_size
                                           or device in self._buffers[target].devices):
            target += 1
        return target

    def _change(self, decoded: Mapping[str, np.ndarray], base: Mapping[str, np.ndarray],
                weight: float) -> Weights:
        """An update's change from its base version (a compressed update is that change
        already), times its staleness weight, in float64."""
        return {n: (np.asarray(decoded[n], dtype=np.float64) if self._compression.active
                    else np.subtract(decoded[n], base[n], dtype=np.float64)) * weight for n in base}

    def _fold(self, b: Buffer, row: Mapping[str, Any], change: Mapping[str, np.ndarray]) -> None:
        with b.lock:  # each update its own key: a device may have two in one version without DP
            key = f"{row['device']}#{len(b.updates) + 1}"
            b.aggregator.add(key, change, row["num_examples"], row["metrics"])
            b.updates.append({"key": key, **{k: row[k] for k in (
                "device", "base_version", "staleness", "weight", "num_examples", "metrics", "body_path")}})

    def _body_path(self, row: Mapping[str, Any]):
        return self._dir / row["body_path"]

    def _base(self, version: int) -> Weights:
        """Global model ``version`` (kept in memory for the versions an update may start from)."""
        with self._versions_lock:
            weights = self._versions.get(version)
        if weights is None:
            with self._state.cond:
                if version == self._state.version:
                    weights = self._state.weights
            if weights is None:
                weights = self._storage.read_checkpoint(version)
            self._remember(version, weights)
        return weights

    def _remember(self, version: int, weights: Weights) -> None:
        with self._versions_lock:
            self._versions[version] = weights
            oldest = max(self._versions) - self._config.max_staleness - 1
            for v in [v for v in self._versions if v < oldest]:
                del self._versions[v]

    # new versions ---------------------------------------------------------
    def _failed(self, error: str) -> None:
        self._state.last_error = f"asynchronous driver error: {error}"
        self._state.closing = None

    def _turn(self) -> None:
        s = self._state
        with s.cond:
            self.check_finished()
            broken = next((b for b in self._buffers.values() if b.broken and not b.inflight), None)
            b = self._buffers.get(s.version + 1)
            if broken is None and (s.closing is not None or b is None
                                   or not b.full(self._config.buffer_size)):
                s.cond.wait(TICK)
                return
            if broken is None:
                s.closing = b.target
            current = s.weights
        if broken is not None:
            self._discard(broken, broken.broken)
        else:
            self._make(b, current)

    def _make(self, b: Buffer, current: Weights) -> None:
        """Buffer ``b`` becomes the next global model: outside the lock, as it takes a while."""
        s = self._state
        b.aggregator.restate(self._strategy.state())  # after the version before this one
        try:
            result = b.aggregator.result()
        except AggregationError as exc:
            self._discard(b, f"model version {b.target} could not be made: {exc.reason}; its "
                             "updates are dropped")
            return
        weights = cast_like({n: a.astype(np.float64) + result.weights[n] for n, a in current.items()},
                            current)
        state = result.state

        def record(row: Mapping[str, Any]) -> None:  # a version's row is written when it is made
            self._storage.insert_round(b.target, started_at=b.started_at,
                                       selected=sorted({u["device"] for u in b.updates}),
                                       config=self._config.training.task())
            self._storage.fold_async_updates(b.target)

        def installed() -> None:
            self._remember(b.target, weights)
            del self._buffers[b.target]

        try:
            _, metrics = self._publish(
                f"model version {b.target}", b.target, b.started_at, weights, state,
                counts=(len(b.updates), result.metrics["num_examples"]),
                entry=lambda row: self._entry(b, row, result.metrics),
                record=record, installed=installed)
        except NotPublished as exc:
            if not exc.saving:  # the version is made again, from updates still to come
                self._discard(b, f"model version {b.target} from {len(b.updates)} updates is not "
                                 f"usable: {exc.reason}; its updates are dropped")
                return
            with s.cond:  # a full disk: keep the buffer, try again shortly
                s.closing = None
                s.last_error = f"{exc.reason}; trying again"
                s.cond.wait(RETRY_AFTER_FAILURE)
            return
        for u in b.updates:
            self._body_path(u).unlink(missing_ok=True)
        log.info("model version %d from %d updates (staleness %s), test accuracy %s", b.target,
                 len(b.updates), [u["staleness"] for u in b.updates], metrics.get("accuracy"))

    def _entry(self, b: Buffer, row: Mapping[str, Any], aggregated: Mapping[str, Any]) -> dict[str, Any]:
        """The history entry of a model version: a round's, plus each update's staleness."""
        screened = aggregated["updates"]
        by_device = {u["device"]: screened[u["key"]] for u in b.updates}  # a device's latest
        entry = build_entry(row, b.updates, [], {**aggregated, "updates": by_device})
        for u in b.updates:  # a device with two updates in one version shows its latest
            entry["devices"][u["device"]].update(staleness=u["staleness"], base_version=u["base_version"])
        entry.update(mode="async", model_version=b.target, updates=[
            {**{k: u[k] for k in ("device", "base_version", "staleness", "weight", "num_examples")},
             "status": screened[u["key"]]["status"]} for u in b.updates])
        return entry

    def _discard(self, b: Buffer, why: str) -> None:
        log.error("%s", why)
        b.aggregator.close()
        self._storage.discard_async_updates(b.target)
        self._history.failed(b.target, started_at=b.started_at, failed_at=self._clock(), reason=why)
        with self._state.cond:  # the version is made again, from updates still to come
            self._buffers[b.target] = Buffer(b.target, self._begin(), self._clock())
            self._state.closing = None
            self._state.last_error = why
            self._state.cond.notify_all()
        for u in b.updates:
            self._body_path(u).unlink(missing_ok=True)
