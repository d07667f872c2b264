"""``POST /api/predict``: classify uploaded pictures with the latest trained global model.

Any valid token may call it (the admin token, or any enrolled device's): decoding pictures
and running the network costs the server CPU and memory, so it is not open to anonymous
callers, yet a device or a demo app holding a device token can use what the federation
learned. Pictures go through the network's own ``image_to_input`` (grey 28x28 for Fashion-MNIST,
colour 32x32 for CIFAR-10; :mod:`fedhub.frameworks.images`) and its own preprocessing, the one
used in training, never a second copy of it. Each answer carries the picture the network
classified (``input_png``), so a person can see what the crop and the background
normalisation made of a photo before trusting the answer.
"""

from __future__ import annotations

import base64
import io
from typing import Any

import numpy as np
from flask import Blueprint, current_app, jsonify, request
from werkzeug.datastructures import FileStorage

from fedhub.engine.errors import Conflict, InvalidInput

from .auth import require_device_or_admin
from .context import engine
from .inputs import body_limit

bp = Blueprint("predict", __name__)

# The field name, and the one the original tool used.
FIELDS = ("image", "imageFile")
MAX_IMAGES = 32


def _uploads() -> list[tuple[str, FileStorage]]:
    """The uploaded files in request order, with the field each came in."""
    if request.mimetype != "multipart/form-data":
        raise InvalidInput("send the picture as multipart/form-data in a file field named 'image'",
                           "image")
    files = [(key, f) for key, f in request.files.items(multi=True) if key in FIELDS]
    if not files:
        raise InvalidInput("no picture: add a file field named 'image' (or 'imageFile')", "image")
    if len(files) > MAX_IMAGES:
        raise InvalidInput(f"at most {MAX_IMAGES} pictures per request, got {len(files)}", "image")
    return files


def _decode(files: list[tuple[str, FileStorage]], predictor: Any) -> np.ndarray:
    """All pictures as one uint8 batch ((N, 28, 28) or (N, 32, 32, 3)); any bad one refuses the
    whole request."""
    from fedhub.frameworks.images import ImageError

    arrays = []
    for number, (field, upload) in enumerate(files, start=1):
        which = f"picture {number}" + (f" ({upload.filename})" if upload.filename else "")
        data = upload.read()
        if not data:
            raise InvalidInput(f"{which} is an empty file", field)
        try:
            arrays.append(predictor.image_to_input(data))
        except ImageError as exc:
            raise InvalidInput(f"{which}: {exc}", field) from None
    return np.stack(arrays)


def _png(image: np.ndarray) -> str:
    """A uint8 (28, 28) grey or (32, 32, 3) colour picture as a base64 PNG (about 1 KB): what
    the network was given."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image, mode="L" if image.ndim == 2 else "RGB").save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@bp.post("/api/predict")
def predict():
    require_device_or_admin()
    # Pictures get their own body limit, far below the one for model updates.
    with body_limit(current_app.config["FEDHUB_MAX_IMAGE_BYTES"],
                    "the pictures' request (server option --max-image-mb)"):
        files = _uploads()
    predictor = current_app.extensions.get("fedhub_predictor")
    if predictor is None:
        raise Conflict("this server does not predict: classifying pictures needs one of FedHub's "
                       "built-in networks (--model basic, cnn or cifar) or a PyTorch module of your "
                       "own, not a Keras model of your own", "model")
    batch = _decode(files, predictor)
    class_names = predictor.class_names
    version, probabilities = predictor.predict(batch, *engine().global_weights())
    answers: list[dict[str, Any]] = []
    for (_, upload), probs, image in zip(files, probabilities, batch, strict=True):
        index = int(np.argmax(probs))
        answers.append({
            "filename": upload.filename or None,
            "class_index": index,
            "class_name": class_names[index],
            "probabilities": [float(p) for p in probs],
            "class_names": list(class_names),  # labels for the probabilities, in order
            "model_version": version,
            "round": version,
            "input_png": _png(image),
        })
    return jsonify(answers[0] if len(answers) == 1 else answers)
