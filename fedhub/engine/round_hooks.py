"""Round hooks (the predictor's reload, TensorBoard, MLflow, ``eval/history.csv``) on their own thread.

They can take seconds (building and warming up a Keras model, writing event files),
so the driver hands each completed round over and opens the next round at once.
Hooks run one round at a time, in order, each failure logged and contained.
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

log = logging.getLogger("fedhub.hooks")

RoundHook = Callable[[dict[str, Any], Mapping[str, np.ndarray]], None]


class RoundHooks:
    """``add(hook)``; ``submit(entry, weights)`` after each completed round."""

    def __init__(self) -> None:
        self._hooks: list[RoundHook] = []
        self._queue: queue.Queue[tuple[dict[str, Any], Mapping[str, np.ndarray]] | None] = queue.Queue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    def add(self, hook: RoundHook) -> None:
        """Call ``hook(history_entry, global_weights)`` after each completed round."""
        self._hooks.append(hook)

    def submit(self, entry: dict[str, Any], weights: Mapping[str, np.ndarray]) -> None:
        if not self._hooks:
            return
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name="fedhub-hooks", daemon=True)
                self._thread.start()
        self._queue.put((entry, weights))

    def idle(self) -> bool:
        """No round waits for its hooks, and none is running them."""
        return self._queue.unfinished_tasks == 0

    def drain(self) -> None:
        """Wait until every submitted round's hooks have run."""
        self._queue.join()

    def stop(self, timeout: float = 30.0) -> None:
        """Run what is queued, end the thread, then close each hook that has a ``close()`` (a
        tracker ends its run: TensorBoard's writers, an MLflow run's status and final model)."""
        with self._lock:
            thread, self._thread = self._thread, None
        if thread is not None:
            self._queue.put(None)
            thread.join(timeout)
        for hook in self._hooks:
            close = getattr(hook, "close", None)
            if callable(close):
                try:
                    close()
                except Exception:
                    log.exception("round hook %r failed to close", hook)

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            try:
                if item is None:
                    return
                entry, weights = item
                for hook in self._hooks:
                    try:
                        hook(entry, weights)
                    except Exception:
                        log.exception("round hook %r failed after round %s", hook, entry.get("round"))
            finally:
                self._queue.task_done()
