"""Load a data set and split its training set over simulated device folders.

Every device in a FedHub run reads only its own ``<root>/<device>/data/train.npz``, so how
the training set is divided decides how hard federated learning is.  Three schemes are
offered, all deterministic for a given seed so experiments can be repeated exactly, for any
labelled data set (they look only at the labels):

* ``iid``: a uniform random split (the easy, textbook case);
* ``dirichlet``: per-class Dirichlet label skew, the usual benchmark for non-IID data;
* ``classes``: each device sees only ``k`` classes (the pathological non-IID case).

The data sets (``--dataset fashion-mnist|cifar-10``) and where their files are found live in
:mod:`fedhub.datasets`; this module splits and writes them.
Run ``python -m fedhub.split --help`` for the command line.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import zipfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from fedhub import datasets
from fedhub import state_dir as state
from fedhub.datasets import DATA_DIR_ENV, DatasetError, read_idx
from fedhub.datasets import FASHION_MNIST_FILES as FILES
from fedhub.engine.devices import check_name
from fedhub.engine.errors import InvalidInput
from fedhub.engine.files import atomic_path, atomic_write_text
from fedhub.engine.plural import plural
from fedhub.options.parser import Parser

__all__ = [
    "DATA_DIR_ENV",
    "DEVICE_ARRAY_FILES",
    "DEVICE_DATA_FILE",
    "FILES",
    "HOLDOUT_FILE",
    "NUM_CLASSES",
    "SCHEMES",
    "DatasetError",
    "has_device_data",
    "load_device_data",
    "load_fashion_mnist",
    "main",
    "partition",
    "partition_classes",
    "partition_dirichlet",
    "partition_iid",
    "read_device_arrays",
    "read_device_holdout",
    "read_idx",
    "split_to_devices",
    "write_device_arrays",
    "write_device_data",
]

DEVICE_DATA_FILE = "train.npz"
# The memory-mappable form (``--format npy``): a worker hosting many devices maps a device's
# arrays only while it trains, instead of holding every device's data in memory.
DEVICE_ARRAY_FILES = ("x.npy", "y.npy")
FORMATS: tuple[str, ...] = ("npz", "npy")
PARTITION_FILE = "partition.json"
# A device's held-out share (federated evaluation: it judges models on it, never trains on it).
HOLDOUT_FILE = "eval.npz"
HOLDOUT_ARRAY_FILES = ("eval_x.npy", "eval_y.npy")
DEFAULT_HOLDOUT = 0.1
DEFAULT_DATASET = "fashion-mnist"
NUM_CLASSES = datasets.get(DEFAULT_DATASET).num_classes
SCHEMES: tuple[str, ...] = ("iid", "dirichlet", "classes")

_DIRICHLET_MAX_TRIES = 1000


def load_fashion_mnist(
    data_dir: str | Path | None = None,
) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """Return Fashion-MNIST as ``((x_train, y_train), (x_test, y_test))`` uint8 arrays:
    ``fedhub.datasets.load("fashion-mnist", data_dir)``, kept for the callers that predate it."""
    return datasets.load(DEFAULT_DATASET, data_dir)


# --------------------------------------------------------------------------- partitioning


def _as_labels(labels: np.ndarray) -> np.ndarray:
    arr = np.asarray(labels)
    if arr.ndim != 1:
        raise DatasetError(f"labels must be a 1-D array, got shape {arr.shape}")
    if arr.size and not np.issubdtype(arr.dtype, np.integer):
        raise DatasetError(f"labels must be integers, got dtype {arr.dtype}")
    if arr.size and int(arr.min()) < 0:
        raise DatasetError("labels must be non-negative")
    return arr.astype(np.int64)


def _check_devices(labels: np.ndarray, n_devices: int) -> None:
    if isinstance(n_devices, bool) or not isinstance(n_devices, int | np.integer):
        raise DatasetError(f"n_devices must be an integer, got {n_devices!r}")
    if n_devices < 1:
        raise DatasetError(f"n_devices must be at least 1, got {n_devices}")
    if n_devices > len(labels):
        raise DatasetError(
            f"cannot split {len(labels)} examples over {n_devices} devices "
            "(every device needs at least one example)"
        )


def _check_alpha(alpha: float) -> None:
    if not (isinstance(alpha, int | float) and math.isfinite(alpha) and alpha > 0):
        raise DatasetError(f"alpha must be a finite number > 0, got {alpha!r}")


def _check_classes_per_device(k: int, labels: np.ndarray) -> None:
    """``k`` must be 1 up to the number of classes the labels can name (``max(label) + 1``): the
    data set's, whichever it is, not a constant."""
    n_classes = int(labels.max()) + 1 if labels.size else 1
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or not 1 <= k <= n_classes:
        raise DatasetError(f"classes_per_device must be an integer in 1..{n_classes}, got {k!r}")


