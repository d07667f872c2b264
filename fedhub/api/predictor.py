"""The model behind ``POST /api/predict``: the latest trained global model, held in memory.

A request must never see a half-updated network, and it must not wait for one to be built.
So when a round completes (the engine's ``add_hook``), a *new* network of the run's framework
(:mod:`fedhub.frameworks`: Keras or PyTorch) is built
and loaded on the engine's round-hook thread, warmed up, and only then put in place by swapping
one reference under a lock held for an assignment. (Only while predictions are being asked
for: a run nobody predicts from does not build a network per round; the first prediction
after a pause builds it then.) A request takes that reference once and
uses it to the end: it answers with the model it started with, never a mix of two rounds,
and nothing is read from disk per call.

The framework is imported only when the first model is built, so the HTTP layer stays light
for code (and tests) that never predicts, and a PyTorch server never imports TensorFlow.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np

from fedhub.engine.errors import Conflict

if TYPE_CHECKING:
    from fedhub.frameworks.base import Network

NO_MODEL_MESSAGE = ("no trained global model yet: the first training round has not completed "
                    "(round 0 is the untrained initial model, which is not served)")


class Predictor:
    """Thread-safe holder of ``(model_version, network)`` for the global model ``model_name`` of
    ``framework``."""

    def __init__(self, model_name: str = "basic", framework: str = "keras",
                 build: Callable[[], Network] | None = None) -> None:
        """``build``: makes another network like the server's (a PyTorch module of the user's
        own: ``fedhub.global_model.GlobalModel.new_network``); else FedHub's network ``model_name``."""
        self.model_name = model_name
        self.framework = framework
        self._builder = build
        self._lock = threading.Lock()
        # (version, network, the engine's weights object it was built from)
        self._current: tuple[int, Network, Mapping[str, np.ndarray]] | None = None
        self._asked = False  # a prediction came since the last model was built
        self._spare: Network | None = None  # the network used for pictures and class names

    def _build(self) -> Network:
        if self._builder is not None:
            return self._builder()
        from fedhub import frameworks

        # seed=None: leave the global random state alone
        return frameworks.get(self.framework).build(self.model_name, seed=None)

    def _about(self) -> Network:
        current = self._current
        if current is not None:
            return current[1]
        if self._spare is None:
            self._spare = self._build()
        return self._spare

    @property
    def class_names(self) -> tuple[str, ...]:
        """The names of the classes the probabilities are for, in order."""
        return tuple(self._about().class_names)

    def image_to_input(self, source: bytes) -> np.ndarray:
        """An uploaded picture as the raw image the network takes (grey 28x28 or colour 32x32);
        ``fedhub.frameworks.images.ImageError`` when it is not a usable picture."""
        return self._about().image_to_input(source)

    @property
    def version(self) -> int | None:
        """The model version (completed round) now served, or None before any trained model."""
        current = self._current
        return None if current is None else current[0]

    def install(self, version: int, weights: Mapping[str, np.ndarray]) -> None:
        """Serve ``weights`` as model ``version`` from now on.

        Builds and warms up the new network *before* taking the lock, so requests keep being
        answered by the previous model meanwhile. Version 0 is the untrained initial model
        (what the engine has after a start or a reset): it clears the model instead, so
        predictions are refused rather than answered at random.
        """
        if version == 0:
            with self._lock:
                self._current = None
            return
        fresh = self._build()
        fresh.set_weights(weights)
        fresh.predict(np.zeros((1, *fresh.image_shape), np.uint8))  # the first call traces
        with self._lock:
            self._current = (version, fresh, weights)

    def on_round(self, entry: Mapping[str, Any], weights: Mapping[str, np.ndarray]) -> None:
        """The engine's round hook: ``entry`` is the completed round's history entry. Builds the
        new model ahead of requests only if predictions were asked for since the last one."""
        if self._asked or int(entry["round"]) == 0:
            self._asked = False
            self.install(int(entry["round"]), weights)

    def predict(self, images: np.ndarray, version: int,
                weights: Mapping[str, np.ndarray]) -> tuple[int, np.ndarray]:
        """``(model_version, probabilities (N, classes))`` for raw uint8 images (``(N, 28, 28)``,
        ``(N, 32, 32, 3)``: :meth:`image_to_input`'s), by the
        engine's current global model ``(version, weights)``.

        The round hook usually has that model built already; in the moment between a round's
        close (or a reset) and its hook, it is built here, so an answer never comes from a
        model the engine has replaced.
        """
        if version == 0:
            raise Conflict(NO_MODEL_MESSAGE, "model")
        self._asked = True
        with self._lock:
            current = self._current
        if current is None or current[2] is not weights:
            self.install(version, weights)
            with self._lock:
                current = self._current
        if current is None:
            raise Conflict(NO_MODEL_MESSAGE, "model")
        version, model, _ = current
        probabilities = model.predict(images)
        broken = [i + 1 for i, row in enumerate(probabilities) if not np.isfinite(row).all()]
        if broken:  # never NaN in a JSON answer: it is not JSON, and it is no class either
            raise Conflict(f"the global model of round {version} gives non-finite outputs (NaN or "
                           f"infinity) for picture {', '.join(map(str, broken))}; it cannot classify "
                           "it until a later round replaces it", "model")
        return version, probabilities
