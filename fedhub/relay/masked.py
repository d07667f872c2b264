"""A relay's sum of its devices' masked updates in one secure-aggregation round.

Under SecAgg+ a device uploads its change masked in the round's field; the server adds the
masked vectors modulo 2^bits and only the sum is ever unmasked. A relay does the same adding for
its devices and sends one :class:`~fedhub.engine.secagg.MaskedSum`: it sees nothing the server
would not (masked vectors), and the server counts each device as if it had sent its own. It has
the same interface as :class:`~fedhub.engine.partials.PartialSum` (``fold``, ``encode``,
``restore``), so :class:`~fedhub.relay.sums.RelaySums` holds, saves and sends either kind.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import numpy as np

from fedhub.engine import wire
from fedhub.engine.secagg import MaskedInput, MaskedSum, RoundParams, masks
from fedhub.engine.secagg.messages import MAX_SUM_HEADER


class MaskedPartialSum:
    """The masked updates of one secure round's devices, summed as they arrive (O(model) memory)."""

    def __init__(self, params: RoundParams) -> None:
        self.params = params
        self.round = params.round
        self.shares: dict[str, tuple[str, tuple[str, ...]]] = {}  # device -> (its token, dealers it refused)
        self._sum = np.zeros(params.length + 1, dtype=np.uint64)

    def __len__(self) -> int:
        return len(self.shares)

    def fold(self, message: MaskedInput, *, token: str) -> None:
        if message.device in self.shares:
            raise ValueError(f"device {message.device!r} is already in this masked sum")
        masks.add(self._sum, message.vector, 1, self.params)
        self.shares[message.device] = (token, message.refused)

    def encode(self, extra: Mapping[str, str] | None = None) -> bytes:
        """The body to send; with ``extra`` (more metadata) the relay's own copy on disk, which
        also keeps the round's parameters to go on adding after a restart."""
        if not self.shares:
            raise ValueError("an empty masked sum is not sent")
        if extra is not None:
            extra = {**extra, "params": json.dumps(self.params.to_dict())}
        message = MaskedSum(self.round, tuple((n, refused) for n, (_, refused) in self.shares.items()),
                            self._sum, tuple(token for token, _ in self.shares.values()))
        return message.to_bytes(self.params, extra)

    @classmethod
    def restore(cls, body: bytes) -> tuple[MaskedPartialSum, dict[str, Any]]:
        """The relay's own copy on disk (:meth:`encode` with ``extra={"keys": ...}``) as it was,
        and the keys it held."""
        raw = wire.header(body, max_header=MAX_SUM_HEADER).get("__metadata__") or {}
        params = RoundParams.from_dict(json.loads(raw["params"]))
        message = MaskedSum.from_bytes(body, params, extra=("params", "keys"))
        pending = cls(params)
        pending._sum = message.vector
        pending.shares = {name: (token, refused)
                          for (name, refused), token in zip(message.inputs, message.tokens, strict=True)}
        return pending, json.loads(raw.get("keys", "{}"))
