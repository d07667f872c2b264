"""A relay between devices and the server: the work behind ``fedhub relay``'s HTTP routes.

Devices speak the device protocol to the relay as to the server. Every request is passed on
unchanged (enrollment, tasks, the model, secure aggregation's key exchange, logs) except an update
of a round that takes partial sums: that one is checked here as the server would check it (the
device's own token, the model's tensors, finite values, the round) and folded into the round's
partial sum (:class:`~fedhub.relay.sums.RelaySums`), which goes to the server once for all of them;
and, in a secure round, a masked update, added to the round's masked sum likewise.
"""

from __future__ import annotations

import hashlib
import json
import logging
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import requests

from fedhub.api.errors import STATUS
from fedhub.device.client import Client, ServerError
from fedhub.engine import wire
from fedhub.engine.errors import FedHubError, InvalidInput, Unauthorized
from fedhub.engine.rounds import MAX_IDEMPOTENCY_KEY

from .sums import RelaySums

log = logging.getLogger("fedhub.relay")

# What a device's request may carry on to the server, and what the server's answer carries back.
REQUEST_HEADERS = ("Authorization", "Content-Type", "X-Enroll-Secret", "Idempotency-Key",
                   "If-None-Match", "Accept")
RESPONSE_HEADERS = ("Content-Type", "ETag", "X-Model-Version", "Retry-After", "Cache-Control")
# Seconds a device token checked with the server stays trusted here: a re-enrolled device's old
# token keeps working at the relay at most this long.
TOKEN_TTL = 60.0
# Longest a request may wait on the server: a device's task long poll (30 s at most) and more.
UPSTREAM_TIMEOUT = 60.0


@dataclass
class Forwarded:
    """The server's answer to a passed-on request."""

    status: int
    body: bytes
    headers: dict[str, str]


