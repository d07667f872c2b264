"""Pool workers as Ray actors: the same :class:`fedhub.device.virtual.Worker`, placed by Ray.

Ray is an optional extra (``pip install -e ".[ray]"``); only ``DevicePool(backend="ray")``
imports this module. Each actor reserves ``cpus_per_worker`` CPUs and ``gpus_per_worker``
GPUs, so Ray spreads the workers over the machines of the cluster (``ray start --head``
on one, ``ray start --address=HEAD:6379`` on the others). The FedHub server is not part of
Ray: the actors reach it over HTTP as any device does. An actor that dies is reported to
:class:`fedhub.device.pool.DevicePool`, which starts a new one for the same devices.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import ray

from . import gpus
from .virtual import Worker, WorkerSpec


@ray.remote(max_concurrency=2)  # run() serves the devices while stop() can still be called
class WorkerActor:
    def __init__(self, spec_json: str, enroll_secret: str | None, log_path: str) -> None:
        spec = WorkerSpec.from_json(spec_json, enroll_secret)
        gpus.share_memory(spec.framework)  # actors may share a GPU (a fractional gpus_per_worker)
        Path(log_path).parent.mkdir(parents=True, exist_ok=True)
        self._log = open(log_path, "a", buffering=1)  # noqa: SIM115 - lives as long as the actor
        node = ray.get_runtime_context().get_node_id()
        self.worker = Worker(spec, node=node, print_fn=functools.partial(print, file=self._log))

    def run(self) -> dict[str, Any]:
        return self.worker.run()

    def stop(self) -> None:
        self.worker.stop()

    def pid(self) -> int:
        return os.getpid()


@dataclass
class _Actor:
    actor: Any
    future: Any
    result: dict[str, Any] | None = None


class RayWorkers:
    """Starts, watches and stops :class:`WorkerActor` s for :class:`fedhub.device.pool.DevicePool`.

    Joins the cluster at ``address`` (``"auto"``, ``"HOST:6379"``, ``"ray://HOST:10001"``),
    or starts a local one when it is None and Ray is not running in this process yet; a
    cluster it started is shut down by :meth:`close`.
    """

    def __init__(self, address: str | None, cpus_per_worker: float, gpus_per_worker: float,
                 log_dir: Path) -> None:
        self.cpus = cpus_per_worker
        self.gpus = gpus_per_worker
        self.log_dir = log_dir
        self._started = False
        if not ray.is_initialized():
            # The actors import what this process can: fedhub and a user's --model-factory module.
            path = os.pathsep.join(p or os.getcwd() for p in sys.path)
            options: dict[str, Any] = {"include_dashboard": False} if address is None else {}
            ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False,
                     runtime_env={"env_vars": {"PYTHONPATH": path, "TF_CPP_MIN_LOG_LEVEL": "2"}},
                     **options)
            self._started = True

    def capacity(self) -> int:
        """How many workers the cluster's CPUs (and GPUs) hold: the default pool size."""
        resources = ray.cluster_resources()
        count = int(resources.get("CPU", 1) // self.cpus) if self.cpus else 1
        if self.gpus:
            count = min(count, int(resources.get("GPU", 0) // self.gpus))
        return max(1, count)

    def launch(self, spec: WorkerSpec, incarnation: int) -> _Actor:
        actor = WorkerActor.options(num_cpus=self.cpus, num_gpus=self.gpus).remote(
            spec.to_json(), spec.enroll_secret, str(self.log_dir / f"worker-{spec.index}.log"))
        return _Actor(actor, actor.run.remote())

    def state(self, handle: _Actor) -> str:
        ready, _ = ray.wait([handle.future], timeout=0)
        if not ready:
            return "running"
        try:
            handle.result = ray.get(handle.future)
        except ray.exceptions.RayActorError as exc:
            return f"died ({type(exc).__name__})"
        except ray.exceptions.RayTaskError as exc:
            return f"failed ({exc.cause!r})"
        return "done"

    def summary(self, handle: _Actor) -> dict[str, Any]:
        return handle.result or {}

    def pid(self, handle: _Actor) -> int:
        return ray.get(handle.actor.pid.remote(), timeout=30)

    def stop(self, handles: Sequence[_Actor], timeout: float) -> None:
        if not handles:
            return
        for handle in handles:
            handle.actor.stop.remote()
        ray.wait([h.future for h in handles], num_returns=len(handles), timeout=timeout)
        for handle in handles:
            self.state(handle)  # keep what a worker that ended reported
            ray.kill(handle.actor)

    def close(self) -> None:
        if self._started:
            ray.shutdown()
