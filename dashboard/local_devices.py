"""Device processes the dashboard starts on this machine for a demo, and stops again.

Started through :mod:`device.launcher` (the same code as ``python -m device.launcher``).
One :class:`LocalDevices` lives as long as the Streamlit server (``st.cache_resource``), so
the processes stay reachable from every browser tab and across page reloads.
"""

from __future__ import annotations

import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from device import launcher
from utils import state_dir as state
from utils.format_dataset import DEVICE_DATA_FILE


@dataclass
class Launched:
    name: str
    proc: subprocess.Popen
    log: Path


def device_names(count: int, prefix: str = "device") -> list[str]:
    """``device1 .. deviceN``: the names ``utils.format_dataset`` gives the device folders."""
    return [f"{prefix}{i}" for i in range(1, count + 1)]


def missing_data(devices_root: Path, names: Sequence[str]) -> list[str]:
    """The names among ``names`` with no ``<root>/<name>/data/train.npz`` to train on."""
    return [n for n in names if not (Path(devices_root) / n / "data" / DEVICE_DATA_FILE).is_file()]


class LocalDevices:
    """The device processes started from the dashboard. Thread-safe (Streamlit sessions share it).

    Each device's output goes to ``<devices root>/<name>.log``, beside its data folder.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._procs: dict[str, Launched] = {}

    def launch(self, server: str, count: int, *, devices_root: Path | None = None,
               state_dir: Path | None = None, auto_activate: bool = True) -> list[str]:
        """Start ``device1..deviceN`` (those not already running); return the names started.

        ``state_dir``: the server's state directory, where the devices read its enrollment
        secret; ``devices_root`` defaults to its ``devices/`` (see :mod:`utils.state_dir`).
        Raises ValueError, before starting anything, if a device has no data folder.
        """
        layout = state.resolve(state_dir)
        root = Path(devices_root) if devices_root is not None else layout.devices_root
        names = device_names(count)
        missing = missing_data(root, names)
        if missing:
            raise ValueError(f"no training data for {', '.join(missing)} in {root}")
        extra = ["--auto-activate"] if auto_activate else []
        with self._lock:
            todo = [n for n in names if n not in self._procs or self._procs[n].proc.poll() is not None]
            procs = launcher.launch(server, todo, devices_root=root, state_dir=layout.server_dir,
                                    extra_args=extra, log_dir=root)
            for name, proc in zip(todo, procs, strict=True):
                self._procs[name] = Launched(name, proc, root / f"{name}.log")
        return todo

    def stop_all(self) -> list[str]:
        """Stop every running device the dashboard started (they leave the federation first)."""
        with self._lock:
            running = [p for p in self._procs.values() if p.proc.poll() is None]
        launcher.stop([p.proc for p in running])
        return [p.name for p in running]

    def running(self) -> list[str]:
        with self._lock:
            return [p.name for p in self._procs.values() if p.proc.poll() is None]

    def rows(self) -> list[dict[str, Any]]:
        """One row per started device: name, pid, running or exit code, and its log's last line."""
        with self._lock:
            launched = list(self._procs.values())
        out = []
        for p in launched:
            code = p.proc.poll()
            out.append({"device": p.name, "pid": p.proc.pid,
                        "process": "running" if code is None else f"exited ({code})",
                        "last log line": _last_line(p.log), "log": str(p.log)})
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
