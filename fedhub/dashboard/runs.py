"""Runs for the control dashboard, without Streamlit: their labels, their settings side by side
with the differing ones marked, their curves in one frame, and the body of a new run.

The server keeps every run (``GET /api/runs``; Reset starts a new one with the same settings), so
comparing two strategies is choosing two runs. These functions only shape what the runs API
answers; the page (:mod:`fedhub.dashboard.page`) draws them. Kept apart so that they are tested
without a browser, a server or Streamlit.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from fedhub.dashboard import federated_eval
from fedhub.engine.config import FederationConfig
from fedhub.engine.privacy import DP_MODES, DPConfig
from fedhub.engine.strategies.registry import describe_strategies

DIFFERS = "≠"  # the settings table's mark on a row whose runs disagree
SAME = ""
OFF = "off"  # a group of settings (differential privacy, secure aggregation) that is off
NO_DP = OFF
GROUPS = ("dp", "secagg")
# Settings shown first in the comparison, in this order; the rest follow by name.
FIRST_SETTINGS = ("strategy", "strategy_params", "rounds", "epochs", "batch_size", "learning_rate",
                  "fraction", "quorum", "round_timeout", "compression", "dp")


@dataclass(frozen=True)
class NewRunDefaults:
    """What the New run form starts with when there is no current run to copy: the engine's own
    defaults (:mod:`fedhub.engine.config`), read once here, so that the form never drifts from
    what ``python server.py`` would run with."""

    strategy: str
    rounds: int
    epochs: int
    batch_size: int
    learning_rate: float
    fraction: float
    quorum: float
    round_timeout: float
    compression: str
    dp: dict[str, Any] = field(default_factory=dict)


def engine_defaults() -> NewRunDefaults:
    """The defaults of a run as the engine declares them (the one place they live)."""
    config = FederationConfig()
    training = config.training
    dp = DPConfig()
    return NewRunDefaults(strategy=config.strategy, rounds=config.rounds, epochs=training.epochs,
                          batch_size=training.batch_size, learning_rate=training.learning_rate,
                          fraction=config.fraction, quorum=config.quorum, round_timeout=config.round_timeout,
                          compression=training.compression,
                          dp={"mode": dp.mode, "noise_multiplier": dp.noise_multiplier,
                              "clipping_norm": dp.clipping_norm, "delta": dp.delta,
                              "max_epsilon": dp.max_epsilon})


def strategy_params(name: str) -> list[dict[str, Any]]:
    """Strategy ``name``'s settings (name, type, default, help), as ``--list-strategies`` gives them."""
    for strategy in describe_strategies():
        if strategy["name"] == name:
            return strategy["params"]
    return []


def strategy_names() -> list[str]:
    return [s["name"] for s in describe_strategies()]


def dp_modes() -> list[str]:
    return list(DP_MODES)


def new_run_settings(*, strategy: str, params: Mapping[str, Any], rounds: int, epochs: int,
                     batch_size: int, learning_rate: float, fraction: float, quorum: float,
                     round_timeout: float, compression: str,
                     dp: Mapping[str, Any] | None) -> dict[str, Any]:
    """The ``settings`` of ``POST /api/runs``. Strategy parameters left empty are left out (the
    strategy's default applies); ``dp`` None turns differential privacy off."""
    return {"strategy": strategy,
            "strategy_params": {k: v for k, v in params.items() if v is not None and v != ""},
            "rounds": int(rounds), "epochs": int(epochs), "batch_size": int(batch_size),
            "learning_rate": float(learning_rate), "fraction": float(fraction), "quorum": float(quorum),
            "round_timeout": float(round_timeout), "compression": compression.strip() or "none",
            "dp": None if dp is None else {k: v for k, v in dp.items() if v is not None}}


def run_label(run: Mapping[str, Any]) -> str:
    """``fedmedian-2 · finished (current)``: a run as the pickers and the chart's legend name it.
    Its name is unique on the server (which names a run after its strategy unless told
    otherwise); a run without one is ``#ID strategy``."""
    settings = run.get("settings") or {}
    what = run.get("name") or f"#{run['id']} {settings.get('strategy') or 'run'}"
    current = " (current)" if run.get("current") else ""
    return f"{what} · {run.get('status', '?')}{current}"


