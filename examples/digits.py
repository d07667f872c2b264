"""A second trainer, on another dataset and model: scikit-learn's bundled handwritten digits
(1,797 images of 8x8 pixels) and softmax regression written in plain NumPy.

The devices never import TensorFlow: :class:`SoftmaxTrainer` implements FedHub's Trainer
protocol (``fedhub/device/trainer.py``) with NumPy. The server holds the same model in Keras
(:func:`build_model`, one Dense layer named like the trainer's tensors) to evaluate and
export each round. Run it through the real server::

    python -m examples.digits --devices 3 --out devices_digits
    python server.py 4000 --model-factory examples.digits:build_model \\
        --test-data devices_digits/test.npz --learning-rate 0.5 --epochs 5 --batch-size 16 \\
        --min-devices 3 --auto-activate --start
    python device/device.py --server http://127.0.0.1:4000 --name digits1 \\
        --devices-root devices_digits --trainer examples.digits:SoftmaxTrainer   # and digits2, digits3
"""

from __future__ import annotations

import argparse
import math
import sys
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedhub.device.trainer import TrainingInterrupted, TrainResult, validate_images
from fedhub.engine.files import atomic_path
from fedhub.options.parser import Parser

FEATURES = 64
CLASSES = 10
MODEL_NAME = "digits_softmax"
KERNEL = f"{MODEL_NAME}/logits/kernel"
BIAS = f"{MODEL_NAME}/logits/bias"
DATA_FILE = "digits.npz"


def build_model():
    """The server's copy of the model (``--model-factory examples.digits:build_model``)."""
    import keras

    model = keras.Sequential([keras.Input((FEATURES,), name="pixels"),
                              keras.layers.Dense(CLASSES, name="logits")], name=MODEL_NAME)
    model.compile(optimizer=keras.optimizers.SGD(0.5),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class SoftmaxTrainer:
    """Softmax regression by mini-batch SGD in NumPy; ``--trainer examples.digits:SoftmaxTrainer``.

    Called with the device's data folder, which holds ``digits.npz`` (``x``: float32
    (N, 64) in 0..1, ``y``: integer labels 0..9).
    """

    def __init__(self, data_dir: Path, *, seed: int = 0) -> None:
        path = Path(data_dir) / DATA_FILE
        if not path.is_file():
            raise ValueError(f"no {path}; make it with `python -m examples.digits`")
        with np.load(path, allow_pickle=False) as npz:
            self.x, self.y = npz["x"], npz["y"]
        self._rng = np.random.default_rng(seed)
        self._stop = threading.Event()

    def validate(self) -> dict[str, Any]:
        return validate_images(self.x, self.y, shape=(FEATURES,), num_classes=CLASSES)

    def initialise(self, config: Mapping[str, Any]) -> None:
        """Nothing to build: the weights come from the server each round."""

    def interrupt(self) -> None:
        self._stop.set()

    def _metrics(self, w: np.ndarray, b: np.ndarray) -> dict[str, float]:
        p = _softmax(self.x @ w + b)
        loss = -np.log(p[np.arange(len(self.y)), self.y] + 1e-12).mean()
        return {"loss": float(loss), "accuracy": float((p.argmax(axis=1) == self.y).mean())}

    def train(self, weights: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> TrainResult:
        self._stop.clear()
        w = np.array(weights[KERNEL], dtype=np.float64)
        b = np.array(weights[BIAS], dtype=np.float64)
        epochs, batch = int(config.get("epochs", 1)), int(config.get("batch_size", 32))
        rate = float(config.get("learning_rate", 0.5))
        started, done, total = time.perf_counter(), 0, epochs * math.ceil(len(self.x) / batch)
        onehot = np.eye(CLASSES)[self.y]
        for _ in range(epochs):
            order = self._rng.permutation(len(self.x))
            for start in range(0, len(order), batch):
                idx = order[start : start + batch]
                grad = (_softmax(self.x[idx] @ w + b) - onehot[idx]) / len(idx)
                w -= rate * self.x[idx].T @ grad
                b -= rate * grad.sum(axis=0)
                done += 1
                if self._stop.is_set():
                    raise TrainingInterrupted(done, total)
        metrics = {**self._metrics(w, b), "train_seconds": time.perf_counter() - started}
        return TrainResult({KERNEL: w.astype(np.float32), BIAS: b.astype(np.float32)}, len(self.x), metrics)

    def evaluate(self, weights: Mapping[str, np.ndarray]) -> dict[str, float]:
        return self._metrics(weights[KERNEL], weights[BIAS])

    def save_final(self, weights: Mapping[str, np.ndarray], folder: Path) -> Path:
        path = Path(folder) / "final.npz"
        with atomic_path(path) as tmp:
            np.savez(tmp, kernel=weights[KERNEL], bias=weights[BIAS])
        return path


def load_digits() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 digits: x float32 (N, 64) scaled to 0..1, y int64."""
    from sklearn.datasets import load_digits as sklearn_digits

    data = sklearn_digits()
    return (data.data / 16.0).astype(np.float32), data.target.astype(np.int64)


def split(out: Path, devices: int, *, seed: int = 0, test_fraction: float = 0.25,
          limit: int | None = None, prefix: str = "digits") -> dict[str, int]:
    """Shuffle, hold out a test set (``out/test.npz``), share the rest evenly over the devices
    (``out/<prefix>N/data/digits.npz``, at most ``limit`` each). Returns examples per device."""
    if devices < 1:
        raise ValueError("devices must be at least 1")
    x, y = load_digits()
    order = np.random.default_rng(seed).permutation(len(x))
    n_test = int(len(x) * test_fraction)
    test, train = order[:n_test], order[n_test:]
    out = Path(out)
    with atomic_path(out / "test.npz") as tmp:
        np.savez(tmp, x=x[test], y=y[test])
    counts = {}
    for i, part in enumerate(np.array_split(train, devices), start=1):
        part = part[:limit] if limit else part
        with atomic_path(out / f"{prefix}{i}" / "data" / DATA_FILE) as tmp:
            np.savez(tmp, x=x[part], y=y[part])
        counts[f"{prefix}{i}"] = len(part)
    return counts


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m examples.digits", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=3)
    p.add_argument("--out", type=Path, default=Path("devices_digits"))
    p.add_argument("--limit", type=int, default=None, help="examples per device")
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args(argv)
    try:
        counts = split(a.out, a.devices, seed=a.seed, limit=a.limit)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for name, n in counts.items():
        print(f"{name}: {n} examples in {a.out / name / 'data' / DATA_FILE}")
    print(f"test set: {a.out / 'test.npz'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
