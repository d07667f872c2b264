"""fedhub.datasets: CIFAR-10's reader against its published facts, the one lookup every command
uses (option > $FEDHUB_DATA_DIR > shared folder > download), the partitions and the split
command on CIFAR-10's colour images."""

from __future__ import annotations

import json
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedhub import datasets
from fedhub import split as format_dataset
from fedhub.datasets import DATA_DIR_ENV, DatasetError
from fedhub.split import load_device_data, partition, read_device_holdout, write_device_data

from .cli_inprocess import assert_one_line_error, run_main
from .conftest import DATA_DIR, ROOT
from .test_format_dataset import write_fake_dataset

CIFAR_DIR = ROOT.parent / "shared" / "data" / "cifar-10"


@pytest.fixture(scope="module")
def cifar() -> datasets.Arrays:
    """The whole of CIFAR-10 from the shared folder, read once."""
    if not (CIFAR_DIR / "cifar-10-batches-py" / "test_batch").is_file():
        pytest.fail(f"CIFAR-10 not found in {CIFAR_DIR} (the official cifar-10-batches-py folder)")
    return datasets.load("cifar-10", CIFAR_DIR)


def write_fake_cifar(folder: Path, per_batch: int, *, nested: bool = True, seed: int = 0) -> Path:
    """A CIFAR-10 folder in the official layout, ``per_batch`` images in each of the six batches;
    returns the folder holding the batches. Pickled with protocol 4, where ``bytes`` have their own
    opcode: Python 3's protocol 2 writes them through ``_codecs.encode``, which the reader
    refuses; the official files (Python 2's protocol 2) are read in the tests on the real ones."""
    rng = np.random.default_rng(seed)
    batches = folder / "cifar-10-batches-py" if nested else folder
    batches.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {"batch_label": name, "labels": [int(v) for v in np.arange(per_batch) % 10],
                 "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                 "filenames": [f"{name}_{i}.png" for i in range(per_batch)]}
        (batches / name).write_bytes(pickle.dumps(batch, protocol=4))
    meta = {"label_names": list(datasets.get("cifar-10").class_names), "num_vis": 3072}
    (batches / "batches.meta").write_bytes(pickle.dumps(meta, protocol=4))
    return batches


def n_train(name: str, data_dir: Path | None = None) -> int:
    return len(datasets.load(name, data_dir)[0][1])


@pytest.fixture
def lookup(tmp_path, monkeypatch):
    """An empty shared folder, no $FEDHUB_DATA_DIR, and a download that fails (no internet)."""
    shared = tmp_path / "shared-data"
    shared.mkdir()
    monkeypatch.setattr(datasets, "SHARED_DATA_ROOT", shared)
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)

    def no_internet(spec):
        raise OSError("no network in this test")

    monkeypatch.setattr(datasets, "_download", no_internet)
    return shared


# --------------------------------------------------------------------------- the data sets


def test_each_data_set_says_its_classes_and_image_shape():
    fashion, cifar10 = datasets.get("fashion-mnist"), datasets.get("cifar-10")
    assert datasets.NAMES == ("fashion-mnist", "cifar-10")
    assert fashion.image_shape == (28, 28) and fashion.channels == 1 and fashion.num_classes == 10
    assert fashion.class_names[0] == "T-shirt/top" and fashion.class_names[9] == "Ankle boot"
    assert cifar10.image_shape == (32, 32, 3) and cifar10.channels == 3
    assert cifar10.class_names == ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog",
                                   "horse", "ship", "truck")
    with pytest.raises(DatasetError,
                       match="unknown data set 'cifar-100'; choose one of fashion-mnist, cifar-10"):
        datasets.get("cifar-100")


# --------------------------------------------------------------------------- CIFAR-10's reader


