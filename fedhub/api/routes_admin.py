"""Control calls: activate or interrupt devices, start, pause and reset training. Admin token only."""

from __future__ import annotations

from flask import Blueprint, jsonify

from .auth import require_admin
from .context import engine
from .inputs import json_body

bp = Blueprint("admin", __name__)



@bp.post("/api/devices/<name>/activate")
def activate(name: str):
    require_admin()
    return jsonify(engine().set_active(name, True))


@bp.post("/api/devices/<name>/deactivate")
def deactivate(name: str):
    require_admin()
    return jsonify(engine().set_active(name, False))


@bp.post("/api/devices/<name>/interrupt")
def interrupt(name: str):
    """Stop one device's local training now; the round goes on without it."""
    require_admin()
    return jsonify(engine().interrupt(name))


@bp.post("/api/training/start")
def start():
    require_admin()
    data = json_body(optional=True)
    return jsonify(engine().start_training(data.get("rounds")))


@bp.post("/api/training/pause")
def pause():
    require_admin()
    return jsonify(engine().pause())


@bp.post("/api/training/resume")
def resume():
    require_admin()
    return jsonify(engine().start_training())


@bp.post("/api/training/reset")
def reset():
    require_admin()
    return jsonify(engine().reset())
