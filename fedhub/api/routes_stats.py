"""The live accuracy page: ``dashboard_stats/`` served at ``/stats/``, and CORS for what it reads.

The page is static; its script polls the public read-only endpoints. Opened as a file with
``?server=URL`` it reads them cross-origin, so those GET routes (and only those) answer with
``Access-Control-Allow-Origin: *``: they are public already and hold no secrets, and
no credentials are ever sent cross-origin.
"""

from __future__ import annotations

from pathlib import Path

from flask import Blueprint, Response, request, send_from_directory

from fedhub.checkout import ROOT
from fedhub.engine.errors import NotFound

STATS_DIR = ROOT / "dashboard_stats"
ASSET_SUFFIXES = {".html", ".js", ".css", ".md", ".png", ".svg"}
CROSS_ORIGIN_READS = {"public.health", "public.status", "public.devices", "public.history",
                      "runs.list_runs", "runs.show_run"}
# Defence in depth: no inline script, no eval, no plugins; data may come from any server.
CONTENT_SECURITY_POLICY = ("default-src 'self'; script-src 'self'; style-src 'self'; "
                           "img-src 'self' data:; connect-src 'self' http: https:; "
                           "object-src 'none'; base-uri 'none'; frame-ancestors 'none'")

bp = Blueprint("stats", __name__)


def _send(asset: str) -> Response:
    if Path(asset).suffix not in ASSET_SUFFIXES:
        raise NotFound(f"no asset {asset!r} on the stats page", "asset")
    response = send_from_directory(STATS_DIR, asset)  # safe_join: no way out of the folder
    response.headers["Content-Security-Policy"] = CONTENT_SECURITY_POLICY
    response.headers["X-Content-Type-Options"] = "nosniff"
    return response


@bp.get("/stats/")
def page() -> Response:
    """``/stats`` redirects here, so the page's relative asset links work as they do from a file."""
    return _send("index.html")


@bp.get("/stats/<path:asset>")
def asset(asset: str) -> Response:
    return _send(asset)


@bp.after_app_request
def allow_cross_origin_reads(response: Response) -> Response:
    if request.method in ("GET", "HEAD") and request.endpoint in CROSS_ORIGIN_READS:
        response.headers["Access-Control-Allow-Origin"] = "*"
    return response
