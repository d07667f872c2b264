"""Federated evaluation as the dashboards show it, shaped without a browser or a server (fast
tier): history entries -> the per-device accuracy chart's points and the latest round's
per-device rows (fedhub/dashboard/federated_eval.py), the runs' comparison, and the Streamlit
panel drawn in-process (AppTest) from hand-made entries.

The entries are written in the schema of ``GET /api/history`` (``federated_evaluation``); the
static page's JavaScript, which shapes the same data, is tested in Chromium
(tests/test_federated_eval_browser.py).
"""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
from streamlit.testing.v1 import AppTest

from fedhub.dashboard import federated_eval as fe
from fedhub.dashboard import page, runs


def summary(accuracy: float, worst: float, best: float, worst_10pct: float, devices: int = 3,
            num_examples: int = 300, **more) -> dict:
    return {"devices": devices, "num_examples": num_examples, "loss": 1 - accuracy, "accuracy": accuracy,
            "worst_10pct": worst_10pct, "worst": worst, "best": best, "std": 0.05, **more}


def device(n: int, acc: float, personal: float | None = None) -> dict:
    return {"num_examples": n, "global": {"loss": 1 - acc, "accuracy": acc},
            "personal": None if personal is None else {"loss": 1 - personal, "accuracy": personal}}


def report(version: int | None, global_: dict | None, personal: dict | None = None,
           personalization: str = "none", devices: dict | None = None) -> dict:
    out = {"personalization": personalization, "global": global_, "personal": personal,
           "devices": devices if devices is not None else {}}
    if version is not None:
        out["model_version"] = version
    return out


def entry(r: int, test_accuracy: float | None, fed: dict | str | None = "absent") -> dict:
    """A history entry; ``fed`` "absent" leaves the key out, as an older run's entries do."""
    out = {"round": r, "closed_at": 1000.0 + r, "num_updates": 3, "num_examples": 900,
           "test_loss": None if test_accuracy is None else 1 - test_accuracy, "test_accuracy": test_accuracy,
           "devices": {}}
    if fed != "absent":
        out["federated_evaluation"] = fed
    return out


def ditto_history() -> list[dict]:
    """Three synchronous rounds with personalization: round r's devices evaluated model r - 1."""
    return [entry(r, 0.5 + 0.1 * r, report(
        r - 1, summary(0.4 + 0.1 * r, 0.2 + 0.1 * r, 0.6 + 0.1 * r, 0.25 + 0.1 * r),
        summary(0.6 + 0.1 * r, 0.5, 0.9, 0.55), "ditto",
        {"device2": device(100, 0.3 + 0.1 * r, 0.8), "device1": device(120, 0.5 + 0.1 * r, 0.9),
         "device3": device(80, 0.3 + 0.1 * r, 0.7)}))
        for r in (1, 2, 3)]


def by_x(points: list[dict]) -> dict[int, dict]:
    return {p["x"]: p for p in points}


# --------------------------------------------------------------------------- the chart's points


def test_global_at_the_evaluated_version_personal_at_the_round():
    points = fe.accuracy_points(ditto_history())
    assert [p["x"] for p in points] == [0, 1, 2, 3]
    at = by_x(points)
    # model 0 (the initial one): the devices' distribution, but no server test accuracy of it here
    assert at[0]["mean"] == pytest.approx(0.5) and at[0]["test_accuracy"] is None
    assert at[0]["personal_mean"] is None
    # model 1: the distribution from round 2's report beside round 1's test accuracy of that model
    assert at[1]["worst"] == pytest.approx(0.4) and at[1]["best"] == pytest.approx(0.8)
    assert at[1]["worst_10pct"] == pytest.approx(0.45) and at[1]["test_accuracy"] == pytest.approx(0.6)
    # personal models after round 1's training, at round 1
    assert at[1]["personal_mean"] == pytest.approx(0.7) and at[1]["personal_worst_10pct"] == 0.55
    # the last round: its model is not evaluated yet, its personal models are
    assert at[3]["mean"] is None and at[3]["worst"] is None
    assert at[3]["personal_mean"] == pytest.approx(0.9) and at[3]["test_accuracy"] == pytest.approx(0.8)
    assert set(points[0]) == {"x", *fe.POINT_FIELDS}
    json.dumps(points)  # plain data: the page and a test may serialize it


