"""Tests for fedhub.split: IDX reading, partition schemes, device files and the CLI."""

from __future__ import annotations

import gzip
import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedhub.split import (
    DATA_DIR_ENV,
    FILES,
    DatasetError,
    load_device_data,
    load_fashion_mnist,
    partition,
    partition_classes,
    partition_dirichlet,
    partition_iid,
    read_idx,
    split_to_devices,
    write_device_data,
)

from .conftest import DATA_DIR

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def train_labels(fashion) -> np.ndarray:
    return fashion[0][1]


def idx_images(images: np.ndarray, *, magic: int = 2051, count: int | None = None) -> bytes:
    n, rows, cols = images.shape
    header = struct.pack(">IIII", magic, n if count is None else count, rows, cols)
    return header + images.astype(np.uint8).tobytes()


def idx_labels(labels: np.ndarray, *, magic: int = 2049, count: int | None = None) -> bytes:
    header = struct.pack(">II", magic, len(labels) if count is None else count)
    return header + np.asarray(labels, np.uint8).tobytes()


def write_fake_dataset(directory: Path, n_train: int = 30, n_test: int = 10) -> None:
    rng = np.random.default_rng(1)
    directory.mkdir(parents=True, exist_ok=True)
    for prefix, n in (("train", n_train), ("t10k", n_test)):
        images = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
        labels = np.arange(n, dtype=np.uint8) % 10
        (directory / f"{prefix}-images-idx3-ubyte.gz").write_bytes(gzip.compress(idx_images(images)))
        (directory / f"{prefix}-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_labels(labels)))


# --------------------------------------------------------------------------- real files


def test_real_files_load(fashion) -> None:
    (x_train, y_train), (x_test, y_test) = fashion
    assert x_train.shape == (60000, 28, 28) and x_train.dtype == np.uint8
    assert y_train.shape == (60000,) and y_train.dtype == np.uint8
    assert x_test.shape == (10000, 28, 28) and y_test.shape == (10000,)
    assert y_train[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert y_test[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    assert np.bincount(y_train).tolist() == [6000] * 10
    assert np.bincount(y_test).tolist() == [1000] * 10
    assert x_train.flags.writeable


def test_env_var_is_used(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write_fake_dataset(tmp_path)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    (x_train, y_train), (x_test, _) = load_fashion_mnist()
    assert x_train.shape == (30, 28, 28) and x_test.shape == (10, 28, 28)
    # an explicit directory wins over the environment
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "nowhere"))
    assert load_fashion_mnist(tmp_path)[0][1].tolist() == y_train.tolist()


# --------------------------------------------------------------------------- broken files


def test_read_idx_plain_and_gzip(tmp_path: Path) -> None:
    images = np.random.default_rng(0).integers(0, 256, (3, 28, 28), dtype=np.uint8)
    plain, gz = tmp_path / "images-idx3-ubyte", tmp_path / "images.gz"
    plain.write_bytes(idx_images(images))
    gz.write_bytes(gzip.compress(idx_images(images)))
    assert np.array_equal(read_idx(plain), images)
    assert np.array_equal(read_idx(gz), images)
    labels = tmp_path / "labels.gz"
    labels.write_bytes(gzip.compress(idx_labels(np.array([9, 0, 3]))))
    assert read_idx(labels).tolist() == [9, 0, 3]


def test_bad_magic(tmp_path: Path) -> None:
    path = tmp_path / "bad.gz"
    path.write_bytes(gzip.compress(idx_labels(np.array([1, 2]), magic=1234)))
    with pytest.raises(DatasetError, match=r"bad\.gz.*magic number 1234"):
        read_idx(path)


def test_truncated_and_trailing(tmp_path: Path) -> None:
    images = np.zeros((4, 28, 28), np.uint8)
    short = tmp_path / "short.gz"
    short.write_bytes(gzip.compress(idx_images(images)[:-100]))
    with pytest.raises(DatasetError, match=r"short\.gz.*truncated.*3136.*found 3036"):
        read_idx(short)
    long = tmp_path / "long"
    long.write_bytes(idx_labels(np.array([1, 2, 3])) + b"\x00\x01")
    with pytest.raises(DatasetError, match=r"trailing bytes.*3 data bytes, found 5"):
        read_idx(long)
    cut_gzip = tmp_path / "cut.gz"
    cut_gzip.write_bytes(gzip.compress(idx_images(images))[:-20])
    with pytest.raises(DatasetError, match=r"cut\.gz"):
        read_idx(cut_gzip)
    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"\x00\x00")
    with pytest.raises(DatasetError, match="too short"):
        read_idx(tiny)


def test_labels_out_of_range(tmp_path: Path) -> None:
    path = tmp_path / "labels"
    path.write_bytes(idx_labels(np.array([1, 12])))
    with pytest.raises(DatasetError, match=r"0\.\.9"):
        read_idx(path)


def test_missing_files(tmp_path: Path) -> None:
    write_fake_dataset(tmp_path)
    (tmp_path / FILES["test_labels"]).unlink()
    (tmp_path / FILES["train_images"]).unlink()
    with pytest.raises(DatasetError) as info:
        load_fashion_mnist(tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message
    assert FILES["test_labels"] in message and FILES["train_images"] in message
    assert FILES["train_labels"] not in message
    with pytest.raises(DatasetError, match="does not exist"):
        load_fashion_mnist(tmp_path / "nowhere")


def test_count_mismatch(tmp_path: Path) -> None:
    write_fake_dataset(tmp_path)
    (tmp_path / FILES["train_labels"]).write_bytes(gzip.compress(idx_labels(np.zeros(29, np.uint8))))
    with pytest.raises(DatasetError, match="30 images but 29 labels"):
        load_fashion_mnist(tmp_path)


# --------------------------------------------------------------------------- partitions


SCHEMES = ["iid", "dirichlet", "classes"]


def check_partition(parts: list[np.ndarray], n_examples: int, n_devices: int) -> None:
    assert len(parts) == n_devices
    for part in parts:
        assert part.ndim == 1 and np.issubdtype(part.dtype, np.integer)
        assert np.all(np.diff(part) > 0), "indices must be sorted and unique"
    joined = np.concatenate(parts)
    assert len(joined) == n_examples, "partition must not drop or duplicate examples"
    assert np.array_equal(np.sort(joined), np.arange(n_examples))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_partition_disjoint_complete_seeded(train_labels: np.ndarray, scheme: str) -> None:
    parts = partition(train_labels, 7, scheme, seed=3, alpha=0.5, classes_per_device=3)
    check_partition(parts, len(train_labels), 7)
    again = partition(train_labels, 7, scheme, seed=3, alpha=0.5, classes_per_device=3)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    other = partition(train_labels, 7, scheme, seed=4, alpha=0.5, classes_per_device=3)
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


def test_iid_is_balanced(train_labels: np.ndarray) -> None:
    parts = partition_iid(train_labels, 7, seed=0)
    sizes = [len(p) for p in parts]
    assert max(sizes) - min(sizes) <= 1
    for p in parts:  # every class appears in roughly its global share
        shares = np.bincount(train_labels[p], minlength=10) / len(p)
        assert np.all(np.abs(shares - 0.1) < 0.03)


def mean_max_class_share(labels: np.ndarray, parts: list[np.ndarray]) -> float:
    return float(np.mean([np.bincount(labels[p], minlength=10).max() / len(p) for p in parts]))


def test_dirichlet_small_alpha_is_skewed(train_labels: np.ndarray) -> None:
    iid = mean_max_class_share(train_labels, partition_iid(train_labels, 10, seed=0))
    skewed_parts = partition_dirichlet(train_labels, 10, alpha=0.1, seed=0)
    check_partition(skewed_parts, len(train_labels), 10)
    skewed = mean_max_class_share(train_labels, skewed_parts)
    assert iid < 0.15
    assert skewed > 0.5 and skewed > 3 * iid
    mild = mean_max_class_share(train_labels, partition_dirichlet(train_labels, 10, alpha=100.0))
    assert mild < 0.2


def test_dirichlet_min_size(train_labels: np.ndarray) -> None:
    labels = train_labels[:300]
    parts = partition_dirichlet(labels, 10, alpha=0.3, seed=1, min_size=10)
    check_partition(parts, 300, 10)
    assert min(len(p) for p in parts) >= 10
    with pytest.raises(DatasetError, match="at least 50 examples"):
        partition_dirichlet(labels, 10, alpha=0.3, min_size=50)
    with pytest.raises(DatasetError, match="tries"):
        partition_dirichlet(labels, 10, alpha=0.001, min_size=29)


@pytest.mark.parametrize(("n_devices", "k"), [(5, 2), (3, 4), (10, 1), (4, 3), (20, 2)])
def test_classes_at_most_k(train_labels: np.ndarray, n_devices: int, k: int) -> None:
    assert n_devices * k >= 10
    parts = partition_classes(train_labels, n_devices, classes_per_device=k, seed=2)
    check_partition(parts, len(train_labels), n_devices)
    for p in parts:
        assert len(np.unique(train_labels[p])) == k
    if n_devices * k == 10:  # each class owned by exactly one device
        owners = [sum(c in set(train_labels[p].tolist()) for p in parts) for c in range(10)]
        assert owners == [1] * 10


def test_classes_leftover_classes_are_dealt_out(train_labels: np.ndarray) -> None:
    parts = partition_classes(train_labels, 4, classes_per_device=2, seed=0)
    check_partition(parts, len(train_labels), 4)
    counts = sorted(len(np.unique(train_labels[p])) for p in parts)
    assert counts == [2, 2, 3, 3]  # 8 owned slots + 2 leftover classes to devices 1 and 2
    whole = partition_classes(train_labels, 1, classes_per_device=1)
    assert len(np.unique(train_labels[whole[0]])) == 10


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"scheme": "random"}, "unknown split scheme 'random'"),
        ({"n_devices": 0}, "at least 1"),
        ({"n_devices": 101}, "cannot split 100 examples over 101 devices"),
        ({"alpha": 0.0}, "alpha"),
        ({"alpha": -1.0, "scheme": "dirichlet"}, "alpha"),
        ({"alpha": float("nan")}, "alpha"),
        ({"classes_per_device": 0}, "classes_per_device"),
        ({"classes_per_device": 11, "scheme": "classes"}, "classes_per_device"),
    ],
)
def test_partition_rejects_bad_arguments(kwargs: dict, message: str) -> None:
    labels = np.arange(100) % 10
    args = {"n_devices": 5, "scheme": "iid"} | kwargs
    n_devices, scheme = args.pop("n_devices"), args.pop("scheme")
    with pytest.raises(DatasetError, match=message):
        partition(labels, n_devices, scheme, **args)


