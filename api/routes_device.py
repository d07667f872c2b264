"""What devices call: enroll, ask for a task, download the model, upload an update, leave."""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify, request

from .auth import require_device, require_device_or_admin
from .inputs import binary_body, float_arg, json_body

bp = Blueprint("device", __name__)


def _engine():
    return current_app.extensions["fedhub"]


@bp.post("/api/devices/register")
def register():
    data = json_body()
    secret = request.headers.get("X-Enroll-Secret") or data.get("enroll_secret")
    result = _engine().devices.register(
        data.get("name"), secret, num_examples=data.get("num_examples"),
        auto_activate=data.get("auto_activate"))
    return jsonify(result), 201


@bp.get("/api/devices/<name>/task")
def task(name: str):
    require_device(name)
    wait = float_arg("wait", 0.0, 0.0, current_app.config["FEDHUB_MAX_WAIT"])
    return jsonify(_engine().next_task(name, wait))


@bp.get("/api/model")
def model():
    require_device_or_admin()
    version, body = _engine().global_model()
    etag = f"v{version}"
    if etag in request.if_none_match:
        response = Response(status=304)
    else:
        response = Response(body, mimetype="application/octet-stream")
    response.set_etag(etag)
    response.headers["X-Model-Version"] = str(version)
    return response


@bp.post("/api/devices/<name>/updates/<int:round_number>")
def upload(name: str, round_number: int):
    require_device(name)
    engine = _engine()
    engine.devices.set_activity(name, "uploading")
    try:
        body = binary_body()
        result = engine.submit(name, round_number, body, request.headers.get("Idempotency-Key"))
    finally:
        engine.devices.set_activity(name, "idle")
    return jsonify(result)


@bp.post("/api/devices/<name>/leave")
def leave(name: str):
    require_device(name)
    _engine().leave(name)
    return jsonify({"left": True})
