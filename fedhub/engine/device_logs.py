"""Structured device logs: checked, bounded, stored in SQLite, read back by filter.

Devices send batches of ``{level, message, time, round}``. A batch is checked
whole before anything is stored, so a bad line changes nothing. Each device
keeps at most ``keep`` lines, so a chatty device cannot fill the disk.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from .errors import InvalidInput
from .storage import Storage
from .wire import MAX_INTEGER

LEVELS = ("INFO", "WARNING", "ERROR")
MAX_BATCH = 200  # lines per request
MAX_MESSAGE_CHARS = 2000
KEEP_PER_DEVICE = 10_000
MAX_QUERY = 1000
FIELDS = {"level", "message", "time", "round"}
MAX_TIME = 253402300799.0  # 9999-12-31T23:59:59Z; also bounds a huge JSON integer before float()


def parse_entries(raw: object, now: float) -> list[dict[str, Any]]:
    """Check a batch of log lines; every refusal names the line and field at fault."""
    if not isinstance(raw, list):
        raise InvalidInput("body must be a JSON list of log lines", "body")
    if not raw:
        raise InvalidInput("the list of log lines is empty", "body")
    if len(raw) > MAX_BATCH:
        raise InvalidInput(f"at most {MAX_BATCH} log lines per request, got {len(raw)}", "body")
    out = []
    for i, entry in enumerate(raw):
        where = f"logs[{i}]"
        if not isinstance(entry, dict):
            raise InvalidInput(f"{where} must be an object", where)
        unknown = sorted(set(entry) - FIELDS)
        if unknown:
            raise InvalidInput(f"{where} has unknown field {unknown[0]!r}", f"{where}.{unknown[0]}")
        level = entry.get("level")
        if level not in LEVELS:
            raise InvalidInput(f"{where}.level must be one of {', '.join(LEVELS)}", f"{where}.level")
        message = entry.get("message")
        if not isinstance(message, str) or not message.strip():
            raise InvalidInput(f"{where}.message must be a non-empty string", f"{where}.message")
        if len(message) > MAX_MESSAGE_CHARS:
            raise InvalidInput(f"{where}.message is longer than {MAX_MESSAGE_CHARS} characters",
                               f"{where}.message")
        stamp = entry.get("time", now)
        if not isinstance(stamp, int | float) or isinstance(stamp, bool) or not 0 <= stamp <= MAX_TIME:
            raise InvalidInput(f"{where}.time must be seconds since the epoch", f"{where}.time")
        round_number = entry.get("round")
        if round_number is not None and (
                not isinstance(round_number, int) or isinstance(round_number, bool)
                or not 0 <= round_number <= MAX_INTEGER):
            raise InvalidInput(f"{where}.round must be an integer from 0 to {MAX_INTEGER}, or null",
                               f"{where}.round")
        out.append({"level": level, "message": message, "time": float(stamp), "round": round_number})
    return out


class DeviceLogs:
    def __init__(self, storage: Storage, *, keep: int = KEEP_PER_DEVICE,
                 clock: Callable[[], float] = time.time) -> None:
        self._storage = storage
        self._keep = keep
        self._clock = clock

    def add(self, device: str, raw: object) -> list[dict[str, Any]]:
        """Check and store a batch; returns the stored lines."""
        return self.keep(device, parse_entries(raw, self._clock()))

    def keep(self, device: str, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """Store lines :func:`parse_entries` checked; returns them."""
        self._storage.add_logs(device, entries, now=self._clock(), keep=self._keep)
        return entries

    def query(self, *, device: str | None = None, level: str | None = None,
              round_number: int | None = None, after: int = 0, limit: int = 500) -> list[dict[str, Any]]:
        """Stored lines, oldest first, filtered; ``after`` is the last id already seen."""
        if level is not None and level not in LEVELS:
            raise InvalidInput(f"level must be one of {', '.join(LEVELS)}", "level")
        if not 1 <= limit <= MAX_QUERY:
            raise InvalidInput(f"limit must be between 1 and {MAX_QUERY}", "limit")
        return self._storage.list_logs(device=device, level=level, round_number=round_number,
                                       after=after, limit=limit)

    def errors(self, round_number: int) -> list[dict[str, Any]]:
        """The stored ERROR lines naming ``round_number``: its failed updates."""
        return self._storage.list_logs(level="ERROR", round_number=round_number, limit=2**31)
