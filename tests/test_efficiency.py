"""The efficiency figure (issue 23, part 3): one process's time for a round's images over the
round's own time, against a reference measured once at the server's start-up."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from fedhub.engine.driver import efficiency_of

from .conftest import ROOT


def test_a_rounds_efficiency_is_one_process_time_for_its_images_over_its_time():
    entry = {"num_examples": 6000, "started_at": 100.0, "closed_at": 103.0}
    figure = efficiency_of(entry, s_per_image=1e-4, epochs=2)
    assert figure["images"] == 12_000 and figure["round_s"] == pytest.approx(3.0)
    assert figure["centralized_s"] == pytest.approx(1.2)
    assert figure["ratio"] == pytest.approx(0.4) and figure["test_s"] is None
    assert efficiency_of(entry, 1e-4, 2, test_s=0.25)["test_s"] == 0.25
    # a round whose result came at once is not a division by zero
    assert efficiency_of({**entry, "closed_at": 100.0}, 1e-4, 1)["ratio"] > 0


def test_the_simulation_summary_takes_the_median_of_the_steady_rounds():
    from fedhub.simulate import efficiency_summary

    history = [{"efficiency": {"ratio": r, "test_s": t}} for r, t in ((0.1, None), (0.5, 0.05), (0.7, 0.04),
                                                                      (0.6, 0.06))]
    assert efficiency_summary(history) == {"efficiency": [0.1, 0.5, 0.7, 0.6],
                                           "first_round_efficiency": 0.1, "steady_efficiency": 0.6,
                                           "test_s": [None, 0.05, 0.04, 0.06]}
    assert efficiency_summary([{"round": 1}]) == {}
    assert efficiency_summary(history[:1])["steady_efficiency"] is None


@pytest.mark.slow
def test_the_reference_trains_a_fresh_network_and_leaves_the_servers_alone(fashion, torch_one_thread):
    from fedhub import efficiency
    from fedhub.global_model import GlobalModel

    _, (x, y) = fashion
    model = GlobalModel.named("basic", framework="torch", test_data=(x[:600], y[:600]))
    before = model.initial_weights()
    reference = efficiency.measure(model, batch_size=32, learning_rate=1e-3, sample=512)
    assert reference.images == 512 and reference.seconds > 0 and reference.startup_s > 0
    assert (reference.framework, reference.network) == ("torch", "basic")
    assert reference.describe()["s_per_image"] == pytest.approx(reference.seconds / 512)
    after = model.initial_weights()
    assert all((before[k] == after[k]).all() for k in before)  # the server's own network untouched
    with pytest.raises(ValueError, match="test set"):
        efficiency.measure(GlobalModel.named("basic", framework="torch"), batch_size=32, learning_rate=1e-3)


@pytest.mark.slow
def test_the_simulate_command_reports_each_rounds_efficiency_and_the_steady_one(tmp_path, data_dir):
    def simulate(*extra: str) -> tuple[dict, str, list[dict]]:
        history = tmp_path / f"history{len(extra)}.json"
        out = subprocess.run(
            [sys.executable, "-m", "fedhub.simulate", "--framework", "torch", "--devices", "4", "--fraction",
             "1", "--workers", "1", "--rounds", "2", "--limit", "100", "--data-dir", str(data_dir),
             "--test-limit", "300", "--history", str(history), *extra],
            cwd=ROOT, capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        return json.loads(out.stdout.splitlines()[-1]), out.stdout, json.loads(history.read_text())

    summary, stdout, history = simulate()
    assert len(summary["efficiency"]) == 2 and summary["steady_efficiency"] == summary["efficiency"][1]
    for entry, ratio in zip(history, summary["efficiency"], strict=True):
        figure = entry["efficiency"]
        assert figure["images"] == entry["num_examples"] == 400  # one epoch of 4 devices' 100 images
        assert figure["round_s"] == pytest.approx(entry["closed_at"] - entry["started_at"])
        assert figure["ratio"] == pytest.approx(figure["centralized_s"] / figure["round_s"])
        assert ratio == pytest.approx(figure["ratio"], abs=1e-4) and 0 < ratio < 100
        assert f"efficiency {figure['ratio']:.2f}" in stdout
    # without the figure: one round of two devices shows it as well as two of four would (with the
    # figure on, even a one-round run has one in its summary and its entry)
    summary, stdout, history = simulate("--no-efficiency", "--rounds", "1", "--devices", "2")
    assert len(history) == 1
    assert "efficiency" not in summary and all("efficiency" not in e for e in history)
