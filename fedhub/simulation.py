"""``fedhub.simulate``: a whole federated run on one machine (or a Ray cluster), in one call.

The devices run in one of two ways, both real devices to the server:

* one process (or thread) per device, each with its own TensorFlow: :class:`fedhub.Device`
  (a Keras model of the user's own);
* a pool of worker processes (or Ray actors) hosting many virtual devices each, sharing one
  model per worker (FedHub's networks in Keras or PyTorch, or the user's Keras model)
  and reading a device's data only while it trains (:mod:`fedhub.device.pool`).
  Memory is then O(workers x model), not O(devices x TensorFlow): the default as soon as
  there are more devices than cores, and whenever ``workers`` or ``backend="ray"`` is given.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedhub.device.attacks import Attack
from fedhub.engine.plural import plural
from fedhub.options.framework import FRAMEWORK

from .devices import Device
from .servers import Server

Partitions = Sequence[tuple[np.ndarray, np.ndarray]] | str | Path


class History(list):
    """The completed rounds (as ``/api/history``), plus ``model`` (the final global Keras model;
    for a network of another framework, :meth:`fedhub.Server.global_model`'s) and ``stats``:
    ``wall_s`` and ``first_round_s`` (seconds from the call to the last and first round's
    result), ``round_s`` (to each round's), on a pool ``training_started_at`` (the time training
    started, once every device had enrolled), ``peak_rss_mb`` (this process and all its children
    together, sampled), and for a pool ``bytes_up``, ``bytes_down``, ``workers``, ``restarts``
    and ``tasks`` (each device round trained: device, round, node)."""

    model: Any = None
    stats: dict[str, Any]

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.stats = {}


class PeakMemory:
    """Samples the resident memory of this process and all its descendants, summed, in a thread.

    The sum counts memory shared between processes once per process, so it errs high.
    """

    def __init__(self, interval: float = 0.25) -> None:
        import psutil

        self._root = psutil.Process()
        self._interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="fedhub-memory", daemon=True)

    def sample(self) -> int:
        import psutil

        total = 0
        for proc in [self._root, *self._root.children(recursive=True)]:
            with contextlib.suppress(psutil.Error):  # it ended between the listing and the reading
                total += proc.memory_info().rss
        self.peak = max(self.peak, total)
        return total

    def _run(self) -> None:
        while not self._stop.wait(self._interval):
            self.sample()

    def __enter__(self) -> PeakMemory:
        self.sample()
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.sample()

    @property
    def peak_mb(self) -> float:
        return round(self.peak / 2**20, 1)


def simulate(model: Any, partitions: Partitions, *,
             test_data: tuple[np.ndarray, np.ndarray] | None = None, processes: bool = True,
             workers: int | None = None, backend: str = "process", ray_address: str | None = None,
             cpus_per_worker: float = 1.0, gpus_per_worker: float = 0.0,
             root: str | Path | None = None, timeout: float | None = None,
             on_round: Callable[[dict[str, Any]], None] | None = None,
             on_progress: Callable[[dict[str, Any]], None] | None = None, quiet: bool = True,
             attacks: Mapping[str, Attack] | None = None,
             dropout: float = 0.0, slow_devices: float = 0.0, slowdown: float = 1.0,
             relay: bool = True, **server_options: Any) -> History:
    """Run ``rounds`` rounds of federated learning with one device per partition.

    ``model`` is a compiled Keras model or a function returning one (called once), or the
    name of one of FedHub's networks of ``framework`` (``"keras"``: ``"basic"``, ``"cnn"``;
    ``"torch"``: ``"cifar"``, ``"basic"``, ``"cnn"``), tested on ``dataset``'s test set
    (default: the one the network takes; give ``data_dir`` and optionally ``test_limit``), as
    :class:`fedhub.Server`'s. A PyTorch run imports no TensorFlow in its workers. ``partitions`` is a list of
    ``(x, y)`` arrays, device ``i`` getting the i-th as ``device<i>``, or a folder written by
    ``python -m fedhub.split`` (its devices as they are named there).

    The devices run against a :class:`fedhub.Server` started here on a free loopback port:

    * on a pool of ``workers`` worker processes hosting virtual devices, each on
      ``gpus_per_worker`` GPUs (:mod:`fedhub.device.gpus`; 0: the CPU) (``backend="ray"``:
      Ray actors with ``cpus_per_worker``/``gpus_per_worker`` each, on the cluster at
      ``ray_address``, or a local one). This is the default when there are more devices than
      cores (then ``workers`` = the number of cores). The run starts once every device has
      enrolled, ``fraction`` of them (a server option) take part in each round.
    * otherwise (or with ``workers=0``) each in a child process (``processes=True``) or in a
      thread of this process; every round waits for all devices.

    ``on_round(entry)`` is called as each round completes, ``on_progress(status)`` about four
    times a second with the server's status (the open round's selected and reported devices).
    ``attacks`` maps device names to the attack each mounts
    (``fedhub.make_attack("scale", factor=10)``). ``slow_devices`` (a share, on a pool) of the
    devices, picked with the seed, are ``slowdown`` times slower: their update arrives after
    that many times their training time (a heterogeneous fleet; ``mode="async"`` is
    :class:`fedhub.Server`'s, as are ``buffer_size`` and ``max_staleness``). ``relay``: each pool
    worker sends one partial sum of its devices' updates in rounds that take them (:mod:`fedhub.relay`;
    False: every update on its own). ``server_options`` are
    the run's settings, as :class:`fedhub.Server` takes them and with its defaults (``rounds``,
    ``epochs``, ``strategy="krum", strategy_params={"num_malicious": 1}``, ...).
    ``secagg`` (True, or a :class:`fedhub.engine.secagg.SecAggConfig`) masks every update
    (SecAgg+); ``dropout`` is then the chance that a device drops out of a round right after
    dealing its key shares (its masks are recovered from its neighbours' shares).
    Returns the history, with the final model as ``.model`` and figures in ``.stats``.
    Raises RuntimeError if a device fails (for instance invalid data: its reason is in the
    message) or a pool worker keeps dying, and TimeoutError after ``timeout`` seconds.
    """
    from fedhub import settings

    started = time.time()
    server_options = settings.keywords(server_options)
    framework = server_options.get("framework", FRAMEWORK)
    folder = isinstance(partitions, str | Path)
    if not folder and not partitions:
        raise ValueError("give at least one partition (x, y)")
    if workers is not None and workers < 0:
        raise ValueError("workers must be 0 (one process per device) or more")
    if framework != FRAMEWORK and not isinstance(model, str):
        raise ValueError(f"a model of your own is a Keras model; with framework={framework!r} give "
                         f"the name of one of FedHub's networks")
    if workers == 0 and (backend != "process" or isinstance(model, str) or folder):
        raise ValueError("workers=0 runs one process per (x, y) partition with a Keras model; "
                         "FedHub's named networks, device folders and Ray need workers")
    pooled = workers != 0 and (workers is not None or backend != "process" or isinstance(model, str)
                               or folder or (processes and len(partitions) > (os.cpu_count() or 1)))
    if not 0 <= slow_devices <= 1 or not 1 <= slowdown <= 1000:
        raise ValueError("slow_devices must be a share from 0 to 1 and slowdown from 1 to 1000")
    if slow_devices and not pooled:
        raise ValueError("slow devices are simulated on a pool of workers: give workers >= 1")
    root = Path(root) if root else Path(tempfile.mkdtemp(prefix="fedhub-simulation-"))
    if attacks and not folder:
        unknown = sorted(set(attacks) - {f"device{i}" for i in range(1, len(partitions) + 1)})
        if unknown:
            raise ValueError(f"attacks name no device: {', '.join(unknown)} (the devices are "
                             f"device1 .. device{len(partitions)})")
    if not 0 <= dropout <= 1 or (dropout and not server_options.get("secagg")):
        raise ValueError("dropout must be from 0 to 1, and goes with secagg")
    with PeakMemory() as memory:
        if pooled:
            history = _on_pool(model, partitions, root=root, test_data=test_data,
                               workers=workers, backend=backend, ray_address=ray_address,
                               cpus_per_worker=cpus_per_worker, gpus_per_worker=gpus_per_worker,
                               timeout=timeout, on_round=on_round, on_progress=on_progress,
                               attacks=attacks, slow=(slow_devices, slowdown),
                               server_options=server_options, dropout=dropout, relay=relay)
        else:
            history = _one_per_device(model, partitions, root=root, test_data=test_data,
                                      processes=processes, timeout=timeout, on_round=on_round,
                                      on_progress=on_progress, quiet=quiet, attacks=attacks,
                                      server_options=server_options, dropout=dropout, relay=relay)
    round_s = [round(entry["closed_at"] - started, 3) for entry in history]
    history.stats.update({"wall_s": round_s[-1] if round_s else None,
                          "first_round_s": round_s[0] if round_s else None, "round_s": round_s,
                          "peak_rss_mb": memory.peak_mb})
    return history


def _keras_model(model: Any) -> Any:
    import keras

    return model if isinstance(model, keras.Model) else model()


def _one_per_device(model: Any, partitions: Sequence[tuple[np.ndarray, np.ndarray]], *, root: Path,
                    test_data: Any, processes: bool, timeout: float | None, on_round: Any,
                    on_progress: Any, quiet: bool, attacks: Mapping[str, Attack] | None,
                    server_options: dict[str, Any], dropout: float = 0.0, relay: bool = True) -> History:
    # every round waits for every device
    options = {"min_devices": len(partitions), "quorum": 1.0, "auto_activate": True, "start": True,
               "state_dir": root / "server", **server_options}
    server = Server(_keras_model(model), test_data=test_data, **options)
    with server:
        devices = [Device(server, f"device{i}", x, y, root=root / "devices", quiet=quiet,
                          attack=(attacks or {}).get(f"device{i}"), secagg_dropout=dropout)
                   for i, (x, y) in enumerate(partitions, start=1)]
        for device in devices:
            device.spawn() if processes else device.start()

        def check() -> None:
            for device in devices:
                if device.poll() not in (None, 0):
                    raise RuntimeError(_stopped(server, device.name, device.exit_code,
                                                f" (see {device.log_path})"))

        try:
            _follow(server, check, _deadline(timeout), timeout, on_round, on_progress)
        except BaseException:
            for device in devices:
                device.stop(timeout=5)
            raise
        history = History(server.history())
        history.model = server.global_model()
        for device in devices:  # each saves the final model and exits on "finish"
            device.join(timeout=60)
    return history


def _on_pool(model: Any, partitions: Partitions, *, root: Path, test_data: Any,
             workers: int | None, backend: str, ray_address: str | None, cpus_per_worker: float,
             gpus_per_worker: float, timeout: float | None, on_round: Any, on_progress: Any,
             attacks: Mapping[str, Attack] | None, slow: tuple[float, float],
             server_options: dict[str, Any], dropout: float = 0.0, relay: bool = True) -> History:
    from fedhub.device.pool import DevicePool
    from fedhub.server_process import free_port

    deadline = _deadline(timeout)
    devices_root, names = _device_folders(partitions, root / "devices")
    unknown = sorted(set(attacks or {}) - set(names))
    if unknown:
        raise ValueError(f"attacks name no device: {', '.join(unknown)}")
    builtin = isinstance(model, str)
    options = dict(server_options)
    fraction = options.pop("fraction", 1.0)
    # Idle virtual devices are touched every device_timeout / 3 seconds: a long timeout keeps
    # that traffic low (a thousand devices every 20 s would be 50 requests a second).
    device_timeout = options.pop("device_timeout", 300.0)
    options.setdefault("min_devices", max(1, math.ceil(fraction * len(names))))
    if workers is None and backend == "process":
        workers = os.cpu_count() or 1
    options.setdefault("port", free_port())
    url = f"http://{options.get('host', '127.0.0.1')}:{options['port']}"
    if backend == "ray" and ray_address and "host" not in options:
        # Workers on the cluster's other machines reach the server at this machine's address.
        import ray

        options["host"] = "0.0.0.0"
        url = f"http://{ray.util.get_node_ip_address()}:{options['port']}"
    framework = options.get("framework", FRAMEWORK)
    options = {"quorum": 1.0, "auto_activate": True, "state_dir": root / "server", **options}
    server = Server(model if builtin else _keras_model(model), test_data=test_data, fraction=fraction,
                    device_timeout=device_timeout, start=False, **options)
    pool = DevicePool(url, names, devices_root, workers=workers,
                      model=model if builtin else "server", framework=framework,
                      enroll_secret=server.enroll_secret,
                      keepalive=device_timeout / 3, log_dir=root / "logs", backend=backend,
                      ray_address=ray_address, cpus_per_worker=cpus_per_worker,
                      gpus_per_worker=gpus_per_worker, attacks=attacks, secagg_dropout=dropout,
                      slowdown=slow_devices(names, *slow, seed=options.get("seed", 0)), relay=relay)
    # The workers start first: they load their framework and build their model while the server
    # does the same, and enroll once it answers (a device retries until then).
    with pool, server:
        def check() -> None:
            if pool.error:
                raise RuntimeError(pool.error)

        _await_enrollment(server, names, check, deadline, timeout)
        server.measure_efficiency()  # the workers wait now: nothing runs beside the measurement
        server.start_training()
        training_started_at = time.time()
        _follow(server, check, deadline, timeout, on_round, on_progress)
        history = History(server.history())
        history.model = server.global_model()
        pool.wait(timeout=120)  # every device asks for its task once more, hears "finish", leaves
        stats = pool.stats()
    history.stats.update({key: stats[key] for key in
                          ("bytes_up", "bytes_down", "workers", "backend", "restarts", "failures", "tasks",
                           "worker_peak_rss_mb", "worker_gpus")}, training_started_at=training_started_at)
    return history


def slow_devices(names: Sequence[str], share: float, factor: float, *, seed: int = 0
                 ) -> dict[str, float]:
    """``round(share * len(names))`` of the devices, picked with ``seed``, each ``factor`` slower."""
    count = round(share * len(names)) if factor > 1 else 0
    return {name: factor for name in random.Random(seed).sample(sorted(names), count)}


def _device_folders(partitions: Partitions, devices_root: Path) -> tuple[Path, list[str]]:
    """The devices' folders: those of a ``fedhub.split`` folder, or the arrays written
    as memory-mappable ``.npy`` files under ``devices_root``."""
    from fedhub.split import PARTITION_FILE, write_device_arrays

    if isinstance(partitions, str | Path):
        folder = Path(partitions)
        try:
            names = list(json.loads((folder / PARTITION_FILE).read_text())["devices"])
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"{folder} is not a folder made by `python -m fedhub.split` "
                             f"(its {PARTITION_FILE} cannot be read: {exc})") from None
        return folder, names
    names = []
    for i, (x, y) in enumerate(partitions, start=1):
        write_device_arrays(devices_root, f"device{i}", x, y)
        names.append(f"device{i}")
    return devices_root, names


def _deadline(timeout: float | None) -> float | None:
    return None if timeout is None else time.monotonic() + timeout


def _stopped(server: Server, name: str, code: int | None, otherwise: str = "") -> str:
    why = next((d["lifecycle_reason"] for d in server.devices() if d["name"] == name), "")
    return f"device {name} stopped with exit code {code}" + (f": {why}" if why else otherwise)


def _await_enrollment(server: Server, names: list[str], check: Callable[[], None],
                      deadline: float | None, timeout: float | None) -> None:
    """Wait until every device has enrolled and sent its data validation; a device refused for
    invalid data fails the simulation, as a device process that exits 1 does."""
    wanted = set(names)
    while True:
        check()
        states = {d["name"]: d["lifecycle"] for d in server.devices() if d["name"] in wanted}
        invalid = sorted(name for name, state in states.items() if state == "invalid")
        if invalid:
            raise RuntimeError(_stopped(server, invalid[0], 1))
        if len(states) == len(wanted) and "validating" not in states.values():
            return
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"the simulation did not start in {timeout:g}s: {len(states)} of "
                               f"{len(wanted)} devices enrolled")
        time.sleep(0.5)  # listing a thousand devices takes the server's time too


def _follow(server: Server, check: Callable[[], None], deadline: float | None, timeout: float | None,
            on_round: Callable[[dict[str, Any]], None] | None,
            on_progress: Callable[[dict[str, Any]], None] | None) -> None:
    seen = 0
    while True:
        status = server.status()
        if status["completed_rounds"] > seen:  # the history is read only when it has grown
            history = server.history()
            for entry in history[seen:]:
                if on_round is not None:
                    on_round(entry)
            seen = len(history)
        if on_progress is not None:
            on_progress(status)
        if status["status"] == "finished" and seen >= status["completed_rounds"]:
            return
        check()
        if deadline is not None and time.monotonic() > deadline:
            raise TimeoutError(f"the simulation did not finish in {timeout:g}s: {status['completed_rounds']}"
                               f" of {plural(status['total_rounds'], 'round')} done. "
                               f"{status.get('reason', '')}")
        time.sleep(0.25)
