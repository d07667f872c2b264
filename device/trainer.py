"""What a device runs each round, behind one small interface.

The device loop only calls these methods, so any trainer (the built-in Keras
one, or a user's own with ``--trainer package.module:Name``) plugs in.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

Weights = dict[str, np.ndarray]


@dataclass
class TrainResult:
    weights: Weights
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


class Trainer(Protocol):
    """The interface every trainer implements."""

    def validate(self) -> dict[str, Any]:
        """Check the local data; return at least {"ok": bool, "problems": [str], "num_examples": int}."""
        ...

    def initialise(self, config: Mapping[str, Any]) -> None:
        """Prepare the model for the round configuration the server sent."""
        ...

    def train(self, weights: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> TrainResult:
        """Train one round starting from ``weights``; return the new weights."""
        ...

    def evaluate(self, weights: Mapping[str, np.ndarray]) -> dict[str, float]:
        """Loss and accuracy of ``weights`` on the local data."""
        ...


def validate_images(x: np.ndarray, y: np.ndarray, *, shape: tuple[int, ...] = (28, 28),
                    num_classes: int = 10) -> dict[str, Any]:
    """Data validation before joining: shapes, dtypes, label range, NaN, emptiness, class counts."""
    problems: list[str] = []
    if len(x) == 0:
        problems.append("no examples")
    if len(x) != len(y):
        problems.append(f"{len(x)} images but {len(y)} labels")
    if tuple(x.shape[1:]) not in (shape, (*shape, 1)):
        problems.append(f"images have shape {tuple(x.shape[1:])}, expected {shape}")
    if x.dtype.kind not in "uif":
        problems.append(f"images have dtype {x.dtype}, expected numbers")
    elif x.dtype.kind == "f" and not np.isfinite(x).all():
        problems.append("images hold NaN or infinity")
    if y.dtype.kind not in "ui":
        problems.append(f"labels have dtype {y.dtype}, expected integers")
    elif len(y) and (y.min() < 0 or y.max() >= num_classes):
        problems.append(f"labels must be in 0..{num_classes - 1}")
    counts = np.bincount(y.astype(np.int64), minlength=num_classes).tolist() if not problems else []
    return {"ok": not problems, "problems": problems, "num_examples": len(x),
            "class_counts": counts}


class KerasTrainer:
    """The built-in trainer: FedHub's Keras :class:`model.Model` on local image arrays."""

    def __init__(self, x: np.ndarray, y: np.ndarray, *, model: str = "basic", seed: int = 0,
                 verbose: int = 0) -> None:
        self.x = x
        self.y = y
        self.model_name = model
        self.seed = seed
        self.verbose = verbose
        self.model = None

    def validate(self) -> dict[str, Any]:
        return validate_images(self.x, self.y)

    def initialise(self, config: Mapping[str, Any]) -> None:
        from model import Model

        name = config.get("model", self.model_name)
        if self.model is None or self.model.name != name:
            self.model_name = name
            self.model = Model(name, seed=self.seed)

    def train(self, weights: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> TrainResult:
        self.initialise(config)
        self.model.set_weights(weights)
        started = time.perf_counter()
        metrics = self.model.train(self.x, self.y, epochs=int(config.get("epochs", 1)),
                                   batch_size=int(config.get("batch_size", 32)),
                                   learning_rate=float(config.get("learning_rate", 1e-3)),
                                   verbose=self.verbose)
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["train_seconds"] = time.perf_counter() - started
        return TrainResult(self.model.get_weights(), len(self.x), metrics)

    def evaluate(self, weights: Mapping[str, np.ndarray]) -> dict[str, float]:
        self.initialise({})
        self.model.set_weights(weights)
        return self.model.evaluate(self.x, self.y)
