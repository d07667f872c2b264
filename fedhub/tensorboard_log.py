"""TensorBoard event files for a run: ``runs/<run-id>/global`` plus one run per device.

A round hook (``engine.add_hook``) writes, after each completed round, the
global test metrics and each reporting device's own metrics (loss, accuracy,
examples, training seconds) at step = round number, so ``tensorboard --logdir
runs`` shows the federation and every device side by side, as PyFed does.

The event files are written with TensorBoard's own writer and summary protos, not TensorFlow's
``tf.summary``: the same files (scalars as tensor summaries, the ``scalars`` plugin), without
importing TensorFlow, so a PyTorch server has TensorBoard too and no Keras run pays for a
summary graph.

A thousand device runs would be unreadable in TensorBoard and cost the server a
writer and four summary ops per device and round (12 % of its Python time under
1,000 devices), so only the first ``max_device_runs`` devices to report get a run
of their own; the ``global`` run holds, every round, the spread of all reporting
devices' loss and accuracy as histograms (``devices/loss``, ``devices/accuracy``).
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
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.histogram.summary_v2 import histogram_pb
from tensorboard.plugins.scalar.summary_v2 import scalar_pb
from tensorboard.summary.writer.event_file_writer import EventFileWriter

log = logging.getLogger("fedhub.tensorboard")
GLOBAL_RUN = "global"
_SAFE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
SPREAD = ("loss", "accuracy")  # device metrics whose spread over a round's devices is charted


def new_run_id() -> str:
    """A sortable, readable run id: the start time."""
    return time.strftime("%Y%m%d-%H%M%S")


class TensorBoardLog:
    """The hook. ``runs_dir/run_id/global`` and ``runs_dir/run_id/<device>`` event files."""

    def __init__(self, runs_dir: str | Path, run_id: str | None, max_device_runs: int) -> None:
        run_id = run_id or new_run_id()
        if max_device_runs < 0:
            raise ValueError("max_device_runs must be 0 or more")
        self.max_device_runs = max_device_runs
        if not _SAFE.fullmatch(run_id):
            raise ValueError(f"run id {run_id!r} must be letters, digits, '.', '_' or '-'")
        self.path = Path(runs_dir) / run_id
        self.path.mkdir(parents=True, exist_ok=True)
        self._writers: dict[str, Any] = {}
        self._device_runs: set[str] = set()
        self._lock = threading.Lock()

    def _writer(self, run: str) -> EventFileWriter:
        if run not in self._writers:
            self._writers[run] = EventFileWriter(str(self.path / run))
        return self._writers[run]

    def _write(self, run: str, step: int, summaries: list[Summary]) -> None:
        writer = self._writer(run)
        now = time.time()
        for summary in summaries:
            writer.add_event(Event(wall_time=now, step=step, summary=summary))
        writer.flush()

    def _scalars(self, run: str, step: int, values: Mapping[str, Any]) -> None:
        self._write(run, step, [
            scalar_pb(name, float(value)) for name, value in values.items()
            if isinstance(value, int | float) and not isinstance(value, bool) and np.isfinite(value)])

    def __call__(self, entry: Mapping[str, Any], weights: Mapping[str, np.ndarray]) -> None:
        """The round hook: ``entry`` is the completed round's history entry."""
        step = int(entry["round"])
        with self._lock:
            self._scalars(GLOBAL_RUN, step, {
                "test_loss": entry.get("test_loss"), "test_accuracy": entry.get("test_accuracy"),
                "num_updates": entry.get("num_updates"), "num_examples": entry.get("num_examples"),
                "dp_epsilon": (entry.get("privacy") or {}).get("epsilon")})
            reported = {d: m for d, m in entry["devices"].items() if "num_examples" in m}  # else: only
            self._spread(step, reported.values())                                     # an ERROR line
            for device, metrics in reported.items():
                if device not in self._device_runs:
                    if len(self._device_runs) >= self.max_device_runs:
                        continue
                    self._device_runs.add(device)
                # device names are checked at enrollment (letters, digits, '_', '-'): safe folder names
                run = device if device != GLOBAL_RUN else f"device_{GLOBAL_RUN}"
                self._scalars(run, step, metrics)

    def _spread(self, step: int, reported: Any) -> None:
        values = {name: [float(m[name]) for m in reported
                         if isinstance(m.get(name), int | float) and np.isfinite(m[name])]
                  for name in SPREAD}
        self._write(GLOBAL_RUN, step, [histogram_pb(f"devices/{name}", np.asarray(column))
                                       for name, column in values.items() if column])

    def close(self) -> None:
        with self._lock:
            for writer in self._writers.values():
                writer.close()
            self._writers.clear()
