"""bench/async.py's report of saved runs: the table, the ratio of the times to the target, and
the chart of accuracy against time (the runs themselves are measured in docs/benchmarks.md)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import ROOT


def _mode(mode, points, staleness=None):
    reached = next(((t, i + 1) for i, (t, acc) in enumerate(points) if acc >= 0.85), (None, None))
    return {"mode": mode, "steps": len(points), "to_target_s": reached[0], "to_target_step": reached[1],
            "final_accuracy": points[-1][1], "best_accuracy": max(a for _, a in points),
            "wall_s": points[-1][0], "points": points,
            "mean_staleness": None if staleness is None else staleness[0],
            "max_staleness_seen": None if staleness is None else staleness[1]}


@pytest.mark.slow  # runs the benchmark's command
def test_saved_runs_are_tabulated_and_drawn(tmp_path):
    first, second = tmp_path / "run1.json", tmp_path / "run2.json"
    first.write_text(json.dumps({"results": [
        _mode("sync", [[50.0, 0.79], [100.0, 0.84], [200.0, 0.851]]),
        _mode("async", [[10.0, 0.8], [40.0, 0.86]], (1.5, 3))]}))
    second.write_text(json.dumps({"results": [_mode("async", [[12.0, 0.7], [30.0, 0.8]], (2.0, 4))]}))
    chart = tmp_path / "async.png"
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "async.py"), "--results", str(first),
                          str(second), "--chart", str(chart)],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert "| sync | 3 | 200.0 s | 3 | 0.8510 | - |" in lines
    assert "| async | 2 | 40.0 s | 2 | 0.8600 | 1.5 / 3 |" in lines
    assert "asynchronous / synchronous time to 85 %: 0.20x" in lines
    assert "| async | 2 | not reached | - | 0.8000 | 2.0 / 4 |" in lines
    assert out.stdout.count("time to 85 %:") == 1  # the second run has no synchronous time
    assert chart.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and chart.stat().st_size > 10_000
