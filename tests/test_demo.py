"""``make demo``'s own entry point, run as a new user runs it: in a fresh copy of the checkout.

The copy keeps the demo's default folders (``devices/``, ``server_training/demo``, ``eval/``)
out of this checkout, and the environment carries no secrets: the server makes its own secret
files and the demo's devices find them there, as on a first run.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import stat
import subprocess
import sys

import pytest
from safetensors.numpy import load_file

from .conftest import ROOT

pytestmark = pytest.mark.slow
# Run-time state, caches and what the demo does not need.
NOT_COPIED = shutil.ignore_patterns(".git", ".venv", "devices", "server_training", "eval", "runs", "tests",
                                    "bench", "docs", "__pycache__", ".pytest_cache", ".ruff_cache")


def test_make_demo_runs_the_demo_entry_point():
    dry = subprocess.run(["make", "-n", "demo"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert dry.returncode == 0, dry.stderr
    assert re.search(r"^\S*python\S* -m fedhub\.demo --devices 3 --rounds 3$", dry.stdout, re.M), dry.stdout


def test_demo_prints_each_round_of_a_real_run(tmp_path, data_dir):
    checkout = tmp_path / "checkout"
    shutil.copytree(ROOT, checkout, ignore=NOT_COPIED)
    env = {k: v for k, v in os.environ.items()
           if k not in ("PYTHONPATH", "FEDHUB_ENROLL_SECRET", "FEDHUB_ADMIN_TOKEN")}
    env["FEDHUB_DATA_DIR"] = str(data_dir)  # as the Makefile exports it
    own = checkout / "devices" / "device1" / "data"  # a split of the user's own, before the demo
    own.mkdir(parents=True)
    (own / "train.npz").write_bytes(b"my own split")
    # `make demo` runs `-m fedhub.demo --devices 3 --rounds 3` on all the data; the same, smaller,
    # with the convolutional model (which no other test trains end to end)
    run = subprocess.run([sys.executable, "-m", "fedhub.demo", "--devices", "2", "--rounds", "2",
                          "--limit", "200", "--model", "cnn"],
                         cwd=checkout, env=env, capture_output=True, text=True, timeout=900)
    out = run.stdout
    assert run.returncode == 0, out[-5000:] + run.stderr[-5000:]
    demo_lines = [line for line in out.splitlines() if not line.startswith("[device")]
    steps = [line for line in demo_lines if re.match(r"\d/3 ", line)]
    assert steps[0] == "1/3 splitting Fashion-MNIST over 2 devices (iid)", steps
    assert re.fullmatch(r"2/3 starting the server on http://127\.0\.0\.1:\d+ \(log: .+server\.log\)",
                        steps[1]), steps
    assert steps[2:] == ["3/3 starting 2 devices; each trains on its own folder"], steps
    printed = [re.fullmatch(r"== round (\d+): global test accuracy (\d\.\d{4}) \(loss (\d+\.\d{4})\), "
                            r"(\d+) devices, (\d+) examples, \d+s since start", line)
               for line in demo_lines if line.startswith("== round")]
    assert all(printed) and len(printed) == 2, demo_lines
    done = [line for line in demo_lines if line.startswith("done:")]
    assert done == [f"done: 2 rounds, final global test accuracy {printed[-1][2]}; "
                    "history in eval/history.csv"], demo_lines

    # what it printed is what the run recorded
    with (checkout / "eval" / "history.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["round"]) for r in rows] == [1, 2]
    for match, row in zip(printed, rows, strict=True):
        assert int(match[1]) == int(row["round"])
        assert match[2] == f"{float(row['test_accuracy']):.4f}", (match[0], row)
        assert match[3] == f"{float(row['test_loss']):.4f}", (match[0], row)
        assert (int(match[4]), int(match[5])) == (int(row["num_updates"]), int(row["num_examples"]))
        assert (int(match[4]), int(match[5])) == (2, 400)

    # the default secrets path: the server made owner-only files, the devices read the secret there
    state = checkout / "server_training" / "demo"
    for secret in ("enroll.secret", "admin.token"):
        assert (state / secret).read_text().strip(), secret
        assert stat.S_IMODE((state / secret).stat().st_mode) == 0o600, secret
    for device in ("device1", "device2"):  # the demo's devices live in its own state directory
        assert stat.S_IMODE((state / "devices" / device / "token").stat().st_mode) == 0o600
    # ... so the user's own split in devices/ is as it was
    assert (checkout / "devices" / "device1" / "data" / "train.npz").read_bytes() == b"my own split"
    assert sorted(p.name for p in (checkout / "devices").iterdir()) == ["device1"]

    # the convolutional network throughout: the devices' updates fitted its tensors
    kernels = {name.split("/")[-2]: tensor.shape for name, tensor
               in load_file(state / "saved" / "round_00002.safetensors").items() if name.endswith("/kernel")}
    assert kernels["conv1"] == (3, 3, 1, 32) and kernels["conv2"] == (3, 3, 32, 64), kernels
