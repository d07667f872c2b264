"""The device registry: who may take part, with which token, and what each is doing.

Tokens are stored only as SHA-256 hashes. Liveness (last seen, current
activity) changes on every request, so it lives in memory and reaches the
database only at meaningful moments; the rest is written through.
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Collection, Iterator
from typing import Any

from . import auth
from .errors import Conflict, Forbidden, InvalidInput, NotFound, Unauthorized
from .lifecycle import STATES, Lifecycle, check_report
from .storage import Storage
from .wire import MAX_INTEGER

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$")
# What a device can be seen doing; "inactive" and "offline" are derived.
ACTIVITIES = ("idle", "training", "uploading")
BUSY = ("training", "uploading")  # online whenever last seen: a long step sends nothing


def check_name(name: object) -> str:
    """Device names become folder names, so only a safe alphabet is allowed (no '/', no '..')."""
    if not isinstance(name, str) or not NAME_RE.fullmatch(name):
        raise InvalidInput(
            "device name must be 1-64 letters, digits, '_' or '-', starting with a letter or digit",
            "name",
        )
    return name


MAX_DEVICES_PAGE = 1000  # rows in one page of the devices list
NAME_PART_RE = re.compile(r"^[A-Za-z0-9_-]{0,64}$")


def device_filter(name: object = None, lifecycle: object = None,
                  active: object = None) -> Callable[[dict[str, Any]], bool]:
    """Whether a device row matches: ``name`` a part of its name (any case), ``lifecycle`` its
    state, ``active`` its activation; None matches any. InvalidInput for what cannot match."""
    if name is not None and (not isinstance(name, str) or not NAME_PART_RE.fullmatch(name)):
        raise InvalidInput("name must be up to 64 letters, digits, '_' or '-' (a part of a device name)",
                           "name")
    if lifecycle is not None and lifecycle not in STATES:
        raise InvalidInput(f"lifecycle must be one of {', '.join(STATES)}", "lifecycle")
    if active is not None and not isinstance(active, bool):
        raise InvalidInput("active must be true or false", "active")
    part = (name or "").lower()

    def keep(row: dict[str, Any]) -> bool:
        return (part in row["name"].lower() and lifecycle in (None, row["lifecycle"])
                and active in (None, row["active"]))

    return keep


ATTACK_KIND_RE = re.compile(r"^[a-z][a-z0-9-]{0,31}$")
MAX_ATTACK_PARAMS = 16
MAX_ATTACK_TEXT = 100


def check_attack(attack: object) -> dict[str, Any] | None:
    """What a device declares it attacks with (``{"kind", "params"}``), or None.

    Only shown (``/api/devices``, the dashboards) so that a demo's attackers are visible;
    aggregation never reads it, as a real attacker would not declare itself.
    """
    if attack is None:
        return None
    if not isinstance(attack, dict) or set(attack) - {"kind", "params"}:
        raise InvalidInput('attack must be an object {"kind": ..., "params": {...}}', "attack")
    kind = attack.get("kind")
    if not isinstance(kind, str) or not ATTACK_KIND_RE.fullmatch(kind):
        raise InvalidInput("attack.kind must be 1-32 lowercase letters, digits or '-'", "attack.kind")
    params = attack.get("params", {})
    if not isinstance(params, dict) or len(params) > MAX_ATTACK_PARAMS:
        raise InvalidInput(f"attack.params must be an object of at most {MAX_ATTACK_PARAMS} settings",
                           "attack.params")
    for key, value in params.items():
        where = f"attack.params.{key}"[:80]
        if not NAME_RE.fullmatch(key):
            raise InvalidInput("attack.params keys must be names (letters, digits, '_', '-')", where)
        if isinstance(value, float) and not math.isfinite(value):
            raise InvalidInput(f"{where} must be a finite number", where)
        if isinstance(value, str) and len(value) > MAX_ATTACK_TEXT:
            raise InvalidInput(f"{where} is longer than {MAX_ATTACK_TEXT} characters", where)
        if isinstance(value, int) and not isinstance(value, bool) and abs(value) > MAX_INTEGER:
            raise InvalidInput(f"{where} must be within ±{MAX_INTEGER}", where)
        if value is not None and not isinstance(value, bool | int | float | str):
            raise InvalidInput(f"{where} must be a number, true, false, a string or null", where)
    return {"kind": kind, "params": dict(params)}


class DeviceRegistry:
    def __init__(self, storage: Storage, *, enroll_secret: str, auto_activate: bool = False,
                 device_timeout: float = 60.0, clock: Callable[[], float] = time.time) -> None:
        self._storage = storage
        self._enroll_secret = enroll_secret
        self._auto_activate = auto_activate
        self._timeout = device_timeout
        self._clock = clock
        self._lock = threading.RLock()
        self._by_hash: dict[str, str] = {}
        self._seen: dict[str, float] = {}
        self._activity: dict[str, str] = {}
        self._left: set[str] = set()
        # Kept in memory too: read by every task poll, status and round selection.
        self._active: dict[str, bool] = {}
        self.lifecycle = Lifecycle(storage, clock)
        for row in storage.list_devices():
            self._by_hash[row["token_hash"]] = row["name"]
            self._seen[row["name"]] = row["last_seen"] or 0.0
            self._active[row["name"]] = bool(row["active"])
            if row["state"] == "left":  # it said it goes: still gone after a restart of the server
                self._left.add(row["name"])

    def check_enroll_secret(self, enroll_secret: str | None) -> None:
        """Refuse a missing or wrong enrollment secret (the HTTP layer checks it before the body)."""
        if not auth.secret_matches(enroll_secret, self._enroll_secret):
            raise Unauthorized("missing or wrong enrollment secret", "enroll_secret")

    def register(self, name: object, enroll_secret: str | None, *, num_examples: int | None = None,
                 auto_activate: bool | None = None, validation: object = None,
                 attack: object = None, token: str | None = None, admin: bool = False
                 ) -> dict[str, Any]:
        """Enroll a new device, or re-enroll an existing one, and return its new token.

        Re-enrolling an existing name replaces its token, so it needs more than the enrollment
        secret: that device's current ``token``, or the admin's (``admin``). It keeps the
        device's activation: a deactivated device stays deactivated until an admin activates
        it (``auto_activate`` counts only for new names, or when the admin re-enrolls).
        ``validation`` is the device's data validation report (see ``lifecycle.check_report``);
        ``attack`` what it declares it attacks with (see :func:`check_attack`).
        """
        name = check_name(name)
        self.check_enroll_secret(enroll_secret)
        report = None if validation is None else check_report(validation)
        if num_examples is not None and (
            not isinstance(num_examples, int) or isinstance(num_examples, bool)
            or not 0 <= num_examples <= MAX_INTEGER
        ):
            raise InvalidInput(f"num_examples must be an integer from 0 to {MAX_INTEGER}", "num_examples")
        if auto_activate is not None and not isinstance(auto_activate, bool):
            raise InvalidInput("auto_activate must be true or false", "auto_activate")
        declared = check_attack(attack)
        new_token = auth.new_token()
        token_hash = auth.hash_token(new_token)
        now = self._clock()
        with self._lock:
            row = self._storage.get_device(name)
            if row is None:
                active = self._auto_activate or bool(auto_activate)
                self._storage.add_device(name, token_hash, active=active, now=now,
                                         num_examples=num_examples, info={"attack": declared})
            else:
                self._check_reenrollment(row, token, admin)
                self._by_hash.pop(row["token_hash"], None)
                fields: dict[str, Any] = {"token_hash": token_hash, "last_seen": now, "state": "idle",
                                          "info": {**json.loads(row["info"]), "attack": declared}}
                if num_examples is not None:
                    fields["num_examples"] = num_examples
                if admin and auto_activate:
                    fields["active"] = True
                self._storage.update_device(name, **fields)
                active = bool(fields.get("active", row["active"]))
            self._by_hash[token_hash] = name
            self._active[name] = active
            self._seen[name] = now
            self._activity[name] = "idle"
            self._left.discard(name)
            self.lifecycle.enrolled(name, report)
        state = self.lifecycle.get(name)
        return {"name": name, "token": new_token, "active": active, "lifecycle": state["state"],
                "lifecycle_reason": state["reason"]}

    @staticmethod
    def _check_reenrollment(row: dict[str, Any], token: str | None, admin: bool) -> None:
        if admin:
            return
        if token is None:
            raise Conflict(f"device name {row['name']!r} is already enrolled; re-enrolling it needs "
                           "that device's current token or the admin token (Authorization: Bearer)",
                           "name")
        if not auth.token_matches(token, row["token_hash"]):
            raise Forbidden(f"re-enrolling {row['name']!r} needs that device's current token or the "
                            "admin token", "Authorization")

    def authenticate(self, token: str | None) -> str:
        """The device a bearer token belongs to; marks it seen (a device that left stays gone:
        its last log lines may arrive after its leave)."""
        if not token:
            raise Unauthorized("missing device token (Authorization: Bearer <token>)", "Authorization")
        with self._lock:
            name = self._by_hash.get(auth.hash_token(token))
            if name is None:
                raise Unauthorized("unknown device token", "Authorization")
            self._seen[name] = self._clock()
            return name

    def vouched(self, name: str, token: str, where: str) -> None:
        """A relay speaks for device ``name`` only with the device's own ``token`` (it has seen it:
        the device's requests went through it). Unauthorized or Forbidden naming ``where``.token."""
        with self._lock:
            owner = self._by_hash.get(auth.hash_token(token))
        if owner is None:  # as the device's own request would be refused: it must enroll again
            raise Unauthorized(f"{where}.token: unknown device token", f"{where}.token")
        if owner != name:
            raise Forbidden(f"{where}.token is not device {name!r}'s token: a relay speaks for a device "
                            "only with its token", f"{where}.token")

    def touch(self, name: str) -> None:
        """Mark a device seen now and back if it had left: it asks for work (long polls keep a
        waiting device online)."""
        with self._lock:
            self._seen[name] = self._clock()
            back = name in self._left
            self._left.discard(name)
        if back:
            self._storage.update_device(name, state="idle")

    def require(self, name: str) -> dict[str, Any]:
        row = self._storage.get_device(check_name(name))
        if row is None:
            raise NotFound(f"no device named {name!r}", "name")
        return row

    def declare_attack(self, name: str, attack: object) -> None:
        """Replace what the device declares it attacks with (see :func:`check_attack`)."""
        declared = check_attack(attack)
        with self._lock:
            row = self.require(name)
            self._storage.update_device(name, info={**json.loads(row["info"]), "attack": declared})

    def set_active(self, name: str, active: bool) -> None:
        self.require(name)
        with self._lock:
            self._storage.update_device(name, active=active)
            self._active[name] = active

    def is_active(self, name: str) -> bool:
        return self._active.get(name, False)

    def set_activity(self, name: str, activity: str) -> None:
        if activity not in ACTIVITIES:
            raise InvalidInput(f"activity must be one of {ACTIVITIES}", "state")
        with self._lock:
            self._activity[name] = activity

    @contextlib.contextmanager
    def busy(self, name: str, activity: str) -> Iterator[None]:
        """Show ``activity`` for the duration; unless the work moved the device on (an accepted
        update sets ``idle``), the activity it had before comes back, so a refusal changes nothing."""
        if activity not in ACTIVITIES:
            raise InvalidInput(f"activity must be one of {ACTIVITIES}", "state")
        with self._lock:
            before = self._activity.get(name)
            self._activity[name] = activity
        try:
            yield
        finally:
            with self._lock:
                if self._activity.get(name) == activity:
                    if before is None:
                        self._activity.pop(name, None)
                    else:
                        self._activity[name] = before

    def set_examples(self, name: str, num_examples: int) -> None:
        self._storage.update_device(name, num_examples=num_examples)

    def leave(self, name: str) -> None:
        with self._lock:
            self._left.add(name)
            self._activity[name] = "idle"
        self._storage.update_device(name, last_seen=self._seen.get(name, self._clock()), state="left")

    def is_online(self, name: str, now: float | None = None) -> bool:
        now = self._clock() if now is None else now
        with self._lock:
            return self._online(name, now)

    def _online(self, name: str, now: float) -> bool:
        """Not gone, and busy or seen within the timeout (lock held)."""
        if name in self._left:
            return False
        return self._activity.get(name) in BUSY or now - self._seen.get(name, 0.0) <= self._timeout

    def refusal(self, name: str, invalid: Collection[str] | None = None) -> Conflict | None:
        """Why ``name`` may not take part in rounds now, or None: the one admission rule, for
        round selection (:meth:`available`) and for every update, in synchronous and
        asynchronous mode alike. A device must be active (an admin may deactivate it) and its
        data not found invalid. From memory: it is asked on every upload. ``invalid``: the
        devices whose data is invalid, when the caller has read them once for many devices."""
        if not self.is_active(name):
            return Conflict(f"device {name!r} is inactive: an admin has not activated it, or "
                            "deactivated it; it takes part again once activated", "active")
        if invalid is not None and name not in invalid:
            return None
        return self.lifecycle.refusal(name)

    def check_admitted(self, name: str) -> None:
        """Raise :meth:`refusal`'s Conflict if ``name`` may not take part now."""
        refusal = self.refusal(name)
        if refusal is not None:
            raise refusal

    def set_timeout(self, device_timeout: float) -> None:
        """Seconds unseen before an idle device counts as offline (a new run's setting)."""
        self._timeout = device_timeout

    def available(self) -> list[str]:
        """Admitted devices (see :meth:`refusal`) that are online now: the candidates for a new
        round."""
        now = self._clock()
        with self._lock:  # with the refusals read inside: an enrollment cannot fall between them
            invalid = self.lifecycle.refused()
            return [name for name in sorted(self._active)
                    if self.refusal(name, invalid) is None and self._online(name, now)]

    def _state(self, name: str, active: bool, now: float) -> str:
        """inactive, offline, or what it is doing (idle, training, uploading) (lock held)."""
        if not active:
            return "inactive"
        if not self._online(name, now):
            return "offline"
        return self._activity.get(name, "idle")

    def counts(self) -> dict[str, int]:
        """How many devices are in each state, from memory. Every ``GET /api/status`` asks, so
        it is one pass under one lock: with 10,000 devices, taking the lock again for each
        device cost 7 ms a status."""
        now = self._clock()
        with self._lock:
            return dict(Counter(self._state(name, active, now) for name, active in self._active.items()))

    def flush(self) -> None:
        """Persist last-seen times (they are kept in memory between meaningful moments)."""
        with self._lock:
            seen = dict(self._seen)
        for name, t in seen.items():
            self._storage.update_device(name, last_seen=t)

    def list(self) -> list[dict[str, Any]]:
        now = self._clock()
        out = []
        lifecycle = self.lifecycle.all()
        with self._lock:
            for row in self._storage.list_devices():
                stage = lifecycle.get(row["name"]) or self.lifecycle.get(row["name"])
                out.append({
                    "name": row["name"],
                    "active": bool(row["active"]),
                    "state": self._state(row["name"], bool(row["active"]), now),
                    "last_seen": self._seen.get(row["name"], row["last_seen"]),
                    "num_examples": row["num_examples"],
                    "registered_at": row["registered_at"],
                    "lifecycle": stage["state"],
                    "lifecycle_reason": stage["reason"],
                    "lifecycle_round": stage["round"],
                    "validation": stage["validation"],
                    "attack": json.loads(row["info"]).get("attack"),
                })
        return out

    def forbid_other(self, caller: str, name: str) -> None:
        if caller != name:
            raise Forbidden("a device may act only for itself", "name")
