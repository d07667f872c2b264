"""bench/torch_cifar.py: a tiny reduced run through real processes (a PyTorch server and two
devices on 400 real CIFAR-10 images, the centralized epoch, a PyTorch and a Keras device for the
memory figures) writes the JSON the benchmark's report is made from, with sane values; bad
arguments are refused with one line. The full-size figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT

BENCH = ROOT / "bench" / "torch_cifar.py"
CIFAR_DIR = Path(os.environ.get("FEDHUB_CIFAR_DIR") or ROOT.parent / "shared/data/cifar-10")
# Every process of the run trains with one thread: the machine is shared.
ONE_THREAD = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


def _bench_module():
    """The script as a module, its command line parsed in-process."""
    return importlib.import_module("bench.torch_cifar")


@pytest.mark.parametrize("argv, reason", [
    (["--devices", "0"], "--devices, --per-device, --rounds, --threads and --memory-images must be at least"),
    (["--per-device", "-5"], "must be at least 1"),
    (["--devices", "11"], "more than CIFAR-10's 50000 training images"),
    (["--test-limit", "10001"], "--test-limit must be from 1 to 10000"),
    (["--target", "1.5"], "--target must be in (0, 1]"),
    (["--target", "nan"], "must be a finite number"),
    (["--threads", "abc"], "invalid int value"),
    (["--memory-frameworks", "jax"], "invalid choice"),
    (["--results", "/nonexistent/run.json"], "--results: no such file"),
])
def test_bad_arguments_get_one_error_line(argv, reason, capsys):
    bench = _bench_module()
    with pytest.raises(SystemExit) as exit_info:
        bench.main(argv)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and reason in lines[0], err


@pytest.mark.slow  # starts a server and device processes, trains PyTorch and Keras
def test_tiny_reduced_run_writes_sane_json(tmp_path, data_dir):
    if not CIFAR_DIR.is_dir():
        pytest.fail(f"CIFAR-10 not found in {CIFAR_DIR}; set FEDHUB_CIFAR_DIR")
    results_path, chart = tmp_path / "run.json", tmp_path / "run.png"
    out = subprocess.run(
        [sys.executable, str(BENCH), "--devices", "2", "--per-device", "200", "--rounds", "2",
         "--test-limit", "500", "--memory-images", "200", "--data-dir", str(CIFAR_DIR),
         "--fmnist-data-dir", str(data_dir), "--timeout", "600", "--json", str(results_path),
         "--chart", str(chart)],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, **ONE_THREAD})
    assert out.returncode == 0, out.stderr[-3000:]
    assert "round 2: test accuracy" in out.stderr  # progress while it runs
    r = json.loads(results_path.read_text())

    # The reduction is recorded, each figure beside its full size.
    assert r["full_size"] is False
    assert r["reduced"] == {"devices": {"run": 2, "full": 10}, "per_device": {"run": 200, "full": 5000},
                            "rounds": {"run": 2, "full": 10}, "test_limit": {"run": 500, "full": None},
                            "memory_images": {"run": 200, "full": 5000}}
    assert r["args"]["batch_size"] == 32 and r["args"]["learning_rate"] == 1e-3 and r["args"]["epochs"] == 1
    assert len(r["load_average"]["start"]) == 3 and len(r["load_average"]["end"]) == 3

    # Two real rounds, each with both devices' 400 images, results in time order after the start.
    fed = r["federation"]
    rounds = fed["rounds"]
    assert [x["round"] for x in rounds] == [1, 2]
    assert all(x["num_updates"] == 2 and x["num_examples"] == 400 for x in rounds)
    assert all(0.0 <= x["test_accuracy"] <= 1.0 and x["test_loss"] > 0 for x in rounds)
    assert 0 < fed["process_start_s"] < rounds[0]["seconds_since_call"] < rounds[1]["seconds_since_call"]
    assert all(x["slowest_device_train_s"] > 0 for x in rounds)
    assert sorted(fed["device_peak_rss_mib"]) == ["device1", "device2"]

    # The centralized epoch: the same 400 images, one thread as each device had.
    central = r["centralized"]
    assert central["examples"] == 400 and central["threads"] == 1 and central["epoch_s"] > 0
    assert 0.0 <= central["test_accuracy"] <= 1.0

    # The targets are computed from those figures.
    c = r["checks"]
    assert c["first_result_s"] == rounds[0]["seconds_since_call"]
    limit = 2 * central["epoch_s"] + fed["process_start_s"]
    assert c["first_result_limit_s"] == pytest.approx(limit, abs=1e-2)
    assert c["steady_round_s"] == rounds[1]["round_seconds"]
    assert c["steady_round_limit_s"] == pytest.approx(1.1 * central["epoch_s"], abs=1e-2)
    assert c["rounds_to_target"] is None or c["rounds_to_target"] in (1, 2)

    # Memory: each device's peak read from the kernel, a PyTorch worker smaller than a Keras one.
    mem = r["memory"]
    torch_mib, keras_mib = mem["torch"]["peak_rss_mib"], mem["keras"]["peak_rss_mib"]
    assert 100 < torch_mib < keras_mib, mem
    for framework in ("torch", "keras"):
        # the kernel folds RSS into VmHWM lazily: a sample may pass it by a little
        assert mem[framework]["sampled_max_rss_mib"] <= 1.02 * mem[framework]["peak_rss_mib"]
        assert 0.0 <= mem[framework]["round_test_accuracy"] <= 1.0

    assert "| 2 |" in out.stdout and "| target | measured | limit | met |" in out.stdout
    assert chart.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    # The saved run reports again without running.
    again = subprocess.run([sys.executable, str(BENCH), "--results", str(results_path)], cwd=ROOT,
                           capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert again.stdout == out.stdout
