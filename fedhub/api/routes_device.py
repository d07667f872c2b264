"""What devices call: enroll, report data validation, ask for a task, download the model,
upload an update, report progress and poll for an interrupt while training, leave."""

from __future__ import annotations

import io

from flask import Blueprint, Response, current_app, jsonify, request
from werkzeug.wsgi import wrap_file

from fedhub.engine.secagg.codec import MAX_MESSAGE_BYTES

from .auth import bearer_token, counted, is_admin, require_device, require_device_or_admin
from .context import engine
from .inputs import binary_body, body_limit, float_arg, json_body

bp = Blueprint("device", __name__)



@bp.post("/api/devices/register")
def register():
    """Enroll with the enrollment secret; an existing name also needs its token or the admin's."""
    header_secret = request.headers.get("X-Enroll-Secret")
    token = bearer_token()
    with counted(header_secret is not None):  # before the body is read: a wrong secret costs little
        if header_secret is not None:
            engine().check_enroll_secret(header_secret)
    data = json_body()
    secret = header_secret or data.get("enroll_secret")
    with counted(secret is not None or token is not None):
        result = engine().register(
            data.get("name"), secret, num_examples=data.get("num_examples"),
            auto_activate=data.get("auto_activate"), validation=data.get("validation"),
            attack=data.get("attack"), token=token, admin=is_admin(token))
    return jsonify(result), 201


@bp.post("/api/devices/<name>/validation")
def validation(name: str):
    """The device's data validation report; invalid data means no tasks (409), with the reason."""
    require_device(name)
    data = json_body()
    return jsonify(engine().report_validation(name, data.get("validation"), attack=data.get("attack"),
                                              declares_attack="attack" in data))


@bp.get("/api/devices/<name>/signal")
def signal(name: str):
    """Polled about once a second while training: has an admin interrupted this device?"""
    require_device(name)
    return jsonify(engine().signal(name))


@bp.post("/api/devices/<name>/evaluation")
def evaluation(name: str):
    """The device's evaluation, on its held-out data, of the global model it trains from (and of
    its personal model), when its task asked for one."""
    require_device(name)
    return jsonify(engine().report_evaluation(name, json_body()))


@bp.post("/api/devices/<name>/progress")
def progress(name: str):
    """Sent at most once a second while training: batches done of the total in the open round."""
    require_device(name)
    data = json_body()
    return jsonify(engine().report_progress(name, data.get("round"), data.get("done"), data.get("total")))


@bp.post("/api/devices/<name>/interrupted")
def interrupted(name: str):
    require_device(name)
    data = json_body()
    return jsonify(engine().interrupted(name, data.get("round"), data.get("detail")))


@bp.get("/api/devices/<name>/task")
def task(name: str):
    require_device(name)
    wait = float_arg("wait", 0.0, 0.0, current_app.config["FEDHUB_MAX_WAIT"])
    return jsonify(engine().next_task(name, wait))


@bp.get("/api/model")
def model():
    require_device_or_admin()
    version, body, etag = engine().model_download(request.if_none_match)
    if body is None:  # the device holds this version
        response = Response(status=304)
    else:
        # Through the server's file wrapper: waitress then sends straight from these bytes, where
        # a plain body is first copied into a per-connection buffer (a temporary file above 64 KB).
        response = Response(wrap_file(request.environ, io.BytesIO(body)),
                            mimetype="application/octet-stream", direct_passthrough=True)
        response.content_length = len(body)
    response.set_etag(etag)
    response.headers["X-Model-Version"] = str(version)
    return response


@bp.post("/api/devices/<name>/updates/<int:round_number>")
def upload(name: str, round_number: int):
    require_device(name)
    body = binary_body()
    return jsonify(engine().submit(name, round_number, body, request.headers.get("Idempotency-Key")))


@bp.post("/api/devices/<name>/secagg/<int:round_number>")
def secagg(name: str, round_number: int):
    """A device's answer to the open secure-aggregation stage: JSON (keys, shares, unmask
    keys) or safetensors (its masked update); refused with the field and the device at fault."""
    require_device(name)
    if request.mimetype == "application/json":
        with body_limit(MAX_MESSAGE_BYTES, "the secure-aggregation message"):
            body = request.get_data(cache=False)
    else:
        body = binary_body()
    return jsonify(engine().secagg_message(name, round_number, body))


@bp.post("/api/devices/<name>/leave")
def leave(name: str):
    require_device(name)
    engine().leave(name)
    return jsonify({"left": True})
