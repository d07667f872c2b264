"""Where a FedHub run keeps its files: one state directory, understood the same way everywhere.

Every command (``server.py``, ``device/device.py``, ``python -m fedhub.device.launcher``,
``python -m fedhub.split``, ``python -m fedhub.cleaner``) and the dashboard take the
state directory from ``--state-dir``, else from ``$FEDHUB_STATE_DIR``. Given one, the whole run
lives in it, so a second run never mixes with the first and every tool finds the secrets::

    STATE_DIR/                  the server's database, checkpoints (saved/), admin.token, enroll.secret
    STATE_DIR/eval/history.csv  the per-round history
    STATE_DIR/devices/NAME/     each local device's data, token and history
    STATE_DIR/runs/             TensorBoard event files, and each run's folder after the first
                                (runs/ID-NAME/saved/: its checkpoints; fedhub.engine.runs)

Without one, the checkout's own git-ignored folders: ``server_training/``, ``eval/``,
``devices/`` and ``runs/``. The folder flags (``--eval-dir``, ``--devices-root``,
``--runs-dir``, ``--out``) still override one folder each.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fedhub.checkout import ROOT

__all__ = ["ADMIN_TOKEN_FILE", "ENROLL_SECRET_FILE", "STATE_DIR_ENV", "SUBFOLDERS", "StateDir",
           "add_option", "resolve"]

STATE_DIR_ENV = "FEDHUB_STATE_DIR"
ENROLL_SECRET_FILE = "enroll.secret"
ADMIN_TOKEN_FILE = "admin.token"
# The folders a given state directory holds besides the server's own files (the cleaner keeps them).
SUBFOLDERS = ("eval", "devices", "runs")


@dataclass(frozen=True)
class StateDir:
    """The folders of one run, all absolute."""

    server_dir: Path  # database, checkpoints, secrets
    eval_dir: Path
    devices_root: Path
    runs_dir: Path

    @property
    def enroll_secret_file(self) -> Path:
        return self.server_dir / ENROLL_SECRET_FILE

    @property
    def admin_token_file(self) -> Path:
        return self.server_dir / ADMIN_TOKEN_FILE


def resolve(state_dir: str | Path | None = None) -> StateDir:
    """The run's folders: ``state_dir``, else ``$FEDHUB_STATE_DIR``, else the checkout's.

    Absolute, so that child processes started elsewhere (the launcher's devices run in the
    checkout) read the same folders.
    """
    given = state_dir or os.environ.get(STATE_DIR_ENV, "").strip()
    if given:
        base = Path(given).expanduser().absolute()
        return StateDir(base, *(base / name for name in SUBFOLDERS))
    return StateDir(ROOT / "server_training", *(ROOT / name for name in SUBFOLDERS))


def add_option(parser: argparse.ArgumentParser, default: Any = None) -> None:
    """The one ``--state-dir`` flag, with the same meaning and help in every command
    (``default=argparse.SUPPRESS`` on a subcommand, so that it does not undo the command's)."""
    parser.add_argument(
        "--state-dir", type=Path, default=default, metavar="DIR",
        help=f"the run's state directory: the server's database, checkpoints and secrets, with "
             f"eval/, devices/ and runs/ inside (default: ${STATE_DIR_ENV}, else the checkout's "
             "server_training/, eval/, devices/ and runs/)")
