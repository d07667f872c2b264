"""Every error answers JSON: {"error": code, "field": ..., "message": ...}."""

from __future__ import annotations

import logging
from typing import Any

from flask import Flask, jsonify
from werkzeug.exceptions import HTTPException

from fedhub.engine.errors import (
    Conflict,
    FedHubError,
    Forbidden,
    InvalidInput,
    NotFound,
    TooLarge,
    Unauthorized,
)

from .throttle import TooManyFailures

log = logging.getLogger("fedhub.api")

STATUS = {
    TooLarge: 413,
    InvalidInput: 400,
    Unauthorized: 401,
    Forbidden: 403,
    NotFound: 404,
    Conflict: 409,
    TooManyFailures: 429,
}


def status_of(exc: FedHubError) -> int:
    for cls in type(exc).__mro__:
        if cls in STATUS:
            return STATUS[cls]
    return 400


def error_body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    """The one shape of every error, from the app or from the HTTP server before it (serving.py)."""
    return {"error": code, "field": field, "message": message}


def error_response(code: str, message: str, status: int, field: str | None = None):
    response = jsonify(error_body(code, message, field))
    response.status_code = status
    if status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="fedhub"'
    return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(FedHubError)
    def _engine_error(exc: FedHubError):
        response = error_response(exc.code, exc.message, status_of(exc), exc.field)
        if isinstance(exc, TooManyFailures):
            response.headers["Retry-After"] = str(exc.retry_after)
        return response

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        code = (exc.name or "error").lower().replace(" ", "_")
        field = "body" if exc.code in (408, 413) else None  # 408: a body too slow (fedhub/api/serving.py)
        response = error_response(code, exc.description or exc.name, exc.code or 500, field)
        # Keep Werkzeug's own headers, such as the Allow a 405 must carry (RFC 9110), but not its
        # HTML Content-Type: the body is JSON.
        for key, value in exc.get_headers():
            if key.lower() != "content-type":
                response.headers[key] = value
        return response

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        # The details go to the server log only: they may hold paths or secrets.
        log.exception("unhandled error")
        return error_response("internal_error", "internal server error", 500)