# --------------------------------------------------------------------------- device files


def test_write_load_round_trip(tmp_path: Path, fashion) -> None:
    (x_train, y_train), _ = fashion
    path = write_device_data(tmp_path, "device1", x_train[:50], y_train[:50])
    assert path == tmp_path / "device1" / "data" / "train.npz"
    x, y = load_device_data(tmp_path / "device1")
    assert x.dtype == np.uint8 and y.dtype == np.uint8
    assert np.array_equal(x, x_train[:50]) and np.array_equal(y, y_train[:50])
    assert [p.name for p in path.parent.iterdir()] == ["train.npz"]  # no temp files left
    with pytest.raises(DatasetError, match="invalid device name"):
        write_device_data(tmp_path, "../escape", x_train[:5], y_train[:5])
    with pytest.raises(DatasetError, match="5 images but 4 labels"):
        write_device_data(tmp_path, "device2", x_train[:5], y_train[:4])


def test_load_device_data_errors(tmp_path: Path) -> None:
    with pytest.raises(DatasetError, match="no training data"):
        load_device_data(tmp_path / "device9")
    data = tmp_path / "dev" / "data"
    data.mkdir(parents=True)
    target = data / "train.npz"
    x = np.zeros((3, 28, 28), np.uint8)
    cases = [
        ({"x": x}, "missing array"),
        ({"x": x, "y": np.zeros(2, np.uint8)}, "3 images but 2 labels"),
        ({"x": x.astype(np.float32), "y": np.zeros(3, np.uint8)}, "uint8"),
        ({"x": np.zeros((3, 28), np.uint8), "y": np.zeros(3, np.uint8)}, "shape"),
        ({"x": x, "y": np.full(3, 10, np.uint8)}, r"0\.\.9"),
    ]
    for arrays, message in cases:
        with target.open("wb") as fh:
            np.savez(fh, **arrays)
        with pytest.raises(DatasetError, match=message):
            load_device_data(tmp_path / "dev")
    target.write_bytes(b"this is not a zip file")
    with pytest.raises(DatasetError, match=r"not a valid \.npz"):
        load_device_data(tmp_path / "dev")


