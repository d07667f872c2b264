"""The framework seam: what every part of FedHub that touches a model asks of it.

The engine (``fedhub.engine``) only knows named arrays. Everything above it that needs a network
(the server's initial weights, per-round test, prediction, validation and export; a device's
training) asks a :class:`Network` built by a :class:`Framework` (Keras or PyTorch), so the
rest of the code does not care which library trains, and a PyTorch run never imports
TensorFlow. This module imports neither.

Weights travel as safetensors of named arrays in a fixed order, whatever the framework: Keras
names them by ``variable.path``, PyTorch by ``state_dict`` key.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import numpy as np

Weights = dict[str, np.ndarray]
Progress = Callable[[int, int], None]

# The raw image each data set's networks take, as stored (uint8 0-255; colour is HWC).
GREY_28 = (28, 28)
COLOUR_32 = (32, 32, 3)
MAX_LEVEL = 255


class Network(Protocol):
    """One built network of one framework, with everything FedHub does with it.

    Inputs are always *raw* images (uint8 0-255 as the data sets store them, or float 0..1),
    ``(N, *image_shape)``: each network scales and normalises them inside, so training,
    evaluation and prediction cannot disagree about preprocessing.
    """

    framework: str  # "keras" or "torch"
    name: str  # the network's name in its framework ("basic", "cnn", "cifar")
    dataset: str  # the data set whose images it takes ("fashion-mnist", "cifar-10")
    image_shape: tuple[int, ...]  # one raw image: (28, 28) grey or (32, 32, 3) colour
    class_names: tuple[str, ...]
    export_suffix: str  # the exported file's extension: ".keras" or ".pt2"

    def get_weights(self) -> Weights:
        """The weights as ``{name: float32 copy}`` in the network's fixed order."""
        ...

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Replace every weight by name; a missing, extra, misshapen or non-finite tensor
        raises ValueError before anything changes."""
        ...

    def train(self, x: np.ndarray, y: np.ndarray, *, epochs: int = 1, batch_size: int = 32,
              learning_rate: float = 1e-3, proximal_mu: float = 0.0,
              anchor: Mapping[str, np.ndarray] | None = None,
              stop: threading.Event | None = None, progress: Progress | None = None) -> dict[str, float]:
        """Train from the current weights; ``{"loss", "accuracy"}`` of the last epoch.

        ``proximal_mu`` > 0 adds FedProx's ``(mu/2)·||w - w_start||²`` (w_start: the weights at
        the call, or ``anchor`` when given: Ditto pulls a personal model toward the global one).
        ``stop`` set during training ends it at the next batch with
        ``fedhub.device.trainer.TrainingInterrupted``; ``progress(done, total)`` hears each batch.
        (Local differential privacy clips and noises the update after training, in the device
        loop, the same for every framework.)
        """
        ...

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        """Loss, accuracy, per-class accuracy and the confusion matrix (:func:`classification_metrics`)."""
        ...

    def evaluate_parts(self, x: np.ndarray, y: np.ndarray, sizes: Sequence[int]) -> list[dict[str, Any]]:
        """:meth:`evaluate` of each consecutive part of ``x, y`` (``sizes``, none empty), from
        one pass over them all (a pool worker's devices' held-out sets)."""
        ...

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Softmax probabilities, float32 ``(N, classes)``."""
        ...

    def image_to_input(self, source: bytes) -> np.ndarray:
        """An uploaded picture as one raw image of :attr:`image_shape` (uint8)."""
        ...

    def export(self, weights: Mapping[str, np.ndarray]) -> bytes:
        """A file the plain framework loads (raw images in, probabilities out) with ``weights``."""
        ...

    def save(self, weights: Mapping[str, np.ndarray], folder: Path) -> Path:
        """Write the exported model with ``weights`` into ``folder``; returns its path."""
        ...


class Framework(Protocol):
    """A machine-learning library FedHub trains with (see :func:`fedhub.frameworks.get`)."""

    name: str
    # network name -> the data set whose images it takes
    networks: Mapping[str, str]

    def build(self, name: str, *, seed: int | None = 0) -> Network:
        """Network ``name``, its weights initialised from ``seed`` (None: the current random state)."""
        ...


def scale_images(images: np.ndarray, image_shape: tuple[int, ...]) -> np.ndarray:
    """Raw images as float32 ``(N, *image_shape)`` in 0..1, or ValueError saying what is wrong.

    Accepts one image or a batch; grey images may carry a trailing channel of 1. Integer images
    are 0-255 levels, float ones must already be in 0..1: out-of-range values raise rather than
    being clipped (a float image in 0..255 is a caller's bug that clipping would hide).
    """
    arr = np.asarray(images)
    if arr.dtype == np.bool_ or arr.dtype.kind not in "uif":
        raise ValueError(f"images must be an integer (0-255) or float (0..1) array, got {arr.dtype}")
    shape = tuple(image_shape)
    if arr.shape == shape:
        arr = arr[np.newaxis]
    elif len(shape) == 2 and arr.shape == (*shape, 1):
        arr = arr[np.newaxis, ..., 0]
    elif len(shape) == 2 and arr.ndim == 4 and arr.shape[1:] == (*shape, 1):
        arr = arr[..., 0]
    if arr.ndim != len(shape) + 1 or arr.shape[1:] != shape:
        shown = ", ".join(map(str, shape))
        raise ValueError(f"expected one image of shape ({shown}) or a batch of shape (N, {shown}), "
                         f"got shape {np.asarray(images).shape}")
    if arr.size == 0:
        return arr.astype(np.float32)
    if arr.dtype.kind in "ui":
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > MAX_LEVEL:
            raise ValueError(f"integer images must be 0-{MAX_LEVEL} levels, got values {lo}..{hi}")
        return arr.astype(np.float32) / np.float32(MAX_LEVEL)
    out = arr.astype(np.float32)
    if not np.isfinite(out).all():
        raise ValueError("float images contain NaN or infinite values")
    if float(out.min()) < 0.0 or float(out.max()) > 1.0:
        raise ValueError(f"float images must already be scaled to 0..1, got values "
                         f"{float(out.min()):g}..{float(out.max()):g} (pass uint8 0-255 images)")
    return out


def check_labels(y: np.ndarray, n: int, num_classes: int) -> np.ndarray:
    """``y`` as int64 class labels, one per example, or ValueError."""
    labels = np.asarray(y)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"expected {n} labels in a 1-D array, got shape {labels.shape}")
    if labels.dtype.kind not in "ui":
        raise ValueError(f"labels must be integers 0-{num_classes - 1}, got dtype {labels.dtype}")
    if n and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(f"labels must be in 0..{num_classes - 1}")
    return labels.astype(np.int64)


def classification_metrics(probabilities: np.ndarray, y: np.ndarray,
                           loss: float | None) -> dict[str, Any]:
    """The one shape of a model's test result, whatever computed the outputs.

    ``confusion_matrix[i][j]`` counts examples of class i predicted as j; a class with no
    examples has per-class accuracy ``None``.
    """
    k = probabilities.shape[-1]
    predicted = probabilities.argmax(axis=-1)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (y, predicted), 1)
    support = confusion.sum(axis=1)
    per_class = [None if support[i] == 0 else float(confusion[i, i] / support[i]) for i in range(k)]
    return {"num_examples": len(y), "loss": loss, "accuracy": float(np.trace(confusion) / len(y)),
            "per_class_accuracy": per_class, "confusion_matrix": confusion.tolist()}


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64, returned as float32."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)
