"""The dashboard's calls to the FedHub server: read the federation, drive it, read device logs,
fetch a round's model and its test results, predict.

The transport is the devices' own :class:`fedhub.device.client.Client` (one implementation of
talking to the server, its error mapping included), without its patient retries: a person
looking at a dashboard wants to hear at once that the server is down, not in five minutes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fedhub.device.client import Client, ServerError, TLSError, Unreachable
from fedhub.engine import auth
from fedhub.state_dir import StateDir

__all__ = ["DEFAULT_SERVER", "ServerAPI", "ServerError", "TLSError", "Unreachable", "default_admin_token"]

DEFAULT_SERVER = "http://127.0.0.1:4000"
# Exporting a model, or evaluating one on the test set the first time, takes seconds, not milliseconds.
SLOW_SECONDS = 120.0


def default_admin_token(layout: StateDir) -> str:
    """The local server's admin token, from its state directory's ``admin.token``, if there is one."""
    return auth.read_secret(layout.admin_token_file) or ""


class ServerAPI:
    """One dashboard session's view of one server, with the admin token for control calls."""

    def __init__(self, server: str, admin_token: str | None, *, ca: str | None = None,
                 timeout: float = 5.0) -> None:
        """``ca``: a CA bundle to verify an HTTPS server's certificate (else the system's)."""
        self.server = server.rstrip("/")
        self.admin_token = admin_token or None
        self._client = Client(self.server, "dashboard", token=admin_token or None, verify=ca or True,
                              timeout=timeout, retry_for=0)

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        """JSON answer of one call; :class:`Unreachable` if down, :class:`TLSError` if its
        certificate is not trusted, :class:`ServerError` on 4xx."""
        return self._client._json(self._client.request(method, path, retry=False, **kwargs))

    # reading: public endpoints ---------------------------------------------
    def status(self) -> dict[str, Any]:
        return self._call("GET", "/api/status")

    def devices(self) -> list[dict[str, Any]]:
        return self._call("GET", "/api/devices")["devices"]

    def devices_page(self, *, offset: int, limit: int, name: str | None = None,
                     lifecycle: str | None = None, active: bool | None = None) -> dict[str, Any]:
        """One page of the devices matching the filters: ``{"devices", "total", "offset", "limit"}``."""
        params = {"offset": offset, "limit": limit, "name": name, "lifecycle": lifecycle,
                  "active": None if active is None else str(active).lower()}
        return self._call("GET", "/api/devices", params={k: v for k, v in params.items() if v is not None})

    def history(self) -> list[dict[str, Any]]:
        return self.history_and_failures()[0]

    def history_and_failures(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """Completed rounds, and the latest failed attempts at rounds (one call)."""
        answer = self._call("GET", "/api/history")
        return answer["rounds"], answer.get("failures", [])

    def runs(self) -> list[dict[str, Any]]:
        """Every run the server keeps, newest first (``GET /api/runs``)."""
        return self._call("GET", "/api/runs")["runs"]

    def run(self, run_id: int) -> dict[str, Any]:
        """One run with its completed rounds (``history``, as ``GET /api/history`` gives them)."""
        return self._call("GET", f"/api/runs/{int(run_id)}")

    # control: admin token ----------------------------------------------------
    def new_run(self, settings: dict[str, Any], name: str | None = None) -> dict[str, Any]:
        """Start a new run with these settings (``POST /api/runs``); the current one is kept."""
        body: dict[str, Any] = {"settings": settings}
        if name:
            body["name"] = name
        return self._call("POST", "/api/runs", json=body)

    def delete_run(self, run_id: int) -> dict[str, Any]:
        return self._call("DELETE", f"/api/runs/{int(run_id)}")

    def set_active(self, name: str, active: bool) -> dict[str, Any]:
        return self._call("POST", f"/api/devices/{name}/{'activate' if active else 'deactivate'}")

    def interrupt(self, name: str) -> dict[str, Any]:
        """Stop the device's local training of the open round; the round goes on without it."""
        return self._call("POST", f"/api/devices/{name}/interrupt")

    def logs(self, *, device: str | None = None, level: str | None = None,
             round_number: int | None = None, after: int = 0, limit: int = 500) -> dict[str, Any]:
        """Device log lines after id ``after``, oldest first: ``{"logs": [...], "next_after": id}``.

        Admin only: log messages are free text from devices."""
        params = {"device": device, "level": level, "round": round_number, "after": after, "limit": limit}
        return self._call("GET", "/api/logs", params={k: v for k, v in params.items() if v is not None})

    def start(self, rounds: int | None = None) -> dict[str, Any]:
        return self._call("POST", "/api/training/start", json={} if rounds is None else {"rounds": rounds})

    def pause(self) -> dict[str, Any]:
        return self._call("POST", "/api/training/pause")

    def resume(self) -> dict[str, Any]:
        return self._call("POST", "/api/training/resume")

    def reset(self) -> dict[str, Any]:
        """Forget every round: back to the initial model (devices stay enrolled)."""
        return self._call("POST", "/api/training/reset")

    # models: admin token -------------------------------------------------------
    def evaluation(self, round_number: int | None = None) -> dict[str, Any]:
        """A round's global model (None: the latest) on the server's test set: loss, accuracy,
        per-class accuracy, confusion matrix and class names."""
        which = "latest" if round_number is None else round_number
        return self._call("GET", f"/api/rounds/{which}/evaluation", read_timeout=SLOW_SECONDS)

    def model_file(self, round_number: int) -> bytes:
        """Round ``round_number``'s global model as the file its framework exports (``.keras``, ``.pt2``).

        Called from a download button, on a thread of its own: so on a connection of its own.
        """
        client = self._client.fork(timeout=self._client.timeout, retry_for=0)
        response = client.request("GET", f"/api/rounds/{round_number}/model.keras", retry=False,
                                  read_timeout=SLOW_SECONDS)
        if response.status_code >= 400:
            client._json(response)  # raises ServerError with the server's explanation
        return response.content

    # prediction ----------------------------------------------------------------
    def predict(self, files: Sequence[tuple[str, bytes, str]]) -> list[dict[str, Any]]:
        """Classify ``(filename, data, mime type)`` pictures; one answer per picture, in order."""
        parts = [("image", (name, data, mime or "application/octet-stream")) for name, data, mime in files]
        answer = self._call("POST", "/api/predict", files=parts)
        return answer if isinstance(answer, list) else [answer]
