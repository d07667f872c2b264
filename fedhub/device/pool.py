"""A pool of K workers hosting N virtual devices: processes on this machine, or Ray actors.

    pool = DevicePool(url, names, devices_root, workers=2, enroll_secret=secret).start()
    pool.wait()   # until the run is over; pool.stats() then says what was trained where

Each worker runs :class:`fedhub.device.virtual.Worker` on its share of the devices, shared out
by their data so that each worker holds about as many examples (:func:`balance`), on the GPUs
``gpus_per_worker`` gives it (:mod:`fedhub.device.gpus`; none by default). A worker that
dies (a crash, the OOM killer, SIGKILL) is started again with the same devices, which pick up
their saved tokens and carry on: a round still open trains them, otherwise the next one does.
With ``backend="ray"`` the workers are Ray actors (:mod:`fedhub.device.ray_backend`), placed by
Ray on the machines of a cluster with ``cpus_per_worker`` CPUs and ``gpus_per_worker`` GPUs each;
they reach the FedHub server over HTTP like any device, and read the device folders at the same
path on every machine.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fedhub.checkout import ROOT

from . import gpus
from .attacks import Attack
from .launcher import stop
from .virtual import WorkerSpec

log = logging.getLogger("fedhub.pool")
BACKENDS = ("process", "ray")


@dataclass
class _Slot:
    """One worker position: its spec, the running incarnation, and what earlier ones reported."""

    spec: WorkerSpec
    handle: Any = None
    restarts: int = 0
    done: bool = False
    summaries: list[dict[str, Any]] = field(default_factory=list)


@dataclass
class _Process:
    proc: subprocess.Popen
    stats_path: Path


class ProcessWorkers:
    """Workers as ``python -m fedhub.device.virtual`` processes; output in ``log_dir/worker-K.log``."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir

    def launch(self, spec: WorkerSpec, incarnation: int) -> _Process:
        stats = self.log_dir / f"worker-{spec.index}.{incarnation}.stats.json"
        spec_path = self.log_dir / f"worker-{spec.index}.json"
        spec_path.write_text(dataclasses.replace(spec, stats_path=str(stats)).to_json())
        env = {**os.environ}
        if spec.gpus is not None:
            env["CUDA_VISIBLE_DEVICES"] = ",".join(spec.gpus)
        if spec.enroll_secret:  # in the environment, not on the command line (ps shows that)
            env["FEDHUB_ENROLL_SECRET"] = spec.enroll_secret
        with open(self.log_dir / f"worker-{spec.index}.log", "ab") as out:
            proc = subprocess.Popen([sys.executable, "-m", "fedhub.device.virtual", "--spec", str(spec_path)],
                                    stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        return _Process(proc, stats)

    def state(self, handle: _Process) -> str:
        code = handle.proc.poll()
        return "running" if code is None else "done" if code == 0 else f"died (exit code {code})"

    def summary(self, handle: _Process) -> dict[str, Any]:
        try:
            return json.loads(handle.stats_path.read_text())
        except (OSError, ValueError):
            return {}

    def stop(self, handles: Sequence[_Process], timeout: float) -> None:
        """As Ctrl-C: the devices leave the federation, then the worker exits."""
        stop([h.proc for h in handles], timeout=timeout)

    def pid(self, handle: _Process) -> int:
        return handle.proc.pid

    def close(self) -> None:
        pass


def examples_of(devices_root: Path, names: Sequence[str]) -> dict[str, int]:
    """Each device's training examples: from the split's ``partition.json`` when it names them,
    else from the arrays' headers (memory-mapped, not read); 1 where there is nothing to read."""
    from fedhub.split import PARTITION_FILE, DatasetError, read_device_arrays

    try:
        listed = json.loads((devices_root / PARTITION_FILE).read_text())["devices"]
    except (OSError, ValueError, KeyError, TypeError):
        listed = {}
    sizes = {}
    for name in names:
        size = (listed.get(name) or {}).get("examples") if isinstance(listed, dict) else None
        if not isinstance(size, int):
            try:
                size = len(read_device_arrays(devices_root / name, mmap=True)[1])
            except (DatasetError, OSError, ValueError):
                size = 1
        sizes[name] = max(1, size)
    return sizes


def balance(names: Sequence[str], devices_root: Path, count: int) -> list[list[str]]:
    """``names`` over ``count`` workers so that each holds about as many examples: the largest
    device first, each to the worker with the fewest examples so far (longest processing time
    first). A round's cohort is a random draw from each worker's devices, so workers that hold
    the same amount of data finish a round at about the same time. Each group in name order."""
    sizes = examples_of(devices_root, names)
    groups: list[list[str]] = [[] for _ in range(count)]
    loads = [0] * count
    for name in sorted(names, key=lambda n: (-sizes[n], n)):
        lightest = min(range(count), key=lambda i: (loads[i], len(groups[i]), i))
        groups[lightest].append(name)
        loads[lightest] += sizes[name]
    return [sorted(group) for group in groups]


class DevicePool:
    """Virtual devices ``names`` (folders under ``devices_root``) on ``workers`` workers.

    ``model`` is one of ``framework``'s networks (:mod:`fedhub.frameworks`: Keras ``basic``/``cnn``,
    PyTorch ``cifar``/``basic``/``cnn``) or ``"server"`` (the server's own Keras model, downloaded
    by each worker); ``framework`` is what the server's task names. A PyTorch worker trains with
    its share of the cores (the process backend: the machine's cores over the workers; Ray: its
    ``cpus_per_worker``) and imports no TensorFlow. ``attacks`` maps device names
    to the attack each mounts (:mod:`fedhub.device.attacks`), ``slowdown`` to how many times its training
    time a simulated slow device's update takes to arrive. ``keepalive`` must stay well
    under the server's ``--device-timeout``. A worker is restarted at most ``max_restarts``
    times; after that :attr:`error` says why and :meth:`wait` raises. ``stay``: the devices
    stay enrolled and waiting when a run finishes (the dashboard's, for its next run), so the
    workers run until :meth:`stop`; off, they exit with the run and :meth:`wait` returns.
    ``relay``: each worker is a relay for its devices (:mod:`fedhub.relay`): in rounds that take
    partial sums it sends one sum of its devices' updates instead of each update (needs
    ``enroll_secret``); off, every update goes to the server on its own.
    """

    def __init__(self, server: str, names: Sequence[str], devices_root: str | Path, *,
                 workers: int | None = None, model: str = "basic", framework: str = "keras",
                 enroll_secret: str | None = None,
                 auto_activate: bool = True, keepalive: float = 20.0, retry_for: float = 300.0,
                 verify: bool | str = True, log_dir: str | Path | None = None, max_restarts: int = 3,
                 backend: str = "process", ray_address: str | None = None,
                 cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0,
                 attacks: Mapping[str, Attack] | None = None, secagg_dropout: float = 0.0,
                 slowdown: Mapping[str, float] | None = None, stay: bool = False,
                 relay: bool = True) -> None:
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
        if not names:
            raise ValueError("a pool needs at least one device")
        if workers is not None and workers < 1:
            raise ValueError("workers must be at least 1")
        if keepalive <= 0:
            raise ValueError("keepalive must be positive")
        self.server = server.rstrip("/")
        self.names = list(names)
        self.devices_root = Path(devices_root).resolve()
        self.workers = workers
        self.model = model
        self.framework = framework
        self.enroll_secret = enroll_secret
        self.auto_activate = auto_activate
        self.keepalive = keepalive
        self.retry_for = retry_for
        self.verify = verify
        self.log_dir = Path(log_dir).resolve() if log_dir else self.devices_root / "logs"
        self.max_restarts = max_restarts
        self.backend = backend
        self.ray_address = ray_address
        self.cpus_per_worker = cpus_per_worker
        self.gpus_per_worker = gpus_per_worker
        self.attacks = {name: attack.describe() for name, attack in (attacks or {}).items()}
        self.secagg_dropout = secagg_dropout
        self.slowdown = dict(slowdown or {})  # simulated slow devices: name -> factor
        self.stay = stay
        self.relay = relay
        self.error: str | None = None
        self._slots: list[_Slot] = []
        self._runner: Any = None
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # starting ---------------------------------------------------------------
    def start(self) -> DevicePool:
        """Start the workers and the supervisor that restarts them; returns at once."""
        if self._thread is not None:
            return self
        self.log_dir.mkdir(parents=True, exist_ok=True)
        if self.backend == "ray":
            from .ray_backend import RayWorkers

            self._runner = RayWorkers(self.ray_address, self.cpus_per_worker, self.gpus_per_worker,
                                      self.log_dir)
            default = self._runner.capacity()
        else:
            self._runner = ProcessWorkers(self.log_dir)
            default = os.cpu_count() or 1
        count = min(self.workers or default, len(self.names))
        threads = self.threads_per_worker(count)
        # Ray places its actors on GPUs itself; process workers get theirs here
        plan = None if self.backend == "ray" else gpus.assign(
            count, self.gpus_per_worker, gpus.visible() if self.gpus_per_worker else [])
        for index, names in enumerate(balance(self.names, self.devices_root, count)):
            spec = WorkerSpec(server=self.server, names=names,
                              devices_root=str(self.devices_root), model=self.model,
                              framework=self.framework, threads=threads, index=index,
                              auto_activate=self.auto_activate, keepalive=self.keepalive,
                              retry_for=self.retry_for, verify=self.verify,
                              attacks={n: a for n, a in self.attacks.items() if n in names},
                              secagg_dropout=self.secagg_dropout,
                              slowdown={n: f for n, f in self.slowdown.items() if n in names},
                              enroll_secret=self.enroll_secret, parent_pid=os.getpid(),
                              stay=self.stay, relay=self.relay, gpus=None if plan is None else plan[index])
            slot = _Slot(spec)
            slot.handle = self._runner.launch(spec, 0)
            self._slots.append(slot)
        self._thread = threading.Thread(target=self._supervise, name="fedhub-pool", daemon=True)
        self._thread.start()
        return self

    def threads_per_worker(self, count: int) -> int:
        """Threads for each of ``count`` workers, so that workers x threads <= cores: on Ray the
        CPUs each actor reserves, here this machine's cores shared out (at least one)."""
        if self.backend == "ray":
            return max(1, int(self.cpus_per_worker))
        return max(1, (os.cpu_count() or 1) // count)

    def _supervise(self) -> None:
        while not self._stopping.wait(0.5):
            with self._lock:
                for slot in self._slots:
                    if slot.done or self._stopping.is_set():
                        continue
                    state = self._runner.state(slot.handle)
                    if state == "done":
                        slot.done = True
                    elif state != "running":
                        self._restart(slot, state)
            if all(slot.done for slot in self._slots) or self.error:
                return

    def _restart(self, slot: _Slot, why: str) -> None:
        slot.summaries.append(self._runner.summary(slot.handle))
        index = slot.spec.index
        if slot.restarts >= self.max_restarts:
            self.error = (f"worker {index} {why} {slot.restarts + 1} times; giving up "
                          f"(see {self.log_dir / f'worker-{index}.log'})")
            slot.done = True
            log.error(self.error)
            return
        slot.restarts += 1
        log.warning("worker %d %s; starting it again (%d of %d)", index, why, slot.restarts,
                    self.max_restarts)
        slot.handle = self._runner.launch(slot.spec, slot.restarts)

    # waiting and stopping ---------------------------------------------------
    @property
    def worker_count(self) -> int:
        return len(self._slots)

    def running(self) -> bool:
        return self._thread is not None and not all(slot.done for slot in self._slots)

    def wait(self, timeout: float | None = None) -> bool:
        """Block until every worker is done (the run is over); False after ``timeout`` seconds.
        Raises RuntimeError if a worker kept dying."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.running() and not self.error:
            if deadline is not None and time.monotonic() > deadline:
                return False
            time.sleep(0.2)
        if self.error:
            raise RuntimeError(self.error)
        return True

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every worker (their devices leave the federation first)."""
        if self._runner is None:
            return
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        with self._lock:
            self._runner.stop([s.handle for s in self._slots if not s.done], timeout)
            for slot in self._slots:
                if not slot.done:
                    slot.done = True
        self._runner.close()

    def __enter__(self) -> DevicePool:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # reading ----------------------------------------------------------------
    def pids(self) -> list[int]:
        """The process ids of the running workers (on this machine for the process backend)."""
        with self._lock:
            return [self._runner.pid(s.handle) for s in self._slots if not s.done]

    def stats(self) -> dict[str, Any]:
        """Totals over every worker and every restart: bytes sent and received, each device
        round trained (device, round, node), failed steps, restarts, each device's exit code,
        and each worker's peak resident memory and GPUs (one entry per worker process)."""
        with self._lock:
            summaries = [(slot, [*slot.summaries, self._runner.summary(slot.handle)])
                         for slot in self._slots]
        out: dict[str, Any] = {"workers": len(summaries), "backend": self.backend, "bytes_up": 0,
                               "bytes_down": 0, "tasks": [], "failures": 0, "restarts": 0,
                               "exit_codes": {}, "worker_peak_rss_mb": [], "worker_gpus": []}
        for slot, parts in summaries:
            out["restarts"] += slot.restarts
            for part in parts:
                if "peak_rss_mb" in part:
                    out["worker_peak_rss_mb"].append(part["peak_rss_mb"])
                    out["worker_gpus"].append(part.get("gpus"))
                out["bytes_up"] += part.get("bytes_up", 0)
                out["bytes_down"] += part.get("bytes_down", 0)
                out["tasks"] += part.get("tasks", [])
                out["failures"] += part.get("failures", 0)
                out["exit_codes"].update(part.get("exit_codes", {}))
        return out
