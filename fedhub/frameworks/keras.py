"""The Keras side of the framework seam: :mod:`fedhub.frameworks.keras_model`'s networks as a
:class:`Network`.

Nothing is reimplemented here: the network, its one ``preprocess``, the picture decoding and
the weight codec are ``keras_model.py``'s, FedProx's term and the interruptible ``fit`` are
``fedhub/device/trainer.py``'s, and the test metrics are ``fedhub.global_model.evaluate_classifier``. This
module only puts them behind the interface the server and the devices use for any framework.
Importing it imports Keras (and TensorFlow).
"""

from __future__ import annotations

import tempfile
import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from fedhub.frameworks.base import Progress, Weights, check_labels

NAME = "keras"
EXPORT_SUFFIX = ".keras"


class KerasNetwork:
    """One of FedHub's Keras networks (``model.Model``), implementing
    :class:`fedhub.frameworks.base.Network`. ``model`` is the :class:`model.Model`; ``proximal``
    FedProx's term once a task asked for it."""

    framework = NAME
    export_suffix = EXPORT_SUFFIX

    def __init__(self, name: str, *, seed: int | None = 0, verbose: int = 0) -> None:
        from fedhub import datasets
        from fedhub.frameworks.keras_model import Model

        self.model = Model(name, seed=seed)
        self.name = name
        self.dataset = KerasFramework.networks[name]
        self.image_shape: tuple[int, ...] = self.model.image_shape
        self.class_names: tuple[str, ...] = datasets.get(self.dataset).class_names
        self.verbose = verbose
        self.proximal: Any = None  # fedhub.device.trainer.ProximalTerm, built on the first FedProx task
        self._export_model: Any = None  # model.build_raw_image_model, built on the first export
        self._lock = threading.Lock()
        # What runs Keras' fit in :meth:`train`: a trainer may wrap it (fedhub.device.trainer.KerasTrainer
        # routes it through its own ``_fit``, which tests subclass to slow batches down).
        self.fit: Callable[..., dict[str, float]] = self._fit

    def __repr__(self) -> str:
        return f"KerasNetwork({self.name!r})"

    def get_weights(self) -> Weights:
        return self.model.get_weights()

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        self.model.set_weights(weights)

    def train(self, x: np.ndarray, y: np.ndarray, *, epochs: int = 1, batch_size: int = 32,
              learning_rate: float = 1e-3, proximal_mu: float = 0.0,
              anchor: Mapping[str, np.ndarray] | None = None,
              stop: threading.Event | None = None, progress: Progress | None = None) -> dict[str, float]:
        from fedhub.device.trainer import ProximalTerm, fit_interruptibly

        if proximal_mu > 0 and self.proximal is None:
            self.proximal = ProximalTerm(self.model.keras_model)
        if self.proximal is not None:
            self.proximal.start_round(proximal_mu, anchor)  # else the weights now set: the round's start
        metrics = fit_interruptibly(
            self.model.keras_model, x, y, stop if stop is not None else threading.Event(),
            fit=self.fit, progress=progress, epochs=epochs, batch_size=batch_size,
            learning_rate=learning_rate)
        return {k: float(v) for k, v in metrics.items()}

    def _fit(self, x: np.ndarray, y: np.ndarray, **kwargs: Any) -> dict[str, float]:
        return self.model.train(x, y, verbose=self.verbose, **kwargs)

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        return self.evaluate_parts(x, y, [len(x)])[0]

    def evaluate_parts(self, x: np.ndarray, y: np.ndarray, sizes: Sequence[int]) -> list[dict[str, Any]]:
        from fedhub.frameworks.keras_model import preprocess
        from fedhub.global_model import evaluate_classifier_parts

        inputs = preprocess(x, self.image_shape)
        if len(inputs) == 0 or not all(sizes):
            raise ValueError("cannot evaluate on an empty dataset")
        labels = check_labels(y, len(inputs), len(self.class_names))
        return evaluate_classifier_parts(self.model.keras_model, inputs, labels, sizes)

    def predict(self, x: np.ndarray) -> np.ndarray:
        return self.model.predict(x)

    def image_to_input(self, source: bytes) -> np.ndarray:
        from fedhub.frameworks.images import colour_image_to_array, image_to_array

        if len(self.image_shape) == 3:
            return colour_image_to_array(source, self.image_shape[0])
        return image_to_array(source)

    def export(self, weights: Mapping[str, np.ndarray]) -> bytes:
        """A ``.keras`` file with the preprocessing and a softmax built in
        (:func:`model.build_raw_image_model`): raw 0..255 images in, probabilities out."""
        from fedhub.frameworks.keras_model import build_raw_image_model, set_keras_weights

        with self._lock, tempfile.TemporaryDirectory(prefix="fedhub-export-") as tmp:
            if self._export_model is None:
                self._export_model = build_raw_image_model(self.name)
            set_keras_weights(self._export_model, weights)
            return save_keras_bytes(self._export_model, Path(tmp))

    def save(self, weights: Mapping[str, np.ndarray], folder: Path) -> Path:
        """``folder/final.keras``: :meth:`model.Model.save` (the training network, optimizer too)."""
        self.model.set_weights(weights)
        path = Path(folder) / "final.keras"
        self.model.save(path)
        return path


def save_keras_bytes(keras_model: Any, folder: Path) -> bytes:
    """Any Keras model as the bytes of a complete ``.keras`` file (its optimizer built first, so
    loading it does not warn about a mismatch)."""
    optimizer = getattr(keras_model, "optimizer", None)
    if optimizer is not None and not optimizer.built:
        optimizer.build(keras_model.trainable_variables)
    path = Path(folder) / "model.keras"
    keras_model.save(path)
    return path.read_bytes()


class KerasFramework:
    """:class:`fedhub.frameworks.base.Framework` for Keras."""

    name = NAME
    networks: ClassVar[dict[str, str]] = {"basic": "fashion-mnist", "cnn": "fashion-mnist",
                                          "cifar": "cifar-10"}

    def build(self, name: str, *, seed: int | None = 0) -> KerasNetwork:
        if name not in self.networks:
            raise ValueError(f"unknown Keras network {name!r}; choose one of {', '.join(self.networks)}")
        return KerasNetwork(name, seed=seed)

    def from_factory(self, spec: str, *, dataset: str, seed: int | None = 0) -> KerasNetwork:
        """A device's own Keras model is a trainer of its own (``--trainer``, see
        ``fedhub.device.trainer.KerasModelTrainer``); the server's is ``--model-factory`` alone."""
        raise ValueError("--model-factory on a device builds a PyTorch module (--framework torch); "
                         "for a Keras model of your own, give the device a --trainer")


FRAMEWORK = KerasFramework()
