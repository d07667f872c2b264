"""The Flask application factory: a fresh app per call, so tests get their own."""

from __future__ import annotations

import threading
from collections.abc import Callable

from flask import Flask

from fedhub.engine.rounds import Coordinator

from . import (
    routes_admin,
    routes_device,
    routes_logs,
    routes_models,
    routes_openapi,
    routes_predict,
    routes_public,
    routes_relay,
    routes_runs,
    routes_stats,
)
from .errors import register_error_handlers
from .predictor import Predictor
from .throttle import FAILURES_PER_MINUTE, FailureLimiter

# Room for the safetensors header and metadata above the tensors themselves.
BODY_SLACK = 1024 * 1024
# POST /api/predict's own body limit: pictures, not model updates.
MAX_IMAGE_BYTES = 16 * 1024 * 1024
# Longest long poll (GET /api/devices/<name>/task?wait=S) a device may ask for, in seconds.
MAX_WAIT = 30.0
# Werkzeug compiles each route with the ast module, whose C side CPython 3.11 keeps one recursion
# counter for across threads (python/cpython#106905): an app is built while another thread parses
# too (numpy reading a header, inspect.signature, another app) may fail with a spurious
# "SystemError: AST constructor recursion depth mismatch". Apps are built one at a time, and a build
# that met the spurious error is built again from scratch.
_ROUTES_LOCK = threading.Lock()
SPURIOUS_AST_ERROR = "AST constructor recursion depth mismatch"
BUILD_TRIES = 5


def built_alone(build: Callable[[], Flask]) -> Flask:
    """Run ``build`` (which makes a fresh Flask app and touches nothing else) under the routes lock,
    again while CPython's spurious AST error interrupts it."""
    with _ROUTES_LOCK:
        for attempt in range(BUILD_TRIES):
            try:
                return build()
            except SystemError as error:
                if SPURIOUS_AST_ERROR not in str(error) or attempt == BUILD_TRIES - 1:
                    raise
    raise AssertionError("unreachable")


def build_app(engine: Coordinator, *, admin_token: str, max_wait: float = MAX_WAIT,
              predictor: Predictor | None = None, max_image_bytes: int = MAX_IMAGE_BYTES,
              auth_failures_per_minute: int = FAILURES_PER_MINUTE) -> Flask:
    """Wrap a running engine in HTTP. ``server.create_app`` builds the engine for you.

    Without a ``predictor`` (hooked to the engine's rounds), ``/api/predict`` answers 409.
    A client address that sends more than ``auth_failures_per_minute`` wrong credentials is
    answered 429 for a while (0: no limit; see ``fedhub/api/throttle.py``).
    """
    return built_alone(lambda: _build(engine, admin_token, max_wait, predictor, max_image_bytes,
                                      auth_failures_per_minute))


def _build(engine: Coordinator, admin_token: str, max_wait: float, predictor: Predictor | None,
           max_image_bytes: int, auth_failures_per_minute: int) -> Flask:
    app = Flask("fedhub")
    app.config.update(
        FEDHUB_ADMIN_TOKEN=admin_token,
        FEDHUB_MAX_WAIT=max_wait,
        FEDHUB_MAX_IMAGE_BYTES=max_image_bytes,
        MAX_CONTENT_LENGTH=engine.max_upload_bytes + BODY_SLACK,
        JSON_SORT_KEYS=False,
    )
    app.extensions["fedhub"] = engine
    app.extensions["fedhub_predictor"] = predictor
    app.extensions["fedhub_failures"] = FailureLimiter(auth_failures_per_minute)
    register_error_handlers(app)
    for module in (routes_public, routes_device, routes_admin, routes_predict, routes_stats,
                   routes_logs, routes_models, routes_runs, routes_relay, routes_openapi):
        app.register_blueprint(module.bp)
    return app