def _sorted_parts(parts: Sequence[Sequence[np.ndarray] | np.ndarray]) -> list[np.ndarray]:
    out = []
    for part in parts:
        if isinstance(part, np.ndarray):
            idx = part
        else:
            idx = np.concatenate(part) if len(part) else np.empty(0, np.int64)
        out.append(np.sort(idx.astype(np.int64)))
    return out


def partition_iid(labels: np.ndarray, n_devices: int, seed: int = 0) -> list[np.ndarray]:
    """Split indices uniformly at random; device sizes differ by at most one."""
    y = _as_labels(labels)
    _check_devices(y, n_devices)
    rng = np.random.default_rng(seed)
    return _sorted_parts(np.array_split(rng.permutation(len(y)), n_devices))


def partition_dirichlet(
    labels: np.ndarray,
    n_devices: int,
    alpha: float = 0.5,
    seed: int = 0,
    min_size: int = 10,
) -> list[np.ndarray]:
    """Per-class Dirichlet label skew (Hsu et al. 2019; the common non-IID benchmark).

    For every class the class's shuffled indices are cut according to proportions drawn from
    ``Dir(alpha, ..., alpha)`` over the devices: small ``alpha`` gives each device a few
    dominant classes, large ``alpha`` approaches IID.  The whole draw is repeated until every
    device has at least ``min_size`` examples (a device with almost no data cannot train),
    up to a bounded number of tries.
    """
    y = _as_labels(labels)
    _check_devices(y, n_devices)
    _check_alpha(alpha)
    if min_size < 0:
        raise DatasetError(f"min_size must be >= 0, got {min_size}")
    if n_devices * min_size > len(y):
        raise DatasetError(
            f"cannot give each of {n_devices} devices at least {min_size} examples "
            f"from only {len(y)} examples"
        )
    rng = np.random.default_rng(seed)
    by_class = [np.flatnonzero(y == c) for c in np.unique(y)]
    for _ in range(_DIRICHLET_MAX_TRIES):
        parts: list[list[np.ndarray]] = [[] for _ in range(n_devices)]
        for members in by_class:
            shuffled = rng.permutation(members)
            proportions = rng.dirichlet(np.full(n_devices, float(alpha)))
            cuts = (np.cumsum(proportions)[:-1] * len(shuffled)).astype(np.int64)
            for device, chunk in enumerate(np.split(shuffled, cuts)):
                parts[device].append(chunk)
        if min(sum(len(c) for c in p) for p in parts) >= min_size:
            return _sorted_parts(parts)
    raise DatasetError(
        f"no Dirichlet split with alpha={alpha} gave all {n_devices} devices at least "
        f"{min_size} examples in {_DIRICHLET_MAX_TRIES} tries; raise alpha, lower "
        "min_size or use fewer devices"
    )


def _class_owners(n_classes: int, n_devices: int, k: int) -> list[list[int]]:
    """Which devices own each class *position* in the shuffled class order.

    Rule: position ``(d * k + j) mod C`` goes to device ``d`` for ``j < k`` (round-robin, so
    when ``n_devices * k >= C`` every class has an owner and each device has exactly ``k``
    distinct classes).  When ``n_devices * k < C``, the positions nobody got
    (``n_devices * k .. C - 1``) are dealt out one by one to devices 0, 1, 2, ... so that the
    partition still covers every example; those devices then hold more than ``k`` classes.
    """
    owners: list[list[int]] = [[] for _ in range(n_classes)]
    for device in range(n_devices):
        for j in range(k):
            position = (device * k + j) % n_classes
            if device not in owners[position]:
                owners[position].append(device)
    for extra, position in enumerate(range(n_devices * k, n_classes)):
        owners[position].append(extra % n_devices)
    return owners


