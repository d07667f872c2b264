"""The data sets FedHub knows by name, and the one place every command finds their files.

    from fedhub import datasets
    spec = datasets.get("cifar-10")            # class names, image shape
    (x_train, y_train), (x_test, y_test) = datasets.load("cifar-10")

Images come back as uint8 in height-width(-channel) order, ``(N, 28, 28)`` grey for
Fashion-MNIST and ``(N, 32, 32, 3)`` RGB for CIFAR-10, labels as uint8 ``(N,)``: the same arrays
``keras.datasets`` gives (CIFAR-10's labels flattened), whatever framework trains on them.

Where the files are (:func:`locate`), for every data set and every command, so a command run by
hand finds what ``make`` found, offline too:

1. the folder the caller names (``--data-dir``);
2. else ``$FEDHUB_DATA_DIR``;
3. else the shared copy beside the checkout, ``<checkout>/../shared/data/<name>``, where there is one;
4. else the framework's own download (``keras.datasets``; Keras is imported only then, since
   importing it costs seconds and a local folder is validated here, offline).

A folder in 1 or 2 may be the data set's own folder (Fashion-MNIST's four ``.gz`` files;
CIFAR-10's ``cifar-10-batches-py`` or the folder holding it) or a parent holding ``fashion-mnist/``
and ``cifar-10/``. ``$FEDHUB_DATA_DIR`` has long been the Fashion-MNIST folder (the Makefile
still exports it so); when it holds another data set than the one asked for, it says nothing about
that one and the lookup goes on to 3 and 4. A folder named explicitly (1) that holds another data
set is an error: the caller asked for that folder.
"""

from __future__ import annotations

import gzip
import math
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DATA_DIR_ENV",
    "FASHION_MNIST_FILES",
    "NAMES",
    "SHARED_DATA_ROOT",
    "DatasetError",
    "DatasetSpec",
    "get",
    "load",
    "locate",
    "read_cifar_batch",
    "read_idx",
]

DATA_DIR_ENV = "FEDHUB_DATA_DIR"
# The shared copies beside the checkout: <checkout>/../shared/data/<name>.
SHARED_DATA_ROOT = Path(__file__).resolve().parents[2] / "shared" / "data"

Arrays = tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]


class DatasetError(ValueError):
    """The dataset or a device's data is missing, malformed, or cannot be split as asked."""


@dataclass(frozen=True)
class DatasetSpec:
    """What a model and a dashboard need to know about a data set, without its files."""

    name: str  # as on the command line: --dataset NAME
    title: str  # as people write it
    class_names: tuple[str, ...]
    image_shape: tuple[int, ...]  # one image, uint8: (H, W) grey or (H, W, C) colour
    keras_name: str  # the module in keras.datasets that downloads it

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def channels(self) -> int:
        return self.image_shape[2] if len(self.image_shape) == 3 else 1


