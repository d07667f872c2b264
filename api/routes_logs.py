"""Device logs: devices send structured lines; admins read them back by device, level and round.

Reading needs the admin token: log messages are free text from devices and may
name hosts, paths or people, unlike the aggregate public views.
"""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify, request

from fedcore.device_logs import query_args
from fedcore.errors import InvalidInput

from .auth import require_admin, require_device

bp = Blueprint("logs", __name__)


def _engine():
    return current_app.extensions["fedhub"]


@bp.post("/api/devices/<name>/logs")
def add(name: str):
    """A JSON list of {level, message, time, round}; an ERROR for the open round drops the device."""
    require_device(name)
    if not request.is_json:
        raise InvalidInput("body must be JSON (Content-Type: application/json)", "Content-Type")
    return jsonify(_engine().add_logs(name, request.get_json(silent=True)))


@bp.get("/api/logs")
def query():
    require_admin()
    a = request.args
    filters = query_args(a.get("device"), a.get("level"), a.get("round"), a.get("after"), a.get("limit"))
    logs = _engine().logs.query(**filters)
    return jsonify({"logs": logs, "next_after": logs[-1]["id"] if logs else filters["after"]})
