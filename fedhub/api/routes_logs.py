"""Device logs: devices send structured lines; admins read them back by device, level and round.

Reading needs the admin token: log messages are free text from devices and may
name hosts, paths or people, unlike the aggregate public views.
"""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from fedhub.engine.device_logs import MAX_BATCH, MAX_MESSAGE_CHARS, MAX_QUERY

from .auth import require_admin, require_device
from .context import engine
from .inputs import int_arg, json_body

bp = Blueprint("logs", __name__)
# A line at its longest, every character escaped as \\uXXXX, with room for the rest; a full batch.
MAX_LOG_LINE_BYTES = 6 * MAX_MESSAGE_CHARS + 256
MAX_LOG_BODY_BYTES = MAX_BATCH * MAX_LOG_LINE_BYTES


@bp.post("/api/devices/<name>/logs")
def add(name: str):
    """A JSON list of {level, message, time, round}; an ERROR for the open round drops the device."""
    require_device(name)
    return jsonify(engine().add_logs(name, json_body(kind=list, max_bytes=MAX_LOG_BODY_BYTES)))


@bp.get("/api/logs")
def query():
    require_admin()
    after = int_arg("after", 0, 0, 2**62)
    return jsonify(engine().query_logs(
        device=request.args.get("device") or None, level=request.args.get("level") or None,
        round_number=int_arg("round", None, 0, 2**31), after=after,
        limit=int_arg("limit", 500, 1, MAX_QUERY)))
