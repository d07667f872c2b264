"""Every update of a round, flattened, in RAM up to a byte budget and memory-mapped beyond it.

Median, trimmed mean, Krum and Bulyan need all the updates at once. A thousand
updates of a large model do not fit in RAM, so past ``memory_budget`` bytes the
buffer moves its rows to an anonymous temporary file (deleted by the OS when it
is closed, even if the server is killed) and reads them back through
``numpy.memmap``. Readers go column block by column block
(:meth:`UpdateBuffer.blocks`), so working memory is one ``rows × width`` block
however large the model.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import numpy as np

# Largest float64 block a reader takes at once.
DEFAULT_BLOCK_BYTES = 32 * 1024 * 1024


class Layout:
    """Where each tensor sits in a flat row, and the row's storage dtype."""

    def __init__(self, template: Mapping[str, np.ndarray]) -> None:
        self.names = list(template)
        self.shapes = {n: tuple(a.shape) for n, a in template.items()}
        self.dtypes = {n: a.dtype for n, a in template.items()}
        self.offsets: dict[str, tuple[int, int]] = {}
        start = 0
        for n, a in template.items():
            self.offsets[n] = (start, start + a.size)
            start += a.size
        self.size = start
        # One dtype that holds every tensor's values exactly (float32 models stay float32).
        self.dtype = np.result_type(np.float32, *(a.dtype for a in template.values())) \
            if template else np.dtype(np.float32)

    def flatten(self, weights: Mapping[str, np.ndarray], dtype: np.dtype | None = None) -> np.ndarray:
        out = np.empty(self.size, dtype=dtype or self.dtype)
        for n in self.names:
            a, b = self.offsets[n]
            out[a:b] = np.ravel(weights[n])
        return out

    def unflatten(self, row: np.ndarray) -> dict[str, np.ndarray]:
        """Views into ``row`` with each tensor's shape (dtype unchanged)."""
        return {n: row[a:b].reshape(self.shapes[n]) for n, (a, b) in self.offsets.items()}


class UpdateBuffer:
    """Rows of equal length, appended once each and then read in column blocks."""

    def __init__(self, layout: Layout, *, memory_budget: int, spill_dir: str | Path | None = None,
                 block_bytes: int = DEFAULT_BLOCK_BYTES) -> None:
        if memory_budget < 0:
            raise ValueError("memory_budget must be 0 or more")
        self.layout = layout
        self.memory_budget = memory_budget
        self.spill_dir = spill_dir
        self.block_bytes = max(8, min(block_bytes, memory_budget or block_bytes))
        self._row_bytes = layout.size * layout.dtype.itemsize
        self._rows: list[np.ndarray] = []
        self._file = None
        self._count = 0
        self._map: np.memmap | None = None

    def __len__(self) -> int:
        return self._count

    @property
    def spilled(self) -> bool:
        """Whether the rows live in a memory-mapped file rather than in RAM."""
        return self._file is not None

    def append(self, weights: Mapping[str, np.ndarray]) -> int:
        """Store one update; returns its row index."""
        if self._file is None and (self._count + 1) * self._row_bytes > self.memory_budget:
            self._spill()
        if self._file is None:
            self._rows.append(self.layout.flatten(weights))
        else:
            for n in self.layout.names:  # tensor by tensor: no model-sized temporary
                self._file.write(np.ascontiguousarray(weights[n], dtype=self.layout.dtype).data)
            self._map = None
        self._count += 1
        return self._count - 1

    def _spill(self) -> None:
        # Open until close(): the rows live in it. Anonymous, so the OS deletes it even on a crash.
        self._file = tempfile.TemporaryFile(prefix="fedhub-updates-", dir=self.spill_dir)  # noqa: SIM115
        for row in self._rows:
            self._file.write(row.data)
        self._rows = []

    def _matrix(self) -> np.memmap:
        if self._map is None:
            self._file.flush()
            self._map = np.memmap(self._file, dtype=self.layout.dtype, mode="r",
                                  shape=(self._count, self.layout.size))
        return self._map

    def block(self, columns: slice, rows: Sequence[int] | None = None) -> np.ndarray:
        """``rows × columns`` of the stored updates, as a new float64 array."""
        if self._file is None:
            picked = self._rows if rows is None else [self._rows[i] for i in rows]
            return np.array([r[columns] for r in picked], dtype=np.float64).reshape(len(picked), -1)
        index = slice(None) if rows is None else list(rows)
        return np.asarray(self._matrix()[index, columns], dtype=np.float64)

    def row(self, index: int) -> np.ndarray:
        """One stored update as a float64 vector."""
        return self.block(slice(None), [index])[0]

    def blocks(self, nrows: int | None = None) -> Iterator[slice]:
        """Column ranges whose ``nrows × width`` float64 block fits in ``block_bytes``."""
        nrows = max(1, self._count if nrows is None else nrows)
        width = max(1, self.block_bytes // (8 * nrows))
        for start in range(0, self.layout.size, width):
            yield slice(start, min(start + width, self.layout.size))

    def close(self) -> None:
        self._rows = []
        self._map = None
        if self._file is not None:
            self._file.close()
            self._file = None
