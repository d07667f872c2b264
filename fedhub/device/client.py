"""The device side of the HTTP protocol, without TensorFlow.

Used by the device process, the load test's lightweight clients and the
Python API alike, so there is one implementation of the protocol. Calls retry
with jittered exponential backoff while the server is unreachable or
answering 5xx; a 4xx is the server's final word and raises at once.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
import urllib.parse
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import requests

from fedhub.engine import compression, partials, wire
from fedhub.engine.errors import InvalidInput

log = logging.getLogger("fedhub.device")


class ServerError(Exception):
    """The server refused a call (4xx): the JSON error it sent, kept whole."""

    def __init__(self, status: int, body: Mapping[str, Any]) -> None:
        self.status = status
        self.body = dict(body)
        self.field = body.get("field")
        super().__init__(f"HTTP {status}: {body.get('message', body)}")


# The HTTP status of each engine error code (fedhub/api/errors.py), for refusals that come inside
# a 200 answer, one per device of a relay's request.
ERROR_STATUS = {"invalid_input": 400, "too_large": 413, "unauthorized": 401, "forbidden": 403,
                "not_found": 404, "conflict": 409}


class TLSError(Exception):
    """The server's certificate could not be verified (or TLS failed otherwise)."""


def _ssl_reason(exc: Exception) -> str:
    """The OpenSSL reason inside requests' nested exception text ('[SSL: CERTIFICATE_VERIFY_FAILED] ...')."""
    found = re.search(r"\[SSL[^\]]*\][^'\")]*", str(exc))
    return found.group(0).strip() if found else str(exc)[:200]


class Unreachable(Exception):
    """The server did not answer within the retry budget."""


def server_url(address: str) -> str:
    """The server's base URL from what a person typed: ``127.0.0.1:4000`` (no scheme) means
    ``http://127.0.0.1:4000``. ValueError, in words, for anything that is not an HTTP(S) address."""
    text = str(address).strip()
    if text.isdigit():
        raise ValueError(f"{address!r} is a port, not an address: give host:port, e.g. 127.0.0.1:{text}")
    url = (text if "://" in text else f"http://{text}").rstrip("/")
    try:
        parts = urllib.parse.urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError for a port that is no number or out of range
    except ValueError as exc:
        raise ValueError(f"{address!r} is not a server address ({exc})") from None
    if parts.scheme not in ("http", "https"):
        raise ValueError(f"{address!r}: the server URL must start with http:// or https://")
    if not parts.hostname or parts.query or parts.fragment or " " in url:
        raise ValueError(f"{address!r} is not a server address: give host:port or http(s)://host:port")
    return url


def duration(seconds: float) -> str:
    """``4 min 57 s`` / ``12 s``: remaining retry time as a person reads it."""
    seconds = max(0, round(seconds))
    return f"{seconds // 60} min {seconds % 60} s" if seconds >= 60 else f"{seconds} s"


def backoff_delays(base: float = 0.5, cap: float = 15.0, rng: random.Random | None = None):
    """Full-jitter exponential backoff (AWS architecture blog): spreads reconnecting devices out."""
    rng = rng or random.Random()
    attempt = 0
    while True:
        yield rng.uniform(0, min(cap, base * 2**attempt))
        attempt += 1


def _retry_after(response: requests.Response) -> float | None:
    """The seconds a 429's ``Retry-After`` asks for (at most a minute); None without one, so the
    answer goes back to the caller as it is."""
    try:
        seconds = float(response.headers.get("Retry-After", ""))
    except ValueError:
        return None
    return min(max(seconds, 0.0), 60.0) if seconds == seconds else None


# Retried until ``retry_for`` runs out: no connection, no answer in time, or a connection that
# broke in the middle of the answer (ChunkedEncodingError: a server killed while answering).
_BROKEN = (requests.ConnectionError, requests.Timeout, requests.exceptions.ChunkedEncodingError)


