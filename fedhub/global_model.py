"""The server's global model: initial weights, evaluation, export, validation.

One class for FedHub's own networks of any framework (built by name through the framework
seam, :mod:`fedhub.frameworks`, each network preprocessing its own raw images) and for any
Keras model (the Python API, or ``server.py --model-factory package.module:build``), so the
engine stays free of any framework and every path (per-round test metrics, export,
validation of an uploaded dataset, ``fedhub.evaluate``) computes metrics the same way.

Importing this module imports no framework: a PyTorch server never loads TensorFlow. Keras is
imported where a Keras model is used.
"""

from __future__ import annotations

import contextlib
import io
import math
import pkgutil
import tempfile
import threading
import zipfile
import zlib
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedhub import tensorflow_env
from fedhub.engine.errors import InvalidInput
from fedhub.frameworks.base import classification_metrics, scale_images

if TYPE_CHECKING:
    import keras

    from fedhub.frameworks.base import Network

# Validation uploads are evaluated in a request thread: bound the work.
MAX_VALIDATE_EXAMPLES = 60_000

Prepare = Callable[[np.ndarray], np.ndarray]


def resolve(spec: str, what: str) -> Any:
    """``package.module:Name`` -> the object (the stdlib's resolver), or a ValueError saying why.

    Importing runs the user's module: whatever it raises (a SyntaxError, an error at import
    time, even ``sys.exit()``) is the user's mistake and becomes the one-line ValueError, not a
    traceback or a silent exit of the server."""
    if not isinstance(spec, str) or ":" not in spec:
        raise ValueError(f"{what} must look like package.module:Name, got {spec!r}")
    try:
        return pkgutil.resolve_name(spec)
    except (Exception, SystemExit) as exc:
        raise ValueError(f"{what} {spec!r} cannot be loaded: {_one_line(exc)}") from None


def call_factory(spec: str, what: str) -> Any:
    """Resolve ``spec`` (:func:`resolve`) and call it with no arguments: what it returns, or a
    one-line ValueError naming ``what`` when it is not callable or fails. The one way both
    frameworks' ``--model-factory`` is called, so a factory that raises stops the server (or
    device) with one ``error:`` line and exit 2 instead of a traceback."""
    factory = resolve(spec, what)
    if not callable(factory):
        raise ValueError(f"{what} {spec!r} is not callable (it is of type {type(factory).__name__})")
    try:
        return factory()
    except (Exception, SystemExit) as exc:
        raise ValueError(f"{what} {spec!r} failed: {_one_line(exc)}") from None


def _one_line(exc: BaseException) -> str:
    """``Type: message`` on one line (a SyntaxError's or a user's multi-line message folded)."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def load_npz(source: bytes | str | Path, *, field: str = "body", max_bytes: int | None = None,
             max_examples: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Arrays ``x`` and ``y`` of an .npz file or body, never unpickling anything.

    Before an array is allocated, the shape and dtype its ``.npy`` header declares are checked:
    at most ``max_examples`` examples, at most ``max_bytes`` for both arrays together, and no
    zip member larger than that once uncompressed. A file of a few hundred bytes declaring
    terabytes, or a zip bomb, is refused without being expanded (numpy allocates what the
    header declares, then fills it).
    """
    try:
        if isinstance(source, bytes | bytearray):
            if source.count(b"PK\x01\x02") > MAX_NPZ_MEMBERS:  # central directory entries, at most
                raise InvalidInput(f"the .npz holds more than {MAX_NPZ_MEMBERS} files", field)
            stream: Any = io.BytesIO(source)
        else:
            stream = source
        with zipfile.ZipFile(stream) as archive:
            members = [_member(archive, key) for key in ("x", "y")]
            budget = max_bytes
            for key, info in zip(("x", "y"), members, strict=True):
                budget = _check_declared(archive, info, key, budget, max_examples)
            x, y = (_read_array(archive, info) for info in members)
            return x, y
    except InvalidInput:
        raise
    except (OSError, ValueError, EOFError, RuntimeError, NotImplementedError, zipfile.BadZipFile,
            zlib.error) as exc:  # RuntimeError: encrypted; NotImplementedError: unknown compression
        raise InvalidInput(f"not a readable .npz of plain arrays: {exc}", field) from None


# An .npz made by numpy holds one file per array; x and y are all FedHub reads.
MAX_NPZ_MEMBERS = 1000


def _member(archive: zipfile.ZipFile, key: str) -> zipfile.ZipInfo:
    for name in (f"{key}.npy", key):
        with contextlib.suppress(KeyError):
            return archive.getinfo(name)
    found = sorted(n.removesuffix(".npy") for n in archive.namelist())[:20]
    raise InvalidInput(f"the .npz has no array {key!r} (found {found})", key)


