"""The line a demo prints for each completed round, the same for ``make demo`` and
``make docker-demo``. Standard library only: the container demo runs on a host without
FedHub's virtualenv."""

from __future__ import annotations

from typing import Any

from fedhub.engine.plural import plural  # standard library only, like this module


def round_line(row: dict[str, Any], seconds: float) -> str:
    """One ``/api/history`` row as ``== round N: global test accuracy ...``."""
    return (f"== round {row['round']}: global test accuracy {row['test_accuracy']:.4f} "
            f"(loss {row['test_loss']:.4f}), {plural(row['num_updates'], 'device')}, "
            f"{plural(row['num_examples'], 'example')}, {seconds:.0f}s since start")