def test_split_to_devices(tmp_path: Path) -> None:
    root = tmp_path / "devices"
    summary = split_to_devices(
        root, 3, scheme="dirichlet", alpha=0.5, seed=1, data_dir=DATA_DIR, limit=40, progress=False
    )
    assert list(summary) == ["device1", "device2", "device3"]
    for name, info in summary.items():
        x, y = load_device_data(root / name)
        assert info["examples"] == len(x) == len(y) <= 40
        assert info["class_counts"] == np.bincount(y, minlength=10).tolist()
    record = json.loads((root / "partition.json").read_text())
    assert record["scheme"] == "dirichlet" and record["seed"] == 1
    assert record["parameters"]["alpha"] == 0.5 and record["parameters"]["limit"] == 40
    assert record["devices"] == summary


def test_split_only_one_device_writes_its_share_of_the_full_split(tmp_path: Path) -> None:
    full, alone = tmp_path / "full", tmp_path / "alone"
    split_to_devices(full, 3, scheme="dirichlet", seed=2, data_dir=DATA_DIR, limit=30, progress=False)
    summary = split_to_devices(alone, 3, scheme="dirichlet", seed=2, data_dir=DATA_DIR, limit=30,
                               progress=False, only="device2")
    assert list(summary) == ["device2"]
    assert sorted(p.name for p in alone.iterdir()) == ["device2", "partition.json"]
    for a, b in zip(load_device_data(full / "device2"), load_device_data(alone / "device2"), strict=True):
        np.testing.assert_array_equal(a, b)
    assert json.loads((alone / "partition.json").read_text())["parameters"]["only"] == "device2"
    with pytest.raises(DatasetError, match=r"not one of the devices device1\.\.device3"):
        split_to_devices(alone, 3, data_dir=DATA_DIR, only="device4", progress=False)


