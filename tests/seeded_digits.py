"""A deterministic digits trainer and server model for tests that compare two runs bit for bit.

``SeededSoftmaxTrainer`` is ``examples.digits.SoftmaxTrainer`` with its shuffling seeded from
the global weights it starts from, so the same global model always gives the same update,
whatever happened before (a server restart, a retried round). A file ``hold`` in the data
folder holding a number N makes every training call after the N-th wait while the file exists:
a test can keep a round open as long as it needs. ``build_model`` is the server's model with
fixed initial weights.
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from examples import digits


def build_model():
    """``examples.digits.build_model`` with the same initial weights in every process."""
    import keras

    keras.utils.set_random_seed(0)
    return digits.build_model()


class SeededSoftmaxTrainer(digits.SoftmaxTrainer):
    def __init__(self, data_dir: Path) -> None:
        super().__init__(data_dir)
        self._hold = Path(data_dir) / "hold"
        self._calls = 0

    def _held(self) -> bool:
        try:  # the test may remove the file between a look and a read
            return self._calls > int(self._hold.read_text())
        except FileNotFoundError:
            return False

    def train(self, weights: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> digits.TrainResult:
        self._calls += 1
        while self._held():
            time.sleep(0.1)
        digest = hashlib.sha256(b"".join(np.ascontiguousarray(weights[k]).tobytes()
                                         for k in sorted(weights))).digest()
        self._rng = np.random.default_rng(int.from_bytes(digest[:8], "little"))
        return super().train(weights, config)
