"""Test-set evaluations of completed rounds, each computed at most once.

The dashboard shows the latest global model's confusion matrix and asks for it again
whenever a round completes. The engine already evaluated that model when it closed the
round, so that result is kept; an older round, or any round after a restart, is evaluated
on its first request. An evaluation takes seconds, so it runs outside every lock: requests
for the same round share the one evaluation in progress (a Future), and nothing else waits.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import Future
from typing import Any

import numpy as np

Weights = Mapping[str, np.ndarray]
Evaluate = Callable[[Weights], Mapping[str, Any]]


class Evaluations:
    """The latest ``keep`` evaluations, by a key that names one round's model for good.

    Round numbers are reused after a reset, so the engine's key is the round's number and
    the time it closed, never the number alone.
    """

    def __init__(self, evaluate: Evaluate, *, keep: int = 16) -> None:
        self._evaluate = evaluate
        self._keep = keep
        self._lock = threading.Lock()  # guards the dictionary only, never an evaluation
        self._results: OrderedDict[Hashable, Future] = OrderedDict()

    def remember(self, key: Hashable, metrics: Mapping[str, Any]) -> None:
        """Keep an evaluation made elsewhere (the engine's own, when it closed the round)."""
        done: Future = Future()
        done.set_result(dict(metrics))
        with self._lock:
            self._store(key, done)

    def get(self, key: Hashable, weights: Callable[[], Weights]) -> dict[str, Any]:
        """The evaluation for ``key``: kept, in progress (then waited for), or made now from
        ``weights()``. A failed evaluation is not kept: the next request tries again."""
        with self._lock:
            future = self._results.get(key)
            mine = future is None
            if mine:
                future = Future()
                self._store(key, future)
            else:
                self._results.move_to_end(key)
        if mine:
            try:
                future.set_result(dict(self._evaluate(weights())))
            except BaseException as exc:
                with self._lock:
                    if self._results.get(key) is future:
                        del self._results[key]
                future.set_exception(exc)
        return dict(future.result())

    def _store(self, key: Hashable, future: Future) -> None:
        self._results[key] = future
        self._results.move_to_end(key)
        while len(self._results) > self._keep:
            self._results.popitem(last=False)
