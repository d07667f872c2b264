"""Who is calling: a device (its own token) or an admin (the admin token)."""

from __future__ import annotations

from flask import current_app, request

from fedcore import auth
from fedcore.errors import Forbidden, Unauthorized

from .context import engine


def bearer_token() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def require_device(name: str | None = None) -> str:
    """The calling device's name; with ``name``, the caller must be that device."""
    caller = engine().authenticate(bearer_token())
    if name is not None and caller != name:
        raise Forbidden("this token belongs to another device", "Authorization")
    return caller


def require_admin() -> None:
    token = bearer_token()
    if token is None:
        raise Unauthorized("missing admin token (Authorization: Bearer <token>)", "Authorization")
    if not auth.secret_matches(token, current_app.config["FEDHUB_ADMIN_TOKEN"]):
        raise Forbidden("control calls need the admin token", "Authorization")


def require_device_or_admin() -> None:
    token = bearer_token()
    if token is not None and auth.secret_matches(token, current_app.config["FEDHUB_ADMIN_TOKEN"]):
        return
    require_device()
