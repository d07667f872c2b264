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
    engine().set_active(name, True)
    return jsonify({"name": name, "active": True})


@bp.post("/api/devices/<name>/deactivate")
def deactivate(name: str):
    require_admin()
    engine().set_active(name, False)
    return jsonify({"name": name, "active": False})


@bp.post("/api/devices/<name>/interrupt")
def interrupt(name: str):
    """Stop one device's local training now; the round goes on without it."""
    require_admin()
    return jsonify(engine().interrupt(name))


@bp.post("/api/training/start")
def start():
    require_admin()
    data = json_body(optional=True)
    engine().start_training(data.get("rounds"))
    return jsonify(engine().status())


@bp.post("/api/training/pause")
def pause():
    require_admin()
    engine().pause()
    return jsonify(engine().status())


@bp.post("/api/training/resume")
def resume():
    require_admin()
    engine().start_training()
    return jsonify(engine().status())


@bp.post("/api/training/reset")
def reset():
    require_admin()
    engine().reset()
    return jsonify(engine().status())
