"""Relays: who may send partial sums for the devices behind them, with which token, and the
reports (evaluations, log lines) a relay sends for its devices in one request.

A relay enrolls as a device does, with the enrollment secret, and gets a token stored only as a
hash; enrolling an existing name again (a new token) needs its current token or the admin's.
Relay names are their own namespace: a relay is never a device, never selected for a round.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from . import auth, federated_eval
from .device_logs import parse_entries
from .devices import check_name
from .errors import Conflict, Forbidden, InvalidInput, Unauthorized
from .partials import MAX_DEVICES, MAX_TOKEN_CHARS
from .storage import Storage

MAX_REPORT_LINES = 1000  # log lines in one relay's reports, all its devices together


@dataclass(frozen=True)
class Vouched:
    """A device a relay speaks for, with the device's own token: the relay's word is not enough."""

    name: str
    token: str


@dataclass(frozen=True)
class DeviceReport(Vouched):
    """What a relay sends on for one of its devices: as the device's own ``POST .../evaluation``
    and ``POST .../logs`` would."""

    evaluation: dict[str, Any] | None = None
    logs: list[dict[str, Any]] = field(default_factory=list)


def parse_devices(raw: object, more: frozenset[str] = frozenset()) -> list[tuple[str, Vouched, dict]]:
    """``{"devices": [{"name", "token", ...more}]}``, each device once: (where, who, entry)."""
    if not isinstance(raw, dict) or set(raw) != {"devices"}:
        raise InvalidInput("body must be a JSON object with one field, devices", "body")
    devices = raw["devices"]
    if not isinstance(devices, list) or not 1 <= len(devices) <= MAX_DEVICES:
        raise InvalidInput(f"devices must be a list of 1 to {MAX_DEVICES} devices", "devices")
    out, seen = [], set()
    for i, entry in enumerate(devices):
        where = f"devices[{i}]"
        if not isinstance(entry, dict) or not {"name", "token"} <= set(entry) <= {"name", "token", *more}:
            raise InvalidInput(f"{where} must be an object with name, token"
                               + "".join(f", {m}" for m in sorted(more)), where)
        try:
            name = check_name(entry["name"])
        except InvalidInput as exc:
            raise exc.within(where) from None
        token = entry["token"]
        if not isinstance(token, str) or not 1 <= len(token) <= MAX_TOKEN_CHARS:
            raise InvalidInput(f"{where}.token must be the device's token (1-{MAX_TOKEN_CHARS} characters)",
                               f"{where}.token")
        if name in seen:
            raise InvalidInput(f"{where}: device {name!r} is named twice", f"{where}.name")
        seen.add(name)
        out.append((where, Vouched(name, token), entry))
    return out


def parse_reports(raw: object, now: float) -> list[DeviceReport]:
    """``{"devices": [{"name", "token", "evaluation"?, "logs"?}, ...]}`` checked whole, each part
    by the check of the device's own request: InvalidInput naming the field
    (``devices[3].logs[0].level``)."""
    out: list[DeviceReport] = []
    lines = 0
    for where, who, entry in parse_devices(raw, frozenset({"evaluation", "logs"})):
        if "evaluation" not in entry and "logs" not in entry:
            raise InvalidInput(f"{where} has neither evaluation nor logs", where)
        try:
            evaluation = federated_eval.parse_report(entry["evaluation"]) if "evaluation" in entry else None
        except InvalidInput as exc:
            raise exc.within(f"{where}.evaluation") from None
        try:
            logs = parse_entries(entry["logs"], now) if "logs" in entry else []
        except InvalidInput as exc:  # a line's fields already say logs[i]
            raise exc.within(where if (exc.field or "").startswith("logs") else f"{where}.logs") from None
        lines += len(logs)
        if lines > MAX_REPORT_LINES:
            raise InvalidInput(f"at most {MAX_REPORT_LINES} log lines in one request", f"{where}.logs")
        out.append(DeviceReport(who.name, who.token, evaluation, logs))
    return out


class RelayRegistry:
    def __init__(self, storage: Storage, check_enroll_secret: Callable[[str | None], None], *,
                 clock: Callable[[], float] = time.time) -> None:
        self._storage = storage
        self._check_secret = check_enroll_secret
        self._clock = clock
        self._lock = threading.Lock()

    def register(self, name: object, enroll_secret: str | None, *, token: str | None = None,
                 admin: bool = False) -> dict[str, Any]:
        """Enroll relay ``name`` (or give an enrolled one a new token); its token, once."""
        name = check_name(name)
        self._check_secret(enroll_secret)
        new_token = auth.new_token()
        with self._lock:
            row = self._storage.get_relay(name)
            if row is not None and not admin:
                if token is None:
                    raise Conflict(f"relay name {name!r} is already enrolled; enrolling it again needs "
                                   "its current token or the admin token (Authorization: Bearer)", "name")
                if not auth.token_matches(token, row["token_hash"]):
                    raise Forbidden(f"enrolling relay {name!r} again needs its current token or the "
                                    "admin token", "Authorization")
            self._storage.set_relay(name, auth.hash_token(new_token), now=self._clock())
        return {"name": name, "token": new_token}

    def authenticate(self, token: str | None, name: str) -> str:
        """The relay ``token`` belongs to, which must be ``name``."""
        if not token:
            raise Unauthorized("missing relay token (Authorization: Bearer <token>)", "Authorization")
        row = self._storage.relay_by_token_hash(auth.hash_token(token))
        if row is None:
            raise Unauthorized("unknown relay token", "Authorization")
        if row["name"] != name:
            raise Forbidden("this token belongs to another relay", "Authorization")
        return name