class Relay:
    """One relay: its name and token at the server, its partial sums, and the two threads that
    watch the server's status and send the sums when they are due."""

    def __init__(self, server: str, name: str, *, state_dir: str | Path, enroll_secret: str | None,
                 verify: bool | str = True, flush_after: float = 2.0,
                 max_devices: int | None = None) -> None:
        self.state_dir = Path(state_dir)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        # Started before its server (or while it restarts), a relay waits and says so, as a device does.
        self.upstream = Client(server, name, verify=verify,
                               on_wait=lambda message: print(f"relay {name}: {message}", flush=True))
        self._enroll(enroll_secret)
        self.sums = RelaySums(self.upstream, state_dir=self.state_dir / "sums", flush_after=flush_after,
                              **({} if max_devices is None else {"max_devices": max_devices}))
        self.session = requests.Session()
        self.session.verify = verify
        self._models = Client(server, name, verify=verify)  # the global model's spec, by ETag
        self._tokens: dict[str, tuple[str, float]] = {}  # sha256(token) -> (device, checked at)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._threads: list[threading.Thread] = []

    def _enroll(self, enroll_secret: str | None) -> None:
        """Enroll with the server once; the token lives in the state directory (mode 600)."""
        from fedhub.engine.auth import read_secret

        path = self.state_dir / "relay.token"
        token = read_secret(path)
        if token is not None:
            self.upstream.token = token
            return
        self.upstream.register_relay(enroll_secret)
        path.touch(mode=0o600)
        path.write_text(self.upstream.token + "\n")

    # running ----------------------------------------------------------------
    def start(self) -> Relay:
        for target, name in ((self._watch, "relay-status"), (self._send, "relay-send")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        """Stop watching; what is pending goes to the server now (a clean stop loses nothing)."""
        self._stop.set()
        self._wake.set()
        for thread in self._threads:
            thread.join(timeout=5)
        try:
            self.sums.flush()
        except Exception as exc:  # kept on disk: the next start sends it
            log.warning("relay %s: pending sums not sent (%s); sent at the next start", self.sums.name, exc)

    def _watch(self) -> None:
        revision = None
        while not self._stop.is_set():
            try:
                status = self.upstream.status(wait=20.0, since=revision)
            except Exception as exc:
                log.warning("relay %s: status: %s", self.sums.name, exc)
                self._stop.wait(1.0)
                continue
            revision = status.get("revision")
            self.sums.observe(status)
            self._wake.set()

    def _send(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(0.25)
            self._wake.clear()
            due = self.sums.due()
            if due or self.sums.view()["outbox"]:
                try:
                    self.sums.flush(due)
                except Exception as exc:
                    log.warning("relay %s: sending partial sums: %s; trying again", self.sums.name, exc)
                    self._stop.wait(1.0)

    # requests ---------------------------------------------------------------
    def forward(self, method: str, path: str, query: str, headers: Mapping[str, str],
                body: bytes) -> Forwarded:
        """Pass a device's request on to the server unchanged; its answer back."""
        wanted = {k: v for k, v in headers.items() if k in REQUEST_HEADERS}
        url = f"{self.upstream.server}{path}" + (f"?{query}" if query else "")
        try:
            response = self.session.request(method, url, headers=wanted, data=body or None,
                                            timeout=(10.0, UPSTREAM_TIMEOUT), allow_redirects=False)
        except requests.RequestException as exc:
            return Forwarded(502, _error_json("upstream_unreachable",
                                              f"the relay cannot reach the server: {type(exc).__name__}"),
                             {"Content-Type": "application/json", "Retry-After": "1"})
        body = response.content
        if method == "GET" and response.status_code == 200 and path.endswith("/task"):
            body = self._task(path, response) or body
        return Forwarded(response.status_code, body,
                         {k: response.headers[k] for k in RESPONSE_HEADERS if k in response.headers})

    def _task(self, path: str, response: requests.Response) -> bytes | None:
        """A device's task passes through (:meth:`RelaySums.passing`); None: as it came."""
        parts = path.split("/")  # /api/devices/NAME/task
        try:
            task = response.json()
        except ValueError:
            return None
        if len(parts) != 5 or not isinstance(task, dict):
            return None
        instead = self.sums.passing(parts[3], task)
        return None if instead is None else json.dumps(instead).encode()

    def update(self, name: str, round_number: int, headers: Mapping[str, str], body: bytes,
               query: str = "") -> Forwarded | dict[str, Any]:
        """A device's update: folded into the round's partial sum when the round takes them,
        else passed on. FedHubError (a 4xx) when it is refused here."""
        path = f"/api/devices/{name}/updates/{round_number}"
        if self.sums.behind(name, round_number):
            self._catch_up()
        if not self.sums.takes(round_number):
            return self.forward("POST", path, query, headers, body)
        token = _bearer(headers.get("Authorization", ""))
        self._check_device(name, token)
        if headers.get("Content-Type", "").split(";")[0].strip() not in (
                "application/octet-stream", "application/vnd.safetensors"):
            return self.forward("POST", path, query, headers, body)  # the server says what is wrong
        model = self._model(token)
        weights, meta = wire.decode(body, wire.spec_of(model), require_examples=True)
        wire.check_round(meta, round_number)
        key = headers.get("Idempotency-Key")
        if key is not None and len(key) > MAX_IDEMPOTENCY_KEY:
            raise InvalidInput(f"Idempotency-Key must be at most {MAX_IDEMPOTENCY_KEY} characters",
                               "Idempotency-Key")
        return self.sums.fold(name, token, round_number, weights, meta, key,
                              hashlib.sha256(body).hexdigest(), reference=model)

    def secagg(self, name: str, round_number: int, headers: Mapping[str, str], body: bytes,
               query: str = "") -> Forwarded | dict[str, Any]:
        """A device's answer to a secure round's stage: its masked update is added to the round's
        masked sum while the masked stage is open (and the round's parameters are known here),
        everything else passed on. FedHubError (a 4xx) when it is refused here."""
        path = f"/api/devices/{name}/secagg/{round_number}"
        binary = headers.get("Content-Type", "").split(";")[0].strip() in (
            "application/octet-stream", "application/vnd.safetensors")
        if binary and self.sums.behind(name, round_number, masked=True):
            self._catch_up()
        if not binary or not self.sums.takes_masked(round_number):
            return self.forward("POST", path, query, headers, body)
        token = _bearer(headers.get("Authorization", ""))
        self._check_device(name, token)
        assert token is not None
        return self.sums.fold_masked(name, token, round_number, body)

    def _catch_up(self) -> None:
        """Look at the server's status now: a device's request came before the watcher saw the
        round (or stage) it belongs to, and would otherwise pass on instead of being summed."""
        client = Client(self.upstream.server, self.sums.name, verify=self.session.verify, retry_for=5)
        client.session = self.session
        try:
            self.sums.observe(client.status())
        except Exception as exc:  # the watcher will see it: the request passes on meanwhile
            log.warning("relay %s: status: %s", self.sums.name, exc)

    def _check_device(self, name: str, token: str | None) -> None:
        """``token`` is device ``name``'s, as the server says (asked once a minute per token)."""
        if not token:
            raise Unauthorized("missing device token (Authorization: Bearer <token>)", "Authorization")
        digest = hashlib.sha256(token.encode()).hexdigest()
        now = time.monotonic()
        with self._lock:
            known = self._tokens.get(digest)
        if known is not None and known[0] == name and now - known[1] < TOKEN_TTL:
            return
        checker = Client(self.upstream.server, name, token=token, verify=self.session.verify, retry_for=10)
        checker.session = self.session
        try:
            checker.signal()
        except ServerError as exc:
            raise _as_error(exc) from None
        with self._lock:
            if len(self._tokens) > 100_000:
                self._tokens.clear()
            self._tokens[digest] = (name, now)

    def _model(self, token: str | None) -> wire.Weights:
        """The global model (downloaded with the device's token, again only when it changes): its
        tensors check an update; under central DP each change from it is clipped here."""
        with self._models._model_lock:
            self._models.token = token
            try:
                _, weights = self._models._fetch_model()
            except ServerError as exc:
                raise _as_error(exc) from None
        return weights


def _bearer(header: str) -> str | None:
    scheme, _, token = header.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None


def _error_json(code: str, message: str, field: str | None = None) -> bytes:
    return json.dumps({"error": code, "field": field, "message": message}).encode()


_BY_STATUS: dict[int, type[FedHubError]] = {code: cls for cls, code in STATUS.items()
                                            if cls.__module__ == FedHubError.__module__}


def _as_error(exc: ServerError) -> FedHubError:
    """The server's refusal of a check the relay made for a device, as the same error here."""
    return _BY_STATUS.get(exc.status, InvalidInput)(str(exc.body.get("message", "refused by the server")),
                                                     exc.body.get("field"))