def _check_declared(archive: zipfile.ZipFile, info: zipfile.ZipInfo, key: str, budget: int | None,
                    max_examples: int | None) -> int | None:
    """Refuse array ``key`` on what its header declares; returns the byte budget left."""
    with archive.open(info) as f:
        version = np.lib.format.read_magic(f)
        if version == (1, 0):
            shape, _, dtype = np.lib.format.read_array_header_1_0(f)
        elif version == (2, 0):
            shape, _, dtype = np.lib.format.read_array_header_2_0(f)
        else:
            raise InvalidInput(f"array {key!r} uses .npy format {version}; expected 1.0 or 2.0", key)
    if dtype.hasobject:
        raise InvalidInput(f"array {key!r} holds Python objects; only plain numbers are read", key)
    nbytes = math.prod(shape) * dtype.itemsize
    shown = "x".join(map(str, shape)) or "scalar"
    if max_examples is not None and shape and shape[0] > max_examples:
        raise InvalidInput(f"array {key!r} declares {shape[0]} examples ({shown}); at most "
                           f"{max_examples}", key)
    if budget is not None and nbytes > budget:
        raise InvalidInput(f"array {key!r} ({shown} of {dtype}) would take {nbytes} bytes; the "
                           f"arrays may take at most {budget} more bytes", key)
    if budget is not None and info.file_size > budget + 64 * 1024:  # 64 KiB: room for the header
        raise InvalidInput(f"array {key!r} unpacks to {info.file_size} bytes; the arrays may take "
                           f"at most {budget} more bytes", key)
    return None if budget is None else budget - nbytes


def _read_array(archive: zipfile.ZipFile, info: zipfile.ZipInfo) -> np.ndarray:
    with archive.open(info) as f:
        return np.lib.format.read_array(f, allow_pickle=False)


def _input_shape(keras_model: keras.Model) -> tuple[int | None, ...] | None:
    try:
        return tuple(keras_model.input_shape[1:])
    except (AttributeError, ValueError, TypeError):
        return None  # a subclassed model without a known input


def num_classes(keras_model: keras.Model) -> int:
    return int(keras_model.output_shape[-1])


