"""Counts in words: "1 round", "2 rounds", never "1 rounds"."""

from __future__ import annotations


def plural(count: int, noun: str, nouns: str | None = None) -> str:
    """``count`` and the noun that goes with it; ``nouns`` for a plural that is not noun + "s"."""
    return f"{count} {noun if count == 1 else nouns or noun + 's'}"
