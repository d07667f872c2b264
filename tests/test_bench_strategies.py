"""bench/strategies.py on a tiny grid: the real strategies, attacks and training loop.

Checked: Krum rejects two devices that scale their updates in every round, while FedAvg with
the same attackers ends well below its clean run; a second invocation finds every run in the
results file and trains nothing; the report writes the tables and charts; the loop's proximal
term keeps a FedProx device near the global model; bad options are refused with exit 2.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "bench" / "strategies.py"


def bench(*args: str, data_dir: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(SCRIPT), *args, "--data-dir", str(data_dir)],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)


def test_robustness_grid_resumes_and_reports(tmp_path, data_dir):
    results = tmp_path / "results.json"
    grid = ("--part", "c", "--strategies", "fedavg,krum", "--attacks", "scale:factor=20",
            "--rounds", "3", "--samples-per-device", "300", "--results", str(results))
    first = bench(*grid, data_dir=data_dir)
    assert first.returncode == 0, first.stderr
    records = json.loads(results.read_text())["runs"].values()
    runs = {(r["run"]["strategy"], r["run"]["attack"]): r for r in records}
    assert set(runs) == {("fedavg", "none"), ("krum", "none"), ("fedavg", "scale:factor=20"),
                         ("krum", "scale:factor=20")}
    accuracy = {key: r["accuracy"] for key, r in runs.items()}
    assert all(len(a) == 3 for a in accuracy.values()), accuracy
    # Both clean runs learn (chance is 0.1; about 0.6 after round 1 and 0.7 after round 3 here),
    # and Krum under attack stays within a few points of its clean run.
    for strategy in ("fedavg", "krum"):
        clean_run = accuracy[(strategy, "none")]
        assert clean_run[-1] > 0.6 and clean_run[-1] > clean_run[0], accuracy
    assert accuracy[("krum", "scale:factor=20")][-1] > accuracy[("krum", "none")][-1] - 0.05, accuracy
    attacked = runs[("krum", "scale:factor=20")]
    assert attacked["attackers"] == ["device01", "device02"]
    assert all({"device01", "device02"} <= set(rejected) for rejected in attacked["rejected"])
    assert attacked["params"] == {"num_malicious": 2}
    clean = runs[("fedavg", "none")]["accuracy"][-1]
    assert runs[("fedavg", "scale:factor=20")]["accuracy"][-1] < clean - 0.1

    again = bench(*grid, "--report", "--docs", str(tmp_path / "docs"), data_dir=data_dir)
    assert again.returncode == 0, again.stderr
    assert "4 runs, 4 already in" in again.stdout and "round " not in again.stdout
    assert "| krum |" in again.stdout and "| fedavg |" in again.stdout
    assert (tmp_path / "docs" / "strategies_c_basic_r3_n300.png").stat().st_size > 10_000


def test_proximal_term_keeps_the_update_near_the_global_model(data_dir):
    from bench.strategies import Data, LocalTraining

    data = Data(str(data_dir))
    x, y = data.shards("iid", 10, 500, 0)[0]
    trainer = LocalTraining("basic", 0)
    start = trainer.initial

    def distance(mu: float) -> float:
        trainer.reset()
        trained, _ = trainer.train("d", start, x, y, learning_rate=1e-3, proximal_mu=mu,
                                   rng=np.random.default_rng(0))
        return float(np.sqrt(sum(np.sum((trained[n] - start[n]) ** 2) for n in start)))

    plain, proximal = distance(0.0), distance(100.0)
    assert proximal < 0.5 * plain


@pytest.mark.parametrize("args", [("--part", "a", "--strategies", "fedfoo"),
                                  ("--part", "c", "--attacks", "scale:factor=x"),
                                  ("--part", "a", "--rounds", "-1"),
                                  ()])
def test_bad_options_exit_2(args, data_dir, tmp_path):
    done = bench(*args, "--results", str(tmp_path / "r.json"), data_dir=data_dir)
    assert done.returncode == 2
    assert "Traceback" not in done.stderr and "error:" in done.stderr.splitlines()[-1]
    assert not (tmp_path / "r.json").exists()
