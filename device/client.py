"""The device side of the HTTP protocol, without TensorFlow.

Used by the device process, the load test's lightweight clients and the
Python API alike, so there is one implementation of the protocol. Calls retry
with jittered exponential backoff while the server is unreachable or
answering 5xx; a 4xx is the server's final word and raises at once.
"""

from __future__ import annotations

import logging
import random
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
import requests

from fedcore import wire

log = logging.getLogger("fedhub.device")


class ServerError(Exception):
    """The server refused a call (4xx): the JSON error it sent, kept whole."""

    def __init__(self, status: int, body: Mapping[str, Any]) -> None:
        self.status = status
        self.body = dict(body)
        self.field = body.get("field")
        super().__init__(f"HTTP {status}: {body.get('message', body)}")


class Unreachable(Exception):
    """The server did not answer within the retry budget."""


def backoff_delays(base: float = 0.5, cap: float = 15.0, rng: random.Random | None = None):
    """Full-jitter exponential backoff (AWS architecture blog): spreads reconnecting devices out."""
    rng = rng or random.Random()
    attempt = 0
    while True:
        yield rng.uniform(0, min(cap, base * 2**attempt))
        attempt += 1


class Client:
    """One device's connection to a FedHub server."""

    def __init__(self, server: str, name: str, *, token: str | None = None,
                 verify: bool | str = True, timeout: float = 30.0, retry_for: float = 300.0,
                 on_wait: Callable[[str], None] | None = None) -> None:
        self.server = server.rstrip("/")
        self.name = name
        self.token = token
        self.timeout = timeout
        self.retry_for = retry_for
        self.session = requests.Session()
        self.session.verify = verify
        self._on_wait = on_wait
        self._model: tuple[str, int, dict[str, np.ndarray]] | None = None

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
            try:
                response = self.session.request(
                    method, url, headers=headers,
                    timeout=(min(10.0, self.timeout), read_timeout or self.timeout), **kwargs)
                if response.status_code < 500:
                    return response
                problem = f"HTTP {response.status_code}"
            except requests.exceptions.SSLError:
                raise  # a certificate problem will not fix itself
            except (requests.ConnectionError, requests.Timeout) as exc:
                problem = type(exc).__name__
            if not retry or time.monotonic() >= deadline:
                raise Unreachable(f"{method} {url}: {problem}")
            delay = next(delays)
            if self._on_wait:
                self._on_wait(f"server unreachable ({problem}); retrying in {delay:.1f}s")
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
                 auto_activate: bool | None = None) -> dict[str, Any]:
        body: dict[str, Any] = {"name": self.name}
        if num_examples is not None:
            body["num_examples"] = num_examples
        if auto_activate is not None:
            body["auto_activate"] = auto_activate
        headers = {"X-Enroll-Secret": enroll_secret} if enroll_secret else {}
        result = self._json(self.request("POST", "/api/devices/register", json=body, headers=headers))
        self.token = result["token"]
        return result

    def task(self, wait: float = 20.0) -> dict[str, Any]:
        return self._json(self.request("GET", f"/api/devices/{self.name}/task",
                                       params={"wait": wait}, read_timeout=wait + self.timeout))

    def model(self) -> tuple[int, dict[str, np.ndarray]]:
        """The global model's version and weights; unchanged models are not downloaded again (ETag)."""
        headers = {"If-None-Match": self._model[0]} if self._model else {}
        response = self.request("GET", "/api/model", headers=headers)
        if response.status_code == 304 and self._model:
            return self._model[1], self._model[2]
        if response.status_code >= 400:
            self._json(response)
        weights, meta = wire.decode(response.content, max_bytes=2**34)
        etag = response.headers.get("ETag", "")
        self._model = (etag, meta.model_version, weights)
        return meta.model_version, weights

    def upload(self, round_number: int, weights: Mapping[str, np.ndarray], *, num_examples: int,
               model_version: int, metrics: Mapping[str, float] | None = None,
               upload_id: str | None = None) -> dict[str, Any]:
        """Send an update; retried with the same Idempotency-Key, so it is counted once."""
        body = wire.encode(weights, wire.Meta(round=round_number, model_version=model_version,
                                              num_examples=num_examples,
                                              metrics=dict(metrics or {})))
        headers = {"Content-Type": "application/octet-stream",
                   "Idempotency-Key": upload_id or uuid.uuid4().hex}
        return self._json(self.request("POST", f"/api/devices/{self.name}/updates/{round_number}",
                                       data=body, headers=headers))

    def leave(self) -> None:
        self._json(self.request("POST", f"/api/devices/{self.name}/leave", retry=False))

    def status(self) -> dict[str, Any]:
        return self._json(self.request("GET", "/api/status"))

    def history(self) -> list[dict[str, Any]]:
        return self._json(self.request("GET", "/api/history"))["rounds"]
