"""Personalization on the device: what it keeps of its own beside the global model.

The task config names the method (the server's ``--personalization``):

* ``finetune``: the baseline. The device's own model is the global model after its local
  training; nothing is kept between rounds.
* ``fedper`` (Arivazhagan et al. 2019): the personal layers (``personal_layers``, name prefixes;
  by default the network's last layer) stay on the device. It trains the global model's shared
  layers with its own personal ones, keeps those, and uploads the global model's values in their
  place: a zero change, so whatever the strategy, aggregation leaves them as they were and no
  device's personal values ever leave it.
* ``ditto`` (Li et al. 2021): besides training the global model as usual, the device trains a
  personal model of its own with ``(lambda/2)·||v - w_global||²`` added to its loss, pulling it
  toward the round's global model.

Personal weights are kept in ``personal.safetensors`` in the device's folder (atomically), so a
restarted device, and each of a pool's virtual devices, keeps its own.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from safetensors import SafetensorError
from safetensors.numpy import load, save

from fedhub.engine import wire
from fedhub.engine.errors import InvalidInput
from fedhub.engine.files import atomic_write_bytes

Weights = dict[str, np.ndarray]
PERSONAL_FILE = "personal.safetensors"
METHODS = ("none", "finetune", "fedper", "ditto")


def layer_of(name: str) -> str:
    """The layer a tensor belongs to: its name without the last part (``fc2.weight`` ->
    ``fc2``; Keras' ``sequential/dense_1/kernel`` -> ``sequential/dense_1``)."""
    return re.split(r"[./](?=[^./]*$)", name)[0]


def personal_names(weights: Mapping[str, np.ndarray], prefixes: str = "") -> list[str]:
    """The tensors FedPer keeps on the device: those whose names start with one of the
    comma-separated ``prefixes``, by default the last layer's. ValueError when the prefixes
    name none, or every tensor (nothing would be learnt together)."""
    names = list(weights)
    wanted = [p.strip() for p in prefixes.split(",") if p.strip()]
    chosen = ([n for n in names if any(n.startswith(p) for p in wanted)] if wanted
              else [n for n in names if layer_of(n) == layer_of(names[-1])] if names else [])
    if not chosen:
        raise ValueError(f"personal_layers {prefixes!r} names none of the model's tensors "
                         f"({', '.join(names[:6])}{', ...' if len(names) > 6 else ''})")
    if len(chosen) == len(names):
        raise ValueError(f"personal_layers {prefixes!r} names every tensor of the model: "
                         "none would be shared")
    return chosen


class PersonalStore:
    """A device's personal weights in its folder; what does not fit the model is not used."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / PERSONAL_FILE

    def load(self, like: Mapping[str, np.ndarray], method: str) -> Weights:
        """The kept tensors that ``like`` (the global model) has, with the same shapes, if
        ``method`` made them; {} for a first round, another method's or another model's."""
        try:
            body = self.path.read_bytes()
            kept = load(body)
        except (OSError, SafetensorError, ValueError):
            return {}
        if _method_of(body) != method:
            return {}
        return {n: a for n, a in kept.items()
                if n in like and np.shape(like[n]) == a.shape}

    def save(self, weights: Mapping[str, np.ndarray], method: str) -> None:
        tensors = {n: np.ascontiguousarray(a, dtype=np.float32) for n, a in weights.items()}
        atomic_write_bytes(self.path, save(tensors, metadata={"method": method}))



def _method_of(body: bytes) -> str | None:
    try:
        metadata = wire.header(body).get("__metadata__") or {}
    except InvalidInput:
        return None
    return metadata.get("method") if isinstance(metadata, dict) else None
