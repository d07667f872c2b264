"""bench/personalization.py on a tiny grid through real processes (``python -m fedhub.simulate``:
a server and a pool of 2 workers hosting 10 virtual devices): the JSON its report is made from has
each round's figures of the model each device would use (the global model for FedAvg, its own for
Ditto), the reduction is recorded, a second call resumes without training, and bad arguments are
refused with one line. The full-size figures are in docs/benchmarks.md.
"""

from __future__ import annotations

import importlib
import json
import subprocess
import sys

import pytest

from .conftest import ROOT

BENCH = ROOT / "bench" / "personalization.py"


def _bench_module():
    return importlib.import_module("bench.personalization")


@pytest.mark.parametrize("argv, reason", [
    (["--methods", "fedfoo"], "unknown method fedfoo"),
    (["--partitions", "iid"], "unknown partition iid"),
    (["--rounds", "0"], "--rounds must be at least 1"),
    (["--test-limit", "10001"], "--test-limit must be at most 10000"),
    (["--qffl-lr", "0"], "must be a positive number"),
    (["--q", "nan"], "must be a number, 0 or more"),
    (["--report", "--json", "/nonexistent/p.json"], "--json: no such file"),
])
def test_bad_arguments_get_one_error_line(argv, reason, capsys):
    with pytest.raises(SystemExit) as exit_info:
        _bench_module().main(argv)
    assert exit_info.value.code == 2
    out, err = capsys.readouterr()
    lines = err.splitlines()
    assert out == "" and len(lines) == 1 and lines[0].startswith("error: ") and reason in lines[0], err


@pytest.mark.slow  # two federations of 10 devices through python -m fedhub.simulate
def test_tiny_grid_writes_per_device_figures_and_resumes(tmp_path, data_dir):
    results, chart = tmp_path / "p.json", tmp_path / "p.png"
    grid = [sys.executable, str(BENCH), "--partitions", "classes2", "--methods", "fedavg,ditto",
            "--rounds", "1", "--limit", "200", "--test-limit", "300", "--data-dir", str(data_dir),
            "--json", str(results)]
    first = subprocess.run([*grid, "--chart", str(chart)], cwd=ROOT, capture_output=True, text=True,
                           timeout=300)
    assert first.returncode == 0, first.stderr[-3000:]
    assert "round 2: global test accuracy" in first.stderr and "(evaluation round)" in first.stderr

    runs = {r["run"]["method"]: r for r in json.loads(results.read_text())["runs"].values()}
    assert set(runs) == {"fedavg", "ditto"}
    for method, r in runs.items():
        assert r["full_size"] is False and r["run"]["rounds"] == 1 and r["run"]["limit"] == 200
        assert len(r["test_accuracy"]) == len(r["used"]) == len(r["global"]) == 1
        assert 0.0 <= r["test_accuracy"][0] <= 1.0
        used = r["used"][0]
        # the model each device would use: FedAvg's global model 1 (evaluated in round 2), Ditto's own
        assert used == (r["personal"][0] if method == "ditto" else r["global"][0])
        assert (r["personal"][0] is None) == (method == "fedavg")
        accuracies = used["per_device"]
        assert len(accuracies) == 10 and all(0.0 <= v <= 1.0 for v in accuracies.values())
        assert used["mean"] == pytest.approx(sum(accuracies.values()) / 10)
        assert used["worst_10pct"] == pytest.approx(min(accuracies.values()))  # 10 devices: the worst one
        final = r["final"]
        assert final["device_mean"] == used["mean"] and final["device_worst_10pct"] == used["worst_10pct"]
        assert final["test_accuracy"] == r["test_accuracy"][-1]
        assert len(r["load_average"]["start"]) == 3 and len(r["load_average"]["end"]) == 3
        assert "--rounds 2" in r["command"] and "--framework torch" in r["command"]
    assert runs["ditto"]["run"]["params"] == {"ditto_lambda": 0.1}
    assert "--personalization ditto --ditto-lambda 0.1" in runs["ditto"]["command"]
    # On two classes per device a device's own model beats the global one by far on its own data.
    assert runs["ditto"]["final"]["device_mean"] > runs["fedavg"]["final"]["device_mean"] + 0.2

    assert "| 2 classes per device | FedAvg |" in first.stdout and "reduced run" in first.stdout
    assert "personalized mean >= FedAvg + 10 points" in first.stdout
    assert chart.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and chart.stat().st_size > 10_000

    again = subprocess.run(grid, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr[-3000:]
    assert "2 runs, 2 already in" in again.stderr and "round 1:" not in again.stderr
    assert again.stdout == first.stdout
    report = subprocess.run([sys.executable, str(BENCH), "--report", "--json", str(results)], cwd=ROOT,
                            capture_output=True, text=True, timeout=120)
    assert report.returncode == 0 and report.stdout == first.stdout, report.stderr
