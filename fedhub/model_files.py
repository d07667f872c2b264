"""Models travel as ``.keras`` files, so every process names their weights the same way.

Weights are exchanged by ``variable.path``. A model built in code gets paths
from the order models were built in that process (``dense`` or ``dense_3``),
while a model loaded from a file gets them from the file. So the server and
every device load the model from one ``.keras`` file and agree on every name.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import keras

from fedhub.engine.files import atomic_path


def save_model(model: keras.Model, path: str | Path) -> Path:
    """Write ``model`` (architecture, weights, compile settings) to ``path`` atomically."""
    path = Path(path)
    with atomic_path(path) as tmp:
        model.save(tmp)
    return path


def load_model(path: str | Path) -> keras.Model:
    """Load a ``.keras`` file without running any code from it (``safe_mode=True``).

    Keras warns ("Skipping variable loading for optimizer ...") when the file's optimizer
    state and the rebuilt optimizer differ in size, as for a compiled model not yet trained.
    FedHub exchanges weights only, never optimizer state, so the warning says nothing to a
    user and is not shown."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
        return keras.saving.load_model(Path(path), safe_mode=True)


def portable(model: keras.Model, path: str | Path) -> keras.Model:
    """Save ``model`` to ``path`` and return the copy loaded back: the names every peer will use."""
    return load_model(save_model(model, path))
