"""A pool shares its devices out by their data, so that its workers finish a round together."""

from __future__ import annotations

import json

import numpy as np

from fedhub.device.pool import balance, examples_of
from fedhub.split import write_device_arrays


def test_workers_hold_about_as_many_examples_whatever_the_devices_sizes(tmp_path):
    sizes = {"big": 900, "a": 300, "b": 300, "c": 300, "d": 50, "e": 50}
    for name, n in sizes.items():
        write_device_arrays(tmp_path, name, np.zeros((n, 28, 28), np.uint8), np.zeros(n, np.uint8))
    assert examples_of(tmp_path, list(sizes)) == sizes
    groups = balance(list(sizes), tmp_path, 2)
    loads = sorted(sum(sizes[n] for n in g) for g in groups)
    assert loads == [950, 950], groups  # round robin (i mod 2) would give 1,250 and 650
    assert sorted(n for g in groups for n in g) == sorted(sizes) and all(g == sorted(g) for g in groups)


def test_the_splits_own_counts_are_used_and_a_folder_without_data_counts_one(tmp_path):
    (tmp_path / "partition.json").write_text(json.dumps({"devices": {"x": {"examples": 7}}}))
    assert examples_of(tmp_path, ["x", "missing"]) == {"x": 7, "missing": 1}
    assert balance(["x", "missing"], tmp_path, 3) == [["x"], ["missing"], []]
