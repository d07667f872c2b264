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
    fed = engine()
    devices = fed.devices.list()
    counts: dict[str, int] = {}
    for d in devices:
        counts[d["state"]] = counts.get(d["state"], 0) + 1
    return jsonify({**fed.status(), "devices": counts})


@bp.get("/api/devices")
def devices():
    fed = engine()
    latest: dict[str, dict] = {}
    for r in fed.history():
        for name, metrics in r["devices"].items():
            latest[name] = {"round": r["round"], **metrics}
    rows = fed.devices.list()
    for row in rows:
        row["latest"] = latest.get(row["name"])
    return jsonify({"devices": rows})


@bp.get("/api/history")
def history():
    return jsonify({"rounds": engine().history()})
