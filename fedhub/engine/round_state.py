"""The federation's round state, shared by request threads and the round driver.

One condition variable guards it: the run's status, the global model (and its
encoded bytes, served to every device), the open round and the round being
aggregated. Everything here is quick (no aggregation, no evaluation, no file
writes beyond a status or selection row), so requests never wait on slow work.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from . import wire
from .secure_round import SecureRound
from .storage import Storage
from .strategies import RoundAggregator

Weights = dict[str, np.ndarray]
STATUSES = ("idle", "running", "paused", "finished")


@dataclass
class OpenRound:
    """A round from its opening to its closing. ``uploading`` holds the devices whose update is
    being folded in right now (outside the lock): the round does not close under them."""

    number: int
    base_version: int
    started_at: float
    selected: set[str]
    needed: int
    deadline: float  # time.monotonic()
    config: dict[str, dict[str, Any]]  # each selected device's task config
    aggregator: RoundAggregator
    reported: dict[str, str | None] = field(default_factory=dict)  # device -> upload id
    uploading: set[str] = field(default_factory=set)
    progress: dict[str, dict[str, int]] = field(default_factory=dict)  # name -> batches done, total
    broken: str | None = None  # why the round cannot be completed any more
    secure: SecureRound | None = None  # secure aggregation's stages, when it is on

    def expects(self, name: str) -> bool:
        """Whether ``name`` is selected and its update (under secure aggregation: its answer to
        the open stage) has not arrived (nor is arriving)."""
        if name not in self.selected or name in self.uploading:
            return False
        if self.secure is not None:
            return name in self.secure.waiting(self.selected)
        return name not in self.reported

    def pending(self) -> set[str]:
        return {name for name in self.selected if self.expects(name)}

    def all_in(self) -> bool:
        """Every selected device has reported (and none is mid-upload)."""
        return bool(self.selected) and not self.uploading and len(self.reported) >= len(self.selected)

    def deadline_in(self) -> float:
        return max(0.0, round(self.deadline - time.monotonic(), 1))

    def task(self, name: str) -> dict[str, Any]:
        train = {"action": "train", "round": self.number, "model_version": self.base_version,
                 "config": self.config[name], "deadline_in": self.deadline_in()}
        return train if self.secure is None else self.secure.task(name, train)

    def view(self) -> dict[str, Any]:
        return {"number": self.number, "started_at": self.started_at, "selected": sorted(self.selected),
                "reported": sorted(self.reported), "needed": self.needed,
                "deadline_in": self.deadline_in(),
                # devices still training (an update received needs no progress bar)
                "progress": {name: dict(p) for name, p in sorted(self.progress.items())
                             if self.expects(name)},
                **({"secagg": self.secure.view(self.selected)} if self.secure is not None else {})}


class RoundState:
    """The shared state; callers hold :attr:`cond` around every read or change."""

    def __init__(self, storage: Storage) -> None:
        self.cond = threading.Condition(threading.RLock())
        self._storage = storage
        self.status = "idle"
        self.version = 0
        self.weights: Weights = {}
        self.encoded = b""
        self.open: OpenRound | None = None
        self.closing: int | None = None  # the round being aggregated and saved
        self.opening = False  # the driver is preparing a round outside the lock
        self.reason = ""  # why no round is open while running
        self.last_error: str | None = None  # why the last round failed
        self.retry_at = 0.0  # time.monotonic() before which no round opens (after a failure)
        # Bytes of accepted uploads (and secure messages) and of model downloads since the last
        # global model was published: the next one's traffic (its history entry's bytes_up/down).
        self.bytes_up = 0
        self.bytes_down = 0
        # Devices' evaluation reports (fedhub.engine.federated_eval) since the last global model
        # was published, by device: the next one's history entry summarizes them.
        self.evaluations: dict[str, dict[str, Any]] = {}

    def take_traffic(self) -> tuple[int, int]:
        """The bytes up and down counted since the last call, and start counting again."""
        traffic, self.bytes_up, self.bytes_down = (self.bytes_up, self.bytes_down), 0, 0
        return traffic

    @property
    def busy(self) -> bool:
        """The driver is opening or closing a round outside the lock."""
        return self.opening or self.closing is not None

    def install(self, version: int, weights: Mapping[str, np.ndarray]) -> None:
        """Make ``weights`` the global model ``version``; encoded once, served to every device."""
        self.weights = dict(weights)
        self.version = version
        self.encoded = wire.encode(self.weights, wire.Meta(round=version, model_version=version))

    def set_status(self, status: str) -> None:
        if status not in STATUSES:
            raise ValueError(f"unknown status {status!r}")
        self.status = status
        self._storage.set_run_status(status, now=time.time())
        self.cond.notify_all()

    def drop(self, name: str) -> bool:
        """No longer wait for ``name`` in the open round; whether it was waited for."""
        r = self.open
        if r is None or not r.expects(name):
            return False
        r.selected.discard(name)
        self._storage.set_round_selected(r.number, sorted(r.selected))
        self.cond.notify_all()
        return True

    def task_for(self, name: str, active: bool) -> dict[str, Any]:
        """What device ``name`` should do now."""
        if not active:
            return {"action": "wait", "reason": "inactive: waiting for an admin to activate it"}
        if self.status == "finished":
            return {"action": "finish", "model_version": self.version}
        r = self.open
        if r is not None and r.expects(name):
            return r.task(name)
        return {"action": "wait", "reason": self._wait_reason(name)}

    def _wait_reason(self, name: str) -> str:
        r = self.open
        if r is not None and r.secure is not None and name in r.selected:
            return f"round {r.number}: secure aggregation stage {r.secure.stage!r}, waiting for the others"
        if r is not None and (name in r.reported or name in r.uploading):
            return f"update for round {r.number} received; waiting for the round to close"
        if r is not None:
            return f"round {r.number} is in progress without this device"
        if self.closing is not None:
            return f"round {self.closing} is being aggregated"
        if self.status == "idle":
            return "training has not been started"
        if self.status == "paused":
            return "training is paused"
        return self.reason or "waiting for the next round"

    def view(self) -> dict[str, Any]:
        """The run as ``GET /api/status`` shows it (without the device counts)."""
        out: dict[str, Any] = {
            "status": self.status,
            "model_version": self.version,
            "completed_rounds": self.version,
            "round": None,
            "reason": "",
            "last_error": self.last_error,
        }
        if self.open is not None:
            out["round"] = self.open.view()
        elif self.closing is not None:
            out["round"] = {"number": self.closing, "state": "aggregating"}
        elif self.status in ("running", "finished"):
            out["reason"] = self.reason
        return out