def test_no_report_anywhere_draws_nothing():
    old = [entry(1, 0.5), entry(2, 0.6)]  # a run from before federated evaluation: no key at all
    assert fe.accuracy_points(old) == [] and fe.latest(old) is None
    none = [entry(1, 0.5, None), entry(2, 0.6, None)]  # no device evaluated in any round
    assert fe.accuracy_points(none) == [] and fe.latest(none) is None
    assert fe.accuracy_points([]) == [] and fe.latest([]) is None
    # a report without any summary or device draws nothing either
    empty = [entry(1, 0.5, report(0, None))]
    assert fe.accuracy_points(empty) == [] and fe.latest(empty) is None


def test_rounds_without_a_report_keep_their_test_accuracy_and_gaps():
    """--fed-eval-every 2: every other round has None; an old entry (no key) among new ones."""
    history = [entry(1, 0.5), entry(2, 0.6, report(1, summary(0.55, 0.3, 0.8, 0.35))),
               entry(3, 0.7, None), entry(4, 0.75, report(3, summary(0.7, 0.5, 0.9, 0.52)))]
    at = by_x(fe.accuracy_points(history))
    assert sorted(at) == [1, 2, 3, 4]
    assert [at[x]["test_accuracy"] for x in (1, 2, 3, 4)] == [0.5, 0.6, 0.7, 0.75]
    assert [at[x]["mean"] for x in (1, 2, 3, 4)] == [0.55, None, 0.7, None]
    assert all(p["personal_mean"] is None for p in at.values())
    found = fe.latest(history)
    assert (found.round, found.model_version, found.personalization) == (4, 3, "none")


def test_a_report_without_model_version_is_of_the_round_before():
    at = by_x(fe.accuracy_points([entry(5, 0.8, report(None, summary(0.7, 0.5, 0.9, 0.55)))]))
    assert at[4]["mean"] == 0.7 and at[5]["test_accuracy"] == 0.8
    assert fe.latest([entry(5, 0.8, report(None, summary(0.7, 0.5, 0.9, 0.55)))]).model_version == 4


def test_asynchronous_versions_go_where_model_version_says():
    # model version 7 made from updates trained from version 5: its devices evaluated version 5
    at = by_x(fe.accuracy_points([entry(7, 0.8, report(5, summary(0.7, 0.5, 0.9, 0.55)))]))
    assert at[5]["mean"] == 0.7 and at[7]["test_accuracy"] == 0.8 and 6 not in at


def test_missing_or_malformed_fields_are_none_never_an_error():
    partial = {"accuracy": 0.7, "worst": "bad", "best": float("nan"), "worst_10pct": True}
    history = [entry(1, None, report(0, partial)),
               {"round": 2, "test_accuracy": float("inf"),
                "federated_evaluation": {"model_version": 1, "global": "not a summary",
                                         "personal": {"accuracy": 0.9}}},
               entry(3, 0.7, ["not", "a", "report"]), "not an entry", None]
    at = by_x(fe.accuracy_points(history))
    assert at[0] == {"x": 0, "worst": None, "best": None, "mean": 0.7, "worst_10pct": None,
                     "personal_mean": None, "personal_worst_10pct": None, "test_accuracy": None}
    assert at[2]["personal_mean"] == 0.9 and at[2]["test_accuracy"] is None
    assert at[3]["test_accuracy"] == 0.7 and at[3]["mean"] is None
    assert fe.summary({"loss": 0.3, "devices": 2}) is None  # nothing about accuracy
    assert fe.number(True) is None and fe.number("0.5") is None and fe.number(math.nan) is None
    assert fe.whole(3.0) == 3 and fe.whole(2.5) is None


# --------------------------------------------------------------------------- the latest report's table


