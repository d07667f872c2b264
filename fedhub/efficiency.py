"""How close a federation runs to the compute limit: one process training the same images.

With ``--efficiency`` (``fedhub.simulate`` turns it on) the server measures once, at start-up and
before any device has work, how long one process takes to train its network on a sample of its
test images: a fresh network of the same kind, one warm-up batch first (building the training
step is start-up: :attr:`Reference.startup_s`), then one timed epoch over the sample with the
devices' batch size and learning rate. Each round's history entry then says how long that one
process would take for the round's images (examples trained times epochs) and divides it by the
round's own time (``efficiency`` in the entry, added by the engine's publisher): 1.0 is as fast
as one process holding all the data, 0.25 is four times slower. The first round's time includes
the devices' start-up.

``fedhub.simulate`` measures again once every device has enrolled and waits for the first round
(:meth:`fedhub.Server.measure_efficiency`): at the server's start its workers are booting their
framework beside the measurement, which made the reference, and so every ratio, vary by up to
1.5x from one run to the next.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np

SAMPLE = 2048  # test images the reference trains on: enough for a steady rate, a second or two


@dataclass(frozen=True)
class Reference:
    """One process's training rate on the server's network."""

    images: int  # images of the timed epoch
    seconds: float  # its time
    startup_s: float  # building the network and its training step (the warm-up batch)
    framework: str
    network: str

    @property
    def s_per_image(self) -> float:
        return self.seconds / self.images

    def describe(self) -> dict[str, Any]:
        return {**asdict(self), "s_per_image": self.s_per_image}


def measure(global_model: Any, *, batch_size: int, learning_rate: float,
            sample: int = SAMPLE) -> Reference:
    """Time one epoch of a fresh network like ``global_model``'s over ``sample`` of its test
    images (ValueError when it has no test set, or is a Keras model of the user's own)."""
    test = getattr(global_model, "_test", None)
    if test is None:
        raise ValueError("the efficiency needs the server's test set to train a sample of")
    x, y = test
    n = min(sample, len(y))
    x, y = np.asarray(x[:n]), np.asarray(y[:n])
    started = time.perf_counter()
    network = global_model.new_network()
    network.train(x[:batch_size], y[:batch_size], epochs=1, batch_size=batch_size,
                  learning_rate=learning_rate)
    startup = time.perf_counter() - started
    started = time.perf_counter()
    network.train(x, y, epochs=1, batch_size=batch_size, learning_rate=learning_rate)
    return Reference(images=n, seconds=time.perf_counter() - started, startup_s=startup,
                     framework=network.framework, network=network.name)


def steady(ratios: Sequence[float]) -> float | None:
    """The steady efficiency of a run's rounds: the (upper) median of those after the first,
    whose time carries the devices' start-up; None with one round or none."""
    later = sorted(ratios[1:])
    return later[len(later) // 2] if later else None