def check_labelled(keras_model: keras.Model | None, x: np.ndarray, y: np.ndarray,
                   prepare: Prepare | None = None, *, limit: int | None = MAX_VALIDATE_EXAMPLES,
                   classes: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Model-ready inputs and int64 labels, or an InvalidInput naming ``x`` or ``y`` and the problem.

    ``classes``: the number of classes, else the Keras model's outputs."""
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype.kind not in "uif":
        raise InvalidInput(f"x has dtype {x.dtype}; expected numbers", "x")
    if x.ndim == 0 or len(x) == 0:
        raise InvalidInput("x holds no examples", "x")
    if limit is not None and len(x) > limit:
        raise InvalidInput(f"at most {limit} examples, got {len(x)}", "x")
    if prepare is not None:
        try:
            inputs = prepare(x)
        except ValueError as exc:
            raise InvalidInput(f"x: {exc}", "x") from None
    else:
        expected = _input_shape(keras_model)
        if expected is not None and (len(expected) != x.ndim - 1 or any(
                e is not None and e != got for e, got in zip(expected, x.shape[1:], strict=False))):
            shown = tuple("N" if e is None else e for e in expected)
            raise InvalidInput(f"x has shape {x.shape}; the model takes (N, {', '.join(map(str, shown))})",
                               "x")
        inputs = x.astype(np.float32)
        if not np.isfinite(inputs).all():
            raise InvalidInput("x holds NaN or infinity", "x")
    k = classes if classes is not None else num_classes(keras_model)
    if y.ndim != 1 or len(y) != len(x):
        raise InvalidInput(f"y must be 1-D with one label per example: got shape {y.shape} for "
                           f"{len(x)} examples", "y")
    if y.dtype.kind not in "ui":
        raise InvalidInput(f"y has dtype {y.dtype}; expected integer class labels 0..{k - 1}", "y")
    if y.min() < 0 or y.max() >= k:
        raise InvalidInput(f"labels must be in 0..{k - 1}, got {int(y.min())}..{int(y.max())}", "y")
    return inputs, y.astype(np.int64)


def evaluate_classifier(keras_model: keras.Model, x: np.ndarray, y: np.ndarray, *,
                        batch_size: int = 512) -> dict[str, Any]:
    """Loss (the model's compiled loss, if any), accuracy, per-class accuracy, confusion matrix.

    ``x`` must already be what the model takes; one prediction pass gives everything.
    ``confusion_matrix[i][j]`` counts examples of class i predicted as j; a class with no
    examples has per-class accuracy ``None``.
    """
    return evaluate_classifier_parts(keras_model, x, y, [len(y)], batch_size=batch_size)[0]


def evaluate_classifier_parts(keras_model: keras.Model, x: np.ndarray, y: np.ndarray,
                              sizes: Sequence[int], *, batch_size: int = 512) -> list[dict[str, Any]]:
    """:func:`evaluate_classifier` of each of the consecutive parts of ``x, y`` that ``sizes``
    gives, from one prediction pass over them all: a pool worker evaluates the same global model
    on each of its devices' held-out sets, and one pass costs a fraction of one per device."""
    import keras

    # predict_on_batch reuses one traced function; predict() builds a tf.data pipeline and traces
    # its functions on every call: three times the CPU for a 10,000-image test (~0.15 s a round).
    outputs = np.concatenate([np.asarray(keras_model.predict_on_batch(x[i : i + batch_size]))
                              for i in range(0, len(x), batch_size)])
    loss_fn = None
    if getattr(keras_model, "loss", None) is not None:
        loss_fn = keras.losses.get(keras_model.loss) if isinstance(keras_model.loss, str) \
            else keras_model.loss
    losses = None  # each example's, in one call: a call per part would cost more than the pass
    if loss_fn is not None and getattr(loss_fn, "reduction", "sum_over_batch_size") == "sum_over_batch_size":
        per_example = loss_fn.call if isinstance(loss_fn, keras.losses.Loss) else loss_fn
        losses = np.asarray(keras.ops.convert_to_numpy(per_example(y, outputs)), dtype=np.float64)
    results, start = [], 0
    for size in sizes:
        part = slice(start, start + size)
        start += size
        if losses is not None:
            loss = float(np.mean(losses[part]))
        elif loss_fn is not None:  # another reduction (a sum...): the loss's own, part by part
            loss = float(np.mean(keras.ops.convert_to_numpy(loss_fn(y[part], outputs[part]))))
        else:
            loss = None
        results.append(classification_metrics(outputs[part], y[part], loss))
    return results


def check_images(network: Network, x: np.ndarray, y: np.ndarray, *,
                 limit: int | None = MAX_VALIDATE_EXAMPLES) -> tuple[np.ndarray, np.ndarray]:
    """Raw images ``network`` takes and int64 labels, or an InvalidInput naming ``x`` or ``y``.

    The images stay raw (the network scales them itself); their shape, dtype and range are
    checked here, by the same function the network uses, so a bad upload is a 400 naming the
    field rather than a failure inside the framework.
    """
    def prepare(images: np.ndarray) -> np.ndarray:
        scale_images(images, network.image_shape)
        return images

    return check_labelled(None, x, y, prepare, limit=limit, classes=len(network.class_names))


class GlobalModel:
    """The model the server sets each round's weights into, under a lock (one at a time).

    Either one of FedHub's own networks (``network``: any framework, see :meth:`named`) or the
    user's own Keras model (``keras_model``, with an optional ``prepare`` of its inputs).
    """

    def __init__(self, keras_model: keras.Model | None = None, *, prepare: Prepare | None = None,
                 test_data: tuple[np.ndarray, np.ndarray] | None = None, builtin: str | None = None,
                 network: Network | None = None) -> None:
        if (keras_model is None) == (network is None):
            raise ValueError("give a Keras model or one of FedHub's networks, not both")
        self.network = network
        self.keras_model = keras_model
        self.prepare = prepare
        # the network's name for FedHub's own networks, else None (a PyTorch module of the user's
        # own is a network too, with its ``factory``: devices build it from theirs, not by name)
        own = network is not None and getattr(network, "factory", None) is not None
        self.builtin = (network.name if not own else None) if network is not None else builtin
        self.framework = network.framework if network is not None else "keras"
        self.name = network.name if network is not None else builtin or str(keras_model.name)
        self.export_suffix = network.export_suffix if network is not None else ".keras"
        self._lock = threading.Lock()
        self._test = None
        if test_data is not None:
            self._test = self._checked(*test_data, limit=None)

    @classmethod
    def named(cls, name: str, *, seed: int = 0, test_data: tuple[np.ndarray, np.ndarray] | None = None,
              framework: str = "keras") -> GlobalModel:
        """FedHub's own network ``name`` of ``framework``, seeded like the devices'."""
        from fedhub import frameworks

        return cls(network=frameworks.get(framework).build(name, seed=seed), test_data=test_data)

    @classmethod
    def from_factory(cls, spec: str, *, test_data: tuple[np.ndarray, np.ndarray] | None = None,
                     framework: str = "keras", dataset: str = "fashion-mnist",
                     seed: int = 0) -> GlobalModel:
        """``package.module:build``: a callable returning a compiled ``keras.Model``; with
        ``framework`` torch, an ``nn.Module`` on ``dataset``'s images
        (:meth:`fedhub.frameworks.torch.TorchFramework.from_factory`: trained, tested, exported
        like FedHub's own networks, so no TensorFlow is imported)."""
        if framework != "keras":
            from fedhub import frameworks

            network = frameworks.get(framework).from_factory(spec, dataset=dataset, seed=seed)
            return cls(network=network, test_data=test_data)
        tensorflow_env.quiet()
        import keras

        built = call_factory(spec, "--model-factory")
        if not isinstance(built, keras.Model):
            raise ValueError(f"--model-factory {spec!r} returned {type(built).__name__}, not a keras.Model")
        return cls(built, test_data=test_data)

    def new_network(self) -> Network:
        """Another network like the server's (the predictor's, built round after round): FedHub's
        network by name, or the user's PyTorch module from its factory again. The global random
        state is left alone (``seed=None``)."""
        from fedhub import frameworks

        network = self.network
        if network is None:
            raise ValueError("a Keras model of your own has no network to build again")
        framework = frameworks.get(network.framework)
        factory = getattr(network, "factory", None)
        if factory is not None:
            return framework.from_factory(factory, dataset=network.dataset, seed=None)
        return framework.build(network.name, seed=None)

    @property
    def class_names(self) -> list[str] | None:
        """The classes' names in label order, for FedHub's own networks."""
        return list(self.network.class_names) if self.network is not None else None

    @property
    def image_shape(self) -> tuple[int, ...] | None:
        """One raw image of FedHub's own network (``(28, 28)``, ``(32, 32, 3)``), else None."""
        return tuple(self.network.image_shape) if self.network is not None else None

    def describe(self) -> dict[str, Any]:
        """What a device or a dashboard must know of the run's network before any round (``GET
        /api/status``'s ``network``): a device builds it before its first task (the framework's
        import and the build are not in round 1's time), a dashboard names the download's file
        suffix and shows the classes and pictures of the data set. ``builtin``: one of FedHub's
        networks by name (devices can build it); false for the user's own model."""
        network = self.network
        return {"framework": self.framework, "name": self.name, "builtin": self.builtin is not None,
                "dataset": getattr(network, "dataset", None),
                "class_names": self.class_names,
                "image_shape": list(self.image_shape) if self.image_shape is not None else None,
                "export_suffix": self.export_suffix}

    def _checked(self, x: np.ndarray, y: np.ndarray, *,
                 limit: int | None = MAX_VALIDATE_EXAMPLES) -> tuple[np.ndarray, np.ndarray]:
        if self.network is not None:
            return check_images(self.network, x, y, limit=limit)
        return check_labelled(self.keras_model, x, y, self.prepare, limit=limit)

    def initial_weights(self) -> dict[str, np.ndarray]:
        with self._lock:
            if self.network is not None:
                return self.network.get_weights()
            from fedhub.frameworks.keras_model import get_keras_weights

            return get_keras_weights(self.keras_model)

    def evaluate(self, weights: Mapping[str, np.ndarray]) -> dict[str, Any]:
        """Test-set metrics for the engine (nothing without a test set)."""
        if self._test is None:
            return {}
        return self.validate_prepared(weights, *self._test)

    def validate(self, weights: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray) -> dict[str, Any]:
        """Metrics of ``weights`` on an uploaded labelled set; InvalidInput if it does not fit."""
        return self.validate_prepared(weights, *self._checked(x, y))

    def validate_prepared(self, weights: Mapping[str, np.ndarray], x: np.ndarray,
                          y: np.ndarray) -> dict[str, Any]:
        """Metrics of ``weights`` on data already checked (:meth:`_checked`)."""
        with self._lock:
            if self.network is not None:
                self.network.set_weights(weights)
                return self.network.evaluate(x, y)
            from fedhub.frameworks.keras_model import set_keras_weights

            set_keras_weights(self.keras_model, weights)
            return evaluate_classifier(self.keras_model, x, y)

    def export(self, weights: Mapping[str, np.ndarray]) -> bytes:
        """A file the plain framework loads (:attr:`export_suffix`).

        FedHub's own networks are exported by their framework with their preprocessing and a
        softmax built in (raw images in, probabilities out: a plain Keras or PyTorch user gets
        the server's predictions). A user's own Keras model goes out as it is.
        """
        if self.network is not None:
            with self._lock:
                return self.network.export(weights)
        from fedhub.frameworks.keras import save_keras_bytes
        from fedhub.frameworks.keras_model import set_keras_weights

        with self._lock, tempfile.TemporaryDirectory(prefix="fedhub-export-") as tmp:
            set_keras_weights(self.keras_model, weights)
            return save_keras_bytes(self.keras_model, Path(tmp))
