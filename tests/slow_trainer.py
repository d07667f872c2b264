"""A device trainer for tests: FedHub's own KerasTrainer, with slow batches and a batch counter.

``--trainer tests.slow_trainer:from_folder`` runs it in a real device process. Until its first
interrupt, every batch lasts at least ``SECONDS_PER_BATCH`` (a slow phone), which is longer than the
device's signal poll (every 0.5 s). After each batch the number of batches done in this round is
written to ``<device folder>/batches``: a test reads it when it sends an interrupt and can then
check that training stopped within a batch or two of that moment, not merely "before the end".
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

from fedhub.device.trainer import KerasTrainer
from fedhub.split import load_device_data

SECONDS_PER_BATCH = 1.0
COUNTER_FILE = "batches"


def batches_done(device_folder: Path) -> int:
    """What the device last wrote: batches done in the round it is training (0 before any)."""
    try:
        return int((Path(device_folder) / COUNTER_FILE).read_text() or 0)
    except FileNotFoundError:
        return 0


class SlowBatchesTrainer(KerasTrainer):
    """``fast_fits``: how many first fits (one a round) run at full speed before batches slow
    down, for a test whose first round is a warm-up."""

    def __init__(self, x, y, folder: Path, fast_fits: int = 0) -> None:
        super().__init__(x, y)
        self.folder = Path(folder)
        self.interrupted = False
        self.fast_fits = fast_fits
        self.fits = 0

    def interrupt(self) -> None:
        self.interrupted = True  # from then on, batches run at full speed
        super().interrupt()

    def _fit(self, x, y, **kwargs: Any) -> dict[str, float]:
        # First in the list: the stop callback that follows sees an interrupt that came meanwhile.
        self.fits += 1
        kwargs["callbacks"] = [counter(self), *kwargs.get("callbacks", [])]
        return super()._fit(x, y, **kwargs)


def counter(trainer: SlowBatchesTrainer):
    """The Keras callback that counts (and slows) the batches; Keras is imported only here, so
    that tests can import :func:`batches_done` without TensorFlow."""
    import keras

    class Counter(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.batches = 0
            self._write()

        def _write(self) -> None:
            path = trainer.folder / COUNTER_FILE
            tmp = path.with_suffix(".tmp")
            tmp.write_text(str(self.batches))
            os.replace(tmp, path)  # a reader never sees half a number

        def on_train_batch_end(self, batch: int, logs: Any = None) -> None:
            self.batches += 1
            self._write()
            if not trainer.interrupted and trainer.fits > trainer.fast_fits:
                time.sleep(SECONDS_PER_BATCH)

    return Counter()


def from_folder(data_dir: Path) -> SlowBatchesTrainer:
    """The ``--trainer`` factory: the device's own ``data/train.npz``."""
    folder = Path(data_dir).parent
    x, y = load_device_data(folder)
    return SlowBatchesTrainer(x, y, folder)


def slow_from_round_2(data_dir: Path) -> SlowBatchesTrainer:
    """:func:`from_folder`, its first round's fit at full speed: slow from round 2 on."""
    folder = Path(data_dir).parent
    x, y = load_device_data(folder)
    return SlowBatchesTrainer(x, y, folder, fast_fits=1)
