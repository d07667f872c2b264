"""Relays: who may send partial sums for the devices behind them, with which token.

A relay enrolls as a device does, with the enrollment secret, and gets a token stored only as a
hash; enrolling an existing name again (a new token) needs its current token or the admin's.
Relay names are their own namespace: a relay is never a device, never selected for a round.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from . import auth
from .devices import check_name
from .errors import Conflict, Forbidden, Unauthorized
from .storage import Storage


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
