"""``GET /openapi.json``: the OpenAPI 3.1 description of the whole HTTP API.

The description is a checked-in data file (``fedhub/api/openapi.json``) rather than something
generated from the routes, so it can say what the code cannot tell (schemas of bodies and
answers, who may call what); ``tests/test_openapi.py`` keeps it true against ``app.url_map``
and, through Schemathesis, against the live server's answers.
"""

from __future__ import annotations

from functools import cache
from pathlib import Path

from flask import Blueprint, Response

SPEC_PATH = Path(__file__).with_name("openapi.json")

bp = Blueprint("openapi", __name__)


@cache
def spec_bytes() -> bytes:
    """The description as served: the file's bytes, read once (it never changes at run time)."""
    return SPEC_PATH.read_bytes()


@bp.get("/openapi.json")
def openapi() -> Response:
    return Response(spec_bytes(), mimetype="application/json")
