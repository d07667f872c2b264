"""TensorBoard event files for a run: ``runs/<run-id>/global`` plus one run per device.

A round hook (``engine.add_hook``) writes, after each completed round, the
global test metrics and each reporting device's own metrics (loss, accuracy,
examples, training seconds) at step = round number, so ``tensorboard --logdir
runs`` shows the federation and every device side by side, as PyFed does. It
needs TensorFlow, so it lives beside ``server.py`` and not in the engine.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from utils import tensorflow_env

tensorflow_env.quiet()  # before TensorFlow is imported

import tensorflow as tf  # noqa: E402

log = logging.getLogger("fedhub.tensorboard")
GLOBAL_RUN = "global"
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")


def new_run_id() -> str:
    """A sortable, readable run id: the start time."""
    return time.strftime("%Y%m%d-%H%M%S")


class TensorBoardLog:
    """The hook. ``runs_dir/run_id/global`` and ``runs_dir/run_id/<device>`` event files."""

    def __init__(self, runs_dir: str | Path, run_id: str | None = None) -> None:
        run_id = run_id or new_run_id()
        if not _SAFE.fullmatch(run_id):
            raise ValueError(f"run id {run_id!r} must be letters, digits, '.', '_' or '-'")
        self.path = Path(runs_dir) / run_id
        self.path.mkdir(parents=True, exist_ok=True)
        self._writers: dict[str, Any] = {}
        self._lock = threading.Lock()

    def _writer(self, run: str):
        if run not in self._writers:
            self._writers[run] = tf.summary.create_file_writer(str(self.path / run))
        return self._writers[run]

    def _scalars(self, run: str, step: int, values: Mapping[str, Any]) -> None:
        writer = self._writer(run)
        with writer.as_default():
            for name, value in values.items():
                if isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value):
                    tf.summary.scalar(name, float(value), step=step)
        writer.flush()

    def __call__(self, entry: Mapping[str, Any], weights: Mapping[str, np.ndarray]) -> None:
        """The round hook: ``entry`` is the completed round's history entry."""
        step = int(entry["round"])
        with self._lock:
            self._scalars(GLOBAL_RUN, step, {
                "test_loss": entry.get("test_loss"), "test_accuracy": entry.get("test_accuracy"),
                "num_updates": entry.get("num_updates"), "num_examples": entry.get("num_examples"),
                "dp_epsilon": (entry.get("privacy") or {}).get("epsilon")})
            for device, metrics in entry["devices"].items():
                if "num_examples" not in metrics:
                    continue  # no update from it: only an ERROR line that failed it
                # device names are checked at enrollment (letters, digits, '_', '-'): safe folder names
                run = device if device != GLOBAL_RUN else f"device_{GLOBAL_RUN}"
                self._scalars(run, step, metrics)

    def close(self) -> None:
        with self._lock:
            for writer in self._writers.values():
                writer.close()
            self._writers.clear()
