"""Run a command's entry point (``main(argv)`` or ``parse_args(argv)``) in this process, as the
command line would: what it printed, and the exit status (``SystemExit`` or the returned code).

A refusal is checked this way in milliseconds instead of a Python start-up per case; each
command keeps one real-process check (tests/test_cli_settings.py) that the same line reaches
the terminal with exit 2.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any


@dataclass
class Outcome:
    code: int | None  # the exit status; None if the entry point returned a non-int (parse_args)
    stdout: str
    stderr: str


def run_main(entry: Callable[[list[str]], Any], argv: Sequence[str]) -> Outcome:
    """``entry(argv)`` with stdout and stderr captured; SystemExit becomes the exit status."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            result = entry(list(argv))
            code = result if isinstance(result, int) and not isinstance(result, bool) else None
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else 1
    return Outcome(code, out.getvalue(), err.getvalue())


def assert_one_line_error(outcome: Outcome, expected: str) -> None:
    """Exit 2 and exactly one ``error: ...`` line on stderr containing ``expected``."""
    lines = outcome.stderr.splitlines()
    assert outcome.code == 2, outcome
    assert len(lines) == 1 and lines[0].startswith("error: "), outcome.stderr
    assert expected in lines[0], (expected, lines[0])
