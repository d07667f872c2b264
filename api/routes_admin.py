"""Control calls: activate or interrupt devices, start, pause and reset training. Admin token only."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify

from .auth import require_admin
from .inputs import json_body

bp = Blueprint("admin", __name__)


def _engine():
    return current_app.extensions["fedhub"]


@bp.post("/api/devices/<name>/activate")
def activate(name: str):
    require_admin()
    _engine().set_active(name, True)
    return jsonify({"name": name, "active": True})


@bp.post("/api/devices/<name>/deactivate")
def deactivate(name: str):
    require_admin()
    _engine().set_active(name, False)
    return jsonify({"name": name, "active": False})


@bp.post("/api/devices/<name>/interrupt")
def interrupt(name: str):
    """Stop one device's local training now; the round goes on without it."""
    require_admin()
    return jsonify(_engine().interrupt(name))


@bp.post("/api/training/start")
def start():
    require_admin()
    data = json_body(optional=True)
    _engine().start_training(data.get("rounds"))
    return jsonify(_engine().status())


@bp.post("/api/training/pause")
def pause():
    require_admin()
    _engine().pause()
    return jsonify(_engine().status())


@bp.post("/api/training/resume")
def resume():
    require_admin()
    _engine().start_training()
    return jsonify(_engine().status())


@bp.post("/api/training/reset")
def reset():
    require_admin()
    _engine().reset()
    return jsonify(_engine().status())
