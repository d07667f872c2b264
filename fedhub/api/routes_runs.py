"""A state directory's runs: list and read them (public, as the history is); start a new run
and delete an old one (admin). Each route calls one engine method."""

from __future__ import annotations

from flask import Blueprint, jsonify

from fedhub.engine.errors import InvalidInput

from .auth import require_admin
from .context import engine
from .inputs import json_body

bp = Blueprint("runs", __name__)

# A new run's body: a name and a few dozen settings; the strategy's parameters are the largest.
MAX_RUN_BODY = 16 * 1024


@bp.get("/api/runs")
def list_runs():
    """Every run, newest first: id, name, status, rounds, settings."""
    return jsonify(engine().list_runs())


@bp.get("/api/runs/<run>")
def show_run(run: str):
    """One run (by id or name) with its settings and history."""
    return jsonify(engine().run(run))


@bp.post("/api/runs")
def start_run():
    """Admin: start a new run now with the current settings and the body's ``settings`` over them."""
    require_admin()
    data = json_body(optional=True, max_bytes=MAX_RUN_BODY)
    unknown = set(data) - {"name", "settings"}
    if unknown:
        field = sorted(unknown)[0]
        raise InvalidInput(f"unknown field {field!r}: a new run takes name and settings", field)
    return jsonify(engine().start_run(data.get("name"), data.get("settings"))), 201


@bp.delete("/api/runs/<run>")
def delete_run(run: str):
    """Admin: remove a run that is not the current one, with its rows and files."""
    require_admin()
    return jsonify(engine().delete_run(run))
