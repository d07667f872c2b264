"""What a device runs each round, behind one small interface.

The device loop only calls these methods, so any trainer (the built-in one, which trains
FedHub's networks in Keras or PyTorch through :mod:`fedhub.frameworks`, or a user's own with
``--trainer package.module:Name``) plugs in.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

Weights = dict[str, np.ndarray]


@dataclass
class TrainResult:
    weights: Weights
    num_examples: int
    metrics: dict[str, float] = field(default_factory=dict)


class TrainingInterrupted(Exception):
    """``train`` stopped early because :meth:`interrupt` was called (an admin's interrupt)."""

    def __init__(self, batches_done: int, batches_total: int | None = None) -> None:
        self.batches_done = batches_done
        self.batches_total = batches_total
        total = f" of {batches_total}" if batches_total else ""
        super().__init__(f"stopped after {batches_done}{total} batches")


class Trainer(Protocol):
    """The interface every trainer implements.

    Three optional methods extend it: ``interrupt()`` (called from another thread when an
    admin interrupts the round: stop at the next batch and raise :class:`TrainingInterrupted`),
    ``progress() -> (batches done, batches in all) | None`` (read from another thread while
    ``train`` runs; the device reports it to the server, which shows it in the dashboards)
    and ``save_final(weights, folder) -> Path`` (the run is over: save the final model).
    """

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


class BatchProgress:
    """Batches done of the total in the current ``train`` call: written by the training loop
    after each batch, read by the device's watcher thread (``current`` is replaced whole)."""

    def __init__(self) -> None:
        self.current: tuple[int, int] | None = None

    def __call__(self, done: int, total: int) -> None:
        self.current = (done, total)


def stop_callback(event: threading.Event, on_batch: Callable[[int], None] | None = None):
    """A Keras callback that ends ``fit`` at the end of the batch during which ``event`` is set.

    Keras 3 checks ``model.stop_training`` after every training batch, so an interrupt
    takes effect within one batch. ``.batches`` counts the batches run; ``on_batch(batches)``
    hears each one.
    """
    import keras

    class _StopOnEvent(keras.callbacks.Callback):
        def __init__(self) -> None:
            super().__init__()
            self.batches = 0

        def on_train_batch_end(self, batch: int, logs: Mapping[str, Any] | None = None) -> None:
            self.batches += 1
            if on_batch is not None:
                on_batch(self.batches)
            if event.is_set():
                self.model.stop_training = True

    return _StopOnEvent()


def fit_interruptibly(keras_model: Any, x: np.ndarray, y: np.ndarray, event: threading.Event, *,
                      epochs: int, batch_size: int, fit: Any = None,
                      progress: BatchProgress | None = None, **kwargs: Any) -> Any:
    """Run ``fit`` (``keras_model.fit`` unless given) stoppable by ``event``; raise
    :class:`TrainingInterrupted` if it was stopped. ``progress`` follows the batches.

    ``event`` is cleared when training ends, not when it starts: an interrupt that arrives
    between the task and the first batch must still stop this round.
    """
    total = epochs * math.ceil(len(x) / batch_size)
    if progress is not None:
        progress(0, total)
    callback = stop_callback(event, None if progress is None else lambda done: progress(done, total))
    try:
        if event.is_set():
            raise TrainingInterrupted(0, total)
        result = (fit or keras_model.fit)(x, y, epochs=epochs, batch_size=batch_size,
                                          callbacks=[callback], **kwargs)
        if event.is_set():
            raise TrainingInterrupted(callback.batches, total)
        return result
    finally:
        event.clear()


class ProximalTerm:
    """FedProx's proximal term (Li et al. 2020), ``(mu/2)·||w - w_global||²``, added to a Keras
    model's training loss.

    Every trainable weight gets a regularizer pulling it toward its value at the start of the
    round (the global model), so the term is part of the loss that ``fit`` minimises and of the
    loss it reports. ``mu`` and the global weights live in non-trainable variables: setting them
    each round does not retrace the training function.
    """

    def __init__(self, keras_model: Any) -> None:
        import keras

        self._model = keras_model
        self.mu = keras.Variable(0.0, dtype="float32", trainable=False, name="proximal_mu")
        self._anchors = []
        for v in keras_model.trainable_variables:
            anchor = keras.Variable(keras.ops.zeros(v.shape, dtype=v.dtype), dtype=v.dtype,
                                    trainable=False, name=f"proximal_anchor_{len(self._anchors)}")
            v.regularizer = _pull_toward(anchor, self.mu)
            self._anchors.append((v, anchor))
        keras_model.train_function = None  # traced again, with the term

    def start_round(self, mu: float, weights: Mapping[str, np.ndarray] | None = None) -> None:
        """Capture ``weights`` (by variable path), else the model's current weights (the global
        model), as the anchor, with ``mu``."""
        self.mu.assign(mu)
        for v, anchor in self._anchors:
            anchor.assign(v.value if weights is None else np.asarray(weights[v.path], dtype=np.float32))

    def value(self) -> float:
        """The term's value for the current weights."""
        import keras

        return float(sum(keras.ops.convert_to_numpy(v.regularizer(v.value)) for v, _ in self._anchors))


def _pull_toward(anchor: Any, mu: Any) -> Any:
    import keras

    def term(weight: Any) -> Any:
        return 0.5 * mu * keras.ops.sum(keras.ops.square(weight - anchor))

    return term


def data_image_shape(x: np.ndarray) -> tuple[int, ...]:
    """The raw image shape a device's arrays hold, as a known data set's (``(28, 28)`` for grey
    images with or without a channel of 1); the Fashion-MNIST shape when it is none (then
    :func:`validate_images` says what is wrong)."""
    from fedhub import datasets

    shape = tuple(np.shape(x)[1:])
    for name in datasets.NAMES:
        image = datasets.get(name).image_shape
        if shape == image or (len(image) == 2 and shape == (*image, 1)):
            return image
    return datasets.get("fashion-mnist").image_shape


def _dataset_of(shape: tuple[int, ...]) -> str:
    from fedhub import datasets

    return next(n for n in datasets.NAMES if datasets.get(n).image_shape == shape)


class ImageTrainer:
    """The built-in trainer: one of FedHub's networks on local image arrays, in the framework the
    server's task names (:mod:`fedhub.frameworks`: Keras or PyTorch; one code path for both).

    The network is built as soon as its framework is known: before enrolling, from the server's
    ``GET /api/status`` (``network``: the device loop passes it to :meth:`initialise`), so that
    importing the framework and building are not part of round 1; else from the first task (a
    task that names none is Keras', as from servers before PyTorch). A device of a PyTorch run
    never imports TensorFlow. ``framework`` (the device's ``--framework``) is an override that
    must match the server's: another framework is a ValueError saying so. The network is
    ``model`` (else the server's, else the framework's first network for the data's images),
    or the user's own (``model_factory``, ``module:function``, PyTorch: an ``nn.Module``). With
    ``proximal_mu`` > 0 in the task config (``--strategy fedprox``) the training loss carries
    FedProx's proximal term toward the round's global model.
    """

    personalizes = True  # train() takes an anchor: Ditto's personal model (fedhub.device.personal)

    def __init__(self, x: np.ndarray, y: np.ndarray, *, model: str | None = None,
                 framework: str | None = None, seed: int = 0, verbose: int = 0,
                 model_factory: str | None = None,
                 holdout: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """``holdout``: the device's held-out images and labels (federated evaluation)."""
        self.x = x
        self.y = y
        self.holdout = holdout if holdout is not None and len(holdout[1]) else None
        self.model_name = model
        self.framework = framework
        self.pinned = framework  # the device's own --framework: the server's must be the same
        self.model_factory = model_factory
        self.seed = seed
        self.verbose = verbose
        self.network: Any = None  # a fedhub.frameworks.base.Network once built
        self._stop = threading.Event()
        self._progress = BatchProgress()

    def validate(self) -> dict[str, Any]:
        shape = self.network.image_shape if self.network is not None else data_image_shape(self.x)
        return validate_images(self.x, self.y, shape=shape)

    def interrupt(self) -> None:
        self._stop.set()

    def progress(self) -> tuple[int, int] | None:
        return self._progress.current

    def initialise(self, config: Mapping[str, Any]) -> None:
        """Build the network the config names (again only when it names another one)."""
        from fedhub import frameworks

        if "framework" in config:
            framework = config["framework"]
        elif config:  # a task from a server that names no framework: Keras
            framework = frameworks.DEFAULT
        else:
            framework = self.network.framework if self.network is not None else self.framework
        if framework is None:
            return  # not known yet: the first task builds it
        if self.pinned is not None and framework != self.pinned:
            raise ValueError(f"--framework {self.pinned} does not match the server's framework "
                             f"{framework}; leave --framework out or give --framework {framework}")
        if self.model_factory is not None:
            if self.network is None or self.network.framework != framework:
                self.network = frameworks.get(framework).from_factory(
                    self.model_factory, dataset=_dataset_of(data_image_shape(self.x)), seed=self.seed)
                self.framework = framework
            return
        name = config.get("model") or self.model_name or frameworks.default_network(
            framework, _dataset_of(data_image_shape(self.x)))
        if frameworks.network_dataset(framework, name) is None:
            hint = ("the same --model-factory" if framework == "torch"
                    else "a --trainer of your own (fedhub.device.trainer.KerasModelTrainer)")
            raise ValueError(f"the server trains {framework} model {name!r}, not one of FedHub's "
                             f"networks ({', '.join(frameworks.networks(framework))}); give this "
                             f"device {hint}")
        if self.network is None or (self.network.framework, self.network.name) != (framework, name):
            self.network = frameworks.get(framework).build(name, seed=self.seed)
            if hasattr(self.network, "verbose"):
                self.network.verbose = self.verbose
            self.framework, self.model_name = framework, name

    def train(self, weights: Mapping[str, np.ndarray], config: Mapping[str, Any], *,
              anchor: Mapping[str, np.ndarray] | None = None) -> TrainResult:
        """``anchor``: the weights the proximal term pulls toward (else ``weights``)."""
        # an empty config is a task too (of the framework given, else Keras)
        self.initialise(config or {"framework": self.framework or "keras"})
        self.network.set_weights(weights)
        started = time.perf_counter()
        metrics = self.network.train(
            self.x, self.y, epochs=int(config.get("epochs", 1)), batch_size=int(config.get("batch_size", 32)),
            learning_rate=float(config.get("learning_rate", 1e-3)),
            proximal_mu=float(config.get("proximal_mu", 0.0)), anchor=anchor, stop=self._stop,
            progress=self._progress)
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics["train_seconds"] = time.perf_counter() - started
        return TrainResult(self.network.get_weights(), len(self.x), metrics)

    def _built(self) -> Any:
        self.initialise({})
        if self.network is None:
            raise RuntimeError("no network yet: its framework comes with the server's first task")
        return self.network

    def evaluate(self, weights: Mapping[str, np.ndarray]) -> dict[str, float]:
        network = self._built()
        network.set_weights(weights)
        result = network.evaluate(self.x, self.y)
        return {"loss": float(result["loss"]), "accuracy": float(result["accuracy"])}

    def evaluate_holdout(self, weights: Mapping[str, np.ndarray]) -> dict[str, Any] | None:
        """Loss, accuracy and examples of ``weights`` on the held-out data (None without any)."""
        if self.holdout is None:
            return None
        network = self._built()
        network.set_weights(weights)
        result = network.evaluate(*self.holdout)
        return {"loss": float(result["loss"]), "accuracy": float(result["accuracy"]),
                "num_examples": len(self.holdout[1])}

    def save_final(self, weights: Mapping[str, np.ndarray], folder: Path) -> Path | None:
        """The run's final global model in ``folder`` (``final.keras``; for PyTorch ``final.pt2``
        and ``final.safetensors``); None when no round ever built the network."""
        self.initialise({})
        if self.network is None:
            return None
        return self.network.save(weights, Path(folder))


class KerasTrainer(ImageTrainer):
    """The built-in trainer with a Keras network from the start (``model.Model``): what the
    pool's workers and the Python API build. ``model`` is the :class:`model.Model`, ``proximal``
    FedProx's term once a task asked for it."""

    def __init__(self, x: np.ndarray, y: np.ndarray, *, model: str = "basic", seed: int = 0,
                 verbose: int = 0) -> None:
        super().__init__(x, y, model=model, framework="keras", seed=seed, verbose=verbose)

    def initialise(self, config: Mapping[str, Any]) -> None:
        super().initialise(config)
        if self.network is not None and self.network.framework == "keras":
            self.network.fit = self._fit

    def _fit(self, x: np.ndarray, y: np.ndarray, **kwargs: Any) -> dict[str, float]:
        """Keras' fit for this trainer's network (a subclass may wrap it)."""
        return self.network._fit(x, y, **kwargs)

    @property
    def model(self) -> Any:
        return None if self.network is None else self.network.model

    @property
    def proximal(self) -> ProximalTerm | None:
        return None if self.network is None else self.network.proximal


class KerasModelTrainer:
    """Any compiled Keras model on any labelled NumPy arrays (the Python API's trainer).

    ``x`` is fed to the model as it is (no preprocessing); ``y`` holds integer class
    labels. The server's round configuration sets epochs, batch size and learning rate.
    Weights are named by ``variable.path`` (``model.get_keras_weights``), so the server's
    model must be the same architecture with the same layer names: load both from one
    ``.keras`` file (the Python API does) or name the layers explicitly.
    """

    def __init__(self, keras_model: Any, x: np.ndarray, y: np.ndarray, *, verbose: int = 0,
                 holdout: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """``holdout``: held-out arrays, as ``x, y``, for federated evaluation."""
        self.keras_model = keras_model
        self.x = np.asarray(x)
        self.y = np.asarray(y)
        self.holdout = holdout if holdout is not None and len(holdout[1]) else None
        self.verbose = verbose
        self._stop = threading.Event()
        self._progress = BatchProgress()

    def validate(self) -> dict[str, Any]:
        try:
            shape = tuple(self.keras_model.input_shape[1:])
            classes = int(self.keras_model.output_shape[-1])
        except (AttributeError, TypeError, ValueError):
            shape, classes = tuple(self.x.shape[1:]), int(self.y.max(initial=0)) + 1
        if None in shape:
            shape = tuple(self.x.shape[1:])
        return validate_images(self.x, self.y, shape=shape, num_classes=classes)

    def initialise(self, config: Mapping[str, Any]) -> None:
        if getattr(self.keras_model, "optimizer", None) is None:
            raise ValueError("the Keras model is not compiled: call model.compile(...) first")

    def interrupt(self) -> None:
        self._stop.set()

    def progress(self) -> tuple[int, int] | None:
        return self._progress.current

    def train(self, weights: Mapping[str, np.ndarray], config: Mapping[str, Any]) -> TrainResult:
        from fedhub.frameworks.keras_model import get_keras_weights, set_keras_weights

        self.initialise(config)
        set_keras_weights(self.keras_model, weights)
        if "learning_rate" in config:
            self.keras_model.optimizer.learning_rate = float(config["learning_rate"])
        started = time.perf_counter()
        history = fit_interruptibly(self.keras_model, self.x, self.y, self._stop,
                                    epochs=int(config.get("epochs", 1)),
                                    batch_size=int(config.get("batch_size", 32)),
                                    progress=self._progress, verbose=self.verbose, shuffle=True)
        metrics = {k: float(v[-1]) for k, v in history.history.items() if v}
        metrics["train_seconds"] = time.perf_counter() - started
        return TrainResult(get_keras_weights(self.keras_model), len(self.x), metrics)

    def evaluate(self, weights: Mapping[str, np.ndarray]) -> dict[str, float]:
        from fedhub.frameworks.keras_model import set_keras_weights

        set_keras_weights(self.keras_model, weights)
        result = self.keras_model.evaluate(self.x, self.y, verbose=0, return_dict=True)
        return {k: float(v) for k, v in result.items()}

    def evaluate_holdout(self, weights: Mapping[str, np.ndarray]) -> dict[str, Any] | None:
        """Loss, accuracy and examples of ``weights`` on the held-out arrays (None without any)."""
        from fedhub.frameworks.keras_model import set_keras_weights

        if self.holdout is None:
            return None
        set_keras_weights(self.keras_model, weights)
        result = self.keras_model.evaluate(*self.holdout, verbose=0, return_dict=True)
        if "accuracy" not in result:
            return None  # a model compiled without an accuracy metric
        return {"loss": float(result["loss"]), "accuracy": float(result["accuracy"]),
                "num_examples": len(self.holdout[1])}

    def save_final(self, weights: Mapping[str, np.ndarray], folder: Path) -> Path:
        from fedhub.frameworks.keras_model import set_keras_weights

        set_keras_weights(self.keras_model, weights)
        path = Path(folder) / "final.keras"
        path.parent.mkdir(parents=True, exist_ok=True)
        self.keras_model.save(path)
        return path


# How the Python API's child devices name :func:`from_folder` (``--trainer``): FedHub's own
# trainer, on arrays FedHub wrote, so a label-flip attack may change its labels.
FROM_FOLDER = "fedhub.device.trainer:from_folder"


def from_folder(data_dir: Path) -> KerasModelTrainer:
    """``--trainer fedhub.device.trainer:from_folder``: ``data_dir/model.keras`` (loaded with
    ``safe_mode=True``) trained on ``data_dir/arrays.npz`` (arrays ``x`` and ``y``; held out:
    ``x_eval`` and ``y_eval``, when there).

    This is what ``fedhub.Device(...).spawn()`` runs in its child process.
    """
    import keras

    data_dir = Path(data_dir)
    for needed in ("model.keras", "arrays.npz"):
        if not (data_dir / needed).is_file():
            raise ValueError(f"no {needed} in {data_dir}")
    with np.load(data_dir / "arrays.npz", allow_pickle=False) as npz:
        if not {"x", "y"} <= set(npz.files):
            raise ValueError(f"{data_dir / 'arrays.npz'} must hold arrays x and y")
        x, y = npz["x"], npz["y"]
        holdout = (npz["x_eval"], npz["y_eval"]) if {"x_eval", "y_eval"} <= set(npz.files) else None
    return KerasModelTrainer(keras.saving.load_model(data_dir / "model.keras", safe_mode=True), x, y,
                             holdout=holdout)
