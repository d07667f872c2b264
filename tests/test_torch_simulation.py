"""Simulations through the framework seam with PyTorch: ``python -m fedhub.simulate --framework torch
--dataset cifar-10`` on a worker pool, and ``fedhub.simulate(..., framework="torch")`` on Ray, both on
small real CIFAR-10 subsets, real worker processes and real training.

The fast tests check the command line without importing a framework or starting a process.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedhub import datasets
from tests.cli_inprocess import assert_one_line_error, run_main
from tests.conftest import ROOT

from .conftest import CIFAR_DIR, ONE_THREAD

CIFAR_MODEL_BYTES = (456 + 2416 + 48120 + 10164 + 850) * 4  # the seed's CNN, float32


# --------------------------------------------------------------------------- command line (fast)


def test_the_framework_options_are_server_py_s_and_pick_the_network():
    from fedhub.simulate import parse_args

    argv = ["--framework", "torch", "--dataset", "cifar-10", "--devices", "10", "--fraction", "1"]
    a = parse_args(argv).run
    assert (a.framework, a.dataset, a.model) == ("torch", "cifar-10", "cifar")
    default = parse_args([]).run  # the Keras / Fashion-MNIST run, unchanged
    assert (default.framework, default.dataset, default.model) == ("keras", "fashion-mnist", "basic")
    assert parse_args(["--framework", "torch", "--model", "cnn"]).run.dataset == "fashion-mnist"


@pytest.mark.parametrize("argv, expected", [
    (["--framework", "jax"], "--framework must be one of keras, torch"),
    (["--dataset", "mnist"], "unknown data set 'mnist'; choose one of fashion-mnist, cifar-10"),
    (["--framework", "torch", "--dataset", "cifar-10", "--model", "basic"],
     "--model basic cannot learn cifar-10 with --framework torch (it takes fashion-mnist images)"),
    (["--framework", "torch", "--model", "resnet"], "torch has no network 'resnet'"),
], ids=["framework", "dataset", "wrong-images", "no-such-network"])
def test_a_framework_data_set_or_network_that_cannot_run_is_one_error_line(argv, expected):
    from fedhub.simulate import parse_args

    assert_one_line_error(run_main(parse_args, argv), expected)


# --------------------------------------------------------------------------- a pool (slow)


def _maps(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/maps").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None  # it has exited


@pytest.mark.slow
def test_simulate_command_trains_pytorch_cifar_10_on_a_pool_without_tensorflow(tmp_path):
    """Two workers, two devices of 1,000 CIFAR-10 images, two rounds. While the command runs, the
    libraries every process of it maps are read from /proc again and again (until it exits): the
    workers and the simulate process (the server) map PyTorch and never TensorFlow."""
    import psutil

    history_path = tmp_path / "history.json"
    proc = subprocess.Popen(
        [sys.executable, "-m", "fedhub.simulate", "--framework", "torch", "--dataset", "cifar-10",
         "--devices", "2", "--fraction", "1", "--workers", "2", "--rounds", "2", "--limit", "1000",
         "--test-limit", "1000", "--data-dir", str(CIFAR_DIR), "--root", str(tmp_path / "sim"),
         "--history", str(history_path), "--quiet", "--timeout", "400"],
        cwd=ROOT, env={**os.environ, **ONE_THREAD}, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    seen: dict[int, list[str]] = {}  # pid -> every reading of its maps
    workers: set[int] = set()
    try:
        while True:
            try:
                children = psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                children = []
            for child in children:
                try:
                    if "fedhub.device.virtual" in " ".join(child.cmdline()):
                        workers.add(child.pid)
                except psutil.Error:
                    continue
            for pid in (proc.pid, *workers):
                maps = _maps(pid)
                if maps is not None:
                    seen.setdefault(pid, []).append(maps)
            try:
                proc.wait(timeout=0.2)  # until the command exits; the maps are read meanwhile
                break
            except subprocess.TimeoutExpired:
                continue
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, out[-3000:] + err[-3000:]

    assert len(workers) == 2, f"two worker processes: {workers}"
    for pid in (proc.pid, *workers):
        readings = seen.get(pid, [])
        assert any("libtorch" in maps for maps in readings), \
            f"process {pid}: the check reads its libraries, and torch is among them"
        assert not any("tensorflow" in maps for maps in readings), f"process {pid} loaded TensorFlow"

    summary = json.loads(out.strip().splitlines()[-1])
    assert (summary["framework"], summary["dataset"], summary["model"]) == ("torch", "cifar-10", "cifar")
    assert summary["workers"] == 2 and summary["failed_steps"] == 0 and summary["restarts"] == 0
    history = json.loads(history_path.read_text())
    assert [entry["round"] for entry in history] == [1, 2]
    for entry in history:
        assert sorted(entry["devices"]) == ["device1", "device2"]
        assert entry["num_updates"] == 2 and entry["num_examples"] == 2000
    first, last = (entry["test_accuracy"] for entry in history)
    assert last > first or last > 0.2, f"learned nothing: {first} then {last} (chance is 0.1)"
    # Each worker downloaded each of the 2 model versions once, each device uploaded twice.
    assert summary["bytes_up"] >= 4 * CIFAR_MODEL_BYTES


# --------------------------------------------------------------------------- Ray (slow)


@pytest.fixture
def one_node_ray():
    """A local Ray cluster of one node with two CPUs, as tests/test_ray.py starts one."""
    import ray  # the extra (pip install -e ".[ray]"), which `make test` installs
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "object_store_memory": 80 * 2**20, "include_dashboard": False})
    ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT), **ONE_THREAD}})
    try:
        yield cluster
    finally:
        ray.shutdown()
        cluster.shutdown()


@pytest.mark.slow
def test_python_api_trains_pytorch_cifar_10_on_ray_actors(tmp_path, one_node_ray):
    """``fedhub.simulate("cifar", folder, framework="torch", backend="ray")``: two Ray actors train
    four devices two rounds; the final model is the PyTorch network, and it scores on the test
    images what the server reported."""
    import torch

    import fedhub
    from fedhub.split import split_to_devices

    torch.set_num_threads(1)
    root = tmp_path / "devices"
    summary = split_to_devices(root, 4, limit=300, data_dir=CIFAR_DIR, progress=False, memmap=True,
                               dataset="cifar-10")
    history = fedhub.simulate("cifar", root, framework="torch", rounds=2, backend="ray", workers=2,
                              cpus_per_worker=1, ray_address=one_node_ray.address, data_dir=CIFAR_DIR,
                              test_limit=500, root=tmp_path, timeout=400)
    stats = history.stats
    assert stats["backend"] == "ray" and stats["workers"] == 2 and stats["failures"] == 0
    assert sorted((t["round"], t["device"]) for t in stats["tasks"]) == \
        sorted((r, name) for r in (1, 2) for name in summary)
    for entry in history:
        assert entry["num_updates"] == 4 and entry["num_examples"] == 1200
    log = (tmp_path / "logs" / "worker-0.log").read_text()
    assert "round 1: loss" in log, log[-2000:]

    model = history.model
    assert (model.framework, model.name) == ("torch", "cifar")
    (_, _), (x_test, y_test) = datasets.load("cifar-10", CIFAR_DIR)
    scored = model.evaluate(x_test[:500], y_test[:500])
    assert scored["accuracy"] == pytest.approx(history[-1]["test_accuracy"], abs=1 / 500)
    assert scored["loss"] == pytest.approx(history[-1]["test_loss"], rel=1e-4)
    assert history[-1]["test_loss"] < history[0]["test_loss"], \
        f"the second round learned: {[(e['test_accuracy'], e['test_loss']) for e in history]}"
    probabilities = model.predict(x_test[:3])
    assert probabilities.shape == (3, 10) and np.allclose(probabilities.sum(axis=1), 1, atol=1e-5)
