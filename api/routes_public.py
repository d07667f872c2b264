"""Read-only views for people and dashboards: status, devices, history. No secrets in them."""

from __future__ import annotations

from flask import Blueprint, current_app, jsonify

bp = Blueprint("public", __name__)


def _engine():
    return current_app.extensions["fedhub"]


@bp.get("/health")
def health():
    return jsonify({"ok": True})


@bp.get("/api/status")
def status():
    engine = _engine()
    devices = engine.devices.list()
    counts: dict[str, int] = {}
    for d in devices:
        counts[d["state"]] = counts.get(d["state"], 0) + 1
    return jsonify({**engine.status(), "devices": counts})


@bp.get("/api/devices")
def devices():
    engine = _engine()
    latest: dict[str, dict] = {}
    for r in engine.history():
        for name, metrics in r["devices"].items():
            latest[name] = {"round": r["round"], **metrics}
    rows = engine.devices.list()
    for row in rows:
        row["latest"] = latest.get(row["name"])
    return jsonify({"devices": rows})


@bp.get("/api/history")
def history():
    return jsonify({"rounds": _engine().history()})