def test_cifar10_reads_as_its_readme_says(cifar):
    """The facts in ../shared/data/cifar-10/README.md: counts, first labels, per-class counts and
    the channel means and deviations, which only come out right if each 3,072-byte row is read
    as R, G, B planes and turned into height-width-channel order."""
    (x_train, y_train), (x_test, y_test) = cifar
    assert x_train.shape == (50000, 32, 32, 3) and x_test.shape == (10000, 32, 32, 3)
    assert x_train.dtype == x_test.dtype == y_train.dtype == y_test.dtype == np.uint8
    assert y_train.shape == (50000,) and y_test.shape == (10000,)
    assert x_train.flags.c_contiguous and x_train.flags.writeable
    assert y_train[:10].tolist() == [6, 9, 9, 4, 1, 1, 2, 7, 8, 3]
    assert y_test[:10].tolist() == [3, 8, 8, 0, 6, 6, 1, 6, 3, 1]
    assert np.bincount(y_train).tolist() == [5000] * 10
    assert np.bincount(y_test).tolist() == [1000] * 10
    for x, mean, std in ((x_train, [0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
                         (x_test, [0.4942, 0.4851, 0.4504], [0.2467, 0.2429, 0.2616])):
        # from each channel's histogram of the 256 levels: exact, and quick on 51 million values
        counts = np.stack([np.bincount(x[..., c].ravel(), minlength=256) for c in range(3)])
        levels = np.arange(256) / 255.0
        means = counts @ levels / counts.sum(axis=1)
        stds = np.sqrt(counts @ levels**2 / counts.sum(axis=1) - means**2)
        np.testing.assert_allclose(means, mean, atol=6e-5)
        np.testing.assert_allclose(stds, std, atol=6e-5)


def test_one_batch_row_becomes_one_hwc_image(tmp_path):
    row = np.arange(3072, dtype=np.int64) % 256
    batch = {"labels": [7], "data": row.astype(np.uint8)[None, :]}
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps(batch, protocol=4))
    x, y = datasets.read_cifar_batch(path)
    assert x.shape == (1, 32, 32, 3) and y.tolist() == [7]
    # pixel (row 1, column 2): red at 1*32+2, green 1,024 further on, blue 2,048 further on
    assert x[0, 1, 2].tolist() == [34, (1024 + 34) % 256, (2048 + 34) % 256]


def test_a_batch_that_names_any_other_callable_runs_nothing(tmp_path):
    marker = tmp_path / "ran"

    class Payload:
        def __reduce__(self):
            return (os.mkdir, (str(marker),))

    payload = pickle.dumps({"labels": [1], "data": Payload()}, protocol=2)
    pickle.loads(payload)  # a general unpickler runs it: the payload is live
    assert marker.is_dir()
    marker.rmdir()
    path = tmp_path / "data_batch_1"
    path.write_bytes(payload)
    with pytest.raises(DatasetError,
                       match=r"data_batch_1: not a CIFAR-10 python batch: refusing posix\.mkdir"):
        datasets.read_cifar_batch(path)
    assert not marker.exists()
    path.write_bytes(pickle.dumps({"labels": [1], "data": eval}, protocol=2))
    with pytest.raises(DatasetError, match=r"refusing __builtin__\.eval"):
        datasets.read_cifar_batch(path)


@pytest.mark.parametrize("batch, message", [
    ({"labels": [1, 2]}, "a dict with 'data' and 'labels'"),
    ({"labels": [1], "data": np.zeros((1, 3072), np.float32)}, r"uint8 array of shape \(N, 3072\)"),
    ({"labels": [1], "data": np.zeros((1, 1024), np.uint8)}, r"shape \(N, 3072\), got \(1, 1024\)"),
    ({"labels": [1], "data": np.array([[b"x"] * 3072], dtype=object)}, "uint8 array"),
    ({"labels": [1, 2], "data": np.zeros((1, 3072), np.uint8)}, "1 images but 2 labels"),
    ({"labels": [10], "data": np.zeros((1, 3072), np.uint8)}, r"labels must be 0\.\.9, found 10\.\.10"),
    ({"labels": ["3"], "data": np.zeros((1, 3072), np.uint8)}, "list of ints"),
])
def test_a_malformed_batch_is_refused(tmp_path, batch, message):
    path = tmp_path / "data_batch_1"
    path.write_bytes(pickle.dumps(batch, protocol=4))
    with pytest.raises(DatasetError, match=message):
        datasets.read_cifar_batch(path)


def test_a_truncated_batch_or_a_missing_one_is_refused(tmp_path, lookup):
    batches = write_fake_cifar(tmp_path / "c", 4)
    whole = (batches / "data_batch_2").read_bytes()
    (batches / "data_batch_2").write_bytes(whole[: len(whole) // 2])
    with pytest.raises(DatasetError, match="data_batch_2: not a CIFAR-10 python batch"):
        datasets.load("cifar-10", tmp_path / "c")
    (batches / "data_batch_2").unlink()
    (batches / "test_batch").unlink()
    with pytest.raises(DatasetError,
                       match=re.escape(f"missing CIFAR-10 files in {batches}: data_batch_2, test_batch")):
        datasets.load("cifar-10", tmp_path / "c")


def test_keras_arrays_come_out_channels_last_with_flat_labels():
    spec = datasets.get("cifar-10")
    chw = np.arange(2 * 3 * 32 * 32, dtype=np.uint8).reshape(2, 3, 32, 32)
    (x, y), (_, yt) = datasets._from_keras(spec, ((chw, np.array([[3], [5]])), (chw[:1], np.array([[1]]))))
    assert x.shape == (2, 32, 32, 3) and y.tolist() == [3, 5] and yt.shape == (1,)
    assert x[1, 4, 5].tolist() == chw[1, :, 4, 5].tolist()


# --------------------------------------------------------------------------- the one lookup


def test_the_option_wins_over_the_environment_which_wins_over_the_shared_folder(tmp_path, lookup,
                                                                                 monkeypatch):
    write_fake_cifar(lookup / "cifar-10", 2)  # shared: 10 training images
    write_fake_cifar(tmp_path / "env", 3)  # 15
    write_fake_cifar(tmp_path / "option", 4)  # 20
    assert n_train("cifar-10") == 10
    assert datasets.locate("cifar-10") == lookup / "cifar-10"
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "env"))
    assert n_train("cifar-10") == 15
    assert n_train("cifar-10", tmp_path / "option") == 20


def test_a_data_set_folder_and_a_parent_folder_both_work(tmp_path, lookup, monkeypatch):
    parent = tmp_path / "data"
    write_fake_cifar(parent / "cifar-10", 3)
    write_fake_dataset(parent / "fashion-mnist", n_train=40)
    for data_dir, expected in ((parent, 15), (parent / "cifar-10", 15),
                               (parent / "cifar-10" / "cifar-10-batches-py", 15)):
        assert n_train("cifar-10", data_dir) == expected, data_dir
    assert n_train("fashion-mnist", parent) == 40
    assert n_train("fashion-mnist", parent / "fashion-mnist") == 40
    monkeypatch.setenv(DATA_DIR_ENV, str(parent))  # the environment: the same two forms
    assert n_train("cifar-10") == 15 and n_train("fashion-mnist") == 40
    monkeypatch.setenv(DATA_DIR_ENV, str(parent / "cifar-10"))
    assert n_train("cifar-10") == 15
    # the old helper reads through the same lookup
    monkeypatch.setenv(DATA_DIR_ENV, str(parent / "fashion-mnist"))
    assert len(format_dataset.load_fashion_mnist()[0][1]) == 40


def test_an_environment_folder_of_another_data_set_leaves_the_lookup_to_the_shared_folder(
        tmp_path, lookup, monkeypatch):
    """What `make` exports: $FEDHUB_DATA_DIR is the Fashion-MNIST folder, and CIFAR-10 is found
    beside it in the shared folder."""
    write_fake_dataset(tmp_path / "fashion", n_train=40)
    write_fake_cifar(lookup / "cifar-10", 2)
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "fashion"))
    assert n_train("cifar-10") == 10 and n_train("fashion-mnist") == 40
    # named explicitly, that folder is an error: the caller asked for it
    with pytest.raises(DatasetError, match=re.escape(f"data directory {tmp_path / 'fashion'} holds "
                                                     "fashion-mnist, not CIFAR-10")):
        datasets.load("cifar-10", tmp_path / "fashion")


