"""Attacks a device can mount on the federation, to demonstrate and measure robust aggregation.

Each attack is a small pure function of NumPy arrays: it changes the weights the
device trained (``poison_weights``) or the labels of the device's own data before
training (``poison_labels``). Weight attacks touch floating-point tensors only and
keep every value finite in its dtype, so the server receives (and must defend
against) a well-formed update. Chosen on the command line as
``--attack scale --attack-arg factor=10``, validated like ``--strategy-arg``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from fedhub.engine import params
from fedhub.engine.params import setting

Weights = dict[str, np.ndarray]


def _on_floats(weights: Mapping[str, np.ndarray], fn: Callable[[str, np.ndarray], np.ndarray]) -> Weights:
    """``fn`` (in float64) on every floating-point tensor, cast back and clipped to its dtype's range."""
    out = {}
    for name, a in weights.items():
        a = np.asarray(a)
        if a.dtype.kind == "f":
            info = np.finfo(a.dtype)
            a = np.clip(fn(name, a.astype(np.float64)), info.min, info.max).astype(a.dtype)
        out[name] = a
    return out


def scale_update(trained: Mapping[str, np.ndarray], global_weights: Mapping[str, np.ndarray],
                 factor: float) -> Weights:
    """global + factor·(trained - global): the honest update times ``factor``."""
    return _on_floats(trained, lambda n, w: global_weights[n] + factor * (w - global_weights[n]))


@dataclass(frozen=True)
class Attack:
    """No attack: the honest update. Subclasses override one of the two steps."""

    kind: ClassVar[str] = "none"
    poisons_labels: ClassVar[bool] = False  # the device's labels, rather than its weights

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Raise ValueError naming the setting that is out of range."""

    def poison_weights(self, trained: Mapping[str, np.ndarray], global_weights: Mapping[str, np.ndarray],
                       rng: np.random.Generator) -> Weights:
        """The weights to upload instead of ``trained`` (the round started from ``global_weights``)."""
        return dict(trained)

    def poison_labels(self, y: np.ndarray) -> np.ndarray:
        """The labels to train on instead of ``y``."""
        return y

    def describe(self) -> dict[str, Any]:
        """What a device declares at registration (for the dashboards; aggregation never reads it)."""
        return {"kind": self.kind, "params": params.values_of(self)}

    def summary(self) -> str:
        """``kind (key=value, ...)`` for logs."""
        settings = ", ".join(f"{k}={v}" for k, v in params.values_of(self).items())
        return f"{self.kind} ({settings})" if settings else self.kind


@dataclass(frozen=True)
class SignFlip(Attack):
    """Send the update reversed: global - factor·(trained - global) (Damaskinos et al. 2018)."""

    kind = "sign-flip"
    factor: float = setting(1.0, "length of the reversed update, relative to the honest one")

    def validate(self) -> None:
        if not self.factor > 0:
            raise ValueError(f"factor must be positive, got {self.factor}")

    def poison_weights(self, trained, global_weights, rng):
        return scale_update(trained, global_weights, -self.factor)


@dataclass(frozen=True)
class Scale(Attack):
    """Send the update scaled: global + factor·(trained - global) (boosting, Bagdasaryan et al. 2020)."""

    kind = "scale"
    factor: float = setting(10.0, "how many times the honest update to send")

    def poison_weights(self, trained, global_weights, rng):
        return scale_update(trained, global_weights, self.factor)


@dataclass(frozen=True)
class Noise(Attack):
    """Add Gaussian noise with standard deviation sigma to every trained weight."""

    kind = "noise"
    sigma: float = setting(1.0, "standard deviation of the added noise")

    def validate(self) -> None:
        if not self.sigma > 0:
            raise ValueError(f"sigma must be positive, got {self.sigma}")

    def poison_weights(self, trained, global_weights, rng):
        return _on_floats(trained, lambda n, w: w + rng.normal(0.0, self.sigma, size=w.shape))


@dataclass(frozen=True)
class Constant(Attack):
    """Send every weight as one value (1e38 is close to float32's largest)."""

    kind = "constant"
    value: float = setting(1e38, "the value of every weight")

    def poison_weights(self, trained, global_weights, rng):
        return _on_floats(trained, lambda n, w: np.full(w.shape, self.value))


@dataclass(frozen=True)
class LabelFlip(Attack):
    """Train on the device's own data with every label y replaced by num_classes - 1 - y."""

    kind = "label-flip"
    poisons_labels = True
    num_classes: int = setting(10, "number of classes (labels are 0 .. num_classes - 1)")

    def validate(self) -> None:
        if self.num_classes < 2:
            raise ValueError(f"num_classes must be at least 2, got {self.num_classes}")

    def poison_labels(self, y: np.ndarray) -> np.ndarray:
        y = np.asarray(y)
        if y.dtype.kind not in "iu" or (y.size and (y.min() < 0 or y.max() >= self.num_classes)):
            raise ValueError(f"label-flip needs integer labels in 0..{self.num_classes - 1}")
        return (self.num_classes - 1 - y).astype(y.dtype)


ATTACKS: dict[str, type[Attack]] = {cls.kind: cls for cls in (SignFlip, Scale, Noise, Constant, LabelFlip)}


def attack_class(kind: str) -> type[Attack]:
    try:
        return ATTACKS[kind]
    except KeyError:
        raise params.ParamError(f"unknown attack {kind!r}; choose from {', '.join(ATTACKS)}") from None


def make_attack(kind: str, **settings: Any) -> Attack:
    """Build an attack by kind (the Python API and the simulation); one-line ParamError if invalid."""
    return params.build(attack_class(kind), settings, f"attack {kind}")


def parse_attack(kind: str, args: Iterable[str] = ()) -> Attack:
    """``--attack KIND`` with its repeated ``--attack-arg KEY=VALUE`` options."""
    return make_attack(kind, **params.parse_assignments(attack_class(kind), args, f"attack {kind}"))


def describe_attacks() -> list[dict[str, Any]]:
    """Every attack with its settings and defaults (for ``--help`` texts and docs)."""
    return [{"kind": kind, "summary": (cls.__doc__ or "").strip().splitlines()[0],
             "params": params.describe(cls)} for kind, cls in ATTACKS.items()]
