"""Where the checkout's top-level layout lies, beside the ``fedhub`` package.

The user's layout stays at the top of the repository: the entry points (``server.py``,
``device/device.py``, ``dashboard/index.py``), the static page (``dashboard_stats/``) and the
run-time folders (``server_training/``, ``eval/``, ``devices/``). Code that needs one of them
asks here, so the package knows its place in one line.
"""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
