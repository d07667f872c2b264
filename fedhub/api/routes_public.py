"""Read-only views for people and dashboards: status, devices, history. No secrets in them."""

from __future__ import annotations

from typing import Any

from flask import Blueprint, current_app, jsonify, request

from fedhub.engine.devices import MAX_DEVICES_PAGE
from fedhub.engine.errors import InvalidInput

from .context import engine
from .inputs import float_arg, int_arg

bp = Blueprint("public", __name__)



@bp.get("/health")
def health():
    return jsonify({"ok": True})


@bp.get("/api/status")
def status():
    """The run; with ``wait`` and ``since`` (a ``revision`` it answered), a long poll that ends
    when the run moves on (see :meth:`fedhub.engine.rounds.Coordinator.status`)."""
    wait = float_arg("wait", 0.0, 0.0, current_app.config["FEDHUB_MAX_WAIT"])
    return jsonify({**engine().status(wait, request.args.get("since")), "network": network()})


def network() -> dict[str, Any]:
    """The run's network (:meth:`fedhub.global_model.GlobalModel.describe`): devices build it before
    their first task, dashboards name the download and show the classes. An app built without
    the server's model side (an engine alone) says what the task config says."""
    model = current_app.extensions.get("fedhub_global_model")
    if model is not None:
        return model.describe()
    training = engine().config.training
    return {"framework": training.framework, "name": training.model, "builtin": True, "dataset": None,
            "class_names": None, "image_shape": None, "export_suffix": None}


@bp.get("/api/devices")
def devices():
    """Every device, or with ``offset``/``limit`` one page, filtered by ``name`` (a part of it),
    ``lifecycle`` and ``active``; ``total`` counts the matching devices."""
    active = request.args.get("active") or None
    if active is not None and active not in ("true", "false"):
        raise InvalidInput("active must be true or false", "active")
    return jsonify(engine().devices_page(
        name=request.args.get("name") or None, lifecycle=request.args.get("lifecycle") or None,
        active=None if active is None else active == "true",
        offset=int_arg("offset", 0, 0, 2**53 - 1), limit=int_arg("limit", None, 1, MAX_DEVICES_PAGE)))


@bp.get("/api/history")
def history():
    fed = engine()
    return jsonify({"rounds": fed.history(), "failures": fed.round_failures()})
