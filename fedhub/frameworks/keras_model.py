"""The FedHub Keras model and the one preprocessing step shared by every code path.

Training (devices), evaluation (server) and prediction (the web API) must all feed the
network exactly the same kind of tensor, otherwise a model that trains well scores badly
when served.  That is why :func:`preprocess` lives here, next to the network, and why nothing
else in the project should scale or reshape images itself. Uploaded pictures become images in
:mod:`fedhub.frameworks.images` (:func:`image_to_array`, re-exported here), which needs no
TensorFlow, so that PyTorch networks share it (:mod:`fedhub.frameworks`: this module is the
Keras side of that seam).

Weights are exchanged between devices and the server by *name* (``variable.path``), so every
layer and model is named explicitly: Keras 3 would otherwise auto-number layers
(``dense``, ``dense_1``, ...) depending on how many models the process has built before.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import keras
import numpy as np

from fedhub.engine.files import atomic_path
from fedhub.frameworks.images import (  # decoding pictures needs no TensorFlow: it lives there
    IMAGE_SIZE,
    MAX_DECODED_BYTES,
    MAX_GREY,
    WORKING_SIDE,
    ImageError,
    image_to_array,
)

__all__ = [
    "CLASS_NAMES",
    "IMAGE_SIZE",
    "MAX_DECODED_BYTES",
    "MODEL_NAMES",
    "NUM_CLASSES",
    "WORKING_SIDE",
    "ImageError",
    "Model",
    "build_keras_model",
    "build_raw_image_model",
    "get_keras_weights",
    "image_to_array",
    "preprocess",
    "set_keras_weights",
]

CLASS_NAMES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
NUM_CLASSES = 10
# Integer images are grey levels 0..MAX_GREY (fedhub.frameworks.images); the network sees them
# divided by it (0..1).
MODEL_NAMES: tuple[str, ...] = ("basic", "cnn")  # the Fashion-MNIST networks
# Every network's raw image (as the data set stores it): ``cifar`` is the CIFAR-10 network.
IMAGE_SHAPES: dict[str, tuple[int, ...]] = {"basic": (IMAGE_SIZE, IMAGE_SIZE),
                                            "cnn": (IMAGE_SIZE, IMAGE_SIZE), "cifar": (32, 32, 3)}

_KERAS_PREFIX = "fedhub_"
_PREDICT_BATCH = 1024


# --------------------------------------------------------------------------- preprocessing


def preprocess(images: np.ndarray, image_shape: tuple[int, ...] = (IMAGE_SIZE, IMAGE_SIZE)) -> np.ndarray:
    """Turn raw Fashion-MNIST-style images into the network's input tensor.

    With a colour ``image_shape`` (``(32, 32, 3)``, CIFAR-10's), the images are scaled the
    same way by :func:`fedhub.frameworks.base.scale_images` and keep their shape
    ``(N, 32, 32, 3)``; the network normalises them inside.

    Accepts one image ``(28, 28)`` or a batch ``(N, 28, 28)`` / ``(N, 28, 28, 1)``.  Integer
    images are taken as 0-255 grey levels (as stored in the dataset and produced by
    :func:`image_to_array`); floating images are taken as already scaled to 0..1.  Returns
    float32 ``(N, 28, 28, 1)`` in [0, 1].

    Out-of-range values raise instead of being clipped: a float image in 0..255 or a
    uint16 image is almost always a caller bug, and silently squashing it would give
    confident nonsense predictions.
    """
    if len(image_shape) == 3:
        from fedhub.frameworks.base import scale_images

        return scale_images(images, tuple(image_shape))
    arr = np.asarray(images)
    if arr.dtype == np.bool_ or not (
        np.issubdtype(arr.dtype, np.integer) or np.issubdtype(arr.dtype, np.floating)
    ):
        raise ValueError(
            f"images must be an integer (0-255) or float (0..1) array, got {arr.dtype}"
        )
    size = (IMAGE_SIZE, IMAGE_SIZE)
    if arr.ndim == 2 and arr.shape == size:
        arr = arr[np.newaxis, :, :, np.newaxis]
    elif arr.ndim == 3 and arr.shape[1:] == size:
        arr = arr[..., np.newaxis]
    elif not (arr.ndim == 4 and arr.shape[1:] == (*size, 1)):
        raise ValueError(
            f"expected one image of shape (28, 28) or a batch of shape (N, 28, 28) or "
            f"(N, 28, 28, 1), got shape {arr.shape}"
        )
    if arr.size == 0:
        return arr.astype(np.float32)
    if np.issubdtype(arr.dtype, np.integer):
        lo, hi = int(arr.min()), int(arr.max())
        if lo < 0 or hi > MAX_GREY:
            raise ValueError(f"integer images must be 0-{MAX_GREY} grey levels, got values {lo}..{hi}")
        return arr.astype(np.float32) / np.float32(MAX_GREY)
    out = arr.astype(np.float32)
    if not np.all(np.isfinite(out)):
        raise ValueError("float images contain NaN or infinite values")
    lo_f, hi_f = float(out.min()), float(out.max())
    if lo_f < 0.0 or hi_f > 1.0:
        raise ValueError(
            f"float images must already be scaled to 0..1, got values {lo_f:g}..{hi_f:g} "
            "(pass uint8 0-255 images to have them scaled)"
        )
    return out


# --------------------------------------------------------------------------- networks


def _basic_layers() -> list[keras.layers.Layer]:
    """The TensorFlow "basic classification" (clothes) tutorial network, logits output."""
    return [
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(128, activation="relu", name="hidden"),
        keras.layers.Dense(NUM_CLASSES, name="logits"),
    ]


def _cnn_layers() -> list[keras.layers.Layer]:
    """A small two-block CNN: more accurate than ``basic`` for a modest cost."""
    return [
        keras.layers.Conv2D(32, 3, activation="relu", name="conv1"),
        keras.layers.MaxPooling2D(name="pool1"),
        keras.layers.Conv2D(64, 3, activation="relu", name="conv2"),
        keras.layers.MaxPooling2D(name="pool2"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(128, activation="relu", name="hidden"),
        keras.layers.Dense(NUM_CLASSES, name="logits"),
    ]


def _cifar_layers() -> list[keras.layers.Layer]:
    """The CIFAR-Flower seed's CNN (the PyTorch tutorial's), layer for layer as
    ``fedhub.frameworks.torch.CifarNet``: inputs normalised with mean and std 0.5 (``normalise``,
    no weights), conv 6 5x5, pool, conv 16 5x5, pool, dense 120, 84, 10 (32 -> 28 -> 14 -> 10 ->
    5, so 5·5·16 = 400 inputs to ``fc1``, as in PyTorch). The same shapes and parameter count;
    Keras' kernels are laid out HWIO and its flatten is channels-last, so the arrays are not
    interchangeable with PyTorch's, only the network."""
    return [
        keras.layers.Rescaling(1.0 / 0.5, offset=-0.5 / 0.5, name="normalise"),
        keras.layers.Conv2D(6, 5, activation="relu", name="conv1"),
        keras.layers.MaxPooling2D(2, name="pool1"),
        keras.layers.Conv2D(16, 5, activation="relu", name="conv2"),
        keras.layers.MaxPooling2D(2, name="pool2"),
        keras.layers.Flatten(name="flatten"),
        keras.layers.Dense(120, activation="relu", name="fc1"),
        keras.layers.Dense(84, activation="relu", name="fc2"),
        keras.layers.Dense(NUM_CLASSES, name="fc3"),
    ]