def test_the_latest_report_lists_its_devices_worst_first():
    found = fe.latest([*ditto_history(), entry(4, 0.9, None), entry(5, 0.9)])
    assert (found.round, found.model_version, found.personalization) == (3, 2, "ditto")
    assert found.rows == [
        {"device": "device2", "num_examples": 100, "global_accuracy": pytest.approx(0.6),
         "personal_accuracy": 0.8},
        {"device": "device3", "num_examples": 80, "global_accuracy": pytest.approx(0.6),
         "personal_accuracy": 0.7},
        {"device": "device1", "num_examples": 120, "global_accuracy": pytest.approx(0.8),
         "personal_accuracy": 0.9}]
    assert found.global_summary["worst_10pct"] == pytest.approx(0.55)
    assert fe.describe(found) == ("Round 3: global model v2 on 3 devices, 300 held-out examples; personal "
                                  "models (ditto) after the round's training. Worst global accuracy first.")


def test_device_rows_without_personal_models_or_with_missing_fields():
    rows = fe.device_rows(report(0, None, devices={
        "b": device(10, 0.5), "a": {"global": None}, "c": None, "d": {"num_examples": "many",
                                                                      "global": {"accuracy": 0.2}}}))
    assert [r["device"] for r in rows] == ["d", "b", "a", "c"]  # no accuracy: last, by name
    assert rows[1] == {"device": "b", "num_examples": 10, "global_accuracy": 0.5, "personal_accuracy": None}
    assert rows[0]["num_examples"] is None and rows[2]["global_accuracy"] is None
    assert fe.device_rows(None) == [] and fe.device_rows({"devices": None}) == []
    assert fe.device_rows({"devices": ["device1"]}) == []
    # a report with devices but no summary is still the latest report; its line counts them
    found = fe.latest([entry(2, 0.5, report(1, None, devices={"b": device(10, 0.5), "e": device(5, 0.4)}))])
    assert fe.describe(found) == ("Round 2: global model v1 on 2 devices, 15 held-out examples. "
                                  "Worst global accuracy first.")
    assert fe.accuracy_points([entry(2, 0.5, report(1, None, devices={"b": device(10, 0.5)}))]) == []


def test_latest_summary_for_comparing_runs():
    assert fe.latest_summary(ditto_history()) == {
        "mean": pytest.approx(0.7), "worst_10pct": pytest.approx(0.55), "personal_mean": pytest.approx(0.9)}
    assert fe.latest_summary([entry(1, 0.5)]) == {"mean": None, "worst_10pct": None, "personal_mean": None}


def test_runs_compare_their_worst_10pct_device_accuracy():
    def a_run(run_id: int, history: list[dict]) -> dict:
        return {"id": run_id, "name": f"run{run_id}", "status": "finished", "current": False,
                "settings": {"strategy": "fedavg"}, "history": history}
    evaluated, old, empty = a_run(2, ditto_history()), a_run(1, [entry(1, 0.5)]), a_run(3, [])
    table = runs.evaluation_table([evaluated, old, empty])
    assert list(table.columns) == list(runs.EVALUATION_COLUMNS)
    assert runs.WORST_10PCT in table.columns
    rows = table.set_index("run")
    assert rows.loc["run2 · finished", runs.WORST_10PCT] == pytest.approx(0.55)
    assert rows.loc["run2 · finished", "test accuracy"] == pytest.approx(0.8)
    assert rows.loc["run2 · finished", "personal accuracy (mean)"] == pytest.approx(0.9)
    assert pd.isna(rows.loc["run1 · finished", runs.WORST_10PCT])
    assert rows.loc["run1 · finished", "test accuracy"] == 0.5
    assert rows.loc["run3 · finished", "rounds"] == 0
    assert pd.isna(rows.loc["run3 · finished", "test accuracy"])
    assert runs.any_evaluated([evaluated, old]) and not runs.any_evaluated([old, empty])


# --------------------------------------------------------------------------- the Streamlit side


def test_the_chart_draws_the_band_and_each_line_present():
    spec = page.fed_eval_chart(fe.accuracy_points(ditto_history())).to_dict()
    area, lines = spec["layer"]
    assert area["mark"]["type"] == "area" and area["encoding"]["y2"]["field"] == "best"
    assert area["encoding"]["color"]["scale"]["domain"] == [page.FED_EVAL_BAND]
    domain = lines["encoding"]["color"]["scale"]["domain"]
    assert domain == list(page.FED_EVAL_LINES)  # every line, the personal mean too
    assert spec["layer"][1]["encoding"]["x"]["title"] == "round"
    # without personalization: no personal line, and no legend entry for it
    plain = [entry(1, 0.5, report(0, summary(0.4, 0.2, 0.6, 0.25))), entry(2, 0.6)]
    lines = page.fed_eval_chart(fe.accuracy_points(plain), asynchronous=True).to_dict()["layer"][1]
    assert "personal: mean (by examples)" not in lines["encoding"]["color"]["scale"]["domain"]
    assert lines["encoding"]["x"]["title"] == "model version"


