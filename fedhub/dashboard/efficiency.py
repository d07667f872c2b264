"""The efficiency figure for the dashboards, without Streamlit: history entries and the server's
status -> the Efficiency tile (or metric), its explanation, and one value per round.

With ``--efficiency`` (``fedhub.simulate`` turns it on) the server times once, at start-up, one
process training its network on a sample of test images (:mod:`fedhub.efficiency`);
``GET /api/status`` then holds::

    "efficiency": None  # off
    "efficiency": {"s_per_image": .., "images": 2048, "seconds": .., "startup_s": ..,
                   "framework": "keras", "network": "basic"}

and each round's history entry (``GET /api/history``)::

    "efficiency": {"images": 1200,          # examples trained x epochs
                   "round_s": 1.3,          # the round's time, from its opening to its result
                   "centralized_s": 0.84,   # one process's time for those images
                   "ratio": 0.65,           # centralized_s / round_s
                   "test_s": 0.07}          # of round_s, the server's test of the new model

The tile shows the latest round's ratio; the first round's time includes the devices' start-up,
so its figure is given separately, with the median of the rounds after it (the steady figure,
the upper median as ``fedhub.simulate``'s summary takes it).

Everything here tolerates what older runs hold (no key at all), a run without the figure (None)
and values that are not finite numbers. dashboard_stats/stats.js shapes the same data the same
way, and writes the same text, for the static page.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from fedhub.dashboard.federated_eval import number, whole
from fedhub.efficiency import steady

KEY = "efficiency"
NONE = "—"  # a round (or a run) without the figure
FIELDS = ("images", "round_s", "centralized_s", "ratio", "test_s")
WHAT = ("The time one process takes to train the round's images, over the round's own time "
        "(1.0: as fast as one process holding all the data).")


def figure(entry: Any) -> dict[str, Any] | None:
    """An entry's efficiency with every field (None where missing or not a number), or None:
    no key (an older run), None (a run without it), or no ratio that is a finite number >= 0."""
    e = entry.get(KEY) if isinstance(entry, Mapping) else None
    if not isinstance(e, Mapping):
        return None
    ratio = number(e.get("ratio"))
    if ratio is None or ratio < 0:
        return None
    return {"images": whole(e.get("images")), "round_s": number(e.get("round_s")),
            "centralized_s": number(e.get("centralized_s")), "ratio": ratio,
            "test_s": number(e.get("test_s"))}


def rows(history: Iterable[Any]) -> list[dict[str, Any]]:
    """One row per entry, in the history's order: ``round`` and :data:`FIELDS` (None for an
    entry without the figure)."""
    out = []
    for entry in history:
        if not isinstance(entry, Mapping):
            continue
        found = figure(entry) or dict.fromkeys(FIELDS)
        out.append({"round": whole(entry.get("round")), **found})
    return out


@dataclass(frozen=True)
class Summary:
    """The run's figures: the latest round's and the first round's (each a :func:`figure` with
    its ``round``), the median ratio of the rounds after the first (None with one round), and
    how many rounds have one."""

    latest: dict[str, Any]
    first: dict[str, Any]
    steady: float | None
    count: int


def summarize(history: Iterable[Any]) -> Summary | None:
    """The run's figures, or None when no entry has one."""
    seen = [{"round": whole(entry.get("round")), **found} for entry in history
            if (found := figure(entry)) is not None]
    if not seen:
        return None
    return Summary(latest=seen[-1], first=seen[0], steady=steady([s["ratio"] for s in seen]),
                   count=len(seen))


def reference(status: Any) -> dict[str, Any] | None:
    """What the status says of the one-process reference (``s_per_image`` > 0, ``images``,
    ``seconds``, ``startup_s``, ``framework``, ``network``), or None: off, an older server, or
    no usable rate."""
    e = status.get(KEY) if isinstance(status, Mapping) else None
    if not isinstance(e, Mapping):
        return None
    s_per_image = number(e.get("s_per_image"))
    if s_per_image is None or s_per_image <= 0:
        return None
    return {"s_per_image": s_per_image, "images": whole(e.get("images")), "seconds": number(e.get("seconds")),
            "startup_s": number(e.get("startup_s")),
            **{k: e.get(k) if isinstance(e.get(k), str) else None for k in ("framework", "network")}}


def ratio_text(ratio: float | None) -> str:
    """``0.66×``: two decimals, or two significant digits below 0.1 (``0.043×``); :data:`NONE`
    for None."""
    if ratio is None:
        return NONE
    digits = 2 if ratio >= 0.1 or ratio == 0 else min(6, 1 - math.floor(math.log10(ratio)))
    return f"{ratio:.{digits}f}×"


def cell_text(entry: Any) -> str:
    """A round's cell in a rounds table: its ratio (:func:`ratio_text`), or :data:`NONE`."""
    found = figure(entry)
    return NONE if found is None else ratio_text(found["ratio"])


def metric_text(summary: Summary | None) -> str:
    """The Streamlit metric (a narrow column): ``0.66×``, the latest round's; :data:`NONE` before
    any figure."""
    return NONE if summary is None else ratio_text(summary.latest["ratio"])


def tile_text(summary: Summary | None) -> str:
    """The tile: ``0.66× one process``, the latest round's; :data:`NONE` before any figure."""
    return NONE if summary is None else f"{ratio_text(summary.latest['ratio'])} one process"


def first_text(summary: Summary | None) -> str:
    """The first round's figure, given apart (it carries the devices' start-up): ``round 1:
    0.12× with start-up``, or "" while it is the only one."""
    if summary is None or summary.count < 2:
        return ""
    return f"round {_round(summary.first)}: {ratio_text(summary.first['ratio'])} with start-up"


def _round(found: Mapping[str, Any]) -> str:
    return "?" if found["round"] is None else str(found["round"])


def _seconds(value: float) -> str:
    return f"{value:.2f} s"


def explain(summary: Summary | None, reference_: Mapping[str, Any] | None) -> str:
    """The tile's tooltip and the metric's help: what the figure is, the latest round's times,
    how one process was timed, and the first round's figure; "" for a run without it."""
    if summary is None and reference_ is None:
        return ""
    parts = [WHAT]
    if summary is not None:
        latest = summary.latest
        images, alone, took = latest["images"], latest["centralized_s"], latest["round_s"]
        if images is not None and alone is not None and took is not None:
            tested = ("" if latest["test_s"] is None
                      else f" ({_seconds(latest['test_s'])} of it testing the new model)")
            parts.append(f"Round {_round(latest)}: one process would train its {images} images in "
                         f"{_seconds(alone)}; the round took {_seconds(took)}{tested}.")
    if reference_ is not None:
        timed = (f"on {reference_['images']} test images" if reference_["images"] is not None
                 else "on a sample of test images")
        startup = ("" if reference_["startup_s"] is None
                   else f" (its own start-up, {_seconds(reference_['startup_s'])}, not counted)")
        parts.append(f"One process was timed at start-up {timed}: "
                     f"{1 / reference_['s_per_image']:.0f} images/s{startup}.")
    if summary is None:
        parts.append("Each round's figure comes when it completes.")
    elif summary.count == 1:
        parts.append("This first round's time includes the devices' start-up.")
    else:
        parts.append(f"Round {_round(summary.first)}, with the devices' start-up: "
                     f"{ratio_text(summary.first['ratio'])}; the median of the rounds after it: "
                     f"{ratio_text(summary.steady)}.")
    return " ".join(parts)
