"""The Flask application factory: a fresh app per call, so tests get their own."""

from __future__ import annotations

from flask import Flask

from fedcore.rounds import Coordinator

from . import routes_admin, routes_device, routes_public
from .errors import register_error_handlers

# Room for the safetensors header and metadata above the tensors themselves.
BODY_SLACK = 1024 * 1024


def build_app(engine: Coordinator, *, admin_token: str, max_wait: float = 30.0) -> Flask:
    """Wrap a running engine in HTTP. ``server.create_app`` builds the engine for you."""
    app = Flask("fedhub")
    app.config.update(
        FEDHUB_ADMIN_TOKEN=admin_token,
        FEDHUB_MAX_WAIT=max_wait,
        MAX_CONTENT_LENGTH=engine.max_upload_bytes + BODY_SLACK,
        JSON_SORT_KEYS=False,
    )
    app.extensions["fedhub"] = engine
    register_error_handlers(app)
    for module in (routes_public, routes_device, routes_admin):
        app.register_blueprint(module.bp)
    return app
