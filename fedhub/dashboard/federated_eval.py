"""Federated evaluation for the dashboards, without Streamlit: history entries -> the points of
the per-device accuracy chart and the rows of the per-device table.

Each round, the chosen devices evaluate on their own held-out data the global model they trained
from, and (with personalization) their personal model after local training; the round's history
entry (``GET /api/history``) then holds::

    "federated_evaluation": None  # no device evaluated in this round
    "federated_evaluation": {"model_version": 4, "personalization": "ditto",
                             "global": Summary, "personal": Summary | None,
                             "devices": {name: {"num_examples": 120,
                                                "global": {"loss": .., "accuracy": ..},
                                                "personal": {..} | None}}}
    Summary = {"devices", "num_examples", "loss", "accuracy" (example-weighted means),
               "worst_10pct", "worst", "best", "std" (of the device accuracies)}

Where the points go: the server's ``test_accuracy`` of entry r is the model made BY round r, but
``global`` in entry r describes the model the devices trained from, ``model_version`` (r - 1 in
synchronous mode). So the global distribution is drawn at x = ``model_version`` (beside the
server's test accuracy of that same model), and the personal one at x = r (after round r's
local training).

Everything here tolerates what older runs and partial reports hold: no key at all, None, a
summary or a device without some field, a value that is not a finite number. dashboard_stats/
stats.js shapes the same data the same way for the static page.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

KEY = "federated_evaluation"
# One chart point (one x): the global distribution of the model made by round x on the devices'
# held-out data, the personal models' mean after round x's training, the server's test accuracy
# of the model made by round x. None where that x has no such value.
POINT_FIELDS = ("worst", "best", "mean", "worst_10pct", "personal_mean", "personal_worst_10pct",
                "test_accuracy")
NO_DEVICE_YET = "No device has evaluated yet: devices need held-out data (--holdout)."
CAPTION = ("Global: the model the devices trained from, at its version (round − 1); "
           "personal: after that round's local training.")


def number(value: Any) -> float | None:
    """A finite int or float as float (bool is not a number here), else None."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value) if math.isfinite(value) else None


def whole(value: Any) -> int | None:
    """An int (bool excluded), or a float that is a whole number, else None."""
    n = number(value)
    return int(n) if n is not None and n == int(n) else None


def report(entry: Any) -> dict[str, Any] | None:
    """The entry's federated evaluation, or None: no key (an older run), None (no device
    evaluated that round), or anything that is not an object."""
    if not isinstance(entry, Mapping):
        return None
    fe = entry.get(KEY)
    return fe if isinstance(fe, Mapping) else None  # type: ignore[return-value]


def summary(value: Any) -> dict[str, Any] | None:
    """A Summary with every field present (None where missing or not a number); None when
    ``value`` is no Summary or says nothing about accuracy."""
    if not isinstance(value, Mapping):
        return None
    out = {"devices": whole(value.get("devices")), "num_examples": whole(value.get("num_examples")),
           **{k: number(value.get(k)) for k in ("loss", "accuracy", "worst_10pct", "worst", "best", "std")}}
    if all(out[k] is None for k in ("accuracy", "worst_10pct", "worst", "best")):
        return None
    return out


def evaluated_version(entry: Mapping[str, Any], fe: Mapping[str, Any]) -> int | None:
    """The global model the devices evaluated: ``model_version``, else (a report without it)
    the round before the entry's, as in synchronous mode."""
    version = whole(fe.get("model_version"))
    if version is not None:
        return version
    r = whole(entry.get("round"))
    return None if r is None else r - 1


