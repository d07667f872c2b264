"""What relays call: enroll, and for their devices, each with its own token, in one request
each: ask their tasks, send their reports (evaluations, log lines), a partial sum of their
updates, and in a secure round the sum of their masked updates."""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from fedhub.engine.partials import MAX_HEADER_BYTES
from fedhub.engine.relays import MAX_REPORT_LINES
from fedhub.engine.secagg.messages import MAX_SUM_HEADER

from .auth import bearer_token, counted, is_admin
from .context import engine
from .inputs import binary_body, body_limit, json_body
from .routes_logs import MAX_LOG_LINE_BYTES

bp = Blueprint("relay", __name__)
# the lines at their longest, and room for 256 devices' names, tokens and evaluations
MAX_REPORT_BYTES = MAX_REPORT_LINES * MAX_LOG_LINE_BYTES + 512 * 1024
MAX_TASKS_BYTES = 256 * 1024  # 256 devices' names and tokens


@bp.post("/api/relays/register")
def register():
    """Enroll a relay with the enrollment secret; an enrolled name also needs its token or the admin's."""
    header_secret = request.headers.get("X-Enroll-Secret")
    token = bearer_token()
    with counted(header_secret is not None):
        if header_secret is not None:
            engine().check_enroll_secret(header_secret)
    data = json_body()
    secret = header_secret or data.get("enroll_secret")
    with counted(secret is not None or token is not None):
        result = engine().register_relay(data.get("name"), secret, token=token, admin=is_admin(token))
    return jsonify(result), 201


@bp.post("/api/relays/<name>/partials/<int:round_number>")
def partial(name: str, round_number: int):
    """A relay's partial sum (float64 safetensors; its devices in the metadata)."""
    _authenticate(name)
    with body_limit(2 * engine().max_upload_bytes + MAX_HEADER_BYTES, "the partial sum"):
        body = binary_body()
    return jsonify(engine().submit_partial(name, round_number, body,
                                           request.headers.get("Idempotency-Key")))


@bp.post("/api/relays/<name>/secagg/<int:round_number>")
def masked_sum(name: str, round_number: int):
    """A relay's sum of its devices' masked updates in a secure round (safetensors; its devices
    in the metadata)."""
    _authenticate(name)
    with body_limit(2 * engine().max_upload_bytes + MAX_SUM_HEADER, "the masked sum"):
        body = binary_body()
    return jsonify(engine().submit_masked_sum(name, round_number, body))


@bp.post("/api/relays/<name>/tasks")
def tasks(name: str):
    """Its devices' tasks, each as the device's own ``GET .../task`` without waiting answers it."""
    _authenticate(name)
    return jsonify(engine().relay_tasks(name, json_body(max_bytes=MAX_TASKS_BYTES)))


@bp.post("/api/relays/<name>/reports")
def reports(name: str):
    """Its devices' evaluation reports and log lines, as each device's own requests would carry them."""
    _authenticate(name)
    return jsonify(engine().relay_reports(name, json_body(max_bytes=MAX_REPORT_BYTES)))


def _authenticate(name: str) -> None:
    """The request's bearer token is relay ``name``'s (a wrong one counts toward the throttle)."""
    token = bearer_token()
    with counted(token is not None):
        engine().authenticate_relay(token, name)
