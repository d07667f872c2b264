"""Many virtual devices in one worker process, each a real device to the server.

A worker of a device pool (:mod:`fedhub.device.pool`: a process here, or a Ray actor anywhere)
hosts a group of devices. Each one is a :class:`~device.runner.DeviceRunner` of its own,
with its own name, token, data folder, lifecycle, server logs and ``history.csv``, and
speaks the one HTTP protocol of :mod:`fedhub.device.client`. What they share is what lets a
thousand of them fit on one machine:

* one network, built once in the framework the spec names (Keras or PyTorch, through
  :mod:`fedhub.frameworks`; a PyTorch worker never imports TensorFlow); each task sets the
  global weights into it and gives it a fresh optimizer state, so every round starts from the
  same point on every device;
* one copy of the global model per version: the first device downloads it, the others
  get ``304 Not Modified``;
* one HTTP session;
* nothing of a device's data until it trains: its ``x.npy``/``y.npy`` are memory-mapped,
  so memory is O(model + the data being trained on), whatever the number of devices.

Scheduling needs no long poll per device: the worker reads the public ``GET /api/status``
(one request; when it has nothing to do, a long poll that ends when the run moves on) to
learn which of its devices the open round selected and asks only those for their task. The
others ask for theirs without waiting every ``keepalive`` seconds, which keeps them online
for the server (set it well under the server's ``--device-timeout``). A device that raises
fails its own step, never the worker; a worker whose launcher is gone stops.

    python -m fedhub.device.virtual --spec worker.json   # the pool starts it; secret in $FEDHUB_ENROLL_SECRET
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import logging
import os
import secrets
import signal
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import requests

from fedhub import tensorflow_env
from fedhub.device import gpus
from fedhub.device.attacks import Attack, make_attack
from fedhub.device.client import Client, PooledClient, RemoteLogHandler, ServerError, TLSError, Unreachable
from fedhub.device.runner import DeviceRunner
from fedhub.device.swarm import process_memory
from fedhub.engine import partials
from fedhub.engine.files import atomic_write_text
from fedhub.relay.sums import RelaySums

log = logging.getLogger("fedhub.pool")
SERVER_MODEL = "server"  # the server's own Keras model, downloaded as a .keras file


@dataclass
class WorkerSpec:
    """What one worker hosts and where it reports. JSON-able, without the enrollment secret
    (that travels in ``$FEDHUB_ENROLL_SECRET`` to a process, in memory to a Ray actor)."""

    server: str
    names: list[str]
    devices_root: str
    model: str = "basic"  # one of the framework's networks (fedhub.frameworks) or "server"
    framework: str = "keras"  # what trains FedHub's networks: keras or torch (as the server's task)
    threads: int | None = None  # PyTorch's intra-op threads in this worker (None: its default)
    index: int = 0
    auto_activate: bool = True
    keepalive: float = 20.0
    poll_interval: float = 0.5
    retry_for: float = 300.0
    verify: bool | str = True
    stats_path: str | None = None
    # Devices that attack (demos and experiments): name -> Attack.describe() ({"kind", "params"}).
    attacks: dict[str, dict[str, Any]] = field(default_factory=dict)
    secagg_dropout: float = 0.0  # chance of dropping out of a secure round after dealing shares
    # Simulated slow devices: name -> how many times its training time its update takes to arrive.
    slowdown: dict[str, float] = field(default_factory=dict)
    enroll_secret: str | None = field(default=None, repr=False)
    # The process that launched this worker: once it is gone, the worker stops (not with Ray).
    parent_pid: int | None = None
    # Keep the devices enrolled and waiting when a run finishes, until stopped (the dashboard's
    # local devices, so that its next run finds them); off, the worker exits with the run.
    stay: bool = False
    # The worker is a relay for its devices (fedhub.relay): while a round takes partial sums, it
    # sends one sum of its devices' updates instead of each (it needs the enrollment secret).
    relay: bool = True
    # The GPUs this worker process trains on, as CUDA_VISIBLE_DEVICES names them (fedhub.device.gpus;
    # [] hides them all); None: as the environment has it (Ray sets it for its actors).
    gpus: list[str] | None = None

    def to_json(self) -> str:
        data = dataclasses.asdict(self)
        data.pop("enroll_secret")
        return json.dumps(data)

    @classmethod
    def from_json(cls, text: str, enroll_secret: str | None = None) -> WorkerSpec:
        return cls(**json.loads(text), enroll_secret=enroll_secret)


# --------------------------------------------------------------------------- training


class SharedModel:
    """The worker's one model, inside a trainer of :mod:`fedhub.device.trainer` whose data is swapped
    for the device being served (:meth:`holding`): an ``ImageTrainer`` (FedHub's networks, any
    framework) or a ``KerasModelTrainer`` (the server's own Keras model)."""

    def __init__(self, trainer: Any) -> None:
        self.trainer = trainer
        self._keras_model: Any = None
        self._reset: Callable[[], Any] | None = None  # a Keras model's optimizer back to fresh
        self._cohort: list[Path] = []  # the devices of this pass (plan_holdouts)
        self._held: dict[Path, dict[str, Any] | None] = {}  # their results for _held_for
        self._held_for: Any = None  # the weights those results are of (kept: identity is the key)
        self.initialise({})

    def _network(self) -> Any:
        """FedHub's network (:class:`fedhub.frameworks.base.Network`), or None for a Keras model."""
        return getattr(self.trainer, "network", None)

    def _keras(self) -> Any:
        network = self._network()
        if network is None:
            return self.trainer.keras_model  # KerasModelTrainer
        return network.model.keras_model if network.framework == "keras" else None

    def initialise(self, config: Mapping[str, Any]) -> None:
        """Build the model (once; again only if the server names another network)."""
        self.trainer.initialise(config)
        keras_model = self._keras()
        if keras_model is not None and keras_model is not self._keras_model:
            import tensorflow as tf  # only for a Keras model: a PyTorch worker never imports it

            optimizer = keras_model.optimizer
            if not optimizer.built:
                optimizer.build(keras_model.trainable_variables)
            self._keras_model = keras_model
            variables = list(optimizer.variables)
            fresh = [tf.constant(np.asarray(v.numpy())) for v in variables]

            # One compiled call: assigning each variable from Python cost about 1 ms a device.
            @tf.function
            def reset() -> None:
                for variable, value in zip(variables, fresh, strict=True):
                    variable.assign(value)

            self._reset = reset

    def reset_optimizer(self) -> None:
        """A fresh optimizer state (moments, step count), as a new device process would have."""
        if self._reset is None:
            self._network().reset_optimizer()
            return
        self._reset()

    def plan_holdouts(self, folders: list[Path]) -> None:
        """The devices about to take their tasks: the first of them to evaluate the global model
        on its held-out data evaluates it on all of theirs, in one pass (every device of a
        round evaluates the same model; one pass over 50 small sets costs about what two do)."""
        self._cohort, self._held, self._held_for = list(folders), {}, None

    def holdout(self, folder: Path, weights: Mapping[str, np.ndarray]) -> dict[str, Any] | None:
        """``weights`` on the held-out data of the device in ``folder`` (None without any)."""
        if weights is not self._held_for and folder in self._cohort:
            self._held, self._held_for = self._evaluate_cohort(weights), weights
        if weights is self._held_for and folder in self._held:
            return self._held.pop(folder)
        return self._evaluate_holdout(folder, weights)

    def _evaluate_cohort(self, weights: Mapping[str, np.ndarray]) -> dict[Path, dict[str, Any] | None]:
        from fedhub.split import DatasetError, read_device_holdout

        network = self._network()
        if network is None:  # the server's own Keras model: one device at a time
            return {}
        try:
            held = {folder: read_device_holdout(folder, mmap=True) for folder in self._cohort}
            parts = {folder: xy for folder, xy in held.items() if xy is not None and len(xy[1])}
            results: dict[Path, dict[str, Any] | None] = {f: None for f in held if f not in parts}
            if parts:
                network.set_weights(weights)
                evaluated = network.evaluate_parts(np.concatenate([x for x, _ in parts.values()]),
                                                   np.concatenate([y for _, y in parts.values()]),
                                                   [len(y) for _, y in parts.values()])
                for (folder, (_, y)), result in zip(parts.items(), evaluated, strict=True):
                    results[folder] = _holdout_report(result, len(y))
        except (DatasetError, OSError, ValueError):  # each device then meets its own problem, alone
            return {}
        return results

    def _evaluate_holdout(self, folder: Path, weights: Mapping[str, np.ndarray]) -> dict[str, Any] | None:
        from fedhub.split import read_device_holdout

        held = read_device_holdout(folder, mmap=True)
        if held is None:
            return None
        with self.holding(*held) as trainer:
            return _holdout_report(trainer.evaluate(weights), len(held[1]))

    @contextlib.contextmanager
    def holding(self, x: np.ndarray, y: np.ndarray) -> Iterator[Any]:
        """The trainer with ``x, y`` as its data, dropped again afterwards."""
        self.trainer.x, self.trainer.y = x, y
        try:
            yield self.trainer
        finally:
            self.trainer.x = self.trainer.y = np.empty(0)


class VirtualTrainer:
    """One virtual device's Trainer: the worker's shared model on this device's own arrays,
    mapped from disk for the duration of a call only."""

    def __init__(self, shared: SharedModel, device_dir: Path, attack: Attack | None = None) -> None:
        self.shared = shared
        self.device_dir = Path(device_dir)
        self.attack = attack  # its labels poisoned too, for label-flip
        self.num_examples = 0  # as found by validate()

    def _arrays(self) -> tuple[np.ndarray, np.ndarray]:
        from fedhub.split import read_device_arrays

        x, y = read_device_arrays(self.device_dir, mmap=True)
        return x, (y if self.attack is None else self.attack.poison_labels(y))

    def validate(self) -> dict[str, Any]:
        from fedhub.split import DatasetError

        try:
            x, y = self._arrays()
        except DatasetError as exc:
            return {"ok": False, "problems": [str(exc)], "num_examples": 0, "class_counts": []}
        with self.shared.holding(x, y) as trainer:
            report = trainer.validate()
        self.num_examples = int(report["num_examples"])
        return report

    def initialise(self, config: Mapping[str, Any]) -> None:
        self.shared.initialise(config)

    @property
    def personalizes(self) -> bool:
        return getattr(self.shared.trainer, "personalizes", False)

    def train(self, weights: Mapping[str, np.ndarray], config: Mapping[str, Any], **more: Any) -> Any:
        """``more``: the shared trainer's own options (``anchor``, for Ditto)."""
        x, y = self._arrays()
        self.shared.initialise(config)
        self.shared.reset_optimizer()
        with self.shared.holding(x, y) as trainer:
            return trainer.train(weights, config, **more)

    def evaluate(self, weights: Mapping[str, np.ndarray]) -> dict[str, float]:
        with self.shared.holding(*self._arrays()) as trainer:
            return trainer.evaluate(weights)

    def evaluate_holdout(self, weights: Mapping[str, np.ndarray]) -> dict[str, Any] | None:
        """``weights`` on this device's held-out arrays (``data/eval.npz``); None without them."""
        return self.shared.holdout(self.device_dir, weights)

    def interrupt(self) -> None:
        self.shared.trainer.interrupt()


def _holdout_report(result: Mapping[str, Any], examples: int) -> dict[str, Any]:
    return {"loss": float(result["loss"]), "accuracy": float(result["accuracy"]), "num_examples": examples}


def _builtin_trainer(name: str, framework: str, threads: int | None = None) -> Any:
    """FedHub's network ``name`` of ``framework``, built now. A PyTorch worker trains with
    ``threads`` threads: the pool gives each worker its share of the cores, as K workers each
    using every core would only slow each other down."""
    from fedhub.device.trainer import ImageTrainer

    if framework == "torch" and threads:
        import torch

        torch.set_num_threads(threads)
    return ImageTrainer(np.empty(0), np.empty(0), model=name, framework=framework)


def _server_model_trainer(model_file: bytes) -> Any:
    """The server's own model (any compiled Keras model), loaded without running its code."""
    import keras

    from fedhub.device.trainer import KerasModelTrainer

    with tempfile.TemporaryDirectory(prefix="fedhub-worker-") as folder:
        path = Path(folder) / "model.keras"
        path.write_bytes(model_file)
        keras_model = keras.saving.load_model(path, safe_mode=True)
    return KerasModelTrainer(keras_model, np.empty(0), np.empty(0))


# --------------------------------------------------------------------------- devices


def _peak_rss(reset: bool = False) -> int:
    """This process's peak resident memory in bytes, since start or the last reset (Linux's
    /proc; 0 where there is none)."""
    try:
        return process_memory(os.getpid(), reset_peak=reset)["VmHWM"]
    except OSError:
        return 0


def _worth_sending(record: logging.LogRecord) -> bool:
    """A virtual device sends the server its round lines, warnings and errors; its waiting
    lines stay in the worker's log (a thousand devices would otherwise flood the server)."""
    return record.levelno >= logging.WARNING or getattr(record, "round", None) is not None


@dataclass
class VirtualDevice:
    runner: DeviceRunner
    trainer: VirtualTrainer
    handler: RemoteLogHandler
    seen: float = 0.0  # monotonic time of the last request the server saw from it
    round: int | None = None  # the round it is training, while it is
    code: int | None = None  # the exit code once the device has stopped
    busy_until: float = 0.0  # monotonic time a slow device's queued update is due


class RoundAsks:
    """Which devices the open round still needs a task asked for, from the public status.

    Each device is asked once per stage of each attempt at a round: a round that fails runs
    again under the same number from a new ``started_at``, and asks everyone again; under
    secure aggregation each stage asks its devices again.
    """

    def __init__(self) -> None:
        self._stage: tuple[Any, ...] = ()
        self._asked: set[str] = set()

    def take(self, current: Mapping[str, Any], eligible: Callable[[str], bool]) -> list[str]:
        """The devices ``current`` (the status' ``round``) waits for that are ``eligible`` and
        not asked yet, in name order; from now on they count as asked."""
        secagg = current.get("secagg")
        stage = (current.get("number"), current.get("started_at"), (secagg or {}).get("stage"))
        if stage != self._stage:
            self._stage, self._asked = stage, set()
        waiting = (secagg["expected"] if secagg else
                   set(current.get("selected", ())) - set(current.get("reported", ())))
        todo = [n for n in sorted(waiting) if n not in self._asked and eligible(n)]
        self._asked.update(todo)
        return todo


# --------------------------------------------------------------------------- the worker


class Worker:
    """Runs the devices of one :class:`WorkerSpec` until the run is over or :meth:`stop`."""

    def __init__(self, spec: WorkerSpec, *, node: str | None = None,
                 print_fn: Callable[..., None] = print) -> None:
        self.spec = spec
        self.node = node or socket.gethostname()
        self._print = print_fn
        self._stop = threading.Event()
        self.session = requests.Session()
        self.session.verify = spec.verify
        self.session.hooks["response"].append(self._count)
        self.bytes_up = 0
        self.bytes_down = 0
        self.tasks: list[dict[str, Any]] = []  # one per round trained: device, round, node, seconds
        self.failures = 0  # steps that raised
        self.devices: dict[str, VirtualDevice] = {}
        self._models = self._client("models")
        self._public = self._client("status")
        self._stats_written = 0.0
        self._startup_peak = 0
        self._due: list[tuple[float, str, Callable[[], None]]] = []  # slow devices' updates
        self.relay: RelaySums | None = None
        self.shared: SharedModel | None = None
        self._announcing: dict[str, Any] | None = None  # the status its devices join by

    def _client(self, name: str) -> Client:
        client = Client(self.spec.server, name, verify=self.spec.verify, retry_for=self.spec.retry_for)
        client.session.close()
        client.session = self.session
        return client

    def _count(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        body = response.request.body
        self.bytes_up += len(body) if body else 0
        self.bytes_down += len(response.content)

    def stop(self) -> None:
        """End the loop at the next device step; the devices leave the federation."""
        self._stop.set()

    # setting up -------------------------------------------------------------
    def _shared_model(self) -> SharedModel:
        from fedhub import frameworks

        builtin = frameworks.networks(self.spec.framework)
        if self.spec.model in builtin:
            return SharedModel(_builtin_trainer(self.spec.model, self.spec.framework, self.spec.threads))
        if self.spec.model != SERVER_MODEL or self.spec.framework != "keras":
            raise ValueError(f"model must be one of {', '.join(builtin)}"
                             + (f" or {SERVER_MODEL}" if self.spec.framework == "keras" else "")
                             + f" (framework {self.spec.framework})")
        # The server's model comes with a device token: enroll the first device now (it sends
        # its data validation when it joins below, with the token saved here).
        first = self.spec.names[0]
        runner = DeviceRunner(self._pooled_client(first), None, self._folder(first),
                              enroll_secret=self.spec.enroll_secret,
                              auto_activate=self.spec.auto_activate, print_fn=self._print)
        runner.enroll(0)
        return SharedModel(_server_model_trainer(runner.client.model_file("latest")))

    def _folder(self, name: str) -> Path:
        return Path(self.spec.devices_root) / name

    def _pooled_client(self, name: str) -> PooledClient:
        return PooledClient(self.spec.server, name, session=self.session, models=self._models,
                            verify=self.spec.verify, retry_for=self.spec.retry_for)

    def _relay(self) -> RelaySums | None:
        """This worker as a relay for its devices, enrolled under a name of its own."""
        if not self.spec.relay or not self.spec.enroll_secret:
            return None
        upstream = self._client(f"pool-w{self.spec.index}-{secrets.token_hex(4)}")
        upstream.register_relay(self.spec.enroll_secret)
        return RelaySums(upstream)

    def _flush(self) -> None:
        """Send what the worker's devices folded (their round's sum): after each pass over them."""
        if self.relay is not None:
            self.relay.flush()

    def _setup(self, shared: SharedModel) -> None:
        self.shared = shared
        self.relay = self._relay()
        for name in self.spec.names:
            declared = self.spec.attacks.get(name)
            attack = None if declared is None else make_attack(declared["kind"], **declared["params"])
            trainer = VirtualTrainer(shared, self._folder(name), attack)
            runner = DeviceRunner(self._pooled_client(name), trainer, self._folder(name),
                                  enroll_secret=self.spec.enroll_secret,
                                  auto_activate=self.spec.auto_activate, poll_wait=0.0,
                                  attack=attack, slowdown=self.spec.slowdown.get(name, 1.0),
                                  print_fn=self._print, secagg_dropout=self.spec.secagg_dropout,
                                  stay=self.spec.stay)
            runner.deliver = lambda delay, send, name=name: self._defer(name, delay, send)
            runner.client.relay = self.relay
            handler = RemoteLogHandler(runner.client, background=False)
            handler.addFilter(_worth_sending)
            runner.logger.addHandler(handler)
            self.devices[name] = VirtualDevice(runner, trainer, handler)
        for name, device in self.devices.items():
            if self._stop.is_set():
                return
            self._guarded(name, lambda d=device: self._join(d))

    def _join(self, device: VirtualDevice) -> None:
        if self._announcing is None:  # the run's network, read once for all the worker's devices
            self._announcing = self._public.status()
        if not device.runner.join(self._announcing):
            device.code = 1  # invalid data: the server knows why and refuses the device
        device.seen = time.monotonic()

    # running ----------------------------------------------------------------
    def run(self) -> dict[str, Any]:
        """Enroll every device, then serve rounds until the run is finished; the summary."""
        try:
            shared = self._shared_model()
            # What the devices cost is measured from here: the framework's start-up peak is behind us.
            self._startup_peak = _peak_rss()
            _peak_rss(reset=True)
            self._setup(shared)
            self._loop()
        finally:
            self._close()
        return self.summary()

    def _alive(self) -> list[str]:
        return [name for name, d in self.devices.items() if d.code is None]

    def _loop(self) -> None:
        asks = RoundAsks()
        revision = None  # set after a pass with nothing to do: the next status waits for a change
        told: set[str] = set()  # devices asked for their task since the run finished
        while not self._stop.is_set() and self._alive():
            self._send_due()
            self._flush()
            status = self._public.status(self.spec.poll_interval, since=revision)
            if self.relay is not None:
                self.relay.observe(status)
            revision = None
            if status["status"] == "finished":
                for name in self._alive():
                    if name not in told:  # once per device and finished run
                        told.add(name)
                        self._step(name)  # "finish": saves nothing here; leaves unless staying
                if not self.spec.stay:
                    return
                # staying: keep the devices online, and wait for the run to give way to another
                self._keepalive(budget=32)
                revision = status.get("revision")
                if revision is None:
                    self._stop.wait(self.spec.poll_interval)
                continue
            told.clear()
            if status.get("mode") == "async":
                self._train_continuously(status)
                continue
            todo = asks.take(status.get("round") or {},
                             lambda n: n in self.devices and self.devices[n].code is None)
            self.shared.plan_holdouts([self._folder(n) for n in todo])
            tasks = self._tasks(todo)
            for name in todo:
                if self._stop.is_set():
                    return
                self._step(name, tasks.get(name))
                self._send_due()
                if self.relay is None:  # each keepalive a request: a few between the steps
                    self._keepalive(budget=4)
            self._flush()
            if self.relay is not None:  # one request for up to 256 devices: after the pass
                self._keepalive(budget=2 * partials.MAX_DEVICES)
            if not todo:
                if self.relay is None:
                    self._keepalive(budget=32)
                revision = status.get("revision")
                if revision is None:  # a server without long polls on its status
                    self._stop.wait(self.spec.poll_interval)

    def _train_continuously(self, status: dict[str, Any]) -> None:
        """Asynchronous mode: every device not waiting on its own slow update trains in turn."""
        # Each device may train from another version here: no pass evaluates for all.
        self.shared.plan_holdouts([])
        now = time.monotonic()
        ready = [n for n in self._alive() if self.devices[n].busy_until <= now]
        if status["status"] != "running" or not ready:
            self._keepalive(budget=32)
            due = min((d.busy_until for d in self.devices.values()), default=now) - now
            self._stop.wait(min(self.spec.poll_interval, max(0.05, due)))
            return
        for name in ready:
            if self._stop.is_set():
                return
            self._step(name)
            self._send_due()

    def _defer(self, name: str, delay: float, send: Callable[[], None]) -> None:
        """A slow device's update: sent ``delay`` seconds from now, while the others train."""
        if delay <= 0:
            send()
            return
        self.devices[name].busy_until = time.monotonic() + delay
        self._due.append((self.devices[name].busy_until, name, send))

    def _send_due(self) -> None:
        now = time.monotonic()
        due = [item for item in self._due if item[0] <= now]
        self._due = [item for item in self._due if item[0] > now]
        for _, name, send in sorted(due, key=lambda item: item[0]):
            self._guarded(name, send)

    def _keepalive(self, budget: int) -> None:
        """Ask the devices the server has not heard from for ``keepalive`` seconds for a task
        (at most ``budget``; with a relay, in one request per 256)."""
        horizon = time.monotonic() - self.spec.keepalive
        due = sorted((d.seen, name) for name, d in self.devices.items()
                     if d.code is None and d.seen <= horizon)
        names = [name for _, name in due[:budget]]
        tasks = self._tasks(names)
        for name in names:
            if self._stop.is_set():
                return
            self._step(name, tasks.get(name))

    def _tasks(self, names: list[str]) -> dict[str, dict[str, Any] | ServerError]:
        """The tasks of ``names``, asked by the relay in one request per 256 devices (none
        without a relay: each device then asks its own)."""
        if self.relay is None:
            return {}
        enrolled = [(n, t) for n in names if (t := self.devices[n].runner.client.token)]
        out: dict[str, dict[str, Any] | ServerError] = {}
        step = partials.MAX_DEVICES
        for start in range(0, len(enrolled), step):
            try:
                out.update(self.relay.upstream.relay_tasks(dict(enrolled[start : start + step])))
            except ServerError as exc:  # (a server that forgot the relay): each device asks its own
                log.warning("relay %s: its devices' tasks were refused: %s", self.relay.name, exc)
                break
        return out

    def _step(self, name: str, asked: dict[str, Any] | ServerError | None = None) -> None:
        """One task for one device: ask (unless ``asked`` is the answer already), then do what it
        says (train, wait or finish)."""
        device = self.devices[name]

        def step() -> None:
            runner = device.runner
            try:
                if isinstance(asked, ServerError):
                    raise asked
                task = asked if asked is not None else runner.client.task(wait=0)
            except ServerError as exc:
                if exc.status != 401:
                    raise
                runner.client.token = None  # the server forgot the device (reset): enroll again
                runner.enroll(device.trainer.num_examples)
                return
            device.seen = time.monotonic()
            instead = self.relay.passing(name, task) if self.relay is not None else None
            task = instead or task
            device.round = task.get("round") if task["action"] == "train" else None
            started = time.perf_counter()
            device.code = runner.handle_task(task)
            device.seen = time.monotonic()
            if device.round is not None:
                self.tasks.append({"device": name, "round": device.round, "node": self.node,
                                   "seconds": round(time.perf_counter() - started, 3)})
                self._write_stats()

        self._guarded(name, step)
        device.round = None

    def _guarded(self, name: str, step: Callable[[], None]) -> None:
        """Run one device's step; what it raises stops that step (or that device), not the worker."""
        device = self.devices[name]
        try:
            step()
        except (Unreachable, TLSError):
            raise  # the server is gone for everyone: the pool decides
        except ServerError as exc:
            if exc.status == 409 and exc.field == "validation":  # refused for invalid data
                device.code = 1
            self._fail(device, f"refused by the server: {exc}")
        except Exception as exc:
            self._fail(device, f"{type(exc).__name__}: {exc}")
        finally:
            device.handler.flush()

    def _fail(self, device: VirtualDevice, message: str) -> None:
        # An update it folded before failing goes first, as it would have without the relay: the
        # ERROR below drops the device from the round, and a sum naming it would then be refused.
        self._flush()
        self.failures += 1
        name = device.runner.client.name
        self._print(f"[{name}] step failed: {message}", flush=True)
        # An ERROR naming the round drops the device from it, so the round does not wait.
        device.runner.logger.error(f"step failed: {message}", extra={"round": device.round})

    def _close(self) -> None:
        stopping = self._stop.is_set()
        with contextlib.suppress(Exception):  # the server may be gone: then so is the round
            self._flush()
        for device in self.devices.values():
            if stopping and device.code is None:
                device.runner.leave()  # tell the server it goes, as Ctrl-C on a device does
            device.handler.close()
            device.runner.logger.removeHandler(device.handler)
        with contextlib.suppress(Exception):  # the lines the devices said last, gathered by the relay
            self._flush()
        self._write_stats(force=True)

    # reporting --------------------------------------------------------------
    def summary(self) -> dict[str, Any]:
        return {"worker": self.spec.index, "node": self.node, "pid": os.getpid(),
                "gpus": os.environ.get("CUDA_VISIBLE_DEVICES"),  # as this process sees them
                # Peak resident memory of start-up (the framework, the model), then of serving the devices.
                "startup_rss_mb": round(self._startup_peak / 2**20, 1),
                "peak_rss_mb": round(_peak_rss() / 2**20, 1),
                "bytes_up": self.bytes_up, "bytes_down": self.bytes_down, "tasks": list(self.tasks),
                "failures": self.failures,
                "exit_codes": {name: d.code for name, d in self.devices.items()}}

    def _write_stats(self, force: bool = False) -> None:
        if self.spec.stats_path is None or (not force and time.monotonic() - self._stats_written < 1.0):
            return
        self._stats_written = time.monotonic()
        atomic_write_text(self.spec.stats_path, json.dumps(self.summary()))


def _exit_with_parent(worker: Worker, parent: int, grace: float = 10.0) -> None:
    """Stop when ``parent``, the process that launched this worker, is gone (killed without a
    chance to stop its workers): an orphan would keep retrying a server that no longer exists.
    (``parent`` comes from the spec: the launcher may be gone before this process gets here.)"""

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        worker.stop()
        time.sleep(grace)  # time to stop cleanly, unless a request is retrying a dead server
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedhub.device.virtual", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--spec", type=Path, required=True, help="the worker's JSON spec (the pool writes it)")
    a = p.parse_args(argv)
    tensorflow_env.lean()
    try:
        spec = WorkerSpec.from_json(a.spec.read_text(), os.environ.get("FEDHUB_ENROLL_SECRET"))
    except (OSError, ValueError, TypeError) as exc:
        print(f"error: --spec {a.spec}: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    if spec.gpus:  # workers may share a GPU (a fractional --gpus-per-worker)
        gpus.share_memory(spec.framework)
    worker = Worker(spec)
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: worker.stop())
    _exit_with_parent(worker, spec.parent_pid or os.getppid())
    try:
        summary = worker.run()
    except (Unreachable, TLSError) as exc:
        print(f"worker {spec.index}: giving up: {exc}", flush=True)
        return 1
    print(f"worker {spec.index}: {len(summary['tasks'])} device rounds trained, "
          f"{summary['failures']} failed steps", flush=True)
    # The run is over or the worker was stopped, and everything is written and flushed:
    # exit now, as TensorFlow's own teardown takes seconds. Each device's code is in the stats.
    os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