def test_a_missing_data_set_says_where_it_looked_without_the_internet(tmp_path, lookup, monkeypatch):
    write_fake_dataset(tmp_path / "fashion")
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "fashion"))
    with pytest.raises(DatasetError) as info:
        datasets.load("cifar-10")
    message = str(info.value)
    assert message.startswith("CIFAR-10 not found: looked in ")
    assert f"${DATA_DIR_ENV} ({tmp_path / 'fashion'}, which holds fashion-mnist)" in message
    assert f"{lookup / 'cifar-10'} (not there)" in message
    assert "keras.datasets.cifar10 could not download it (no network in this test)" in message
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path / "nowhere"))
    with pytest.raises(DatasetError,
                       match=re.escape(f"{tmp_path / 'nowhere'} (${DATA_DIR_ENV}) does not exist")):
        datasets.load("cifar-10")
    with pytest.raises(DatasetError,
                       match=re.escape(f"{tmp_path / 'gone'} (the data folder given) does not exist")):
        datasets.load("fashion-mnist", tmp_path / "gone")


def test_the_class_names_in_batches_meta_must_be_cifar10s(tmp_path, lookup):
    batches = write_fake_cifar(tmp_path / "c", 1)
    (batches / "batches.meta").write_bytes(pickle.dumps({"label_names": ["a"] * 10}, protocol=4))
    with pytest.raises(DatasetError, match=r"batches\.meta: class names .* are not CIFAR-10's"):
        datasets.load("cifar-10", tmp_path / "c")