def flatten(settings: Mapping[str, Any] | None, prefix: str = "") -> dict[str, Any]:
    """``{"dp": {"mode": "local"}}`` -> ``{"dp.mode": "local"}``: nested settings one row each.
    A group that is off (``dp``/``secagg`` None) is one row, ``off``, so that a run with DP and
    one without differ on a row of their own; no parameters (``strategy_params: {}``) are no row."""
    out: dict[str, Any] = {}
    for key, value in (settings or {}).items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{name}."))
        elif value is None and key in GROUPS:
            out[name] = OFF
        else:
            out[name] = value
    return out


def _order(key: str) -> tuple[int, str]:
    head = key.split(".", 1)[0]
    return (FIRST_SETTINGS.index(head) if head in FIRST_SETTINGS else len(FIRST_SETTINGS), key)


def settings_table(runs: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """The runs' settings side by side: one row per setting, one column per run (its label), and
    a ``differs`` column marked :data:`DIFFERS` where the runs do not all agree (a setting one
    run lacks differs too). Values are text, so that a table of mixed types shows as typed."""
    flat = [flatten(run.get("settings")) for run in runs]
    keys = sorted({k for f in flat for k in f}, key=_order)
    rows = []
    for key in keys:
        values = [f.get(key) for f in flat]
        row: dict[str, Any] = {"setting": key,
                               "differs": DIFFERS if len({repr(v) for v in values}) > 1 else SAME}
        for run, value in zip(runs, values, strict=True):
            row[run_label(run)] = "–" if value is None else str(value)
        rows.append(row)
    return pd.DataFrame(rows, columns=["setting", "differs", *(run_label(r) for r in runs)])


def differing(table: pd.DataFrame) -> list[str]:
    """The settings the runs disagree on, in the table's order."""
    return list(table.loc[table["differs"] == DIFFERS, "setting"]) if len(table) else []


def curves_frame(runs: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Long form for one chart: a row per (run, round) with the global model's test accuracy and
    loss, the run named by its label (the chart's colour and legend)."""
    rows = [{"run": run_label(run), "round": entry["round"], "accuracy": entry.get("test_accuracy"),
             "loss": entry.get("test_loss")}
            for run in runs for entry in run.get("history") or []]
    return pd.DataFrame(rows, columns=["run", "round", "accuracy", "loss"])


WORST_10PCT = "worst 10 % device accuracy"
EVALUATION_COLUMNS = ("run", "rounds", "test accuracy", "device accuracy (mean)", WORST_10PCT,
                      "personal accuracy (mean)")


def evaluation_table(runs: Sequence[Mapping[str, Any]]) -> pd.DataFrame:
    """Each run's latest numbers side by side: its rounds, the server's test accuracy of its last
    model, and from its latest federated evaluation the global model's mean and worst-10 % device
    accuracy on the devices' held-out data and the personal models' mean (None where a run has
    none: no device evaluated, or a run from before federated evaluation)."""
    rows = []
    for run in runs:
        history = run.get("history") or []
        fed = federated_eval.latest_summary(history)
        last = history[-1] if history and isinstance(history[-1], Mapping) else {}
        rows.append({"run": run_label(run), "rounds": len(history),
                     "test accuracy": federated_eval.number(last.get("test_accuracy")),
                     "device accuracy (mean)": fed["mean"], WORST_10PCT: fed["worst_10pct"],
                     "personal accuracy (mean)": fed["personal_mean"]})
    return pd.DataFrame(rows, columns=list(EVALUATION_COLUMNS)).astype(
        {c: "Float64" for c in EVALUATION_COLUMNS[2:]})


def any_evaluated(runs: Sequence[Mapping[str, Any]]) -> bool:
    """Whether a device evaluated in any of these runs (the comparison then shows their numbers)."""
    return any(federated_eval.latest(run.get("history") or []) is not None for run in runs)
