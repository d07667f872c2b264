"""A device trainer for tests: FedHub's own KerasTrainer (the ``basic`` model by default), which
also keeps, for each round it trains, the global weights it started from and the weights it
trained, so that a test can compute what the server should have made of the uploads.

``--trainer tests.recording_trainer:from_folder`` runs it in a real device process; each call
to ``train`` writes ``<device folder>/trained/NNN.safetensors`` (NNN counts the calls, from 1),
with the tensors ``start:<name>`` and ``end:<name>``. Safetensors, never pickles.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from safetensors.numpy import load_file, save_file

from fedhub.device.trainer import KerasTrainer, TrainResult
from fedhub.split import load_device_data

FOLDER = "trained"


class RecordingTrainer(KerasTrainer):
    def __init__(self, x, y, folder: Path) -> None:
        super().__init__(x, y)
        self.folder = Path(folder) / FOLDER
        self.calls = 0

    def train(self, weights: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> TrainResult:
        result = super().train(weights, config)
        self.calls += 1
        self.folder.mkdir(exist_ok=True)
        tensors = {**{f"start:{n}": np.ascontiguousarray(a) for n, a in weights.items()},
                   **{f"end:{n}": np.ascontiguousarray(a) for n, a in result.weights.items()}}
        tmp = self.folder / f".{self.calls:03d}.tmp"
        save_file(tensors, str(tmp))
        tmp.replace(self.folder / f"{self.calls:03d}.safetensors")  # a reader never sees half a file
        return result


def recorded(device_folder: Path) -> list[tuple[dict[str, np.ndarray], dict[str, np.ndarray]]]:
    """Each ``train`` call's (start, end) weights, in order."""
    out = []
    for path in sorted((Path(device_folder) / FOLDER).glob("*.safetensors")):
        tensors = load_file(str(path))
        out.append(({k.removeprefix("start:"): a for k, a in tensors.items() if k.startswith("start:")},
                    {k.removeprefix("end:"): a for k, a in tensors.items() if k.startswith("end:")}))
    return out


def from_folder(data_dir: Path) -> RecordingTrainer:
    """The ``--trainer`` factory: the device's own ``data/train.npz``."""
    folder = Path(data_dir).parent
    x, y = load_device_data(folder)
    return RecordingTrainer(x, y, folder)
