"""The engine behind the app handling the current request (``build_app`` puts it there)."""

from __future__ import annotations

from flask import current_app

from fedhub.engine.rounds import Coordinator


def engine() -> Coordinator:
    return current_app.extensions["fedhub"]
