"""The masks a device adds and the server takes away, in one place so both sides agree.

A device u adds its self mask PRG(b_u) and, for each neighbour v that dealt shares, the
pairwise mask PRG(s_uv) with sign + if u < v (by name) and - otherwise, so each pair's masks
cancel in the sum. The server removes the self masks of the devices whose input it counted
(their seeds rebuilt from shares) and, for each device that dropped after dealing its shares,
the masks its surviving neighbours added for it (from its rebuilt mask key).
"""

from __future__ import annotations

import numpy as np

from .crypto import expand, pair_seed
from .params import RoundParams


def self_mask(seed: bytes, params: RoundParams, device: str) -> np.ndarray:
    return expand(seed, params.length + 1, params.bits, params.round, f"self/{device}")


def pair_mask(private: bytes, peer_public: bytes, params: RoundParams, me: str, peer: str) -> np.ndarray:
    """The mask between ``me`` and ``peer`` from ``me``'s mask private key and ``peer``'s public key."""
    return expand(pair_seed(private, peer_public, params.round, me, peer), params.length + 1,
                  params.bits, params.round, "pair")


def add(total: np.ndarray, mask: np.ndarray, sign: int, params: RoundParams) -> None:
    """total += sign * mask, modulo 2^bits, in place (uint64 arithmetic wraps modulo 2^64)."""
    if sign > 0:
        np.add(total, mask, out=total)
    else:
        np.subtract(total, mask, out=total)
    np.bitwise_and(total, np.uint64(params.modulus_mask), out=total)


def pair_sign(me: str, peer: str) -> int:
    """The sign with which ``me`` adds the mask it shares with ``peer``."""
    return 1 if me < peer else -1
