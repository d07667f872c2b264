"""The ``--secure-aggregation`` options, shared by ``server.py`` and ``fedhub.simulate``."""

from __future__ import annotations

import argparse

from fedhub.engine.secagg import SecAggConfig

DEFAULTS = SecAggConfig()


def add_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--secure-aggregation", action="store_true",
                   help="SecAgg+: the server learns only the weighted mean of each round's updates")
    p.add_argument("--secagg-shares", type=int, default=DEFAULTS.shares,
                   help="shares of each device's secrets (odd; it and its ring neighbours hold them)")
    p.add_argument("--secagg-threshold", type=int, default=None,
                   help="shares that rebuild a dropped device's masks (default: a strict majority)")
    p.add_argument("--secagg-clip", type=float, default=DEFAULTS.clip_range,
                   help="each coordinate of an update (change from the global model) is clipped to +-CLIP")
    p.add_argument("--secagg-bits", type=int, default=DEFAULTS.bits,
                   help="masked sums are integers modulo 2^BITS (16 to 64)")
    p.add_argument("--secagg-max-weight", type=int, default=DEFAULTS.max_weight,
                   help="a device's weight (its example count) is capped here")


def config_from(a: argparse.Namespace) -> SecAggConfig | None:
    """The settings given, or None without ``--secure-aggregation`` (checked by the caller's
    ``FederationConfig.validate``)."""
    if not a.secure_aggregation:
        return None
    return SecAggConfig(shares=a.secagg_shares, threshold=a.secagg_threshold, bits=a.secagg_bits,
                        clip_range=a.secagg_clip, max_weight=a.secagg_max_weight)


def hint(exc: Exception) -> str:
    """The option to fix, for a refusal naming a secure-aggregation setting."""
    field = getattr(exc, "field", None)
    return f" (--secagg-{field.replace('_range', '').replace('_', '-')})" if field else ""