def accuracy_points(history: Iterable[Any]) -> list[dict[str, Any]]:
    """The per-device accuracy chart, one point per x (see :data:`POINT_FIELDS`), x ascending;
    [] when no entry holds a distribution to draw (the chart is then not shown at all). Every
    round's test accuracy is a point too, for comparison. Where two entries put the same series
    at the same x, the later one wins."""
    points: dict[int, dict[str, Any]] = {}
    drawn = False

    def at(x: int) -> dict[str, Any]:
        return points.setdefault(x, {"x": x, **dict.fromkeys(POINT_FIELDS)})

    for entry in history:
        if not isinstance(entry, Mapping):
            continue
        r = whole(entry.get("round"))
        accuracy = number(entry.get("test_accuracy"))
        if r is not None and accuracy is not None:
            at(r)["test_accuracy"] = accuracy
        fe = report(entry)
        if fe is None:
            continue
        g = summary(fe.get("global"))
        version = evaluated_version(entry, fe)
        if g is not None and version is not None:
            at(version).update(worst=g["worst"], best=g["best"], mean=g["accuracy"],
                               worst_10pct=g["worst_10pct"])
            drawn = True
        p = summary(fe.get("personal"))
        if p is not None and r is not None:
            at(r).update(personal_mean=p["accuracy"], personal_worst_10pct=p["worst_10pct"])
            drawn = True
    return [points[x] for x in sorted(points)] if drawn else []


def _accuracy(value: Any) -> float | None:
    return number(value.get("accuracy")) if isinstance(value, Mapping) else None


def device_rows(fe: Mapping[str, Any] | None) -> list[dict[str, Any]]:
    """One row per device of a report: ``device``, ``num_examples`` (held out), ``global_accuracy``,
    ``personal_accuracy`` (None: no personal model, or a value missing), worst global accuracy
    first (those without one last), then by name."""
    devices = (fe or {}).get("devices")
    if not isinstance(devices, Mapping):
        return []
    rows = []
    for name, d in devices.items():
        d = d if isinstance(d, Mapping) else {}
        rows.append({"device": str(name), "num_examples": whole(d.get("num_examples")),
                     "global_accuracy": _accuracy(d.get("global")),
                     "personal_accuracy": _accuracy(d.get("personal"))})
    rows.sort(key=lambda row: (row["global_accuracy"] is None, row["global_accuracy"] or 0.0, row["device"]))
    return rows


@dataclass(frozen=True)
class Latest:
    """The latest round with a report: its number, the model version the devices evaluated,
    the personalization, the two summaries and one row per device (:func:`device_rows`)."""

    round: int | None
    model_version: int | None
    personalization: str
    global_summary: dict[str, Any] | None
    personal_summary: dict[str, Any] | None
    rows: list[dict[str, Any]] = field(default_factory=list)


def latest(history: Iterable[Any]) -> Latest | None:
    """The latest entry whose report has a summary or a device; None if no entry has one."""
    found = None
    for entry in history:
        fe = report(entry)
        if fe is None:
            continue
        rows = device_rows(fe)
        g, p = summary(fe.get("global")), summary(fe.get("personal"))
        if rows or g is not None or p is not None:
            personalization = fe.get("personalization")
            found = Latest(round=whole(entry.get("round")), model_version=evaluated_version(entry, fe),
                           personalization=personalization if isinstance(personalization, str) else "none",
                           global_summary=g, personal_summary=p, rows=rows)
    return found


def describe(report_: Latest) -> str:
    """One line above the table: which round, which model, how many devices and examples."""
    g = report_.global_summary or {}
    devices = g.get("devices") if g.get("devices") is not None else len(report_.rows)
    examples = g.get("num_examples")
    if examples is None:
        known = [row["num_examples"] for row in report_.rows if row["num_examples"] is not None]
        examples = sum(known) if known else None
    what = f"{devices} device{'' if devices == 1 else 's'}"
    if examples is not None:
        what += f", {examples} held-out example{'' if examples == 1 else 's'}"
    model = "the global model" if report_.model_version is None else f"global model v{report_.model_version}"
    personal = ("" if report_.personalization == "none"
                else f"; personal models ({report_.personalization}) after the round's training")
    where = "the latest report" if report_.round is None else f"Round {report_.round}"
    return f"{where}: {model} on {what}{personal}. Worst global accuracy first."


def latest_summary(history: Iterable[Any]) -> dict[str, float | None]:
    """The latest report's headline numbers, for comparing runs: the mean and worst-10 % device
    accuracy of the global model and the personal mean (None where there is none)."""
    found = latest(history)
    g = (found.global_summary if found else None) or {}
    p = (found.personal_summary if found else None) or {}
    return {"mean": g.get("accuracy"), "worst_10pct": g.get("worst_10pct"),
            "personal_mean": p.get("accuracy")}
