"""What relays call: enroll, and send a partial sum of their devices' updates."""

from __future__ import annotations

from flask import Blueprint, jsonify, request

from fedhub.engine.partials import MAX_HEADER_BYTES

from .auth import bearer_token, counted, is_admin
from .context import engine
from .inputs import binary_body, body_limit, json_body

bp = Blueprint("relay", __name__)


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
    token = bearer_token()
    with counted(token is not None):
        engine().authenticate_relay(token, name)
    with body_limit(2 * engine().max_upload_bytes + MAX_HEADER_BYTES, "the partial sum"):
        body = binary_body()
    return jsonify(engine().submit_partial(name, round_number, body,
                                           request.headers.get("Idempotency-Key")))
