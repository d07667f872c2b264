"""The device loop: enroll, wait until active, then pull -> train -> push, until the run ends."""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

from .client import Client, ServerError, Unreachable
from .trainer import Trainer

log = logging.getLogger("fedhub.device")

HISTORY_COLUMNS = ("round", "time", "num_examples", "loss", "accuracy", "train_seconds", "accepted")


class DeviceRunner:
    """Runs one device against a server. ``stop()`` ends it cleanly from another thread."""

    def __init__(self, client: Client, trainer: Trainer, folder: Path, *,
                 enroll_secret: str | None = None, auto_activate: bool | None = None,
                 poll_wait: float = 20.0, print_fn=print) -> None:
        self.client = client
        self.trainer = trainer
        self.folder = Path(folder)
        self.enroll_secret = enroll_secret
        self.auto_activate = auto_activate
        self.poll_wait = poll_wait
        self._print = print_fn
        self._stop = threading.Event()
        self.rounds_done = 0
        self.client._on_wait = self._say

    def _say(self, message: str) -> None:
        self._print(f"[{self.client.name}] {message}", flush=True)

    def stop(self) -> None:
        self._stop.set()

    # tokens are kept beside the device's data so a restarted device keeps its identity
    def _token_path(self) -> Path:
        return self.folder / "token"

    def _save_token(self, token: str) -> None:
        path = self._token_path()
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(token)

    def enroll(self, num_examples: int) -> None:
        path = self._token_path()
        if self.client.token is None and path.exists():
            self.client.token = path.read_text().strip() or None
        if self.client.token is not None:
            try:
                self.client.task(wait=0)
                return
            except ServerError as exc:
                if exc.status != 401:
                    raise
                self.client.token = None
        result = self.client.register(self.enroll_secret, num_examples=num_examples,
                                      auto_activate=self.auto_activate)
        self._save_token(result["token"])
        state = "active" if result["active"] else "inactive (activate it from the dashboard)"
        self._say(f"enrolled, {state}")

    def run(self) -> int:
        """Returns 0 when the run finished or the device was stopped, 1 on a refusal."""
        report = self.trainer.validate()
        if not report["ok"]:
            self._say("local data is invalid: " + "; ".join(report["problems"]))
            return 1
        self._say(f"{report['num_examples']} local examples")
        self.trainer.initialise({})  # build the model now, not inside the first round
        try:
            self.enroll(report["num_examples"])
            return self._loop()
        except ServerError as exc:
            self._say(f"refused by the server: {exc}")
            return 1
        except Unreachable as exc:
            self._say(f"giving up: {exc}")
            return 1

    def _loop(self) -> int:
        last_reason = None
        while not self._stop.is_set():
            try:
                task = self.client.task(wait=self.poll_wait)
            except ServerError as exc:
                if exc.status == 401:  # the server forgot us (reset): enroll again
                    self.client.token = None
                    self.enroll(0)
                    continue
                raise
            action = task["action"]
            if action == "finish":
                self._say(f"run finished at model version {task['model_version']}")
                self._finish()
                return 0
            if action == "wait":
                if task.get("reason") != last_reason:
                    last_reason = task.get("reason")
                    self._say(f"waiting: {last_reason}")
                continue
            last_reason = None
            self._train_round(task)
        return 0

    def _train_round(self, task: dict[str, Any]) -> None:
        number = task["round"]
        version, weights = self.client.model()
        if version != task["model_version"]:
            self._say(f"round {number}: model moved on to version {version}; asking again")
            return
        config = task["config"]
        self._say(f"round {number}: training {config.get('epochs', 1)} epoch(s) from model v{version}")
        result = self.trainer.train(weights, config)
        try:
            ack = self.client.upload(number, result.weights, num_examples=result.num_examples,
                                     model_version=version, metrics=result.metrics,
                                     upload_id=uuid.uuid4().hex)
            accepted = True
            extra = f"{ack.get('reported', '?')}/{ack.get('selected', '?')} reported"
        except ServerError as exc:
            if exc.status != 409:
                raise
            accepted = False
            extra = f"not counted: {exc.body.get('message')}"
        m = result.metrics
        self._say(f"round {number}: loss {m.get('loss', float('nan')):.4f} "
                  f"accuracy {m.get('accuracy', float('nan')):.4f} on {result.num_examples} examples "
                  f"in {m.get('train_seconds', 0):.1f}s; {extra}")
        self._record(number, result, accepted)
        self.rounds_done += 1

    def _record(self, number: int, result, accepted: bool) -> None:
        path = self.folder / "history.csv"
        new = not path.exists()
        with path.open("a", newline="") as f:
            writer = csv.writer(f)
            if new:
                writer.writerow(HISTORY_COLUMNS)
            m = result.metrics
            writer.writerow([number, round(time.time(), 3), result.num_examples, m.get("loss"),
                             m.get("accuracy"), m.get("train_seconds"), accepted])

    def _finish(self) -> None:
        save = getattr(self.trainer, "save_final", None)
        if save is None:
            return
        _, weights = self.client.model()
        path = save(weights, self.folder / "saved")
        if path:
            self._say(f"final model saved to {path}")

    def leave(self) -> None:
        """Tell the server this device is going (best effort: it may already be gone)."""
        with contextlib.suppress(ServerError, Unreachable, OSError):
            self.client.leave()
