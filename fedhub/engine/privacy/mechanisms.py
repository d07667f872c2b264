"""The Gaussian mechanism on model updates: L2 clipping and noise, as small pure functions.

Clipping bounds what one device can change (its sensitivity); Gaussian noise of standard
deviation ``noise_multiplier`` x that bound hides any one device's contribution. The same two
steps serve central DP (on the server, noise on the aggregate), distributed DP (each device adds
its share of the noise before secure aggregation, so nobody sees a noiseless sum) and local DP
(each device adds all of it).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

Weights = dict[str, np.ndarray]


def l2_norm(tensors: Mapping[str, np.ndarray]) -> float:
    """The L2 norm of all tensors taken as one vector."""
    return math.sqrt(sum(float(np.square(np.asarray(t, dtype=np.float64)).sum()) for t in tensors.values()))


def difference(weights: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray]) -> Weights:
    """weights - reference in float64: a device's update as a change from the global model."""
    return {n: np.asarray(weights[n], dtype=np.float64) - np.asarray(r, dtype=np.float64)
            for n, r in reference.items()}


@dataclass(frozen=True)
class Clipped:
    """A clipped update and what clipping did to it."""

    tensors: Weights
    norm: float  # before clipping
    clipped: bool  # the norm exceeded the bound and was scaled down to it


def clip_by_norm(tensors: Mapping[str, np.ndarray], clipping_norm: float) -> Clipped:
    """Scale ``tensors`` down to L2 norm ``clipping_norm`` if above it (FlatClip, McMahan et al. 2018).

    A zero update stays zero (Flower divides by its norm), and a non-finite one is refused.
    """
    if not (math.isfinite(clipping_norm) and clipping_norm > 0):
        raise ValueError("clipping_norm must be a positive number")
    norm = l2_norm(tensors)
    if not math.isfinite(norm):
        raise ValueError("the update holds NaN or infinity")
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    scaled = {n: np.asarray(t, dtype=np.float64) * scale for n, t in tensors.items()}
    return Clipped(scaled, norm, scale < 1.0)


def add_gaussian_noise(tensors: Mapping[str, np.ndarray], std: float, rng: np.random.Generator) -> Weights:
    """``tensors`` plus independent N(0, std^2) noise on every coordinate, in float64."""
    if not (math.isfinite(std) and std >= 0):
        raise ValueError("the noise standard deviation must be a non-negative number")
    return {n: np.asarray(t, dtype=np.float64) + rng.normal(0.0, std, np.shape(t))
            for n, t in tensors.items()}


def central_noise_std(noise_multiplier: float, clipping_norm: float, num_updates: int) -> float:
    """Noise on the mean of ``num_updates`` clipped updates: noise_multiplier x C on their sum."""
    return noise_multiplier * clipping_norm / num_updates


def distributed_noise_std(noise_multiplier: float, clipping_norm: float, min_devices: int) -> float:
    """Each device's share of the noise for secure aggregation: the sum of ``min_devices`` shares
    has standard deviation noise_multiplier x C, as central DP would add. Pass the fewest
    devices whose inputs can be summed (the SecAgg threshold), so that dropouts never leave less
    noise than the accountant assumes."""
    if min_devices < 1:
        raise ValueError("min_devices must be at least 1")
    return noise_multiplier * clipping_norm / math.sqrt(min_devices)


def clip_and_noise(update: Mapping[str, np.ndarray], clipping_norm: float, noise_std: float,
                   rng: np.random.Generator | None = None) -> tuple[Weights, Clipped]:
    """What a device does for local or distributed DP: clip its update, then add its noise.

    Local DP: ``noise_std = noise_multiplier * clipping_norm``. Distributed DP:
    ``noise_std = distributed_noise_std(...)``. Returns the private update and the clipping record.
    """
    clipped = clip_by_norm(update, clipping_norm)
    return add_gaussian_noise(clipped.tensors, noise_std, rng or np.random.default_rng()), clipped


def add_noise_share(vector: np.ndarray, clipping_norm: float, noise_std: float,
                    rng: np.random.Generator | None = None) -> tuple[np.ndarray, Clipped]:
    """Distributed DP on a device: its flat change clipped to L2 norm ``clipping_norm`` plus its
    share of the noise (``noise_std``, see :func:`distributed_noise_std`), before masking."""
    private, clipped = clip_and_noise({"update": np.asarray(vector)}, clipping_norm, noise_std, rng)
    return private["update"], clipped


def privatize_update(trained: Mapping[str, np.ndarray], global_weights: Mapping[str, np.ndarray],
                     clipping_norm: float, noise_multiplier: float,
                     rng: np.random.Generator | None = None) -> tuple[Weights, Clipped]:
    """Local DP on a device: its change from ``global_weights`` clipped to ``clipping_norm`` and
    noised with ``noise_multiplier`` x that bound, returned as weights in the model's dtypes."""
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError("noise_multiplier must be a non-negative number")
    reference = {n: np.asarray(g) for n, g in global_weights.items()}
    private, clipped = clip_and_noise(difference(trained, reference), clipping_norm,
                                      noise_multiplier * clipping_norm, rng)
    return {n: (g.astype(np.float64) + private[n]).astype(g.dtype) for n, g in reference.items()}, clipped