def panel_script(history_json: str) -> None:
    import json

    from fedhub.dashboard.page import federated_eval_panel

    federated_eval_panel(json.loads(history_json))


def open_panel(history: list) -> AppTest:
    at = AppTest.from_function(panel_script, args=(json.dumps(history),), default_timeout=30).run()
    assert not at.exception, at.exception
    return at


def test_the_panel_shows_the_chart_and_the_latest_rounds_devices():
    at = open_panel([*ditto_history(), entry(4, 0.85, None)])
    assert [h.value for h in at.subheader] == ["Per-device accuracy (held-out data)"]
    (chart,) = at.get("vega_lite_chart")
    assert "held-out data" in chart.proto.spec
    captions = [c.value for c in at.caption]
    assert fe.CAPTION in captions and any(c.startswith("Round 3: global model v2") for c in captions)
    (frame,) = [t.value for t in at.dataframe]
    assert list(frame.columns) == ["device", "held-out examples", "global accuracy", "personal accuracy"]
    assert list(frame["device"]) == ["device2", "device3", "device1"]
    assert list(frame["personal accuracy"]) == [0.8, 0.7, 0.9]
    assert list(frame["held-out examples"]) == [100, 80, 120]


def test_the_panel_says_why_there_is_nothing_yet():
    for history in ([], [entry(1, 0.5), entry(2, 0.6)], [entry(1, 0.5, None)]):
        at = open_panel(history)
        assert [i.value for i in at.info] == [fe.NO_DEVICE_YET], history
        assert not at.get("vega_lite_chart") and not at.dataframe


def test_the_panel_without_personal_models_leaves_that_column_empty():
    history = [entry(1, 0.5, report(0, summary(0.4, 0.2, 0.6, 0.25), devices={"d1": device(50, 0.4)}))]
    at = open_panel(history)
    (frame,) = [t.value for t in at.dataframe]
    assert frame["personal accuracy"].isna().all() and list(frame["global accuracy"]) == [0.4]
    assert at.dataframe[0].proto.placeholder == page.BLANK


def compare_script(runs_json: str) -> None:
    import json

    from fedhub.dashboard.page import compare_view

    class Runs:
        """What compare_view asks the server: its runs, and each one's detail."""

        server = "http://stand-in"
        runs_ = json.loads(runs_json)

        def runs(self) -> list:
            return [{k: v for k, v in r.items() if k != "history"} for r in self.runs_]

        def run(self, run_id: int) -> dict:
            return next(r for r in self.runs_ if r["id"] == run_id)

    compare_view(Runs())


def test_the_runs_comparison_shows_the_worst_10pct_device_accuracy():
    def a_run(run_id: int, history: list[dict], current: bool) -> dict:
        return {"id": run_id, "name": f"run{run_id}", "status": "finished", "current": current,
                "settings": {"strategy": "fedavg"}, "history": history}
    both = [a_run(2, ditto_history(), True), a_run(1, [entry(1, 0.5)], False)]
    at = AppTest.from_function(compare_script, args=(json.dumps(both),), default_timeout=30).run()
    assert not at.exception, at.exception
    (frame,) = [t.value for t in at.dataframe if runs.WORST_10PCT in t.value.columns]
    assert list(frame["run"]) == ["run2 · finished (current)", "run1 · finished"]
    assert frame[runs.WORST_10PCT].iloc[0] == pytest.approx(0.55) and pd.isna(frame[runs.WORST_10PCT].iloc[1])
    # runs from before federated evaluation: the comparison is as it was, without that table
    old = [a_run(2, [entry(1, 0.6)], True), a_run(1, [entry(1, 0.5)], False)]
    at = AppTest.from_function(compare_script, args=(json.dumps(old),), default_timeout=30).run()
    assert not at.exception, at.exception
    assert not [t for t in at.dataframe if runs.WORST_10PCT in t.value.columns]