_SPECS: dict[str, DatasetSpec] = {
    spec.name: spec
    for spec in (
        DatasetSpec(
            name="fashion-mnist",
            title="Fashion-MNIST",
            class_names=("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                         "Sneaker", "Bag", "Ankle boot"),
            image_shape=(28, 28),
            keras_name="fashion_mnist",
        ),
        DatasetSpec(
            name="cifar-10",
            title="CIFAR-10",
            class_names=("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse",
                         "ship", "truck"),
            image_shape=(32, 32, 3),
            keras_name="cifar10",
        ),
    )
}
NAMES: tuple[str, ...] = tuple(_SPECS)


def get(name: str) -> DatasetSpec:
    """The data set called ``name`` (``fashion-mnist`` or ``cifar-10``); :class:`DatasetError`
    naming the choices otherwise."""
    try:
        return _SPECS[name]
    except (KeyError, TypeError):
        raise DatasetError(f"unknown data set {name!r}; choose one of {', '.join(NAMES)}") from None


# --------------------------------------------------------------------------- where the files are

FASHION_MNIST_FILES: dict[str, str] = {
    "train_images": "train-images-idx3-ubyte.gz",
    "train_labels": "train-labels-idx1-ubyte.gz",
    "test_images": "t10k-images-idx3-ubyte.gz",
    "test_labels": "t10k-labels-idx1-ubyte.gz",
}
CIFAR_FOLDER = "cifar-10-batches-py"
CIFAR_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR_TEST_BATCH = "test_batch"
CIFAR_META = "batches.meta"


def _find_file(directory: Path, name: str) -> Path | None:
    """Return ``name`` in ``directory``, accepting the un-gzipped variant too."""
    for candidate in (directory / name, directory / name.removesuffix(".gz")):
        if candidate.is_file():
            return candidate
    return None


def _holds_own(directory: Path, name: str) -> bool:
    """Whether ``directory`` is data set ``name``'s own folder (any of its files is there)."""
    if name == "fashion-mnist":
        return any(_find_file(directory, f) for f in FASHION_MNIST_FILES.values())
    markers = (CIFAR_FOLDER, *CIFAR_TRAIN_BATCHES, CIFAR_TEST_BATCH, CIFAR_META)
    return any((directory / marker).exists() for marker in markers)


def _other_held(directory: Path, name: str) -> str | None:
    """Another known data set that ``directory`` holds (as its own folder or as a parent)."""
    for other in NAMES:
        if other != name and (_holds_own(directory, other) or (directory / other).is_dir()):
            return other
    return None


def _in_folder(directory: Path, name: str, origin: str) -> Path | None:
    """Data set ``name``'s folder in a folder the user chose (``origin`` says how); None when
    that folder plainly holds another data set instead."""
    if not directory.is_dir():
        raise DatasetError(
            f"data directory {directory} ({origin}) does not exist (set --data-dir or "
            f"${DATA_DIR_ENV} to the {get(name).title} folder, or to a folder holding {name}/)"
        )
    if _holds_own(directory, name):
        return directory
    if (directory / name).is_dir():
        return directory / name
    if _other_held(directory, name) is not None:
        return None
    return directory  # neither: read as the data set's folder, whose errors name what is missing


def locate(name: str, data_dir: str | Path | None = None) -> Path | None:
    """The folder data set ``name`` is read from (module docstring's order), or None for the
    framework's download. Raises :class:`DatasetError` when ``data_dir`` (or the environment's
    folder) does not exist, or when ``data_dir`` holds another data set."""
    spec = get(name)
    if data_dir is not None and str(data_dir) != "":
        directory = Path(data_dir)
        found = _in_folder(directory, name, "the data folder given")
        if found is None:
            raise DatasetError(
                f"data directory {directory} holds {_other_held(directory, name)}, not {spec.title}: "
                f"give the {spec.title} folder, or a folder holding {name}/"
            )
        return found
    env = os.environ.get(DATA_DIR_ENV, "").strip()
    if env:
        found = _in_folder(Path(env), name, f"${DATA_DIR_ENV}")
        if found is not None:
            return found
    shared = SHARED_DATA_ROOT / name
    return shared if shared.is_dir() else None


def _looked(name: str) -> str:
    """Where :func:`locate` looked before falling back to the download, for the error message."""
    places = []
    env = os.environ.get(DATA_DIR_ENV, "").strip()
    if env:
        places.append(f"${DATA_DIR_ENV} ({env}, which holds {_other_held(Path(env), name)})")
    places.append(f"{SHARED_DATA_ROOT / name} (not there)")
    return ", ".join(places)


def load(name: str, data_dir: str | Path | None = None) -> Arrays:
    """Return data set ``name`` as ``((x_train, y_train), (x_test, y_test))``, uint8 arrays.

    Read from :func:`locate`'s folder and validated here (shapes, counts, label range), else
    downloaded by Keras; a :class:`DatasetError` says which files are wrong, or where it looked.
    """
    spec = get(name)
    directory = locate(name, data_dir)
    if directory is None:
        try:
            arrays = _download(spec)
        except Exception as exc:
            raise DatasetError(
                f"{spec.title} not found: looked in {_looked(name)}, and keras.datasets."
                f"{spec.keras_name} could not download it ({exc}); pass --data-dir or set "
                f"${DATA_DIR_ENV} to a folder holding {name}/"
            ) from exc
        where = f"keras.datasets.{spec.keras_name}"
    else:
        arrays = _READERS[name](directory)
        where = str(directory)
    (x_train, y_train), (x_test, y_test) = arrays
    result = []
    for split, x, y in (("train", x_train, y_train), ("test", x_test, y_test)):
        result.append(check_arrays(spec, x, y, f"{spec.title} {split} set in {where}"))
    return result[0], result[1]


def check_arrays(spec: DatasetSpec, x: Any, y: Any, where: str) -> tuple[np.ndarray, np.ndarray]:
    """``(x, y)`` as arrays if they are ``spec``'s images and labels (shape, count, uint8, label
    range), else a :class:`DatasetError` that starts with ``where``: loaded files and devices'
    data are held to the same rule."""
    x, y = np.asarray(x), np.asarray(y)
    if x.ndim < 1 or x.shape[1:] != spec.image_shape:
        shape = "x".join(str(n) for n in spec.image_shape)
        raise DatasetError(f"{where}: images must be {shape}, got shape {x.shape}")
    if y.ndim != 1:
        raise DatasetError(f"{where}: labels must be 1-D, got shape {y.shape}")
    if len(x) != len(y):
        raise DatasetError(f"{where}: {len(x)} images but {len(y)} labels; the counts must match")
    if x.dtype != np.uint8 or y.dtype != np.uint8:
        raise DatasetError(f"{where}: images and labels must be uint8, got {x.dtype} and {y.dtype}")
    if y.size and int(y.max()) >= spec.num_classes:
        raise DatasetError(f"{where}: labels must be 0..{spec.num_classes - 1}, found {int(y.max())}")
    return x, y


def _download(spec: DatasetSpec) -> Arrays:
    """The framework's download (Keras' cache, fetching once), as uint8 HWC arrays."""
    from fedhub import tensorflow_env

    tensorflow_env.quiet()
    import keras

    return _from_keras(spec, getattr(keras.datasets, spec.keras_name).load_data())


def _from_keras(spec: DatasetSpec, arrays: Any) -> Arrays:
    """Keras' arrays in this module's form: labels flat (CIFAR-10's come as ``(N, 1)``), colour
    images channels-last even where Keras' ``image_data_format`` is ``channels_first``."""
    (x_train, y_train), (x_test, y_test) = arrays
    out = []
    for x, y in ((x_train, y_train), (x_test, y_test)):
        x, y = np.asarray(x, np.uint8), np.asarray(y, np.uint8).reshape(-1)
        if x.ndim == 4 and x.shape[1] == spec.channels and x.shape[1:] != spec.image_shape:
            x = np.ascontiguousarray(x.transpose(0, 2, 3, 1))  # image_data_format channels_first
        out.append((x, y))
    return out[0], out[1]


# --------------------------------------------------------------------------- Fashion-MNIST

_IMAGES_MAGIC = 2051
_LABELS_MAGIC = 2049


def read_idx(path: Path) -> np.ndarray:
    """Read a Fashion-MNIST IDX file (gzip-compressed or plain) with full validation.

    Images (magic 2051) come back as uint8 ``(count, rows, cols)``, labels (magic 2049) as
    uint8 ``(count,)`` with values 0..9.  The payload must be exactly as long as the header
    says: a truncated download or a file with trailing bytes raises :class:`DatasetError`
    instead of silently yielding fewer or shifted examples.
    """
    path = Path(path)
    try:
        with path.open("rb") as fh:
            compressed = fh.read(2) == b"\x1f\x8b"  # gzip magic, whatever the file name
        if compressed:
            with gzip.open(path, "rb") as gz:
                data = gz.read()
        else:
            data = path.read_bytes()
    except FileNotFoundError as exc:
        raise DatasetError(f"{path}: file not found") from exc
    except (OSError, EOFError) as exc:  # includes gzip.BadGzipFile and truncated gzip
        raise DatasetError(f"{path}: cannot read file: {exc}") from exc

    if len(data) < 8:
        raise DatasetError(f"{path}: file too short for an IDX header ({len(data)} bytes)")
    magic, count = (int(v) for v in np.frombuffer(data, ">u4", count=2))
    if magic == _IMAGES_MAGIC:
        if len(data) < 16:
            raise DatasetError(f"{path}: file too short for an IDX image header")
        rows, cols = (int(v) for v in np.frombuffer(data, ">u4", count=2, offset=8))
        header, shape = 16, (count, rows, cols)
        kind = f"{count} images of {rows}x{cols}"
    elif magic == _LABELS_MAGIC:
        header, shape = 8, (count,)
        kind = f"{count} labels"
    else:
        raise DatasetError(
            f"{path}: bad magic number {magic} (expected {_IMAGES_MAGIC} for images or "
            f"{_LABELS_MAGIC} for labels); is this a Fashion-MNIST IDX file?"
        )
    expected = math.prod(shape)
    actual = len(data) - header
    if actual != expected:
        problem = "file is truncated" if actual < expected else "file has trailing bytes"
        raise DatasetError(
            f"{path}: {problem}: header announces {kind} = {expected} data bytes, found {actual}"
        )
    arr = np.frombuffer(data, np.uint8, offset=header).reshape(shape).copy()
    if magic == _LABELS_MAGIC and arr.size and int(arr.max()) >= 10:
        raise DatasetError(f"{path}: labels must be 0..9, found {int(arr.max())}")
    return arr


def _read_fashion_mnist(directory: Path) -> Arrays:
    found = {key: _find_file(directory, name) for key, name in FASHION_MNIST_FILES.items()}
    missing = [FASHION_MNIST_FILES[key] for key, path in found.items() if path is None]
    if missing:
        raise DatasetError(f"missing Fashion-MNIST files in {directory}: {', '.join(missing)}")
    arrays = {key: read_idx(path) for key, path in found.items() if path is not None}
    return ((arrays["train_images"], arrays["train_labels"]),
            (arrays["test_images"], arrays["test_labels"]))


# --------------------------------------------------------------------------- CIFAR-10

# CIFAR-10's python batches are pickles, and unpickling runs whatever callables a file names.
# This unpickler resolves exactly three names, the ones numpy's own array pickles use, and
# refuses every other: so a file can build dicts, lists, strings, numbers and numpy arrays, and
# nothing else runs. The three are harmless whatever their arguments: ``_reconstruct`` makes an
# empty array of a type that must be ndarray, ``ndarray`` makes an array (over a buffer it
# bounds-checks), ``dtype`` parses a type description (no evaluation), and the array's
# ``__setstate__`` (which BUILD calls) copies bytes into it. Persistent ids and the extension
# registry go through the same refusals (the base class has no persistent_load; EXT opcodes
# resolve through find_class). The result is then checked field by field (a uint8 array,
# int labels), so an object array built from allowed parts is refused too.
_RECONSTRUCT = np.empty(0).__reduce__()[0]  # numpy's _reconstruct, wherever this numpy keeps it
_ALLOWED_GLOBALS: dict[tuple[str, str], Callable[..., Any] | type] = {
    ("numpy.core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy._core.multiarray", "_reconstruct"): _RECONSTRUCT,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"refusing {module}.{name}: a CIFAR-10 batch holds only numpy arrays"
            ) from None


def _unpickle_arrays_only(path: Path) -> Any:
    try:
        with path.open("rb") as fh:
            return _ArraysOnlyUnpickler(fh, encoding="latin1").load()
    except FileNotFoundError:
        raise DatasetError(f"{path}: file not found") from None
    except (OSError, EOFError, pickle.UnpicklingError, ValueError, TypeError, AttributeError,
            IndexError, KeyError, MemoryError) as exc:
        raise DatasetError(f"{path}: not a CIFAR-10 python batch: {exc}") from exc


def read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """One CIFAR-10 python batch (``data_batch_N``, ``test_batch``) as uint8 ``(N, 32, 32, 3)``
    images and uint8 ``(N,)`` labels, read without a general unpickler (see
    :class:`_ArraysOnlyUnpickler`) and checked: a dict whose ``data`` is uint8 ``(N, 3072)``
    (each row 1,024 red, then green, then blue values) and whose ``labels`` are N ints 0..9."""
    path = Path(path)
    batch = _unpickle_arrays_only(path)
    if not isinstance(batch, dict) or "data" not in batch or "labels" not in batch:
        raise DatasetError(f"{path}: not a CIFAR-10 batch (a dict with 'data' and 'labels')")
    data, labels = batch["data"], batch["labels"]
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8 or data.ndim != 2 \
            or data.shape[1] != 3 * 32 * 32:
        shape = getattr(data, "shape", type(data).__name__)
        raise DatasetError(f"{path}: 'data' must be a uint8 array of shape (N, 3072), got {shape}")
    if not isinstance(labels, list) or not all(type(v) is int for v in labels):
        raise DatasetError(f"{path}: 'labels' must be a list of ints")
    if len(labels) != len(data):
        raise DatasetError(f"{path}: {len(data)} images but {len(labels)} labels")
    if labels and not (min(labels) >= 0 and max(labels) <= 9):
        raise DatasetError(f"{path}: labels must be 0..9, found {min(labels)}..{max(labels)}")
    images = np.ascontiguousarray(data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))
    return images, np.asarray(labels, np.uint8)


