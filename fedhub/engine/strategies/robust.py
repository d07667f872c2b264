"""Byzantine-robust strategies: FedMedian, FedTrimmedAvg, Krum, MultiKrum and Bulyan.

They need every update of the round at once, so a round keeps them in an
:class:`~.buffer.UpdateBuffer` (memory-mapped past a byte budget) and does the
work in :meth:`RoundAggregator.result`, outside the coordinator's lock. The rules
are small pure functions over float64 blocks (rows are updates, columns a slice
of the flattened model); the strategies walk the buffer block by block, so
working memory stays one block however many devices report.

An update holding NaN or infinity is rejected (recorded, never aggregated).
Each round reports, per device, whether its update was used or rejected and why,
its Krum score where there is one, the share of its coordinates a coordinate-wise
rule cut, and its distance from the new global model.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ..params import setting
from .base import DEFAULT_MEMORY_BUDGET, RoundAggregator, Strategy, Weights
from .buffer import Layout, UpdateBuffer

RowInfo = dict[str, Any]


# The rules -------------------------------------------------------------------------------------
def squared_distances(buffer: UpdateBuffer, center: np.ndarray) -> np.ndarray:
    """Pairwise squared L2 distances between the buffered updates, block by block.

    Through the Gram matrix of the updates minus ``center`` (the current global model):
    distances between models are distances between their updates, and centring keeps
    ``|a|² + |b|² - 2a·b`` from cancelling away the small differences that matter.
    """
    n = len(buffer)
    gram = np.zeros((n, n))
    for cols in buffer.blocks():
        block = buffer.block(cols) - center[cols]
        gram += block @ block.T
    sq = np.diag(gram)
    return np.maximum(sq[:, None] + sq[None, :] - 2 * gram, 0.0)


def krum_scores(d2: np.ndarray, num_malicious: int) -> np.ndarray:
    """Krum's score of each update: the sum of squared distances to its n - f - 2 nearest others
    (at least one, as in Flower)."""
    n = len(d2)
    closest = min(n - 1, max(1, n - num_malicious - 2))
    scores = np.zeros(n)
    for i in range(n):
        others = np.delete(d2[i], i)
        scores[i] = np.sort(others)[:closest].sum()
    return scores


def lowest(scores: np.ndarray, k: int) -> list[int]:
    """Indices of the ``k`` lowest scores (ties: the earlier update)."""
    return [int(i) for i in np.argsort(scores, kind="stable")[:k]]


def iterated_krum(d2: np.ndarray, num_malicious: int, count: int) -> list[int]:
    """Bulyan's selection (El Mhamdi et al. 2018): Krum picks one update, it leaves the pool,
    and Krum runs again on the rest, ``count`` times."""
    pool = list(range(len(d2)))
    chosen = []
    for _ in range(count):
        sub = d2[np.ix_(pool, pool)]
        best = pool[lowest(krum_scores(sub, num_malicious), 1)[0]]
        chosen.append(best)
        pool.remove(best)
    return chosen


def trimmed_mean(block: np.ndarray, cut: int) -> tuple[np.ndarray, np.ndarray]:
    """Per column, the mean without the ``cut`` lowest and ``cut`` highest values; and per row,
    how many of its values were cut."""
    n = len(block)
    order = np.argsort(block, axis=0, kind="stable")
    kept = np.take_along_axis(block, order[cut:n - cut], axis=0)
    dropped = np.concatenate([order[:cut], order[n - cut:]]).ravel()
    return kept.mean(axis=0), np.bincount(dropped, minlength=n)


def mean_around_median(block: np.ndarray, beta: int) -> tuple[np.ndarray, np.ndarray]:
    """Per column, the mean of the ``beta`` values closest to the column's median (Bulyan's second
    stage); and per row, how many of its values were left out."""
    n = len(block)
    median = np.median(block, axis=0)
    order = np.argsort(np.abs(block - median), axis=0, kind="stable")
    kept = np.take_along_axis(block, order[:beta], axis=0)
    return kept.mean(axis=0), np.bincount(order[beta:].ravel(), minlength=n)


Rule = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


def coordinatewise(buffer: UpdateBuffer, rows: Sequence[int], rule: Rule) -> tuple[np.ndarray, np.ndarray]:
    """Apply a per-column ``rule`` to ``rows`` block by block; returns the aggregate and, per row,
    the share of its coordinates the rule left out."""
    out = np.empty(buffer.layout.size)
    left_out = np.zeros(len(rows))
    for cols in buffer.blocks(len(rows)):
        out[cols], counts = rule(buffer.block(cols, rows))
        left_out += counts
    return out, left_out / max(1, buffer.layout.size)


def weighted_rows_mean(buffer: UpdateBuffer, rows: Sequence[int], weights: Sequence[int]) -> np.ndarray:
    """The ``weights``-weighted mean of ``rows``, block by block."""
    total = float(sum(weights))
    out = np.empty(buffer.layout.size)
    for cols in buffer.blocks(len(rows)):
        acc = np.zeros(cols.stop - cols.start)
        for w, values in zip(weights, buffer.block(cols, rows), strict=True):
            acc += w * values  # row by row: the same sums however the columns are blocked
        out[cols] = acc / total
    return out


def distances_to(buffer: UpdateBuffer, point: np.ndarray) -> np.ndarray:
    """L2 distance of every buffered update from ``point``."""
    total = np.zeros(len(buffer))
    for cols in buffer.blocks():
        total += ((buffer.block(cols) - point[cols]) ** 2).sum(axis=1)
    return np.sqrt(total)


# The round -------------------------------------------------------------------------------------
class BufferedAggregator(RoundAggregator):
    """Keeps every accepted update in an :class:`UpdateBuffer`; the strategy combines them."""

    def __init__(self, strategy: Buffered, global_weights: Mapping[str, np.ndarray], *,
                 spill_dir: str | Path | None, memory_budget: int) -> None:
        super().__init__(strategy, global_weights, {})
        self.layout = Layout(self.template)
        self.buffer = UpdateBuffer(self.layout, memory_budget=memory_budget, spill_dir=spill_dir)
        self._rows: list[tuple[str, int]] = []

    def _fold(self, device: str, weights: Mapping[str, np.ndarray], num_examples: int, *,
              metrics: Mapping[str, Any]) -> None:
        self.buffer.append(weights)
        self._rows.append((device, num_examples))

    def _combine(self) -> tuple[Weights, Weights, dict[str, dict[str, Any]]]:
        center = self.layout.flatten(self.template, np.float64)
        examples = [n for _, n in self._rows]
        vector, infos = self.strategy.combine(self.buffer, center, examples)
        distances = distances_to(self.buffer, vector)
        per_device = {}
        for (device, _), info, dist in zip(self._rows, infos, distances, strict=True):
            per_device[device] = {**info, "distance": float(dist)}
        return self.layout.unflatten(vector), {}, per_device

    def _release(self) -> None:
        self.buffer.close()


class Buffered(Strategy):
    """A strategy that sees every update of the round before combining them."""

    rejects_nonfinite = True

    def begin(self, global_weights: Mapping[str, np.ndarray], *, spill_dir: str | Path | None = None,
              memory_budget: int = DEFAULT_MEMORY_BUDGET) -> RoundAggregator:
        return BufferedAggregator(self, global_weights, spill_dir=spill_dir, memory_budget=memory_budget)

    def combine(self, buffer: UpdateBuffer, center: np.ndarray,
                examples: Sequence[int]) -> tuple[np.ndarray, list[RowInfo]]:
        """The new global model as a flat float64 vector, and what happened to each row."""
        raise NotImplementedError


def _num_malicious() -> Any:
    return setting(0, "f: how many of a round's updates may be malicious")


def _check_malicious(value: int) -> None:
    if value < 0:
        raise ValueError(f"num_malicious must be 0 or more, got {value}")


@dataclass
class FedMedian(Buffered):
    """Coordinate-wise median of the updates (Yin et al. 2018)."""

    name = "fedmedian"

    def combine(self, buffer, center, examples):
        rows = range(len(buffer))
        vector, _ = coordinatewise(buffer, rows, lambda b: (np.median(b, axis=0), np.zeros(len(b), int)))
        return vector, [{} for _ in rows]


@dataclass
class FedTrimmedAvg(Buffered):
    """Coordinate-wise trimmed mean (Yin et al. 2018): per coordinate, drop the beta share of the
    lowest and of the highest values and average the rest."""

    name = "fedtrimmedavg"
    beta: float = setting(0.2, "share cut from each end, per coordinate, in [0, 0.5)")

    def validate(self) -> None:
        if not 0 <= self.beta < 0.5:
            raise ValueError(f"beta must be in [0, 0.5), got {self.beta}")

    def cut(self, n: int) -> int:
        return int(self.beta * n)

    def min_updates(self) -> int:
        """Enough updates that one value is cut from each end (when beta > 0)."""
        n = 1
        while self.beta > 0 and self.cut(n) < 1:
            n += 1
        return n

    def combine(self, buffer, center, examples):
        rows = range(len(buffer))
        cut = self.cut(len(rows))
        vector, share = coordinatewise(buffer, rows, lambda b: trimmed_mean(b, cut))
        return vector, [{"trimmed_share": float(s)} for s in share]


@dataclass
class Krum(Buffered):
    """Krum (Blanchard et al. 2017): the one update closest to its n - f - 2 nearest neighbours."""

    name = "krum"
    num_malicious: int = _num_malicious()

    def validate(self) -> None:
        _check_malicious(self.num_malicious)

    def keep(self, n: int) -> int:
        return 1

    def min_updates(self) -> int:
        return 2 * self.num_malicious + 3  # Krum's guarantee needs n > 2f + 2

    def combine(self, buffer, center, examples):
        scores = krum_scores(squared_distances(buffer, center), self.num_malicious)
        k = self.keep(len(buffer))
        chosen = lowest(scores, k)
        vector = weighted_rows_mean(buffer, chosen, [examples[i] for i in chosen])
        infos: list[RowInfo] = []
        for i, score in enumerate(scores):
            info: RowInfo = {"score": float(score)}
            if i not in chosen:
                info.update(status="rejected", reason=f"Krum score {score:.4g} is not among the "
                                                      f"{k} lowest")
            infos.append(info)
        return vector, infos


@dataclass
class MultiKrum(Krum):
    """Multi-Krum (El Mhamdi et al. 2018): the example-weighted mean of the num_to_keep updates
    with the lowest Krum scores."""

    name = "multikrum"
    num_to_keep: int = setting(0, "updates kept and averaged (0: n - num_malicious)")

    def validate(self) -> None:
        super().validate()
        if self.num_to_keep < 0:
            raise ValueError(f"num_to_keep must be 0 or more, got {self.num_to_keep}")

    def keep(self, n: int) -> int:
        return self.num_to_keep or n - self.num_malicious

    def min_updates(self) -> int:
        return max(super().min_updates(), self.num_to_keep)


@dataclass
class Bulyan(Buffered):
    """Bulyan (El Mhamdi et al. 2018): iterated Krum picks n - 2f updates; then per coordinate,
    the mean of the n - 4f values closest to their median."""

    name = "bulyan"
    num_malicious: int = _num_malicious()

    def validate(self) -> None:
        _check_malicious(self.num_malicious)

    def min_updates(self) -> int:
        return 4 * self.num_malicious + 3

    def combine(self, buffer, center, examples):
        f = self.num_malicious
        d2 = squared_distances(buffer, center)
        theta = len(buffer) - 2 * f
        chosen = iterated_krum(d2, f, theta)
        vector, share = coordinatewise(buffer, chosen, lambda b: mean_around_median(b, theta - 2 * f))
        cut = dict(zip(chosen, share, strict=True))
        infos: list[RowInfo] = []
        for i, score in enumerate(krum_scores(d2, f)):
            info: RowInfo = {"score": float(score)}
            if i in cut:
                info["trimmed_share"] = float(cut[i])
            else:
                info.update(status="rejected", reason=f"not among the {theta} updates iterated "
                                                      "Krum selected")
            infos.append(info)
        return vector, infos
