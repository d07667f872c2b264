"""Strategies by name, built from typed settings; what ``--list-strategies`` prints.

Everything here is derived from the strategy classes' dataclass fields (type,
default, help), so a new setting appears in the parser, the validation messages
and the listing by being declared once.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from .. import params
from .adaptive import FedAdagrad, FedAdam, FedYogi
from .averaging import FedAvg, FedAvgM, FedProx
from .base import Strategy
from .fairness import QFedAvg
from .robust import Bulyan, FedMedian, FedTrimmedAvg, Krum, MultiKrum

STRATEGIES: dict[str, type[Strategy]] = {
    cls.name: cls
    for cls in (FedAvg, FedAvgM, FedProx, FedAdam, FedYogi, FedAdagrad,
                FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan, QFedAvg)
}


def strategy_class(name: str) -> type[Strategy]:
    try:
        return STRATEGIES[name]
    except KeyError:
        raise params.ParamError(
            f"unknown strategy {name!r}; choose from {', '.join(STRATEGIES)}") from None


def make_strategy(name: str, **settings: Any) -> Strategy:
    """Build a strategy by name; an unknown name, key or bad value is a one-line ParamError."""
    return params.build(strategy_class(name), settings, f"strategy {name}")


def parse_strategy_args(name: str, args: Iterable[str]) -> dict[str, Any]:
    """Typed settings for strategy ``name`` from repeated ``KEY=VALUE`` strings
    (``--strategy-arg``); pass them to :func:`make_strategy`, which checks the ranges."""
    return params.parse_assignments(strategy_class(name), args, f"strategy {name}")


def describe_strategies() -> list[dict[str, Any]]:
    """Every strategy: name, one-line summary and settings with types and defaults."""
    return [{"name": name, "summary": _summary(cls), "params": params.describe(cls)}
            for name, cls in STRATEGIES.items()]


def format_strategies() -> str:
    """The text of ``--list-strategies``."""
    lines = []
    for s in describe_strategies():
        lines.append(f"{s['name']}: {s['summary']}")
        for p in s["params"]:
            default = "none" if p["default"] is None else p["default"]
            lines.append(f"    {p['name']} ({p['type']}, default {default}): {p['help']}")
    return "\n".join(lines)


def _summary(cls: type) -> str:
    return " ".join((cls.__doc__ or "").strip().split("\n\n")[0].split())
