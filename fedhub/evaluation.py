"""Test a model (typically the final global one) on held-out arrays."""

from __future__ import annotations

from typing import Any

import numpy as np

from fedhub.engine.errors import InvalidInput


def evaluate(model: Any, x: np.ndarray, y: np.ndarray, *, batch_size: int = 512) -> dict[str, Any]:
    """Loss, accuracy, per-class accuracy and confusion matrix of a Keras classifier on ``x, y``.

    The same computation as the server's per-round test metrics and its
    ``POST /api/rounds/<n>/validate``. ``y`` holds integer class labels; ``loss``
    is the model's compiled loss (None if it is not compiled). Raises ValueError
    when the arrays do not fit the model.
    """
    from fedhub.global_model import check_labelled, evaluate_classifier

    try:
        inputs, labels = check_labelled(model, x, y, limit=None)
    except InvalidInput as exc:
        raise ValueError(f"{exc.field}: {exc.message}") from None
    return evaluate_classifier(model, inputs, labels, batch_size=batch_size)