_BUILDERS: dict[str, Callable[[], list[keras.layers.Layer]]] = {
    "basic": _basic_layers, "cnn": _cnn_layers, "cifar": _cifar_layers}


def _check_name(name: str) -> None:
    if name not in _BUILDERS:
        raise ValueError(f"unknown model {name!r}; choose one of {', '.join(_BUILDERS)}")


def _network_input(name: str) -> tuple[int, ...]:
    """What the network takes from :func:`preprocess`: grey images get a channel of 1."""
    shape = IMAGE_SHAPES[name]
    return (*shape, 1) if len(shape) == 2 else shape


def build_keras_model(name: str = "basic") -> keras.Model:
    """Build (uncompiled) the named network; weight names are fixed by explicit layer names.

    It takes :func:`preprocess`'s output, (N, 28, 28, 1) in 0..1 (``cifar``: (N, 32, 32, 3)),
    and answers logits."""
    _check_name(name)
    return keras.Sequential([keras.Input(_network_input(name), name="image"), *_BUILDERS[name]()],
                            name=f"{_KERAS_PREFIX}{name}")


def build_raw_image_model(name: str = "basic") -> keras.Model:
    """The named network for plain Keras users (the ``.keras`` export): raw images in,
    probabilities out, compiled.

    It takes (N, 28, 28) grey levels 0..255 (uint8 Fashion-MNIST, or :func:`image_to_array`'s
    output) and scales them inside, by the same ``MAX_GREY`` as :func:`preprocess`; its last
    layer is a softmax. The weights are the same tensors, with the same names, as
    :func:`build_keras_model`'s, so the federation's weights load into it as they are.
    """
    _check_name(name)
    shape = IMAGE_SHAPES[name]  # colour images (cifar) need no channel added
    channel = [keras.layers.Reshape(_network_input(name), name="channel")] if len(shape) == 2 else []
    model = keras.Sequential(
        [
            keras.Input(shape, name="image"),
            *channel,
            keras.layers.Rescaling(1.0 / MAX_GREY, name="rescaling"),
            *_BUILDERS[name](),
            keras.layers.Softmax(name="probabilities"),
        ],
        name=f"{_KERAS_PREFIX}{name}",
    )
    _compile(model, 1e-3, from_logits=False)
    return model


