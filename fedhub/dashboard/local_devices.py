"""Devices the dashboard starts on this machine for a demo, and stops again.

They run on the same worker pool as ``python -m fedhub.device.launcher --devices N --workers K``
(:class:`fedhub.device.pool.DevicePool`): K worker processes host the N devices as virtual devices
(one model per worker, data memory-mapped), so a demo of many devices does not start a
TensorFlow per device. One :class:`LocalDevices` lives as long as the Streamlit server
(``st.cache_resource``), so the pools stay reachable from every browser tab and across
page reloads.

They stay enrolled between runs (the pool's ``stay``): when a run finishes they wait for the
next one, so Reset then Start, or a new run, trains them again; only Stop all ends them.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedhub import state_dir as state
from fedhub.device.launcher import enroll_secret
from fedhub.device.pool import DevicePool
from fedhub.split import DEVICE_DATA_FILE


@dataclass
class Launched:
    names: list[str]
    pool: DevicePool


def device_names(count: int, prefix: str = "device") -> list[str]:
    """``device1 .. deviceN``: the names ``fedhub.split`` gives the device folders."""
    return [f"{prefix}{i}" for i in range(1, count + 1)]


def missing_data(devices_root: Path, names: Sequence[str]) -> list[str]:
    """The names among ``names`` with no ``<root>/<name>/data/train.npz`` to train on."""
    return [n for n in names if not (Path(devices_root) / n / "data" / DEVICE_DATA_FILE).is_file()]


class LocalDevices:
    """The device pools started from the dashboard. Thread-safe (Streamlit sessions share it).

    Each pool's workers write to ``<devices root>/logs/worker-K.log``.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._launched: list[Launched] = []

    def launch(self, server: str, count: int, *, workers: int = 2, devices_root: Path | None = None,
               state_dir: Path | None = None, auto_activate: bool = True) -> list[str]:
        """Start ``device1..deviceN`` (those not already running) on ``workers`` worker processes;
        return the names started.

        ``state_dir``: the server's state directory, where the enrollment secret is read
        (unless ``$FEDHUB_ENROLL_SECRET`` is set); ``devices_root`` defaults to its ``devices/``
        (see :mod:`fedhub.state_dir`). Raises ValueError, before starting anything, if a device
        has no data folder.
        """
        layout = state.resolve(state_dir)
        root = Path(devices_root) if devices_root is not None else layout.devices_root
        names = device_names(count)
        missing = missing_data(root, names)
        if missing:
            raise ValueError(f"no training data for {', '.join(missing)} in {root}")
        with self._lock:
            running = {n for launched in self._launched if launched.pool.running() for n in launched.names}
            todo = [n for n in names if n not in running]
            if todo:
                pool = DevicePool(server, todo, root, workers=workers, enroll_secret=enroll_secret(layout),
                                  auto_activate=auto_activate, stay=True).start()
                self._launched.append(Launched(todo, pool))
        return todo

    def stop_all(self) -> list[str]:
        """Stop every running device the dashboard started (they leave the federation first)."""
        with self._lock:
            running = [launched for launched in self._launched if launched.pool.running()]
        for launched in running:
            launched.pool.stop()
        return [n for launched in running for n in launched.names]

    def running(self) -> list[str]:
        with self._lock:
            return [n for launched in self._launched if launched.pool.running() for n in launched.names]

    def rows(self) -> list[dict[str, Any]]:
        """One row per started device: name, its worker, whether the pool runs, and the worker's
        log's last line."""
        with self._lock:
            launched = list(self._launched)
        out = []
        for item in launched:
            pool = item.pool
            count = max(1, pool.worker_count)
            running = pool.running()
            process = "running" if running else f"stopped ({pool.error})" if pool.error else "stopped"
            for i, name in enumerate(item.names):
                log = pool.log_dir / f"worker-{i % count}.log"
                out.append({"device": name, "worker": i % count, "process": process,
                            "last log line": _last_line(log), "log": str(log)})
        return out


def _last_line(path: Path) -> str:
    try:
        with path.open("rb") as f:
            f.seek(0, 2)
            f.seek(max(0, f.tell() - 2048))
            lines = f.read().decode("utf-8", "replace").strip().splitlines()
    except OSError:
        return ""
    return lines[-1] if lines else ""
