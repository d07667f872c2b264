"""The relay's HTTP routes: a device's update and a secure round's masked update (summed here or
passed on), the relay's own status, and every other request passed on to the server as it came."""

from __future__ import annotations

from flask import Flask, Response, jsonify, request

from fedhub.api.app import built_alone
from fedhub.api.errors import register_error_handlers
from fedhub.engine.wire import DEFAULT_MAX_BYTES

from .service import Forwarded, Relay

BODY_SLACK = 1024 * 1024
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE"]


def create_relay_app(relay: Relay, *, max_body_bytes: int = DEFAULT_MAX_BYTES + BODY_SLACK) -> Flask:
    """The relay's Flask app (a fresh one per call)."""
    return built_alone(lambda: _build(relay, max_body_bytes))


def _build(relay: Relay, max_body_bytes: int) -> Flask:
    app = Flask("fedhub-relay")
    app.config.update(MAX_CONTENT_LENGTH=max_body_bytes, JSON_SORT_KEYS=False)
    register_error_handlers(app)

    def _answer(result: Forwarded | dict) -> Response:
        if isinstance(result, dict):
            return jsonify(result)
        response = Response(result.body, status=result.status)
        for key, value in result.headers.items():
            response.headers[key] = value
        return response

    @app.get("/relay/status")
    def status():
        """What this relay holds and has sent; no token, no secrets (as the server's status)."""
        return jsonify(relay.sums.view())

    @app.post("/api/devices/<name>/updates/<int:round_number>")
    def update(name: str, round_number: int):
        body = request.get_data(cache=False)
        return _answer(relay.update(name, round_number, request.headers, body,
                                    request.query_string.decode("latin-1")))

    @app.post("/api/devices/<name>/secagg/<int:round_number>")
    def secagg(name: str, round_number: int):
        body = request.get_data(cache=False)
        return _answer(relay.secagg(name, round_number, request.headers, body,
                                    request.query_string.decode("latin-1")))

    @app.route("/", defaults={"path": ""}, methods=METHODS)
    @app.route("/<path:path>", methods=METHODS)
    def forward(path: str):
        body = request.get_data(cache=False)
        return _answer(relay.forward(request.method, "/" + path,
                                     request.query_string.decode("latin-1"), request.headers, body))

    return app
