"""Command-line parsing that refuses bad input with one line (``error: ...``, exit 2)."""

from __future__ import annotations

import argparse
import sys
from typing import NoReturn


class Parser(argparse.ArgumentParser):
    """``argparse`` with one-line errors: no usage block before the reason (``--help`` has it)."""

    def error(self, message: str) -> NoReturn:
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
