"""Federated evaluation: devices judge the global model (and their own) on held-out data.

The server's test set says how good the global model is on average; on skewed data it can be
good on average and poor for many devices. So each round the strategy asks some of its devices
(:func:`choose`: every N rounds, a share of them) to evaluate, before training, the global model
they train from on a held-out share of their own data, and, with personalization, their own
model after training. Each sends one report (:func:`parse_report`), never masked (secure
aggregation hides updates, not these metrics). When the round's model is published the reports
become its history entry's ``federated_evaluation`` (:func:`summarize`): per device and as a
distribution (example-weighted mean, worst 10 %, worst, best, spread). Evaluation never changes
the model.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .errors import InvalidInput

MAX_EXAMPLES = 10**9
MAX_LOSS = 1e12
WORST_SHARE = 0.1  # "worst 10 %": the mean accuracy of the worst tenth of the devices (at least one)
MODELS = ("global", "personal")


def choose(devices: Sequence[str], round_number: int, *, every: int, fraction: float,
           rng: random.Random) -> tuple[str, ...]:
    """Which of a round's ``devices`` evaluate: none unless ``round_number`` is a multiple of
    ``every`` (0: never), else ``ceil(fraction * n)`` of them at random (all of them without
    drawing when ``fraction`` is 1, so the selection's random sequence is unchanged)."""
    if every <= 0 or round_number % every or not devices:
        return ()
    if fraction >= 1:
        return tuple(devices)
    k = max(1, math.ceil(fraction * len(devices)))
    return tuple(sorted(rng.sample(sorted(devices), k)))


def _metrics(raw: object, field: str, *, counted: bool) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise InvalidInput(f"{field} must be an object with loss and accuracy", field)
    allowed = {"loss", "accuracy", "num_examples"} if counted else {"loss", "accuracy"}
    extra = sorted(set(raw) - allowed)
    if extra:
        raise InvalidInput(f"{field}.{extra[0]} is not a field of an evaluation", f"{field}.{extra[0]}")
    out: dict[str, Any] = {}
    for key, low, high in (("loss", 0.0, MAX_LOSS), ("accuracy", 0.0, 1.0)):
        value = raw.get(key)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value) \
                or not low <= value <= high:
            raise InvalidInput(f"{field}.{key} must be a number from {low:g} to {high:g}", f"{field}.{key}")
        out[key] = float(value)
    if counted:
        n = raw.get("num_examples")
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_EXAMPLES:
            raise InvalidInput(f"{field}.num_examples must be an integer from 1 to {MAX_EXAMPLES}",
                               f"{field}.num_examples")
        out["num_examples"] = n
    return out


def parse_report(raw: object) -> dict[str, Any]:
    """A device's evaluation report, checked: ``{"round": int, "global": {"loss", "accuracy",
    "num_examples"}, "personal": {"loss", "accuracy"} | null}`` (the personal model is judged
    on the same held-out examples). InvalidInput names the field at fault."""
    if not isinstance(raw, dict):
        raise InvalidInput("the body must be a JSON object", "body")
    extra = sorted(set(raw) - {"round", "global", "personal"})
    if extra:
        raise InvalidInput(f"{extra[0]} is not a field of an evaluation report", extra[0])
    number = raw.get("round")
    if isinstance(number, bool) or not isinstance(number, int) or not 0 <= number <= 2**53:
        raise InvalidInput("round must be a non-negative integer", "round")
    report = {"round": number, "global": _metrics(raw.get("global"), "global", counted=True)}
    personal = raw.get("personal")
    report["personal"] = None if personal is None else _metrics(personal, "personal", counted=False)
    return report


def distribution(values: Iterable[tuple[float, float, int]]) -> dict[str, Any] | None:
    """The spread of ``(loss, accuracy, examples)`` over devices: example-weighted mean loss and
    accuracy, the worst 10 % (mean accuracy of the worst ``ceil(n / 10)`` devices), the worst,
    the best and the standard deviation of the devices' accuracies. None for no device."""
    rows = list(values)
    if not rows:
        return None
    total = sum(n for _, _, n in rows)
    accuracies = sorted(a for _, a, _ in rows)
    worst = accuracies[:max(1, math.ceil(WORST_SHARE * len(accuracies)))]
    mean = sum(accuracies) / len(accuracies)
    return {
        "devices": len(rows), "num_examples": total,
        "loss": sum(loss * n for loss, _, n in rows) / total,
        "accuracy": sum(a * n for _, a, n in rows) / total,
        "worst_10pct": sum(worst) / len(worst), "worst": accuracies[0], "best": accuracies[-1],
        "std": math.sqrt(sum((a - mean) ** 2 for a in accuracies) / len(accuracies)),
    }


def summarize(reports: Mapping[str, Mapping[str, Any]], *, model_version: int,
              personalization: str) -> dict[str, Any] | None:
    """A round's ``federated_evaluation`` from each device's report (None when none came)."""
    if not reports:
        return None
    devices = {name: {"num_examples": r["global"]["num_examples"],
                      "global": {k: r["global"][k] for k in ("loss", "accuracy")},
                      "personal": r.get("personal")}
               for name, r in sorted(reports.items())}
    return {
        "model_version": model_version, "personalization": personalization,
        **{model: distribution((d[model]["loss"], d[model]["accuracy"], d["num_examples"])
                               for d in devices.values() if d.get(model) is not None)
           for model in MODELS},
        "devices": devices,
    }


STATISTICS = ("accuracy", "worst_10pct", "worst", "best", "std", "loss")


def scalars(entry: Mapping[str, Any]) -> list[tuple[int, str, float]]:
    """A history entry's federated evaluation as ``(step, name, value)`` scalars for trackers
    (TensorBoard, MLflow): ``federated/global/<statistic>`` at the step of the model evaluated
    (the one before the round: beside that model's ``test_accuracy``) and
    ``federated/personal/<statistic>`` at the round's step (after its local training)."""
    evaluation = entry.get("federated_evaluation")
    if not isinstance(evaluation, Mapping):
        return []
    steps = {"global": int(evaluation.get("model_version", int(entry["round"]) - 1)),
             "personal": int(entry["round"])}
    out = []
    for model, step in steps.items():
        summary = evaluation.get(model)
        if isinstance(summary, Mapping):
            out.extend((step, f"federated/{model}/{name}", float(summary[name]))
                       for name in STATISTICS if isinstance(summary.get(name), int | float))
    return out
