"""The device loop: enroll, wait until active, then pull -> train -> push, until the run ends
(or, with ``stay``, on through the runs that follow until it is stopped)."""

from __future__ import annotations

import contextlib
import csv
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from fedhub.engine import compression
from fedhub.engine.auth import read_secret
from fedhub.engine.plural import plural
from fedhub.engine.privacy import local_dp_task, privatize_update
from fedhub.engine.secagg import SecAggError

from .attacks import Attack
from .client import Client, RemoteLogHandler, ServerError, TLSError, Unreachable, backoff_delays, duration
from .personal import PersonalStore, personal_names
from .secure import SecureDevice
from .trainer import Trainer, TrainingInterrupted

log = logging.getLogger("fedhub.device")

HISTORY_COLUMNS = ("round", "time", "num_examples", "loss", "accuracy", "train_seconds", "accepted")
PROGRESS_INTERVAL = 1.0  # seconds between two progress reports, at least
RESIDUAL_FILE = "residual.safetensors"  # top-k's error feedback, kept across restarts
# The threads that watch a training round beside it (its progress, the server's interrupt): kept
# between rounds, as a pool worker's devices each train for milliseconds, one after another, and
# a thread started and joined for each cost about as much as its training.
_WATCHERS = ThreadPoolExecutor(max_workers=16, thread_name_prefix="fedhub-signal")


