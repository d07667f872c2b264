"""Command-line parsing that refuses bad input with one line (``error: ...``, exit 2).

Every FedHub command (``server.py``, ``device/device.py``, ``python -m fedhub.simulate``, the
utilities, the benchmarks, the examples) builds its parser from :class:`Parser`, so a refusal
looks the same everywhere and no command prints its usage block or a traceback instead.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import NoReturn


def finite_float(text: str) -> float:
    """``type=float`` for every option of a :class:`Parser`: ``nan`` and ``inf`` are refused
    here, since a non-finite number passes every ``<``/``>`` range check after it (all
    comparisons with NaN are false) and would reach ``int()`` or the engine unchecked."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


class Parser(argparse.ArgumentParser):
    """``argparse`` with one-line errors: no usage block before the reason (``--help`` has it),
    and every ``type=float`` option finite (:func:`finite_float`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        # argparse looks a type up in this registry first: groups share it, so every float
        # option of this parser and of its argument groups is checked the same way.
        self.register("type", float, finite_float)

    def error(self, message: str) -> NoReturn:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