class Client:
    """One device's connection to a FedHub server."""

    def __init__(self, server: str, name: str, *, token: str | None = None,
                 verify: bool | str = True, timeout: float = 30.0, retry_for: float = 300.0,
                 on_wait: Callable[[str], None] | None = None) -> None:
        self.server = server_url(server)
        self.name = name
        self.token = token
        self.timeout = timeout
        self.retry_for = retry_for
        self.session = requests.Session()
        self.session.verify = verify
        # Passed on each call too: requests lets $REQUESTS_CA_BUNDLE override a session's verify.
        self.verify = verify
        self._on_wait = on_wait
        self._model: tuple[str, int, dict[str, np.ndarray]] | None = None
        self._model_lock = threading.Lock()

    def fork(self, *, timeout: float = 10.0, retry_for: float = 5.0) -> Client:
        """A second connection with the same server, name, token and TLS settings, for
        another thread (a requests session is not shared between threads)."""
        return Client(self.server, self.name, token=self.token, verify=self.session.verify,
                      timeout=timeout, retry_for=retry_for)

    # transport ----------------------------------------------------------
    def _headers(self, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        headers = dict(extra or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        return headers

    def request(self, method: str, path: str, *, retry: bool = True, read_timeout: float | None = None,
                **kwargs: Any) -> requests.Response:
        """Send a request; retry connection failures and 5xx until ``retry_for`` seconds pass."""
        url = f"{self.server}{path}"
        headers = self._headers(kwargs.pop("headers", None))
        deadline = time.monotonic() + self.retry_for
        delays = backoff_delays()
        while True:
            retry_after = None
            try:
                response = self.session.request(
                    method, url, headers=headers, verify=self.verify,
                    timeout=(min(10.0, self.timeout), read_timeout or self.timeout), **kwargs)
                if response.status_code == 429 and retry:
                    retry_after = _retry_after(response)
                if response.status_code < 500 and retry_after is None:
                    return response
                problem, trouble = f"HTTP {response.status_code}", f"answered HTTP {response.status_code}"
            except requests.exceptions.SSLError as exc:  # a certificate problem will not fix itself
                raise TLSError(f"TLS failure talking to {self.server}: {_ssl_reason(exc)} "
                               "(for a private CA, pass its bundle with --ca)") from None
            except _BROKEN as exc:
                problem = type(exc).__name__
                trouble = f"unreachable ({problem})"
            remaining = deadline - time.monotonic()
            if retry_after is not None and remaining <= retry_after:
                return response  # the wait it asks for is past the budget: the caller sees the 429
            if not retry or remaining <= 0:
                waited = f" after retrying for {duration(self.retry_for)}" if retry and self.retry_for else ""
                raise Unreachable(f"{method} {url}: {problem}{waited}")
            # A 429 names its own wait; jitter spreads the devices it refused at once.
            backoff = next(delays) if retry_after is None else retry_after * random.uniform(1.0, 1.2)
            delay = min(backoff, remaining)
            if self._on_wait:
                self._on_wait(f"server {self.server} {trouble}; retrying in {delay:.1f}s, "
                              f"giving up in {duration(remaining)}")
            time.sleep(delay)

    def _json(self, response: requests.Response) -> dict[str, Any]:
        try:
            body = response.json()
        except ValueError:
            body = {"message": response.text[:200]}
        if response.status_code >= 400:
            raise ServerError(response.status_code, body)
        return body

    # protocol -----------------------------------------------------------
    def register(self, enroll_secret: str | None, *, num_examples: int | None = None,
                 auto_activate: bool | None = None,
                 validation: Mapping[str, Any] | None = None,
                 attack: Mapping[str, Any] | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"name": self.name, "attack": None if attack is None else dict(attack)}
        if num_examples is not None:
            body["num_examples"] = num_examples
        if auto_activate is not None:
            body["auto_activate"] = auto_activate
        if validation is not None:
            body["validation"] = dict(validation)
        headers = {"X-Enroll-Secret": enroll_secret} if enroll_secret else {}
        result = self._json(self.request("POST", "/api/devices/register", json=body, headers=headers))
        self.token = result["token"]
        return result

    def task(self, wait: float = 20.0) -> dict[str, Any]:
        """Long-poll for a task. A busy server answers "wait" at once with ``retry_in``: the
        waiting then happens here, jittered, without holding one of the server's threads."""
        task = self._json(self.request("GET", f"/api/devices/{self.name}/task",
                                       params={"wait": wait}, read_timeout=wait + self.timeout))
        retry_in = task.get("retry_in")
        if isinstance(retry_in, int | float) and retry_in > 0:
            time.sleep(random.uniform(0.5, 1.0) * min(float(retry_in), wait))
        return task

    def model(self, version: int | None = None) -> tuple[int, dict[str, np.ndarray]]:
        """The global model's version and weights; unchanged models are not downloaded again (ETag),
        and ``version`` (the one a task names), when held already, is not even asked for. One
        thread at a time: threads sharing this client download a new version once."""
        with self._model_lock:
            return self._fetch_model(version)

    def _fetch_model(self, version: int | None = None) -> tuple[int, dict[str, np.ndarray]]:
        if version is not None and self._model and self._model[1] == version:
            return self._model[1], self._model[2]
        headers = {"If-None-Match": self._model[0]} if self._model else {}
        response = self.request("GET", "/api/model", headers=headers)
        if response.status_code == 304 and self._model:
            return self._model[1], self._model[2]
        if response.status_code >= 400:
            self._json(response)
        try:  # a whole model, or the change from the one held (the server's --compress-downlink)
            version, weights = compression.decode_download(
                response.content, self._model[1:] if self._model else None)
        except InvalidInput:
            if self._model is None:
                raise
            self._model = None  # what it changes is not what is held: download the whole model
            return self._fetch_model()
        etag = response.headers.get("ETag", "")
        self._model = (etag, version, weights)
        return version, weights

    def upload(self, round_number: int, weights: Mapping[str, np.ndarray], *, num_examples: int,
               model_version: int, metrics: Mapping[str, float] | None = None,
               upload_id: str | None = None, scheme: compression.Scheme = compression.NONE,
               reference: Mapping[str, np.ndarray] | None = None,
               residual: compression.Residual | None = None) -> dict[str, Any]:
        """Send an update; retried with the same Idempotency-Key, so it is counted once.

        With a ``scheme`` (the task's ``compression``) it goes as the compressed delta from
        ``reference``, the model trained from; top-k's ``residual`` is read and, once the server
        accepted the update, replaced by what this one left out."""
        meta = wire.Meta(round=round_number, model_version=model_version, num_examples=num_examples,
                         metrics=dict(metrics or {}))
        body, left = compression.encode_update(
            weights, weights if reference is None else reference, scheme, meta,
            residual=residual.load(scheme) if residual is not None else None)
        headers = {"Content-Type": "application/octet-stream",
                   "Idempotency-Key": upload_id or uuid.uuid4().hex}
        ack = self._json(self.request("POST", f"/api/devices/{self.name}/updates/{round_number}",
                                      data=body, headers=headers))
        if residual is not None:
            residual.save(left, scheme)
        return ack

    def register_relay(self, enroll_secret: str | None) -> dict[str, Any]:
        """Enroll this client's name as a relay (:mod:`fedhub.relay`); keeps the relay token."""
        headers = {"X-Enroll-Secret": enroll_secret} if enroll_secret else {}
        result = self._json(self.request("POST", "/api/relays/register", json={"name": self.name},
                                         headers=headers))
        self.token = result["token"]
        return result

    def send_partial(self, round_number: int, body: bytes, *, masked: bool = False) -> dict[str, Any]:
        """A relay's partial sum (:mod:`fedhub.engine.partials`), or with ``masked`` its sum of
        masked updates in a secure round; its key is its digest (a masked sum's devices are its
        key), so a retry, even from a restarted relay, is acknowledged and never counted twice."""
        headers = {"Content-Type": "application/octet-stream",
                   "Idempotency-Key": partials.key_of(self.name, body)}
        kind = "secagg" if masked else "partials"
        return self._json(self.request("POST", f"/api/relays/{self.name}/{kind}/{round_number}",
                                       data=body, headers=headers))

    def send_relay_reports(self, devices: list[Mapping[str, Any]]) -> dict[str, Any]:
        """A relay's devices' evaluation reports and log lines, ``[{name, token, evaluation?,
        logs?}]``: at most 256 devices, each named once, and 1,000 lines in all."""
        return self._json(self.request("POST", f"/api/relays/{self.name}/reports",
                                       json={"devices": list(devices)}))

    def relay_tasks(self, devices: Mapping[str, str]) -> dict[str, dict[str, Any] | ServerError]:
        """The tasks of a relay's devices (name -> token, at most 256), in one request: each
        device's task, or the ServerError its own request for it would have raised."""
        answer = self._json(self.request("POST", f"/api/relays/{self.name}/tasks", json={
            "devices": [{"name": name, "token": token} for name, token in devices.items()]}))
        return {entry["name"]: entry["task"] if "task" in entry
                else ServerError(ERROR_STATUS.get(entry["error"].get("error"), 400), entry["error"])
                for entry in answer["tasks"]}

    def secagg(self, round_number: int, body: bytes, *, masked: bool = False) -> dict[str, Any]:
        """Answer the open secure-aggregation stage: a JSON message, or the masked update."""
        ctype = "application/octet-stream" if masked else "application/json"
        return self._json(self.request("POST", f"/api/devices/{self.name}/secagg/{round_number}",
                                       data=body, headers={"Content-Type": ctype}))

    def report_validation(self, report: Mapping[str, Any], *,
                          attack: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """Send the data validation report (and the attack declared, if any); the answer says
        the lifecycle state (init or invalid)."""
        return self._json(self.request(
            "POST", f"/api/devices/{self.name}/validation",
            json={"validation": dict(report), "attack": None if attack is None else dict(attack)}))

    def signal(self) -> dict[str, Any]:
        """Polled while training: {"interrupt": bool, "round": int | None, "lifecycle": str}."""
        return self._json(self.request("GET", f"/api/devices/{self.name}/signal"))

    def report_progress(self, round_number: int, done: int, total: int) -> dict[str, Any]:
        """Batches done of the total in this round's local training (sent at most once a second)."""
        return self._json(self.request("POST", f"/api/devices/{self.name}/progress",
                                       json={"round": round_number, "done": done, "total": total}))

    def report_evaluation(self, report: Mapping[str, Any]) -> dict[str, Any]:
        """Loss and accuracy on the held-out data: ``{"round", "global": {..., "num_examples"},
        "personal": {...} | None}`` (see fedhub.engine.federated_eval.parse_report)."""
        return self._json(self.request("POST", f"/api/devices/{self.name}/evaluation", json=dict(report)))

    def report_interrupted(self, round_number: int, detail: str | None = None) -> dict[str, Any]:
        return self._json(self.request("POST", f"/api/devices/{self.name}/interrupted",
                                       json={"round": round_number, "detail": detail}))

    def send_logs(self, entries: list[Mapping[str, Any]]) -> dict[str, Any]:
        """Structured log lines {level, message, time, round}; at most 200 per call."""
        return self._json(self.request("POST", f"/api/devices/{self.name}/logs", json=list(entries)))

    def model_file(self, round_number: int | str = "latest") -> bytes:
        """A completed round's global model as ``.keras`` bytes (architecture and weights)."""
        response = self.request("GET", f"/api/rounds/{round_number}/model.keras")
        if response.status_code >= 400:
            self._json(response)
        return response.content

    def leave(self) -> None:
        self._json(self.request("POST", f"/api/devices/{self.name}/leave", retry=False))

    def status(self, wait: float = 0.0, since: str | None = None) -> dict[str, Any]:
        """The run's status. With ``since`` (an earlier answer's ``revision``), waits up to
        ``wait`` seconds for the run to move on: on the server, a long poll; here, for what is
        left of ``wait``, when the server answered early without a change (it was holding as
        many such polls as it allows)."""
        if since is None or wait <= 0:
            return self._json(self.request("GET", "/api/status"))
        start = time.monotonic()
        status = self._json(self.request("GET", "/api/status", params={"wait": wait, "since": since},
                                         read_timeout=wait + self.timeout))
        if status.get("revision", since) == since:
            time.sleep(max(0.0, wait - (time.monotonic() - start)))
        return status

    def history(self) -> list[dict[str, Any]]:
        return self._json(self.request("GET", "/api/history"))["rounds"]


class PooledClient(Client):
    """One of many devices hosted in one process (a pool worker, the load swarm): the host's
    HTTP session, and the host's one copy of the global model (``models``, a client whose
    ETag cache all its devices share: a new version is downloaded once, then answered 304)."""

    def __init__(self, server: str, name: str, *, session: requests.Session, models: Client,
                 **kwargs: Any) -> None:
        super().__init__(server, name, **kwargs)
        self.session.close()
        self.session = session
        self._models = models
        # The host's relay (fedhub.relay.sums.RelaySums): while the round takes partial sums, an
        # update (and its evaluation report) goes into the host's sum for the round instead of
        # on its own, and so does a masked update at a secure round's masked stage; log lines go
        # with the host's other devices' lines in one request.
        self.relay: Any = None

    def upload(self, round_number: int, weights: Mapping[str, np.ndarray], *, num_examples: int,
               model_version: int, metrics: Mapping[str, float] | None = None,
               upload_id: str | None = None, scheme: compression.Scheme = compression.NONE,
               **kwargs: Any) -> dict[str, Any]:
        if self.relay is not None and self.token and not scheme.active and self.relay.takes(round_number):
            meta = wire.Meta(round=round_number, model_version=model_version, num_examples=num_examples,
                             metrics=dict(metrics or {}))
            return self.relay.fold(self.name, self.token, round_number, weights, meta,
                                   reference=kwargs.get("reference"))
        return super().upload(round_number, weights, num_examples=num_examples,
                              model_version=model_version, metrics=metrics, upload_id=upload_id,
                              scheme=scheme, **kwargs)

    def report_evaluation(self, report: Mapping[str, Any]) -> dict[str, Any]:
        if self.relay is not None and self.token and self.relay.takes(report["round"]):
            self.relay.report(self.name, self.token, evaluation=report)  # goes before the round's sum
            return {"round": report["round"], "accepted": True, "queued": True}
        return super().report_evaluation(report)

    def secagg(self, round_number: int, body: bytes, *, masked: bool = False) -> dict[str, Any]:
        if masked and self.relay is not None and self.token and self.relay.takes_masked(round_number):
            return self.relay.fold_masked(self.name, self.token, round_number, body)
        return super().secagg(round_number, body, masked=masked)

    def send_logs(self, entries: list[Mapping[str, Any]]) -> dict[str, Any]:
        if self.relay is not None and self.token:  # with the other devices' lines, at the next flush
            self.relay.report(self.name, self.token, logs=entries)
            return {"queued": len(entries)}
        return super().send_logs(entries)

    def model(self, version: int | None = None) -> tuple[int, dict[str, np.ndarray]]:
        with self._models._model_lock:
            self._models.token = self.token  # any enrolled device may read the global model
            return self._models._fetch_model(version)


class RemoteLogHandler(logging.Handler):
    """Ships a device's log records to the server (``POST /api/devices/<name>/logs``) in batches.

    A background thread sends what has gathered once a second; an ERROR is sent at once
    because it marks the round's update failed. Sending is best effort: the device goes
    on if the server is away, and at most ``capacity`` lines wait. A record's ``round``
    comes from ``extra={"round": n}``.

    ``background=False`` starts no thread: lines wait until the owner calls :meth:`flush`,
    and go through ``client`` itself (a pool's virtual devices flush after each step).
    """

    def __init__(self, client: Client, *, interval: float = 1.0, capacity: int = 1000,
                 background: bool = True) -> None:
        super().__init__(level=logging.INFO)
        # Its own connection: requests sessions are not shared between threads.
        self._main = client
        self._client = client.fork() if background else client
        self._pending: list[dict[str, Any]] = []
        self._capacity = capacity
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._interval = interval
        self._thread: threading.Thread | None = None
        if background:
            self._thread = threading.Thread(target=self._run, name="fedhub-logs", daemon=True)
            self._thread.start()

    def emit(self, record: logging.LogRecord) -> None:
        if record.levelno < logging.INFO:
            return
        level = ("ERROR" if record.levelno >= logging.ERROR
                 else "WARNING" if record.levelno >= logging.WARNING else "INFO")
        entry = {"level": level, "message": self.format(record)[:2000] or "-",
                 "time": record.created, "round": getattr(record, "round", None)}
        with self._lock:
            if len(self._pending) < self._capacity:
                self._pending.append(entry)
        if level == "ERROR":
            self._wake.set()

    def flush(self) -> None:
        with self._lock:
            batch, self._pending = self._pending, []
        token = self._main.token
        if not batch or token is None:
            with self._lock:
                self._pending = batch + self._pending
            return
        self._client.token = token
        for start in range(0, len(batch), 200):
            try:
                self._client.send_logs(batch[start : start + 200])
            except (ServerError, Unreachable, requests.RequestException) as exc:
                log.debug("could not send %d log lines: %s", len(batch), exc)

    def _run(self) -> None:
        while not self._stopping.is_set():
            self._wake.wait(self._interval)
            self._wake.clear()
            self.flush()

    def close(self) -> None:
        self._stopping.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        self.flush()
        super().close()