# --------------------------------------------------------------------------- CLI


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "fedhub.split", *args],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env={k: v for k, v in os.environ.items() if k != DATA_DIR_ENV},
    )


@pytest.mark.slow
def test_cli_writes_devices(tmp_path: Path) -> None:
    """The command in a real process (its refusals are checked in-process below)."""
    out = tmp_path / "devs"
    result = run_cli(
        "--devices", "3", "--split", "classes", "--classes-per-device", "4",
        "--data-dir", str(DATA_DIR), "--out", str(out), "--limit", "25", "--quiet",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    lines = [line for line in result.stdout.splitlines() if line.startswith("device")]
    assert len(lines) == 3 and all("25 examples" in line for line in lines)
    for n in (1, 2, 3):
        x, y = load_device_data(out / f"device{n}")
        assert len(x) == 25 and len(np.unique(y)) <= 4
    assert (out / "partition.json").is_file()


def test_cli_errors(tmp_path: Path) -> None:
    """In-process: ``main(argv)`` prints one ``error: ...`` line and exits 2."""
    from fedhub.split import main
    from tests.cli_inprocess import assert_one_line_error, run_main

    assert_one_line_error(run_main(main, ["--devices", "2", "--data-dir", str(tmp_path / "missing"),
                                          "--quiet"]), "does not exist")
    assert_one_line_error(run_main(main, ["--devices", "0", "--data-dir", str(DATA_DIR),
                                          "--out", str(tmp_path)]), "n_devices must be at least 1")
    assert_one_line_error(run_main(main, ["--devices", "2", "--only", "../x", "--data-dir", str(DATA_DIR),
                                          "--out", str(tmp_path)]), "device")
    assert run_main(main, ["--help"]).code == 0
