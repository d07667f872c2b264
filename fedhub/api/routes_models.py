"""Model export, validation and test-set evaluation (after FedV's serving and validation APIs).

``GET /api/rounds/<n>/model.keras`` downloads the global model of any completed
round (``latest`` for the current one) as a file that the plain framework
loads: ``.keras`` for Keras, a ``torch.export`` program (``.pt2``) for PyTorch.
``POST /api/rounds/<n>/validate`` evaluates that model on an uploaded
labelled ``.npz`` (arrays ``x`` and ``y``), and ``GET /api/rounds/<n>/evaluation``
on the server's own test set (made once per round): loss, accuracy, per-class
accuracy and the confusion matrix. All need a device or admin token, like ``/api/model``.
"""

from __future__ import annotations

from flask import Blueprint, Response, current_app, jsonify, request

from fedhub.engine.errors import Conflict, InvalidInput, NotFound
from fedhub.engine.wire import MAX_INTEGER

from .auth import require_device_or_admin
from .context import engine

bp = Blueprint("models", __name__)
NPZ_TYPES = ("application/octet-stream", "application/x-npz", "application/zip")


def _model():
    model = current_app.extensions.get("fedhub_global_model")
    if model is None:
        raise Conflict("this server has no Keras model to export or validate with", "round")
    return model


def _round_number(round_text: str) -> int | None:
    """The round a URL names: None for ``latest``, else its number."""
    if round_text == "latest":
        return None
    if not (round_text.isascii() and round_text.isdigit()):  # isdigit() alone lets '²' through
        raise InvalidInput("round must be a round number or 'latest'", "round")
    if len(round_text) > len(str(MAX_INTEGER)):  # no round, and not even worth turning into an int
        raise NotFound(f"no round {round_text}", "round")
    return int(round_text)


@bp.get("/api/rounds/<round_text>/model.keras")
def export(round_text: str):
    require_device_or_admin()
    model = _model()
    number, weights = engine().round_weights(_round_number(round_text))
    body = model.export(weights)
    response = Response(body, mimetype="application/octet-stream")
    suffix = getattr(model, "export_suffix", ".keras")  # PyTorch: a torch.export program, .pt2
    response.headers["Content-Disposition"] = f'attachment; filename="fedhub_round_{number:05d}{suffix}"'
    response.headers["X-Model-Version"] = str(number)
    return response


@bp.post("/api/rounds/<round_text>/validate")
def validate(round_text: str):
    require_device_or_admin()
    # Keras-side module: imported only when a model is in use
    from fedhub.global_model import MAX_VALIDATE_EXAMPLES, load_npz

    model = _model()
    if request.mimetype not in NPZ_TYPES:
        raise InvalidInput("body must be an .npz file (Content-Type: application/octet-stream)",
                           "Content-Type")
    number, weights = engine().round_weights(_round_number(round_text))
    x, y = load_npz(request.get_data(cache=False), max_bytes=engine().max_upload_bytes,
                    max_examples=MAX_VALIDATE_EXAMPLES)
    return jsonify({"round": number, "model": model.name, **model.validate(weights, x, y)})


@bp.get("/api/rounds/<round_text>/evaluation")
def evaluation(round_text: str):
    require_device_or_admin()
    model = _model()
    number, metrics = engine().test_evaluation(_round_number(round_text))
    return jsonify({"round": number, "model": model.name, "class_names": model.class_names, **metrics})
