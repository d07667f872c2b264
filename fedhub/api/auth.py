"""Who is calling: a device (its own token) or an admin (the admin token).

Every credential check runs inside :func:`counted`: a valid credential is always served, and a
wrong one from an address that sent too many is answered 429 (``fedhub/api/throttle.py`` says why that
order, and what keeps guessing useless).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from flask import current_app, request

from fedhub.engine import auth
from fedhub.engine.errors import Forbidden, Unauthorized

from .context import engine
from .throttle import FailureLimiter


def bearer_token() -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


def is_admin(token: str | None) -> bool:
    return token is not None and auth.secret_matches(token, current_app.config["FEDHUB_ADMIN_TOKEN"])


@contextlib.contextmanager
def counted(presented: bool) -> Iterator[None]:
    """Check credentials inside: a wrong credential that was ``presented`` (not merely missing)
    spends one of the client's failures, or is answered 429 when none is left. A right one is
    served whatever the client's failures: one client's guesses must not lock out the others
    that share its address (a NAT, a reverse proxy, a local simulation)."""
    limiter: FailureLimiter = current_app.extensions["fedhub_failures"]
    try:
        yield
    except (Unauthorized, Forbidden) as exc:
        if presented:
            limiter.failed(request.remote_addr or "", exc.field)
        raise


def require_device(name: str | None = None) -> str:
    """The calling device's name; with ``name``, the caller must be that device."""
    token = bearer_token()
    with counted(token is not None):
        caller = engine().authenticate(token)
    if name is not None and caller != name:
        raise Forbidden("this token belongs to another device", "Authorization")
    return caller


def require_admin() -> None:
    token = bearer_token()
    with counted(token is not None):
        if token is None:
            raise Unauthorized("missing admin token (Authorization: Bearer <token>)", "Authorization")
        if not is_admin(token):
            raise Forbidden("control calls need the admin token", "Authorization")


def require_device_or_admin() -> None:
    token = bearer_token()
    with counted(token is not None):
        if not is_admin(token):
            engine().authenticate(token)
