"""Each device's lifecycle, as people and dashboards see it.

    validating -> init -> training -> waiting -> training ... -> finished
           \\-> invalid        \\-> interrupted -> training ...

A device reports its data validation (shapes, dtypes, labels, class counts)
when it enrolls; a device whose data is invalid is refused tasks, with the
reason kept for the API. The round coordinator moves devices between
``training`` and ``waiting``; an admin's interrupt raises a signal the device
polls for while it trains. States are few and change a few times per round,
so they are kept in memory (read on every task poll), written through to SQLite
and survive a restart.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from .errors import Conflict, InvalidInput
from .storage import Storage
from .wire import MAX_INTEGER

STATES = ("validating", "invalid", "init", "training", "waiting", "interrupted", "finished")
# Bounds on what a device may report about its data: they end up in every /api/devices answer.
MAX_PROBLEMS = 20
MAX_PROBLEM_CHARS = 300
MAX_CLASSES = 1000
_KEEP = object()  # a lifecycle write that keeps the device's last validation report


def check_report(report: object) -> dict[str, Any]:
    """A device's data validation report, checked and reduced to the known fields.

    ``{"ok": bool, "problems": [str], "num_examples": int, "class_counts": [int]}``;
    ``ok`` must agree with ``problems`` (ok means no problems).
    """
    if not isinstance(report, Mapping):
        raise InvalidInput("validation must be a JSON object", "validation")
    ok = report.get("ok")
    if not isinstance(ok, bool):
        raise InvalidInput("validation.ok must be true or false", "validation.ok")
    problems = report.get("problems", [])
    if (not isinstance(problems, list) or len(problems) > MAX_PROBLEMS
            or not all(isinstance(p, str) and 0 < len(p) <= MAX_PROBLEM_CHARS for p in problems)):
        raise InvalidInput(f"validation.problems must be a list of at most {MAX_PROBLEMS} non-empty "
                           f"strings of up to {MAX_PROBLEM_CHARS} characters", "validation.problems")
    if ok == bool(problems):
        raise InvalidInput("validation.ok must be true exactly when there are no problems",
                           "validation.ok")
    n = report.get("num_examples")
    if not isinstance(n, int) or isinstance(n, bool) or n < 0:
        raise InvalidInput("validation.num_examples must be a non-negative integer",
                           "validation.num_examples")
    counts = report.get("class_counts", [])
    if (not isinstance(counts, list) or len(counts) > MAX_CLASSES
            or not all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in counts)):
        raise InvalidInput(f"validation.class_counts must be a list of at most {MAX_CLASSES} "
                           "non-negative integers", "validation.class_counts")
    if ok and counts and sum(counts) != n:
        raise InvalidInput(f"validation.class_counts add up to {sum(counts)}, not num_examples {n}",
                           "validation.class_counts")
    return {"ok": ok, "problems": list(problems), "num_examples": n, "class_counts": list(counts)}


class Lifecycle:
    """Lifecycle states and pending interrupt signals. Thread-safe.

    The states are kept in memory, loaded at start and updated as each write commits, like the
    device registry's activations: every task poll asks whether its device is refused, and a
    crowd of long polls must not queue on the storage lock for it (nor must ``/api/status``
    behind them). SQLite has them too, for a restart.
    """

    def __init__(self, storage: Storage, clock: Callable[[], float] = time.time) -> None:
        self._storage = storage
        self._clock = clock
        self._lock = threading.RLock()
        self._interrupts: dict[str, int] = {}  # device -> round it was told to stop
        # A leaf lock: held only to read or replace a row, never while taking another lock
        # (rows are replaced from the storage's commit, with the storage lock held).
        self._rows_lock = threading.Lock()
        self._rows: dict[str, dict[str, Any]] = {row["name"]: row for row in storage.list_lifecycle()}
        # After a restart nobody is training any more: the round they trained in is forgotten.
        for name, row in list(self._rows.items()):
            if row["state"] == "training":
                self.set(name, "waiting", reason="the server restarted during training")

    def get(self, name: str) -> dict[str, Any]:
        with self._rows_lock:
            row = self._rows.get(name)
            if row is not None:
                return dict(row)
        return {"state": "validating", "reason": "no data validation report yet", "round": None,
                "validation": None, "updated_at": None}

    def all(self) -> dict[str, dict[str, Any]]:
        with self._rows_lock:
            return {name: dict(row) for name, row in sorted(self._rows.items())}

    def _write(self, name: str, *, state: str, reason: str, round_number: int | None,
               validation: Mapping[str, Any] | object | None = _KEEP, durable: bool = True) -> None:
        """Write a device's row (``validation`` _KEEP: the last report stays); memory follows once
        it commits, not if it rolls back."""
        # A storage transaction, not this object's lock: callers may already be inside one.
        with self._storage.transaction(durable=durable):
            if validation is _KEEP:  # read inside: a report committed meanwhile is kept
                validation = self.get(name)["validation"]
            row = {"name": name, "state": state, "reason": reason, "round": round_number,
                   "validation": dict(validation) if isinstance(validation, Mapping) else None,
                   "updated_at": self._clock()}
            self._storage.set_lifecycle(name, state=state, reason=reason, round_number=round_number,
                                        validation=row["validation"], now=row["updated_at"])
            self._storage.after_commit(lambda: self._remember(row))

    def _remember(self, row: dict[str, Any]) -> None:
        with self._rows_lock:
            self._rows[row["name"]] = row

    def set(self, name: str, state: str, *, reason: str = "", round_number: int | None = None) -> None:
        """Move a device to ``state``; its last validation report is kept."""
        if state not in STATES:
            raise ValueError(f"unknown lifecycle state {state!r}")
        # Not durable: a restart rebuilds what matters (nobody is training after one).
        self._write(name, state=state, reason=reason, round_number=round_number, durable=False)

    def enrolled(self, name: str, report: Mapping[str, Any] | None) -> None:
        """A device (re-)enrolled: it starts over, from its report if it sent one."""
        with self._lock:
            self._interrupts.pop(name, None)
            if report is None:
                self._write(name, state="validating", reason="no data validation report yet",
                            round_number=None, validation=None)
            else:
                self.report(name, report)

    def report(self, name: str, report: Mapping[str, Any]) -> dict[str, Any]:
        """Record a checked validation report: ``init`` if the data is valid, else ``invalid``."""
        state, reason = ("init", "") if report["ok"] else (
            "invalid", "invalid data: " + "; ".join(report["problems"]))
        with self._lock:
            self._write(name, state=state, reason=reason, round_number=None, validation=report)
        return self.get(name)

    def refusal(self, name: str) -> Conflict | None:
        """Why this device may not train now (its data is invalid), or None; from memory."""
        with self._rows_lock:
            row = self._rows.get(name)
            if row is None or row["state"] != "invalid":
                return None
            reason = row["reason"]
        return Conflict(f"device {name!r} is refused: {reason}", "validation")

    def refused(self) -> set[str]:
        """The devices whose data is invalid."""
        with self._rows_lock:
            return {name for name, row in self._rows.items() if row["state"] == "invalid"}

    # interrupts ---------------------------------------------------------
    def request_interrupt(self, name: str, round_number: int) -> None:
        with self._lock:
            self._interrupts[name] = round_number
            self.set(name, "interrupted", reason=f"interrupted by an admin during round {round_number}",
                     round_number=round_number)

    def signal(self, name: str) -> dict[str, Any]:
        """What a training device must know now: whether to stop its local training."""
        with self._lock:
            pending = self._interrupts.get(name)
        return {"interrupt": pending is not None, "round": pending, "lifecycle": self.get(name)["state"]}

    def interrupted(self, name: str, round_number: object, detail: object = None, *,
                    latest: int) -> dict[str, Any]:
        """The device confirms it stopped ``round_number``, at most ``latest`` (the last round
        that can have started); the signal is cleared."""
        if (not isinstance(round_number, int) or isinstance(round_number, bool)
                or not 1 <= round_number <= MAX_INTEGER):  # round 0 is the initial model: never trained
            raise InvalidInput(f"round must be an integer from 1 to {MAX_INTEGER} (round 0 is the "
                               "initial model, which no device trains)", "round")
        if round_number > latest:
            raise Conflict(f"round {round_number} cannot have started: the latest round that can "
                           f"is {latest}", "round")
        if detail is not None and (not isinstance(detail, str) or len(detail) > MAX_PROBLEM_CHARS):
            raise InvalidInput(f"detail must be a string of up to {MAX_PROBLEM_CHARS} characters",
                               "detail")
        with self._lock:
            pending = self._interrupts.get(name)
            if pending is not None and pending != round_number:
                raise Conflict(f"the interrupt was for round {pending}, not {round_number}", "round")
            self._interrupts.pop(name, None)
            reason = f"stopped local training of round {round_number}"
            if pending is None:
                reason += " on its own"
            if detail:
                reason += f": {detail}"
            self.set(name, "interrupted", reason=reason, round_number=round_number)
            return self.get(name)

    def forget_interrupt(self, name: str) -> None:
        with self._lock:
            self._interrupts.pop(name, None)
