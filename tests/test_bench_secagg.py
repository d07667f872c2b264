"""bench/secagg.py on a tiny model: its table is produced, and each secure round it measures
unmasks the weighted mean within one quantization step, with and without dropouts."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from .conftest import ROOT


@pytest.mark.slow  # runs the benchmark's command
def test_secagg_bench_measures_rounds_that_decode_within_a_step(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "bench" / "secagg.py"), "--devices", "4", "12",
                          "--params", "300", "--dropout", "0.25", "--json", str(tmp_path / "secagg.json")],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    rows = [line.split(" | ") for line in out.stdout.splitlines() if line.startswith("| 4 ") or
            line.startswith("| 12 ")]
    assert [r[1].split(" (")[0] for r in rows] == ["FedAvg", "SecAgg+", "SecAgg+"] * 2, out.stdout
    secure = [r for r in rows if r[1].startswith("SecAgg+")]
    assert [r[7] for r in secure] == ["0", "1", "0", "3"], out.stdout  # dropouts recovered
    for r in secure:
        assert r[2] == "9"  # four stages, a task and an answer each, and the model
        error, step = map(float, re.fullmatch(r"(\S+) \((\S+)\) \|", r[8]).groups())
        assert error <= step
    raw = json.loads((tmp_path / "secagg.json").read_text())["rounds"]  # the raw figures are kept
    assert [(r["devices"], r["protocol"]) for r in raw] == [(4, "fedavg"), (4, "secagg+"), (4, "secagg+"),
                                                            (12, "fedavg"), (12, "secagg+"), (12, "secagg+")]
