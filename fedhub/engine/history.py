"""The history of completed rounds: one entry per round, built once when it closes.

An entry holds the global test metrics, the strategy and its settings, and per
device what it reported (its metrics), what the strategy did with its update
(``aggregation``: used or rejected, why, Krum score, share of coordinates cut,
distance from the new model, the relay that summed it) and whether it failed (an ERROR log line naming the
round). Entries are stored in SQLite beside the round and kept in memory, so the
dashboards' polls of ``/api/history`` and ``/api/devices`` every two seconds read
a list instead of every update and log line. Failed attempts at a round (too few
usable updates, a disk error) are kept too, with their reason. ``eval/history.csv``
is written from the same entries.
"""

from __future__ import annotations

import copy
import csv
import io
import threading
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .device_logs import DeviceLogs
from .files import atomic_write_text
from .storage import Storage

COLUMNS = ("round", "closed_at", "num_updates", "num_examples", "test_loss", "test_accuracy")
# What RoundResult.metrics["updates"] says about each update that a history entry keeps.
AGGREGATION_FIELDS = ("status", "reason", "score", "trimmed_share", "distance", "relay")
FAILURES_KEPT = 50


def build_entry(round_row: Mapping[str, Any], updates: Iterable[Mapping[str, Any]],
                errors: Iterable[Mapping[str, Any]], outcome: Mapping[str, Any] | None = None
                ) -> dict[str, Any]:
    """A completed round's entry from its row, its stored updates, the ERROR lines naming it
    and the strategy's round metrics (``RoundResult.metrics``)."""
    outcome = outcome or {}
    devices: dict[str, dict[str, Any]] = {
        u["device"]: {"num_examples": u["num_examples"], **u["metrics"]} for u in updates}
    for device, info in (outcome.get("updates") or {}).items():
        devices.setdefault(device, {})["aggregation"] = {
            k: info[k] for k in AGGREGATION_FIELDS if info.get(k) is not None}
    entry = {
        "round": round_row["number"], "test_loss": round_row["test_loss"],
        "test_accuracy": round_row["test_accuracy"], "num_updates": round_row["num_updates"],
        "num_examples": round_row["num_examples"], "started_at": round_row["started_at"],
        "closed_at": round_row["closed_at"], "devices": devices,
        "strategy": ({"name": outcome["strategy"], "params": outcome.get("params", {})}
                     if "strategy" in outcome else None),
        "num_used": outcome.get("num_used", round_row["num_updates"]),
        **({"privacy": outcome["privacy"]} if outcome.get("privacy") else {}),
    }
    if "secagg" in outcome:
        entry["secagg"] = outcome["secagg"]
    for e in errors:
        _mark_failed(entry, e)
    return entry


def _mark_failed(entry: dict[str, Any], error: Mapping[str, Any]) -> bool:
    """An ERROR line naming the round marks that device's update failed (the first line's
    message is kept); lines from an earlier run of the same round number do not count."""
    if error["received_at"] < entry["started_at"]:
        return False
    device = entry["devices"].setdefault(error["device"], {})
    changed = not device.get("failed")
    device["failed"] = True
    device.setdefault("error", error["message"])
    return changed


class RoundHistory:
    """Completed rounds' entries and failed attempts, in memory and in SQLite. Thread-safe."""

    def __init__(self, storage: Storage, logs: DeviceLogs) -> None:
        self._storage = storage
        self._logs = logs
        self._lock = threading.Lock()
        self._entries: dict[int, dict[str, Any]] = {e["round"]: e for e in storage.list_history()}
        self._backfill()
        self._failures = storage.list_round_failures(FAILURES_KEPT)
        self._latest = self._latest_by_device()

    def _backfill(self) -> None:
        """Entries for completed rounds stored before entries were (a database from an older
        FedHub): built once from their updates and logs."""
        for row in self._storage.list_rounds():
            if row["status"] == "complete" and row["number"] > 0 and row["number"] not in self._entries:
                entry = self.build(row)
                self._storage.put_history(row["number"], entry)
                self._entries[row["number"]] = entry

    def build(self, round_row: Mapping[str, Any], outcome: Mapping[str, Any] | None = None
              ) -> dict[str, Any]:
        """The entry of the completed round ``round_row`` (not stored yet: see :meth:`store`)."""
        number = round_row["number"]
        return build_entry(round_row, self._storage.list_updates(number), self._logs.errors(number),
                           outcome)

    def store(self, entry: Mapping[str, Any]) -> None:
        """Write the entry (inside the transaction that completes its round)."""
        self._storage.put_history(entry["round"], entry)

    def remember(self, entry: dict[str, Any]) -> None:
        """Serve the entry from now on (once its round is durable)."""
        with self._lock:
            self._entries[entry["round"]] = entry
            for name, metrics in entry["devices"].items():
                self._latest[name] = {"round": entry["round"], **metrics}

    def late_error(self, error: Mapping[str, Any]) -> None:
        """An ERROR line that names an already completed round."""
        with self._lock:
            entry = copy.deepcopy(self._entries.get(error["round"]))  # readers may hold the old one
            if entry is None or not _mark_failed(entry, error):
                return
            self._storage.put_history(entry["round"], entry)
            self._entries[entry["round"]] = entry
            self._latest = self._latest_by_device()

    def failed(self, round_number: int, *, started_at: float, failed_at: float, reason: str) -> None:
        """Record a failed attempt at a round (it runs again)."""
        self._storage.add_round_failure(round_number, started_at=started_at, failed_at=failed_at,
                                        reason=reason)
        with self._lock:
            self._failures = [*self._failures, {"round": round_number, "started_at": started_at,
                                                 "failed_at": failed_at, "reason": reason}
                              ][-FAILURES_KEPT:]

    def clear(self) -> None:
        """Forget everything (a reset; the database rows go with the rounds)."""
        with self._lock:
            self._entries = {}
            self._failures = []
            self._latest = {}

    def entries(self) -> list[dict[str, Any]]:
        """Completed rounds, oldest first."""
        with self._lock:
            return [self._entries[n] for n in sorted(self._entries)]

    def failures(self) -> list[dict[str, Any]]:
        """The latest failed attempts at rounds, oldest first."""
        with self._lock:
            return list(self._failures)

    def latest(self) -> dict[str, dict[str, Any]]:
        """Per device, its part in the latest completed round it took part in."""
        with self._lock:
            return dict(self._latest)

    def _latest_by_device(self) -> dict[str, dict[str, Any]]:
        latest: dict[str, dict[str, Any]] = {}
        for number in sorted(self._entries):
            for name, metrics in self._entries[number]["devices"].items():
                latest[name] = {"round": number, **metrics}
        return latest


def write_csv(path: str | Path, rounds: Iterable[Mapping[str, Any]]) -> None:
    """Rewrite the whole file atomically, so a reader never sees half a row."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(COLUMNS)
    for r in rounds:
        writer.writerow([r.get(c) for c in COLUMNS])
    atomic_write_text(path, buffer.getvalue())
