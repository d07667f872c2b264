"""Read-only views for people and dashboards: status, devices, history. No secrets in them."""

from __future__ import annotations

from flask import Blueprint, jsonify

from .context import engine

bp = Blueprint("public", __name__)



@bp.get("/health")
def health():
    return jsonify({"ok": True})


@bp.get("/api/status")
def status():
    return jsonify(engine().status())


@bp.get("/api/devices")
def devices():
    return jsonify({"devices": engine().list_devices()})


@bp.get("/api/history")
def history():
    fed = engine()
    return jsonify({"rounds": fed.history(), "failures": fed.round_failures()})