def partition_classes(
    labels: np.ndarray, n_devices: int, classes_per_device: int = 2, seed: int = 0
) -> list[np.ndarray]:
    """Give each device only ``classes_per_device`` classes (pathological non-IID split).

    Classes are taken in a seeded random order and assigned round-robin (see
    :func:`_class_owners` for the exact rule, including what happens to classes left over
    when ``n_devices * classes_per_device`` is below the number of classes).  Each class's
    shuffled indices are split evenly among the devices that own it.
    """
    y = _as_labels(labels)
    _check_devices(y, n_devices)
    _check_classes_per_device(classes_per_device, y)
    rng = np.random.default_rng(seed)
    present = np.unique(y)
    order = rng.permutation(present)
    k = min(int(classes_per_device), len(present))
    owners = _class_owners(len(present), n_devices, k)
    parts: list[list[np.ndarray]] = [[] for _ in range(n_devices)]
    for position, cls in enumerate(order):
        members = rng.permutation(np.flatnonzero(y == cls))
        devices = owners[position]
        for device, chunk in zip(devices, np.array_split(members, len(devices)), strict=True):
            parts[device].append(chunk)
    return _sorted_parts(parts)


def partition(
    labels: np.ndarray,
    n_devices: int,
    scheme: str = "iid",
    *,
    seed: int = 0,
    alpha: float = 0.5,
    classes_per_device: int = 2,
) -> list[np.ndarray]:
    """Split example indices over ``n_devices`` with the named scheme (see module doc).

    Returns one sorted index array per device; the arrays are disjoint and together cover
    every index exactly once.  All parameters are validated, even those the chosen scheme
    ignores, so a typo on the command line is reported rather than silently unused.
    """
    if scheme not in SCHEMES:
        raise DatasetError(f"unknown split scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    y = _as_labels(labels)
    _check_devices(y, n_devices)
    _check_alpha(alpha)
    _check_classes_per_device(classes_per_device, y)
    if scheme == "iid":
        return partition_iid(y, n_devices, seed=seed)
    if scheme == "dirichlet":
        return partition_dirichlet(y, n_devices, alpha=alpha, seed=seed)
    return partition_classes(y, n_devices, classes_per_device=classes_per_device, seed=seed)


# --------------------------------------------------------------------------- device files


def _validate_xy(x: np.ndarray, y: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """A device's arrays are one known data set's images (:mod:`fedhub.datasets`: ``(N, 28, 28)``
    grey or ``(N, 32, 32, 3)`` colour, uint8) and its labels; which one, the shape says."""
    x, y = np.asarray(x), np.asarray(y)
    specs = [datasets.get(name) for name in datasets.NAMES]
    spec = next((s for s in specs if x.shape[1:] == s.image_shape), None)
    if spec is None:
        shapes = " or ".join(str((None, *s.image_shape)).replace("None", "N") for s in specs)
        raise DatasetError(f"{where}: x must have shape {shapes}, got {x.shape}")
    return datasets.check_arrays(spec, x, y, where)


def write_device_data(root: Path, name: str, x: np.ndarray, y: np.ndarray, *,
                      memmap: bool = False,
                      holdout: tuple[np.ndarray, np.ndarray] | None = None) -> Path:
    """Write ``root/name/data/train.npz`` (arrays ``x`` and ``y``, uint8) atomically: ``x`` is
    a known data set's images, ``(N, 28, 28)`` grey or ``(N, 32, 32, 3)`` colour (HWC).

    With ``memmap`` the arrays go to ``data/x.npy`` and ``data/y.npy`` instead
    (:func:`write_device_arrays`); the path of ``x.npy`` is returned.

    ``holdout``: the device's held-out arrays, written beside them (``data/eval.npz``, or
    ``data/eval_x.npy`` and ``eval_y.npy``); without it a held-out file there is removed, so a
    device never evaluates on another split's examples.

    ``name`` becomes a directory name, so it must be a plain name (letters, digits, ``.``,
    ``_``, ``-``): a device name must never be able to write outside ``root``.
    """
    _check_device_name(name)
    x, y = _validate_xy(x, y, f"device {name}")
    if holdout is not None:
        holdout = _validate_xy(*holdout, f"device {name}'s held-out data")
    folder = Path(root) / name / "data"
    for file_name in (HOLDOUT_FILE, *HOLDOUT_ARRAY_FILES):
        (folder / file_name).unlink(missing_ok=True)
    if memmap:
        target = write_device_arrays(root, name, x, y)
        if holdout is not None:
            for file_name, array in zip(HOLDOUT_ARRAY_FILES, holdout, strict=True):
                with atomic_path(folder / file_name) as tmp:
                    np.save(tmp, array, allow_pickle=False)
        return target
    target = folder / DEVICE_DATA_FILE
    with atomic_path(target) as tmp:
        np.savez_compressed(tmp, x=x, y=y)
    for file_name in DEVICE_ARRAY_FILES:
        (folder / file_name).unlink(missing_ok=True)
    if holdout is not None:
        with atomic_path(folder / HOLDOUT_FILE) as tmp:
            np.savez_compressed(tmp, x=holdout[0], y=holdout[1])
    return target


def holdout_indices(indices: np.ndarray, share: float, *, limit: int | None = None,
                    seed: int | list[int] = 0) -> tuple[np.ndarray, np.ndarray]:
    """A device's ``(training, held-out)`` indices from its share ``indices``: ``share`` of the
    examples it trains on held out besides (``round(share * n)``, none when that is 0), drawn
    with ``seed``. With ``limit`` the training part is the first ``limit`` examples, as without a
    held-out share, and the held-out ones come from the examples beyond it while there are enough."""
    indices = np.asarray(indices)
    train = indices if limit is None else indices[:limit]
    k = round(share * len(train))
    if k <= 0:
        return train, indices[:0]
    rng = np.random.default_rng(seed)
    rest = indices[len(train):]
    if len(rest) >= k:
        return train, rest[np.sort(rng.choice(len(rest), k, replace=False))]
    k = min(k, len(train) - 1)
    held = np.zeros(len(train), dtype=bool)
    held[rng.choice(len(train), k, replace=False)] = True
    return train[~held], train[held]


def split_holdout(x: np.ndarray, y: np.ndarray, share: float, *,
                  seed: int = 0) -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """``(x, y)`` as ``((x, y) to train on, (x, y) held out)``: a device's own data without a
    held-out file (``--holdout``), split the way :func:`split_to_devices` splits a share."""
    train, held = holdout_indices(np.arange(len(y)), share, seed=seed)
    return (x[train], y[train]), (x[held], y[held])


def read_device_holdout(device_dir: Path, *, mmap: bool = False) -> tuple[np.ndarray, np.ndarray] | None:
    """A device's held-out arrays (``data/eval_x.npy`` + ``eval_y.npy``, else ``data/eval.npz``),
    validated like its training data; None when it has none."""
    data = Path(device_dir) / "data"
    if (data / HOLDOUT_ARRAY_FILES[0]).is_file():
        x, y = (_load_npy(data / file_name, mmap) for file_name in HOLDOUT_ARRAY_FILES)
        return _validate_xy(x, y, str(data / HOLDOUT_ARRAY_FILES[0]))
    if not (data / HOLDOUT_FILE).is_file():
        return None
    x, y = _load_npz(data / HOLDOUT_FILE)
    return _validate_xy(x, y, str(data / HOLDOUT_FILE))


def _check_device_name(name: str) -> None:
    try:
        check_name(name)
    except InvalidInput as exc:
        raise DatasetError(f"invalid device name {name!r}: {exc.message}") from None


def write_device_arrays(root: Path, name: str, x: np.ndarray, y: np.ndarray) -> Path:
    """Write any arrays as ``root/name/data/x.npy`` and ``y.npy`` (uncompressed, so they can be
    memory-mapped), atomically; returns the path of ``x.npy``. A ``train.npz`` there is
    removed, so a folder never holds two different datasets. Not checked as a known data set:
    the Python API writes any model's data this way, and the device's trainer validates it.
    """
    _check_device_name(name)
    folder = Path(root) / name / "data"
    for file_name, array in zip(DEVICE_ARRAY_FILES, (x, y), strict=True):
        with atomic_path(folder / file_name) as tmp:
            np.save(tmp, np.asarray(array), allow_pickle=False)
    (folder / DEVICE_DATA_FILE).unlink(missing_ok=True)
    return folder / DEVICE_ARRAY_FILES[0]


def has_device_data(device_dir: Path) -> bool:
    """Whether ``device_dir/data`` holds training data in either form."""
    data = Path(device_dir) / "data"
    return (data / DEVICE_DATA_FILE).is_file() or (data / DEVICE_ARRAY_FILES[0]).is_file()


def read_device_arrays(device_dir: Path, *, mmap: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A device's arrays as stored: ``data/x.npy`` + ``data/y.npy``, else ``data/train.npz``.

    ``mmap`` maps the ``.npy`` form read-only instead of reading it: pages come from disk only
    when training touches them (a ``.npz`` is compressed and always read whole). Nothing is
    checked beyond the files being plain arrays: see :func:`load_device_data`.
    ``allow_pickle=False`` because device folders may come from elsewhere: loading a pickle
    would let a crafted file run code.
    """
    data = Path(device_dir) / "data"
    if (data / DEVICE_ARRAY_FILES[0]).is_file():
        x, y = (_load_npy(data / file_name, mmap) for file_name in DEVICE_ARRAY_FILES)
        return x, y
    path = data / DEVICE_DATA_FILE
    if not path.is_file():
        raise DatasetError(
            f"no training data at {path}; create it with "
            "`python -m fedhub.split --devices N`"
        )
    return _load_npz(path)


def _load_npy(path: Path, mmap: bool) -> np.ndarray:
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except FileNotFoundError:
        raise DatasetError(f"{path}: missing (x.npy needs its y.npy)") from None
    except (OSError, ValueError, EOFError) as exc:
        raise DatasetError(f"{path}: not a valid .npy file: {exc}") from exc


def _load_npz(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as npz:
            missing = [key for key in ("x", "y") if key not in npz.files]
            if missing:
                raise DatasetError(
                    f"{path}: missing array(s) {', '.join(missing)} (found {npz.files})"
                )
            return npz["x"], npz["y"]
    except DatasetError:
        raise
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"{path}: not a valid .npz file: {exc}") from exc


def load_device_data(device_dir: Path, *, mmap: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Read a device's data (:func:`read_device_arrays`), validating shapes (a known data
    set's), dtypes and labels."""
    x, y = read_device_arrays(device_dir, mmap=mmap)
    npy = Path(device_dir) / "data" / DEVICE_ARRAY_FILES[0]
    return _validate_xy(x, y, str(npy if npy.is_file() else npy.with_name(DEVICE_DATA_FILE)))


def _summary(y: np.ndarray, num_classes: int) -> dict[str, Any]:
    return {
        "examples": len(y),
        "class_counts": np.bincount(y, minlength=num_classes).astype(int).tolist(),
    }


def split_to_devices(
    root: str | Path,
    n_devices: int,
    *,
    scheme: str = "iid",
    seed: int = 0,
    alpha: float = 0.5,
    classes_per_device: int = 2,
    data_dir: str | Path | None = None,
    limit: int | None = None,
    prefix: str = "device",
    progress: bool = True,
    only: str | None = None,
    memmap: bool = False,
    dataset: str = DEFAULT_DATASET,
    holdout: float = DEFAULT_HOLDOUT,
) -> dict[str, dict[str, Any]]:
    """Partition a data set's training set (``dataset``: ``fashion-mnist`` or ``cifar-10``, found
    by :func:`fedhub.datasets.locate` from ``data_dir``) and write one folder per device.

    Writes ``root/<prefix>1 .. <prefix>N/data/train.npz`` (the images as the data set has them:
    ``(n, 28, 28)`` grey, ``(n, 32, 32, 3)`` colour) and ``root/partition.json`` (data set,
    scheme, seed, parameters and per-device summary), and returns
    ``{name: {"examples": n, "class_counts": [one int per class]}}``.  ``limit`` keeps only the first
    ``limit`` examples of each device's share *after* partitioning, so quick runs keep the
    same label distribution per device as the full split.  A split replaces the previous one:
    the folders of the earlier split in ``root`` that this one does not make (``device4`` after
    a split over 4, now over 3) are removed, so no device trains on data that overlaps the new
    split; a ``<prefix>N`` folder that no earlier split made is refused (:class:`DatasetError`)
    and left alone.
    ``only`` (a device name) writes that device's share alone, the same share as in the full
    split: a device on its own machine or container makes just its own data.
    ``memmap`` writes memory-mappable ``x.npy``/``y.npy`` instead of ``train.npz``.
    ``holdout``: besides the examples a device trains on, this share of them is held out in
    ``data/eval.npz`` (``eval_x.npy``/``eval_y.npy``) for federated evaluation
    (:func:`holdout_indices`; 0: none).
    """
    if limit is not None and limit < 1:
        raise DatasetError(f"limit must be at least 1, got {limit}")
    if not 0 <= holdout < 1:
        raise DatasetError(f"holdout must be from 0 to below 1, got {holdout}")
    try:
        check_name(f"{prefix}{n_devices}")
    except InvalidInput:
        raise DatasetError(f"invalid device prefix {prefix!r}") from None
    spec = datasets.get(dataset)
    names = [f"{prefix}{number}" for number in range(1, n_devices + 1)]
    if only is not None and only not in names:
        raise DatasetError(f"{only!r} is not one of the devices {prefix}1..{prefix}{n_devices}")
    root = Path(root)
    stale = [] if only is not None else _stale_devices(root, prefix, names)
    source = datasets.locate(dataset, data_dir)
    (x_train, y_train), _ = datasets.load(dataset, source)
    parts = partition(
        y_train,
        n_devices,
        scheme,
        seed=seed,
        alpha=alpha,
        classes_per_device=classes_per_device,
    )
    summary: dict[str, dict[str, Any]] = {}
    bar = tqdm(parts, desc="writing devices", unit="device", disable=not progress)
    for number, (name, indices) in enumerate(zip(names, bar, strict=True), start=1):
        if only is not None and name != only:
            continue
        chosen, held = holdout_indices(indices, holdout, limit=limit, seed=[seed, number])
        write_device_data(root, name, x_train[chosen], y_train[chosen], memmap=memmap,
                          holdout=(x_train[held], y_train[held]) if len(held) else None)
        summary[name] = {**_summary(y_train[chosen], spec.num_classes), "held_out": len(held)}

    for folder in stale:
        shutil.rmtree(folder)

    record = {
        "dataset": dataset,
        "scheme": scheme,
        "seed": seed,
        "n_devices": len(parts),
        "parameters": {
            "alpha": alpha,
            "classes_per_device": classes_per_device,
            "limit": limit,
            "prefix": prefix,
            "only": only,
            "format": "npy" if memmap else "npz",
            "holdout": holdout,
        },
        "source": str(source) if source is not None else f"keras.datasets.{spec.keras_name}",
        "total_examples": sum(s["examples"] for s in summary.values()),
        "devices": summary,
    }
    atomic_write_text(root / PARTITION_FILE, json.dumps(record, indent=2) + "\n")
    return summary


def _stale_devices(root: Path, prefix: str, names: list[str]) -> list[Path]:
    """The device folders of the previous split (its ``partition.json``) that a split into
    ``names`` does not make again; checked before anything is written, so a refusal changes
    nothing. A ``<prefix>N`` folder with data that no earlier split recorded is someone's own:
    refused with the way out, never removed."""
    try:
        previous = set(json.loads((root / PARTITION_FILE).read_text())["devices"])
    except (OSError, ValueError, KeyError, TypeError):
        previous = set()
    keep = set(names)
    stale, foreign = [], []
    for folder in sorted(root.glob(f"{prefix}*")):
        if (not folder.is_dir() or folder.name in keep
                or not re.fullmatch(rf"{re.escape(prefix)}\d+", folder.name)):
            continue
        if folder.name in previous:
            stale.append(folder)
        elif has_device_data(folder):
            foreign.append(folder.name)
    if foreign:
        raise DatasetError(
            f"{root} holds device folders with data that no earlier split made: {', '.join(foreign)}; "
            "remove them or split into another folder (--out, or --state-dir)"
        )
    return stale


# --------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="python -m fedhub.split",
        description="Split a data set's training set (Fashion-MNIST by default, or CIFAR-10) into "
        "per-device folders (<out>/deviceN/data/train.npz) for a FedHub run.",
    )
    parser.add_argument("--devices", type=int, required=True, help="number of devices")
    parser.add_argument(
        "--dataset", choices=datasets.NAMES, default=DEFAULT_DATASET,
        help=f"the data set to split (default: {DEFAULT_DATASET})")
    parser.add_argument(
        "--split", choices=SCHEMES, default="iid", help="partition scheme (default: iid)"
    )
    parser.add_argument(
        "--alpha",
        type=float,
        default=0.5,
        help="Dirichlet concentration for --split dirichlet; smaller = more skewed (default 0.5)",
    )
    parser.add_argument(
        "--classes-per-device",
        type=int,
        default=2,
        help="classes per device for --split classes (default 2)",
    )
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument(
        "--data-dir",
        default=None,
        help="the data set's folder (Fashion-MNIST's four .gz files, CIFAR-10's cifar-10-batches-py) "
        f"or a folder holding fashion-mnist/ and cifar-10/ (default: ${DATA_DIR_ENV}, else "
        "../shared/data/<dataset> beside the checkout where there is one, else the Keras download)",
    )
    state.add_option(parser)
    parser.add_argument(
        "--out", type=Path, default=None,
        help="output folder (default: the state directory's devices/, where devices look)")
    parser.add_argument(
        "--limit",
        type=int,
        default=None,
        help="keep only the first N examples of each device's share (quick tests)",
    )
    parser.add_argument(
        "--only",
        metavar="NAME",
        default=None,
        help="write only this device's share of the split (e.g. device2), as on its own machine",
    )
    parser.add_argument(
        "--format",
        choices=FORMATS,
        default="npz",
        help="npz: one compressed data/train.npz per device; npy: data/x.npy and data/y.npy, "
        "memory-mapped by device pools (python -m fedhub.device.launcher --workers K) (default: npz)",
    )
    parser.add_argument(
        "--holdout", type=float, default=DEFAULT_HOLDOUT, metavar="SHARE",
        help="share held out besides each device's training examples, for federated evaluation "
        f"(data/eval.npz; 0: none) (default {DEFAULT_HOLDOUT})")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    args = _parser().parse_args(argv)
    args.out = args.out or state.resolve(args.state_dir).devices_root
    try:
        summary = split_to_devices(
            args.out,
            args.devices,
            scheme=args.split,
            seed=args.seed,
            alpha=args.alpha,
            classes_per_device=args.classes_per_device,
            data_dir=args.data_dir,
            limit=args.limit,
            progress=not args.quiet,
            only=args.only,
            memmap=args.format == "npy",
            dataset=args.dataset,
            holdout=args.holdout,
        )
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    for name, info in summary.items():
        counts = " ".join(str(c) for c in info["class_counts"])
        print(f"{name}: {plural(info['examples'], 'example')}, class counts [{counts}]")
    total = sum(info["examples"] for info in summary.values())
    print(f"wrote {plural(len(summary), 'device')} ({plural(total, 'example')}) "
          f"to {args.out}/ ({PARTITION_FILE})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
