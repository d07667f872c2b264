"""The human-readable history: one CSV row per completed round, in ``eval/``."""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from .files import atomic_write_text

COLUMNS = ("round", "closed_at", "num_updates", "num_examples", "test_loss", "test_accuracy")


def write_csv(path: str | Path, rounds: Iterable[Mapping[str, Any]]) -> None:
    """Rewrite the whole file atomically, so a reader never sees half a row."""
    buffer = io.StringIO()
    writer = csv.writer(buffer)
    writer.writerow(COLUMNS)
    for r in rounds:
        writer.writerow([r.get(c) for c in COLUMNS])
    atomic_write_text(path, buffer.getvalue())