# --------------------------------------------------------------------------- partitions, device files


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "classes"])
def test_partitions_split_cifar10_whole_and_disjoint(cifar, scheme):
    (x_train, y_train), _ = cifar
    parts = partition(y_train, 6, scheme, seed=1, alpha=0.3, classes_per_device=3)
    joined = np.concatenate(parts)
    assert len(joined) == 50000 and np.array_equal(np.sort(joined), np.arange(50000))
    shares = [np.bincount(y_train[p], minlength=10) / len(p) for p in parts]
    top = float(np.mean([s.max() for s in shares]))
    if scheme == "iid":
        assert top < 0.12  # each device close to a tenth of every class
    elif scheme == "dirichlet":
        assert top > 0.3
    else:
        assert all(np.count_nonzero(s) == 3 for s in shares)
    x = x_train[parts[0]]
    assert x.shape == (len(parts[0]), 32, 32, 3) and x.dtype == np.uint8


def test_colour_device_data_round_trips_in_both_formats(tmp_path, cifar):
    (x_train, y_train), _ = cifar
    x, y = x_train[:64], y_train[:64]
    for memmap in (False, True):
        root = tmp_path / str(memmap)
        write_device_data(root, "device1", x, y, memmap=memmap)
        got_x, got_y = load_device_data(root / "device1")
        np.testing.assert_array_equal(got_x, x)
        np.testing.assert_array_equal(got_y, y)
    with pytest.raises(DatasetError, match=r"x must have shape \(N, 28, 28\) or \(N, 32, 32, 3\), "
                                           r"got \(64, 3, 32, 32\)"):
        write_device_data(tmp_path, "device2", x.transpose(0, 3, 1, 2), y)


# --------------------------------------------------------------------------- the split command


def test_the_split_command_writes_cifar10_devices(tmp_path, monkeypatch):
    """As `make` runs it: $FEDHUB_DATA_DIR is the Fashion-MNIST folder, CIFAR-10 comes from the
    shared folder beside the checkout, and each device gets its colour images as train.npz."""
    monkeypatch.setenv(DATA_DIR_ENV, str(DATA_DIR))
    out = tmp_path / "devices"
    outcome = run_main(format_dataset.main, ["--dataset", "cifar-10", "--devices", "3", "--split", "classes",
                                             "--classes-per-device", "4", "--limit", "300",
                                             "--out", str(out), "--quiet"])
    assert outcome.code == 0, outcome
    record = json.loads((out / "partition.json").read_text())
    assert record["dataset"] == "cifar-10" and record["source"] == str(CIFAR_DIR)
    for n in (1, 2, 3):
        x, y = load_device_data(out / f"device{n}")
        assert x.shape == (300, 32, 32, 3) and x.dtype == np.uint8
        assert 1 <= len(np.unique(y)) <= 4
        assert record["devices"][f"device{n}"]["class_counts"] == np.bincount(y, minlength=10).tolist()
        assert f"device{n}: 300 examples" in outcome.stdout
        # 10 % held out besides, from the device's own share beyond the 300 it trains on
        x_eval, _ = read_device_holdout(out / f"device{n}")
        assert x_eval.shape == (30, 32, 32, 3) and record["devices"][f"device{n}"]["held_out"] == 30
    assert sorted(p.name for p in (out / "device1" / "data").iterdir()) == ["eval.npz", "train.npz"]


def test_the_split_command_refuses_in_one_line(tmp_path):
    out = str(tmp_path / "devices")
    assert_one_line_error(run_main(format_dataset.main, ["--dataset", "cifar-100", "--devices", "2",
                                                         "--out", out]), "invalid choice: 'cifar-100'")
    assert_one_line_error(run_main(format_dataset.main, ["--dataset", "cifar-10", "--devices", "2",
                                                         "--data-dir", str(DATA_DIR), "--out", out]),
                          f"data directory {DATA_DIR} holds fashion-mnist, not CIFAR-10")
    assert not (tmp_path / "devices").exists()


@pytest.mark.slow
def test_the_split_command_in_a_process(tmp_path):
    """`python -m fedhub.split --dataset cifar-10 --devices 3` with `make`'s environment."""
    out = tmp_path / "devices"
    env = {**os.environ, DATA_DIR_ENV: str(DATA_DIR)}
    result = subprocess.run([sys.executable, "-m", "fedhub.split", "--dataset", "cifar-10",
                             "--devices", "3", "--limit", "50", "--out", str(out), "--quiet"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "wrote 3 devices (150 examples)" in result.stdout
    x, _ = load_device_data(out / "device2")
    assert x.shape == (50, 32, 32, 3)
