"""The dashboard's runs, shaped without a browser or a server (fast tier): a run's label, the
settings of runs side by side with the differing ones marked, their curves in one frame, the
body of a new run, and the New run form's defaults (the engine's own).

The runs here are written as ``GET /api/runs/<id>`` answers; the browser test
(tests/test_dashboard_compare_browser.py) compares two real runs of a real server.
"""

from __future__ import annotations

from fedhub.dashboard import runs
from fedhub.engine.config import FederationConfig


def a_run(run_id: int, strategy: str, accuracies: list[float], **settings) -> dict:
    return {"id": run_id, "name": "", "status": "finished", "created_at": 1.0, "finished_at": 2.0,
            "completed_rounds": len(accuracies), "total_rounds": len(accuracies), "current": False,
            "settings": {"strategy": strategy, "strategy_params": {}, "rounds": len(accuracies),
                         "epochs": 1, "dp": None, **settings},
            "history": [{"round": i + 1, "test_accuracy": a, "test_loss": 1 - a, "devices": {}}
                        for i, a in enumerate(accuracies)]}


def test_a_run_is_named_by_its_id_its_name_or_strategy_and_its_status():
    run = a_run(2, "fedmedian", [0.5])
    assert runs.run_label(run) == "#2 fedmedian · finished"
    assert runs.run_label({**run, "name": "robust", "current": True, "status": "running"}) == \
        "robust · running (current)"


def test_settings_side_by_side_mark_what_differs():
    fedavg = a_run(1, "fedavg", [0.5, 0.6])
    krum = a_run(2, "krum", [0.4], strategy_params={"num_malicious": 1},
                 dp={"mode": "central-fixed", "noise_multiplier": 1.0})
    table = runs.settings_table([fedavg, krum])
    assert list(table.columns) == ["setting", "differs", "#1 fedavg · finished", "#2 krum · finished"]
    rows = table.set_index("setting")
    assert rows.loc["strategy", "differs"] == runs.DIFFERS
    assert rows.loc["epochs", "differs"] == runs.SAME
    assert rows.loc["rounds", "differs"] == runs.DIFFERS  # 2 against 1
    # a nested setting is a row of its own; one run's absent value differs from the other's
    assert rows.loc["strategy_params.num_malicious", "#1 fedavg · finished"] == "–"
    assert rows.loc["dp.mode", "#2 krum · finished"] == "central-fixed"
    assert rows.loc["dp", "#1 fedavg · finished"] == runs.NO_DP
    assert runs.differing(table)[:2] == ["strategy", "strategy_params.num_malicious"]
    assert "epochs" not in runs.differing(table)
    # the order a person reads: the strategy first, then rounds and training
    assert list(table["setting"])[:1] == ["strategy"]


def test_one_run_alone_differs_in_nothing():
    table = runs.settings_table([a_run(1, "fedavg", [0.5])])
    assert runs.differing(table) == []


def test_curves_of_every_run_in_one_frame_named_by_run():
    frame = runs.curves_frame([a_run(1, "fedavg", [0.5, 0.6]), a_run(2, "fedmedian", [0.4])])
    assert list(frame["run"]) == ["#1 fedavg · finished"] * 2 + ["#2 fedmedian · finished"]
    assert list(frame["round"]) == [1, 2, 1]
    assert list(frame["accuracy"]) == [0.5, 0.6, 0.4]
    assert runs.curves_frame([a_run(3, "fedavg", [])]).empty


def test_a_new_runs_body_leaves_unset_parameters_to_their_defaults():
    body = runs.new_run_settings(strategy="fedadam", params={"eta": 0.05, "eta_l": None, "tau": ""},
                                 rounds=3, epochs=2, batch_size=16, learning_rate=0.01, fraction=1.0,
                                 quorum=0.5, round_timeout=60, compression=" ", dp=None)
    assert body == {"strategy": "fedadam", "strategy_params": {"eta": 0.05}, "rounds": 3, "epochs": 2,
                    "batch_size": 16, "learning_rate": 0.01, "fraction": 1.0, "quorum": 0.5,
                    "round_timeout": 60.0, "compression": "none", "dp": None}
    dp = runs.new_run_settings(strategy="fedavg", params={}, rounds=1, epochs=1, batch_size=1,
                               learning_rate=0.1, fraction=1, quorum=1, round_timeout=1, compression="q8",
                               dp={"mode": "local", "noise_multiplier": 0.5, "max_epsilon": None})["dp"]
    assert dp == {"mode": "local", "noise_multiplier": 0.5}


def test_the_forms_defaults_are_the_engines():
    config = FederationConfig()
    defaults = runs.engine_defaults()
    assert (defaults.strategy, defaults.rounds, defaults.epochs, defaults.batch_size) == (
        config.strategy, config.rounds, config.training.epochs, config.training.batch_size)
    assert "fedmedian" in runs.strategy_names()
    assert [p["name"] for p in runs.strategy_params("krum")] == ["num_malicious"]
    assert runs.strategy_params("fedavg") == []