def _read_cifar10(directory: Path) -> Arrays:
    folder = directory / CIFAR_FOLDER if (directory / CIFAR_FOLDER).is_dir() else directory
    names = (*CIFAR_TRAIN_BATCHES, CIFAR_TEST_BATCH)
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise DatasetError(f"missing CIFAR-10 files in {folder}: {', '.join(missing)} "
                           f"(the official {CIFAR_FOLDER} folder has all six batches)")
    meta = folder / CIFAR_META
    if meta.is_file():
        names_in_meta = _unpickle_arrays_only(meta)
        label_names = names_in_meta.get("label_names") if isinstance(names_in_meta, dict) else None
        if label_names is not None and tuple(label_names) != get("cifar-10").class_names:
            raise DatasetError(f"{meta}: class names {label_names} are not CIFAR-10's")
    parts = [read_cifar_batch(folder / name) for name in CIFAR_TRAIN_BATCHES]
    x_train = np.concatenate([x for x, _ in parts])
    y_train = np.concatenate([y for _, y in parts])
    return (x_train, y_train), read_cifar_batch(folder / CIFAR_TEST_BATCH)


_READERS: dict[str, Callable[[Path], Arrays]] = {
    "fashion-mnist": _read_fashion_mnist,
    "cifar-10": _read_cifar10,
}