class DeviceRunner:
    """Runs one device against a server. ``stop()`` ends it cleanly from another thread."""

    def __init__(self, client: Client, trainer: Trainer, folder: Path, *,
                 enroll_secret: str | None = None, secret_file: Path | None = None,
                 auto_activate: bool | None = None, poll_wait: float = 20.0,
                 attack: Attack | None = None, slowdown: float = 1.0, print_fn=print,
                 secagg_dropout: float = 0.0, stay: bool = False) -> None:
        """``secret_file``: read the enrollment secret from this file (the local server's)
        instead of ``enroll_secret``, again on each refusal while the retry time lasts.
        ``attack``: poison what this device sends (a demo of attacks on the federation; its
        labels, for ``label-flip``, are the trainer's to poison). It is declared when the
        device enrolls, so that the dashboards show it. ``slowdown``: a simulated slow device
        takes this many times its training time before its update arrives (see :attr:`deliver`).
        ``secagg_dropout``: the chance (a simulation) of dropping out of a secure-aggregation
        round after dealing its shares. ``stay``: when a run finishes, save the final model and
        keep waiting, enrolled, for the next run (a Reset, or a new run) instead of leaving: a
        dashboard that starts another run must not wait for devices that went home."""
        self.client = client
        self.trainer = trainer
        self.folder = Path(folder)
        self.enroll_secret = enroll_secret
        self.secret_file = Path(secret_file) if secret_file is not None else None
        self.auto_activate = auto_activate
        self.poll_wait = poll_wait
        self.attack = attack
        self.slowdown = slowdown
        self.stay = stay
        # deliver(delay, send): send the update after ``delay`` seconds. Here it waits; a pool
        # worker queues it instead and serves its other devices meanwhile.
        self.deliver: Callable[[float, Callable[[], None]], None] = self._deliver_after
        self._rng = np.random.default_rng()
        self._print = print_fn
        self._stop = threading.Event()
        self.rounds_done = 0
        self.client._on_wait = lambda message: self._say(message, logging.WARNING)
        self._report: dict[str, Any] | None = None
        self._misconfigured = False  # join() stopped on a setting that cannot work (exit 2)
        self._interrupted = threading.Event()
        self._last_reason: str | None = None
        # The round this device is working on (from its task to its upload), and whether the
        # server said the run is over: what a Ctrl-C must tell the server (see stopped_by_user).
        self._round: int | None = None
        self._finished = False
        # What the device says also goes to the server as structured logs (RemoteLogHandler).
        self.logger = logging.getLogger(f"fedhub.device.{client.name}")
        self.logger.propagate = False
        self.logger.setLevel(logging.INFO)
        self.secure = SecureDevice(client, self._say, dropout=secagg_dropout)
        self._said_no_holdout = False

    def _say(self, message: str, level: int = logging.INFO, round_number: int | None = None) -> None:
        self._print(f"[{self.client.name}] {message}", flush=True)
        self.logger.log(level, message, extra={"round": round_number})

    def stop(self) -> None:
        self._stop.set()

    def _declared(self) -> dict[str, Any] | None:
        """The attack this device declares to the server (shown, never used to aggregate)."""
        return None if self.attack is None else self.attack.describe()

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
        """Enroll (or reuse the saved token) and hand the server the data validation report."""
        path = self._token_path()
        if self.client.token is None and path.exists():
            self.client.token = path.read_text().strip() or None
        if self.client.token is not None:
            try:
                self.client.signal()  # is the saved token still good?
                if self._report is not None:
                    self.client.report_validation(self._report, attack=self._declared())
                return
            except ServerError as exc:
                if exc.status != 401:
                    raise
                self.client.token = None
        result = self._register(num_examples)
        self._save_token(result["token"])
        state = "active" if result["active"] else "inactive (activate it from the dashboard)"
        self._say(f"enrolled, {state}")

    def _register(self, num_examples: int) -> dict[str, Any]:
        """Enroll with the secret. A device started before its server on a fresh state directory
        reads the secret file before the server has written it, so a refused secret from a file
        is read again, with backoff, until the retry time (``--retry-for``) is spent."""
        deadline = time.monotonic() + self.client.retry_for
        delays = backoff_delays()
        while True:
            secret = read_secret(self.secret_file) if self.secret_file else self.enroll_secret
            try:
                return self.client.register(secret, num_examples=num_examples,
                                            auto_activate=self.auto_activate, validation=self._report,
                                            attack=self._declared())
            except ServerError as exc:
                if exc.status != 401 or exc.field != "enroll_secret":
                    raise
                remaining = deadline - time.monotonic()
                if self.secret_file is None or remaining <= 0 or self._stop.is_set():
                    raise ServerError(401, {**exc.body, "message": self._secret_problem(exc)}) from None
                if read_secret(self.secret_file) != secret:  # written meanwhile (by the server starting)
                    continue
                delay = min(next(delays), remaining)
                self._say(f"server {self.client.server} refused the enrollment secret from "
                          f"{self.secret_file}; reading it again in {delay:.1f}s, giving up in "
                          f"{duration(remaining)}", logging.WARNING)
                self._stop.wait(delay)

    def _secret_problem(self, exc: ServerError) -> str:
        """What is wrong with the enrollment secret, and what to do about it."""
        refused = f"{exc.body.get('message') or 'enrollment refused'} for {self.client.server}"
        give = "give the server's secret with --enroll-secret or FEDHUB_ENROLL_SECRET"
        if self.secret_file is None:
            return f"{refused}: the enrollment secret given is not this server's; {give}"
        if not self.secret_file.exists():
            return (f"{refused}: there is no secret file {self.secret_file} (the server writes it "
                    "when it starts with that state directory); point --state-dir or FEDHUB_STATE_DIR "
                    f"at the server's state directory, or {give}")
        return (f"{refused}: the secret in {self.secret_file} is not this server's; point --state-dir "
                f"or FEDHUB_STATE_DIR at the server's state directory, or {give}")

    def run(self) -> int:
        """Returns 0 when the run finished or the device was stopped, 1 on a refusal."""
        handler = RemoteLogHandler(self.client)
        self.logger.addHandler(handler)
        try:
            return self._run()
        finally:
            self.logger.removeHandler(handler)
            handler.close()

    def _run(self) -> int:
        try:
            if not self.join():
                return 2 if self._misconfigured else 1
            return self._loop()
        except ServerError as exc:
            self._say(f"refused by the server: {exc}")
            return 1
        except Unreachable as exc:
            self._say(f"giving up: {exc}")
            return 1
        except TLSError as exc:
            self._say(str(exc))
            return 1

    def join(self, status: Mapping[str, Any] | None = None) -> bool:
        """Validate the local data, build the model and enroll with the validation report.

        False when the data is invalid (the server is told why; the device must stop). Both
        the device process and the pool's virtual devices (``fedhub.device.virtual``) start here;
        ``status``: the server's ``GET /api/status`` when the caller has it (a pool's worker reads
        it once for all its devices), else this device asks.
        """
        try:  # build the model now, as the server's network, not inside the first round
            self.trainer.initialise(announced_network(self.client.status() if status is None else status))
        except ValueError as exc:  # the device's --framework is not the server's
            self._say(f"error: {exc}", logging.ERROR)
            self._misconfigured = True  # a usage error: the command exits 2, as for a bad option
            return False
        report = self._report = self.trainer.validate()
        if not report["ok"]:
            self._say("local data is invalid: " + "; ".join(report["problems"]), logging.ERROR)
            # The server records the report, refuses the device and shows why.
            with contextlib.suppress(ServerError, Unreachable, TLSError):
                self.enroll(report["num_examples"])
            return False
        self._say(f"{report['num_examples']} local examples")
        if self.attack is not None:
            self._say(f"attacking the federation: {self.attack.summary()}", logging.WARNING)
        self.enroll(report["num_examples"])
        return True

    def _loop(self) -> int:
        while not self._stop.is_set():
            try:
                task = self.client.task(wait=self.poll_wait)
            except ServerError as exc:
                if exc.status == 401:  # the server forgot us (reset): enroll again
                    self.client.token = None
                    self.enroll(0)
                    continue
                raise
            code = self.handle_task(task)
            if code is not None:
                return code
            if task["action"] == "finish":  # staying: "finish" comes at once, so wait here
                self._await_next_run()
        return 0

    def _await_next_run(self) -> None:
        """Wait, at most ``poll_wait`` seconds, for the finished run to give way to another (a
        long poll on the public status), then the loop asks for a task again: that request is
        what keeps this device online in the server's eyes between runs."""
        status = self.client.status()
        if status.get("status") != "finished":
            return
        if status.get("revision") is None:  # a server without long polls on its status
            self._stop.wait(self.poll_wait)
            return
        self.client.status(self.poll_wait, since=status["revision"])

    def handle_task(self, task: dict[str, Any]) -> int | None:
        """Do what one task says: train a round, wait, or finish. Returns the exit code once
        the run is over, else None. The loop above and the pool's virtual devices call it."""
        action = task["action"]
        if action == "finish":
            if self.stay and self._finished:  # said and saved already: still waiting
                return None
            self._finished = True
            self._say(f"run finished at model version {task['model_version']}")
            self._finish()
            if self.stay:
                self._say("staying enrolled: waiting for the next run (stop the device to leave)")
                return None
            self.leave()  # so a later run does not select a device that has gone
            return 0
        self._finished = False  # a new run (a Reset, or another run) has begun
        if action == "secagg":
            self.secure.step(task)
            return None
        if action == "wait":
            if task.get("reason") != self._last_reason:
                self._last_reason = task.get("reason")
                self._say(f"waiting: {self._last_reason}")
            return None
        self._last_reason = None
        self._train_round(task)
        self._round = None  # not reached when a signal stops the round: stopped_by_user reports it
        return None

    def _train_round(self, task: dict[str, Any]) -> None:
        number = task["round"]
        version, weights = self.client.model(task.get("model_version"))
        if version != task["model_version"]:  # a round (or a version) newer than the task's
            self._say(f"round {number}: model moved on to version {version}; asking again")
            return
        self._round = number
        if "secagg" in task and self.secure.drops(number):
            self._say(f"round {number}: dropping out after sharing keys (simulated)", logging.WARNING, number)
            with contextlib.suppress(ServerError):
                self.client.report_interrupted(number, "dropped out after sharing its keys (simulated)")
            return
        config = task["config"]
        try:
            scheme = compression.parse(config.get("compression", "none"))
        except ValueError as exc:  # a newer server's scheme: say so, as a failed round
            self._say(f"round {number}: cannot send updates this way: {exc}", logging.ERROR, number)
            return
        proximal = f" with FedProx's proximal term (mu={config['proximal_mu']})" \
            if config.get("proximal_mu") else ""
        self._say(f"round {number}: training {config.get('epochs', 1)} epoch(s) from model v{version}"
                  f"{proximal}", round_number=number)
        self._interrupted.clear()
        done = threading.Event()
        watcher = _WATCHERS.submit(self._watch, number, done)
        detail = None
        started = time.monotonic()
        try:
            result, sent, report = self._local_work(number, weights, config)
        except TrainingInterrupted as exc:
            detail = str(exc)
        except Exception as exc:  # the trainer's failure fails this round, not the device
            self._say(f"round {number}: training failed: {type(exc).__name__}: {exc}", logging.ERROR,
                      number)
            return
        finally:
            done.set()
            if (failed := watcher.exception()) is not None:  # waits for it; training stands
                self._say(f"round {number}: watching the round failed: {failed!r}", logging.WARNING)
        if self._interrupted.is_set():
            self._say(f"round {number}: interrupted by the server ({detail or 'after training'})",
                      logging.WARNING, number)
            with contextlib.suppress(ServerError):
                self.client.report_interrupted(number, detail)
            return
        try:
            local_dp = local_dp_task(config)
        except ValueError as exc:
            self._say(f"round {number}: refused the task's local DP settings: {exc}", logging.ERROR, number)
            return
        if local_dp is not None:  # clipped and noised here: the server never sees the update itself
            sent, _ = privatize_update(sent, weights, *local_dp, self._rng)
            # The log goes to the server too: it names the settings, never the update's norm.
            self._say(f"round {number}: local DP: change clipped to L2 norm {local_dp[0]:g}, "
                      f"Gaussian noise of std {local_dp[0] * local_dp[1]:g} added", round_number=number)
        if self.attack is not None:
            sent = self.attack.poison_weights(sent, weights, self._rng)
        delay = (self.slowdown - 1) * (time.monotonic() - started)
        self.deliver(delay, lambda: self._send(task, version, weights, sent, result, scheme, report))

    def _local_work(self, number: int, weights: dict[str, np.ndarray], config: dict[str, Any]
                    ) -> tuple[Any, dict[str, np.ndarray], dict[str, Any] | None]:
        """The round's work on this device: evaluate the global model on the held-out data when
        asked, train, and with personalization (:mod:`.personal`) make and keep its own model
        and evaluate that too. Returns the training result, the weights to send and the
        evaluation report (None when not asked or without held-out data)."""
        method = config.get("personalization", "none")
        store = PersonalStore(self.folder)
        start, names = dict(weights), []
        if method == "fedper":
            names = personal_names(weights, config.get("personal_layers", ""))
            start.update(store.load({n: weights[n] for n in names}, method))
        report = None
        if config.get("evaluate"):
            held = self._evaluate_holdout(weights)
            if held is not None:
                report = {"round": number, "global": held, "personal": None}
        # q-FFL weighs each update by the loss of the global model on the device's training data
        start_loss = float(self.trainer.evaluate(weights)["loss"]) if config.get("start_loss") else None
        result = self.trainer.train(start, config)
        if start_loss is not None:
            result.metrics["start_loss"] = start_loss
        sent, own = result.weights, None
        if method == "finetune":
            own = result.weights
        elif method == "fedper":
            own = result.weights
            store.save({n: result.weights[n] for n in names}, method)
            sent = {**result.weights, **{n: weights[n] for n in names}}
        elif method == "ditto":
            if not getattr(self.trainer, "personalizes", False):
                raise ValueError("this device's trainer cannot train a Ditto personal model; use the "
                                 "built-in trainer")
            personal = {**weights, **store.load(weights, method)}
            pull = {**config, "proximal_mu": float(config.get("ditto_lambda", 0.1))}
            own = self.trainer.train(personal, pull, anchor=weights).weights
            store.save(own, method)
        if report is not None and own is not None:
            held = self._evaluate_holdout(own)
            report["personal"] = held and {"loss": held["loss"], "accuracy": held["accuracy"]}
        return result, sent, report

    def _evaluate_holdout(self, weights: dict[str, np.ndarray]) -> dict[str, Any] | None:
        """Loss, accuracy and examples of ``weights`` on the held-out data; None without any."""
        evaluate = getattr(self.trainer, "evaluate_holdout", None)
        result = evaluate(weights) if evaluate is not None else None
        if result is None and not self._said_no_holdout:
            self._said_no_holdout = True
            self._say("asked to evaluate, but this device has no held-out data (split with --holdout, "
                      "or start it with --holdout SHARE)")
        return result

    def _deliver_after(self, delay: float, send: Callable[[], None]) -> None:
        self._stop.wait(delay)
        send()

    def _send(self, task: dict[str, Any], version: int, weights: dict[str, np.ndarray],
              sent: dict[str, np.ndarray], result: Any, scheme: compression.Scheme,
              report: dict[str, Any] | None = None) -> None:
        number = task["round"]
        if report is not None:  # before the update: the round's history entry summarizes it
            try:
                self.client.report_evaluation(report)
            except ServerError as exc:
                if exc.status != 409:
                    raise
                self._say(f"round {number}: evaluation not kept: {exc.body.get('message')}",
                          round_number=number)
        try:
            if "secagg" in task:
                self.secure.masked_upload(task, sent, weights, result.num_examples)
                extra = "masked update sent"
            else:
                ack = self.client.upload(number, sent, num_examples=result.num_examples,
                                         model_version=version, metrics=result.metrics,
                                         upload_id=uuid.uuid4().hex, reference=weights,
                                         scheme=scheme,
                                         residual=compression.Residual(self.folder / RESIDUAL_FILE))
                extra = (f"in relay {ack['relay']}'s sum" if "relay" in ack
                         else f"{ack.get('reported', '?')}/{ack.get('selected', '?')} reported")
            accepted = True
        except SecAggError as exc:  # the device's own refusal: the ERROR takes it out of the round
            self._say(f"round {number}: secure aggregation refused: {exc.message}", logging.ERROR, number)
            return
        except ServerError as exc:
            if exc.status != 409:
                raise
            accepted = False
            extra = f"not counted: {exc.body.get('message')}"
        m = result.metrics
        self._say(f"round {number}: loss {m.get('loss', float('nan')):.4f} "
                  f"accuracy {m.get('accuracy', float('nan')):.4f} "
                  f"on {plural(result.num_examples, 'example')} "
                  f"in {m.get('train_seconds', 0):.1f}s; {extra}", round_number=number)
        self._record(number, result, accepted)
        self.rounds_done += 1

    def _watch(self, number: int, done: threading.Event) -> None:
        """While training, beside it: send the trainer's progress (batches done of the total) at
        most once a second, and poll the server's signal about twice a second; on an interrupt
        for this round, tell the trainer (it stops at the next batch end)."""
        side = self.client.fork(timeout=5.0, retry_for=0.0)
        progress = getattr(self.trainer, "progress", None)
        sent, sent_at = None, 0.0
        while not done.wait(0.5):
            side.token = self.client.token
            current = progress() if progress is not None else None
            if current is not None and current != sent and time.monotonic() - sent_at >= PROGRESS_INTERVAL:
                sent, sent_at = current, time.monotonic()
                with contextlib.suppress(ServerError, Unreachable, TLSError):
                    side.report_progress(number, *current)
            try:
                signal = side.signal()
            except (ServerError, Unreachable, TLSError):
                continue
            if signal.get("interrupt") and signal.get("round") == number:
                self._interrupted.set()
                interrupt = getattr(self.trainer, "interrupt", None)
                if interrupt is not None:
                    interrupt()
                return

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

    def stopped_by_user(self) -> None:
        """The device was stopped (Ctrl-C, SIGTERM): say why it goes, and tell the server, so that
        both say what happened. A round it was training is reported interrupted, so the server
        shows it "interrupted" rather than "training" for good; a run that had ended (the demo
        stops its devices once the last round is in) is said to be finished, not interrupted."""
        if self._finished or self._run_is_over():
            self._say("the run is over: leaving the federation")
        elif self._round is not None:
            number = self._round
            self._say(f"interrupted: leaving the federation (stopped during round {number})",
                      logging.WARNING, number)
            with contextlib.suppress(ServerError, Unreachable, TLSError, OSError):
                self.client.fork(timeout=5.0, retry_for=0.0).report_interrupted(
                    number, "the device was stopped (Ctrl-C or SIGTERM)")
        else:
            self._say("interrupted: leaving the federation")
        self.leave()

    def _run_is_over(self) -> bool:
        """Whether the server says the run has finished (one quick call: the device is exiting)."""
        try:
            return self.client.fork(timeout=3.0, retry_for=0.0).status().get("status") == "finished"
        except (ServerError, Unreachable, TLSError, OSError, ValueError):
            return False


def announced_network(status: Mapping[str, Any]) -> dict[str, Any]:
    """The run's network as the server's ``GET /api/status`` announces it (``network``), as a
    task config names it (``framework``, ``model``), so the trainer builds it before the
    first task; ``{}`` from a server that announces none (the first task builds it then).
    The user's own model (not ``builtin``) the device builds from its own
    ``--model-factory``, never from the name the server sends."""
    network = status.get("network")
    if not isinstance(network, dict) or not isinstance(network.get("framework"), str):
        return {}
    announced = {"framework": network["framework"]}
    if isinstance(network.get("name"), str):
        announced["model"] = network["name"]
    return announced
