"""TensorBoard event files for a run: ``runs/<run-name>/global`` plus one run per device.

A round hook (``engine.add_hook``) writes, after each completed round, the
global test metrics and each reporting device's own metrics (loss, accuracy,
examples, training seconds) at step = round number, so ``tensorboard --logdir
runs`` shows the federation and every device side by side, as PyFed does.

The event files are written with TensorBoard's own record writer and summary protos, not
TensorFlow's ``tf.summary``: the same files (scalars as tensor summaries, the ``scalars`` plugin),
without importing TensorFlow, so a PyTorch server has TensorBoard too and no Keras run pays for a
summary graph. (TensorBoard's ``EventFileWriter`` opens its file through ``tf.io.gfile``, which
imports TensorFlow wherever it is installed: :class:`EventFile` opens a plain local file.)

A thousand device runs would be unreadable in TensorBoard and cost the server a
writer and four summary ops per device and round (12 % of its Python time under
1,000 devices), so only the first ``max_device_runs`` devices to report get a run
of their own; the ``global`` run holds, every round, the spread of all reporting
devices' loss and accuracy as histograms (``devices/loss``, ``devices/accuracy``).

The run's folder is named by the run's name (:func:`fedhub.tracking.run_name`) and holds its
settings for the HParams dashboard (a session start written with the plugin's protos, at the
folder's top: ``global`` and the device runs are its sub-runs, so their scalars are its metrics).
Nothing is created before the first completed round, so a server that fails to start leaves no
empty folder. A run whose first round is 1 never writes into a folder that already has events
(a reset, or the same ``--run-id`` again): it gets ``<name>-2``, ``-3``, ...; a server restarted
in the middle of a run (its first round here is later) goes on in its folder.
"""

from __future__ import annotations

import itertools
import logging
import os
import re
import socket
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.plugins.histogram.summary_v2 import histogram_pb
from tensorboard.plugins.hparams import metadata as hparams_metadata
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.plugins.scalar.summary_v2 import scalar_pb
from tensorboard.summary.writer.record_writer import RecordWriter

from fedhub.engine import federated_eval
from fedhub.tracking import RunFollower

log = logging.getLogger("fedhub.tensorboard")
GLOBAL_RUN = "global"
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
SPREAD = ("loss", "accuracy")  # device metrics whose spread over a round's devices is charted
TOP = "."  # the writer of the run folder itself: the HParams session


def new_run_id() -> str:
    """A sortable, readable run id: the start time."""
    return time.strftime("%Y%m%d-%H%M%S")


def folder_name(name: str | None) -> str:
    """A run's name as a folder name: letters, digits, '.', '_' and '-' (others become '-')."""
    safe = _UNSAFE.sub("-", name or "").strip("-.")[:128]
    return safe or new_run_id()


def hparams_summary(values: Mapping[str, Any], group: str, start_time: float) -> Summary:
    """The HParams plugin's session start (its ``hparams_pb``, built from the plugin's protos:
    the plugin's own summary modules import TensorFlow)."""
    info = plugin_data_pb2.SessionStartInfo(group_name=group, start_time_secs=start_time)
    for key, value in sorted(values.items()):
        if isinstance(value, bool):
            info.hparams[key].bool_value = value
        elif isinstance(value, int | float):
            info.hparams[key].number_value = float(value)
        elif value is not None:
            info.hparams[key].string_value = str(value)
    summary = Summary()
    summary.value.add(tag=hparams_metadata.SESSION_START_INFO_TAG, tensor=hparams_metadata.NULL_TENSOR,
                      metadata=hparams_metadata.create_summary_metadata(
                          plugin_data_pb2.HParamsPluginData(session_start_info=info)))
    return summary


class EventFile:
    """One event file in ``folder`` (made on opening): TensorBoard's file name and record format
    over a plain local file."""

    _count = itertools.count()

    def __init__(self, folder: Path) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        name = (f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}.{os.getpid()}."
                f"{next(self._count):06d}")  # sorted by name: in the order opened
        self._file = open(folder / name, "wb")  # noqa: SIM115 - open until close()
        self._records = RecordWriter(self._file)
        self.add_event(Event(wall_time=time.time(), file_version="brain.Event:2"))

    def add_event(self, event: Event) -> None:
        self._records.write(event.SerializeToString())

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class TensorBoardLog:
    """The hook. ``runs_dir/<name>/`` (the settings), ``global`` and ``<device>`` event files."""

    def __init__(self, runs_dir: str | Path, run_name: str | None, max_device_runs: int = 32, *,
                 settings: Mapping[str, Any] | None = None, run_id: str | int | None = None) -> None:
        if max_device_runs < 0:
            raise ValueError("max_device_runs must be 0 or more")
        self.max_device_runs = max_device_runs
        self.runs_dir = Path(runs_dir)
        self.run = RunFollower(run_name or new_run_id(), run_id, settings or {})
        self.path = self.runs_dir / folder_name(self.run.name)  # another name if that is taken
        self._started_at = time.time()
        self._open = False
        self._writers: dict[str, Any] = {}
        self._device_runs: set[str] = set()
        self._lock = threading.Lock()

    def switch(self, run: Mapping[str, Any]) -> None:
        """Another run became current (the engine's run listener): a folder of its own."""
        self.run.switch(run)

    def _begin(self, entry: Mapping[str, Any]) -> None:
        """Pick the run's folder at its first round (or another run's first: a reset) and write
        its settings there."""
        if self.run.new_run(entry, self._open):  # a reset, another run: a folder of its own
            self._close_writers()
            self._device_runs.clear()
            self._open, self._started_at = False, time.time()
        if self._open:
            return
        name = folder_name(self.run.name)
        path, n = self.runs_dir / name, 1
        # a folder with events is another run's, unless this run goes on in it (a restart)
        while int(entry["round"]) == 1 and path.exists() and any(path.iterdir()):
            n += 1
            path = self.runs_dir / f"{name}-{n}"
        self.path, self._open = path, True
        if self.run.settings:
            self._write(TOP, 0, [hparams_summary(self.run.settings, path.name, self._started_at)])

    def _writer(self, run: str) -> EventFile:
        if run not in self._writers:  # the file makes its folder
            self._writers[run] = EventFile(self.path if run == TOP else self.path / run)
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
            self._begin(entry)
            self.run.last_step = step
            self._scalars(GLOBAL_RUN, step, {
                "test_loss": entry.get("test_loss"), "test_accuracy": entry.get("test_accuracy"),
                "num_updates": entry.get("num_updates"), "num_examples": entry.get("num_examples"),
                "dp_epsilon": (entry.get("privacy") or {}).get("epsilon")})
            by_step: dict[int, dict[str, float]] = {}
            for at, name, value in federated_eval.scalars(entry):
                by_step.setdefault(at, {})[name] = value
            for at, values in sorted(by_step.items()):
                self._scalars(GLOBAL_RUN, at, values)
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
        """Flush and close the event files (the server stops)."""
        with self._lock:
            self._close_writers()

    def _close_writers(self) -> None:
        for writer in self._writers.values():
            writer.close()
        self._writers.clear()