def _compile(keras_model: keras.Model, learning_rate: float, *, from_logits: bool = True) -> None:
    keras_model.compile(
        optimizer=keras.optimizers.Adam(learning_rate=learning_rate),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=from_logits),
        metrics=["accuracy"],
    )


def _labels(y: np.ndarray, n: int) -> np.ndarray:
    labels = np.asarray(y)
    if labels.ndim != 1 or labels.shape[0] != n:
        raise ValueError(f"expected {n} labels in a 1-D array, got shape {labels.shape}")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers 0-{NUM_CLASSES - 1}, got dtype {labels.dtype}")
    if n and (labels.min() < 0 or labels.max() >= NUM_CLASSES):
        raise ValueError(f"labels must be in 0..{NUM_CLASSES - 1}")
    return labels.astype(np.int64)


def run_epochs(keras_model: keras.Model, inputs: np.ndarray, labels: np.ndarray, *, epochs: int,
               batch_size: int, rng: np.random.Generator,
               callbacks: list[keras.callbacks.Callback] | None = None, verbose: int = 0) -> dict[str, float]:
    """``fit``'s epochs without its per-call set-up: the model's one compiled training step (built
    once, then reused by every call: a pool worker's devices one after another), fed NumPy
    batches of a fresh permutation each epoch; the metrics reset each epoch; ``callbacks`` told of
    each batch's end (an interrupt sets ``stop_training``); ``verbose``: Keras' progress bar.
    The last epoch's logs, as ``fit``'s history holds them.

    ``fit`` on a ``tf.data`` pipeline cost a small device more than its training: building the
    pipeline, an epoch iterator and callbacks took two thirds of a pool worker's training time
    for 60-image devices (docs/benchmarks.md, "Where a device task's time goes")."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    keras_model.make_train_function()  # built once: Keras keeps it until the model is compiled again
    step = keras_model.train_function
    for callback in callbacks or []:
        callback.set_model(keras_model)
    keras_model.stop_training = False
    n = len(labels)
    logs: dict[str, Any] = {}
    for _ in range(epochs):
        keras_model.reset_metrics()
        bar = keras.utils.Progbar(math.ceil(n / batch_size)) if verbose else None
        order = rng.permutation(n)
        for index, start in enumerate(range(0, n, batch_size)):
            take = order[start:start + batch_size]
            logs = step(iter(((inputs[take], labels[take]),)))
            for callback in callbacks or []:
                callback.on_train_batch_end(index, logs)
            if bar is not None:
                bar.update(index + 1, [(k, float(v)) for k, v in logs.items()])
            if keras_model.stop_training:
                break
        if keras_model.stop_training:
            break
    return {k: float(v) for k, v in logs.items()}


def _softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=-1, keepdims=True)).astype(np.float32)


def get_keras_weights(keras_model: keras.Model) -> dict[str, np.ndarray]:
    """Any Keras model's weights as ``{variable.path: float32 copy}`` in model order.

    This is the one naming of weights on the wire: FedHub's own networks and any user model
    (the Python API, ``--model-factory``) go through it. Optimizer state is excluded.
    """
    return {
        v.path: np.array(keras.ops.convert_to_numpy(v.value), dtype=np.float32, copy=True)
        for v in keras_model.weights
    }


def set_keras_weights(keras_model: keras.Model, weights: Mapping[str, np.ndarray]) -> None:
    """Replace all of a Keras model's weights by name; validate everything before changing anything.

    The set of names must match exactly and every shape must match, because a partial or
    mismatched update from a device running a different architecture must never be
    mixed into the global model.  Non-finite values are refused for the same reason (a
    diverged device would otherwise poison every later round).  Values are cast to each
    variable's dtype.
    """
    if not isinstance(weights, Mapping):
        raise ValueError(f"weights must be a mapping name -> array, got {type(weights).__name__}")
    variables = keras_model.weights
    expected = [v.path for v in variables]
    expected_set = set(expected)
    for name in expected:
        if name not in weights:
            raise ValueError(f"missing weight tensor {name!r}")
    model_name = str(keras_model.name).removeprefix(_KERAS_PREFIX)
    for name in weights:
        if name not in expected_set:
            raise ValueError(f"unexpected weight tensor {name!r} (not in model {model_name!r})")
    prepared = []
    for v in variables:
        value = np.asarray(weights[v.path])
        shape = tuple(int(d) for d in v.shape)
        if value.shape != shape:
            raise ValueError(f"weight tensor {v.path!r} has shape {value.shape}, expected {shape}")
        if not (np.issubdtype(value.dtype, np.floating) or np.issubdtype(value.dtype, np.integer)):
            raise ValueError(f"weight tensor {v.path!r} has non-numeric dtype {value.dtype}")
        dtype = keras.backend.standardize_dtype(v.dtype)
        cast = value.astype(dtype)
        if not np.all(np.isfinite(cast)):
            raise ValueError(f"weight tensor {v.path!r} contains NaN or infinite values")
        prepared.append((v, cast))
    for v, cast in prepared:
        v.assign(cast)


class Model:
    """A compiled FedHub network plus the name-keyed weight exchange used by FedAvg.

    All inputs are *raw* images (uint8 0-255, or float 0..1); :func:`preprocess` is applied
    inside, so callers cannot accidentally preprocess twice or differently.
    """

    def __init__(
        self, name: str = "basic", *, learning_rate: float = 1e-3, seed: int | None = 0
    ) -> None:
        """Build and compile network ``name``.

        ``seed`` is passed to ``keras.utils.set_random_seed`` (which seeds Python, NumPy and
        the backend globally) so that every participant starting from the same seed gets the
        same initial weights; pass ``None`` to leave the global random state alone.
        """
        _check_name(name)
        if seed is not None:
            keras.utils.set_random_seed(seed)
        self.name = name
        self.image_shape: tuple[int, ...] = IMAGE_SHAPES[name]
        self.keras_model: keras.Model = build_keras_model(name)
        _compile(self.keras_model, learning_rate)
        self._rng = np.random.default_rng(seed)  # each epoch's order of the examples

    def __repr__(self) -> str:
        return f"Model(name={self.name!r}, parameters={self.num_parameters()})"

    # ------------------------------------------------------------------ training / inference

    def train(
        self,
        x: np.ndarray,
        y: np.ndarray,
        *,
        epochs: int = 1,
        batch_size: int = 32,
        learning_rate: float | None = None,
        callbacks: list[keras.callbacks.Callback] | None = None,
        verbose: int = 0,
    ) -> dict[str, float]:
        """Train on raw images; return ``{"loss", "accuracy"}`` of the last epoch.

        ``learning_rate`` (if given) replaces the optimizer's rate from now on, so the server
        can change it between federated rounds without rebuilding the model.
        """
        if epochs < 1:
            raise ValueError(f"epochs must be >= 1, got {epochs}")
        inputs = preprocess(x, self.image_shape)
        if inputs.shape[0] == 0:
            raise ValueError("cannot train on an empty dataset")
        labels = _labels(y, inputs.shape[0])
        if learning_rate is not None:
            if not learning_rate > 0:
                raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
            self.keras_model.optimizer.learning_rate = float(learning_rate)
        logs = run_epochs(self.keras_model, inputs, labels, epochs=epochs, batch_size=batch_size,
                          rng=self._rng, callbacks=callbacks, verbose=verbose)
        return {"loss": logs["loss"], "accuracy": logs["accuracy"]}

    def evaluate(self, x: np.ndarray, y: np.ndarray, *, batch_size: int = 512) -> dict[str, float]:
        """Return ``{"loss", "accuracy"}`` on raw images ``x`` with labels ``y``."""
        inputs = preprocess(x, self.image_shape)
        if inputs.shape[0] == 0:
            raise ValueError("cannot evaluate on an empty dataset")
        labels = _labels(y, inputs.shape[0])
        result = self.keras_model.evaluate(
            inputs, labels, batch_size=batch_size, verbose=0, return_dict=True
        )
        return {"loss": float(result["loss"]), "accuracy": float(result["accuracy"])}

    def predict(self, x: np.ndarray) -> np.ndarray:
        """Return softmax probabilities float32 ``(N, 10)``; a single image gives ``(1, 10)``.

        Calls the model directly in batches rather than ``keras.Model.predict`` because the
        latter has a large fixed overhead that dominates single-image web requests.
        """
        inputs = preprocess(x, self.image_shape)
        if inputs.shape[0] == 0:
            return np.zeros((0, NUM_CLASSES), dtype=np.float32)
        chunks = []
        for start in range(0, inputs.shape[0], _PREDICT_BATCH):
            batch = inputs[start : start + _PREDICT_BATCH]
            logits = self.keras_model(batch, training=False)
            chunks.append(keras.ops.convert_to_numpy(logits))
        return _softmax(np.concatenate(chunks).astype(np.float64))

    # ------------------------------------------------------------------ weights

    def get_weights(self) -> dict[str, np.ndarray]:
        """Return ``{variable.path: float32 copy}`` in model order (optimizer state excluded)."""
        return get_keras_weights(self.keras_model)

    def set_weights(self, weights: Mapping[str, np.ndarray]) -> None:
        """Replace all weights by name; validate everything before changing anything (see
        :func:`set_keras_weights`)."""
        set_keras_weights(self.keras_model, weights)

    def weight_spec(self) -> dict[str, tuple[tuple[int, ...], str]]:
        """Return ``{name: (shape, dtype name)}`` so peers can validate updates cheaply."""
        return {
            v.path: (tuple(int(d) for d in v.shape), keras.backend.standardize_dtype(v.dtype))
            for v in self.keras_model.weights
        }

    def num_parameters(self) -> int:
        """Total number of scalars in the model weights."""
        return int(sum(int(np.prod(v.shape)) for v in self.keras_model.weights))

    # ------------------------------------------------------------------ persistence

    def save(self, path: str | Path) -> None:
        """Save architecture, weights and optimizer state to a ``.keras`` file atomically.

        Writes a temporary ``.keras`` file in the destination directory and renames it over
        the target, so a reader (or a crash) never sees a half-written model.
        """
        target = Path(path)
        if target.suffix != ".keras":
            raise ValueError(f"model files must end in .keras, got {target.name!r}")
        optimizer = self.keras_model.optimizer
        if optimizer is not None and not optimizer.built:
            # Save a complete optimizer state, so loading does not warn about a mismatch.
            optimizer.build(self.keras_model.trainable_variables)
        with atomic_path(target) as tmp:
            self.keras_model.save(tmp, overwrite=True)

    @classmethod
    def load(cls, path: str | Path) -> Model:
        """Load a ``.keras`` file written by :meth:`save` (``safe_mode=True``: no code runs).

        The network name comes from the Keras model name (``fedhub_basic`` / ``fedhub_cnn``).
        Keras' deserialised layers do not get the model-name prefix in their variable paths
        (``hidden/kernel`` instead of ``fedhub_basic/hidden/kernel``), so the weights and
        optimizer state are copied into a freshly built network: that keeps weight names
        identical to :class:`Model` instances built in code, and checks the layout so a
        foreign or outdated file cannot silently join a federation.
        """
        source = Path(path)
        if not source.is_file():
            raise FileNotFoundError(f"no model file at {source}")
        loaded = keras.saving.load_model(source, safe_mode=True)
        keras_name = str(loaded.name)
        name = keras_name.removeprefix(_KERAS_PREFIX)
        if not keras_name.startswith(_KERAS_PREFIX) or name not in _BUILDERS:
            raise ValueError(
                f"{source} holds Keras model {keras_name!r}, not one of "
                f"{', '.join(_KERAS_PREFIX + n for n in MODEL_NAMES)}"
            )
        fresh = build_keras_model(name)
        pairs = list(zip(loaded.weights, fresh.weights, strict=False))
        layout_ok = len(loaded.weights) == len(fresh.weights) and all(
            tuple(a.shape) == tuple(b.shape)
            and b.path.removeprefix(f"{keras_name}/") == a.path.removeprefix(f"{keras_name}/")
            for a, b in pairs
        )
        if not layout_ok:
            raise ValueError(f"{source}: weights do not match the {name!r} architecture")
        for a, b in pairs:
            b.assign(keras.ops.convert_to_numpy(a.value))

        learning_rate = 1e-3
        old_opt = getattr(loaded, "optimizer", None)
        if old_opt is not None:
            with contextlib.suppress(TypeError, ValueError):  # a schedule: keep the default
                learning_rate = float(keras.ops.convert_to_numpy(old_opt.learning_rate))
        _compile(fresh, learning_rate)
        if old_opt is not None and old_opt.built:
            new_opt = fresh.optimizer
            new_opt.build(fresh.trainable_variables)
            old_vars, new_vars = old_opt.variables, new_opt.variables
            if len(old_vars) == len(new_vars) and all(
                tuple(a.shape) == tuple(b.shape) for a, b in zip(old_vars, new_vars, strict=True)
            ):
                for a, b in zip(old_vars, new_vars, strict=True):
                    b.assign(keras.ops.convert_to_numpy(a.value))

        self = cls.__new__(cls)
        self.name = name
        self.image_shape = IMAGE_SHAPES[name]
        self.keras_model = fresh
        return self
