"""Differential privacy as a strategy wrapper: clip each update, noise the mean, count epsilon.

After Flower's ``DifferentialPrivacyServerSideFixedClipping`` and ``...AdaptiveClipping``
(central DP) and ``LocalDpMod`` (local DP), behind FedHub's one strategy interface
(:class:`~fedhub.engine.strategies.Strategy`). Three things differ from Flower, each for the guarantee:

- central DP averages the clipped changes itself, each device counting once, and adds the
  noise to that mean. Weighting by example counts would let one device move the mean by more
  than C / n, which the noise does not cover;
- the inner strategy then receives one update, the private mean, so a server optimizer
  (FedAvgM, FedAdam...) steps on the private mean, as in DP-FedAvg and DP-FedAdam, and the
  guarantee holds whatever it does (post-processing). Strategies that compare updates (median,
  Krum) would have nothing left to compare, so central DP wraps only the averaging ones;
- adaptive clipping (Andrew et al. 2021) counts the updates at or below C, as in the paper,
  and the noise uses the bound the updates were clipped with.

Local DP: each device clips its change and adds all the noise before it uploads
(:func:`.mechanisms.privatize_update`); the wrapper only announces C and z in the task config
and counts epsilon, and the inner strategy, robust ones included, aggregates as usual.

Distributed DP (with secure aggregation): each device clips its change and adds its share of
the noise before masking, so the unmasked sum carries the noise central DP would add and the
server never sees a noiseless sum; the wrapper announces C and the share's std and counts
epsilon as central DP does (:class:`DistributedDP`).

The adaptive bound and the accountant's rounds are strategy state (``dp_clipping_norm``,
``dp_accountant``): saved beside each checkpoint, restored after a restart, cleared on reset,
and adopted only once the round is durable, like a server optimizer's moments.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .. import params
from ..strategies.averaging import Averaging
from ..strategies.base import (
    DEFAULT_MEMORY_BUDGET,
    InvalidUpdate,
    RoundAggregator,
    RoundPlan,
    RoundResult,
    Strategy,
    Weights,
)
from .accounting import BudgetExhausted, PrivacyAccountant
from .mechanisms import (
    add_gaussian_noise,
    central_noise_std,
    clip_by_norm,
    difference,
    distributed_noise_std,
    l2_norm,
)

# The name under which the private mean reaches the inner strategy.
PRIVATE_MEAN = "dp-mean"
CLIP_KEY = "dp_clipping_norm"
ACCOUNTANT_KEY = "dp_accountant"
# What a device's task config carries for local DP.
LOCAL_CLIP = "dp_clipping_norm"
LOCAL_NOISE = "dp_noise_multiplier"
# What a device's task config carries for distributed DP (under secure aggregation).
SHARE_CLIP = "dp_share_clipping_norm"
SHARE_NOISE = "dp_share_noise_std"


def _check_noise(noise_multiplier: float) -> None:
    if not (math.isfinite(noise_multiplier) and noise_multiplier >= 0):
        raise ValueError("noise_multiplier must be a non-negative number")


def _json_epsilon(epsilon: float) -> float | None:
    """Epsilon for JSON: None when infinite (a round without noise gives no guarantee)."""
    return epsilon if math.isfinite(epsilon) else None


def _check_norm(clipping_norm: float, what: str = "clipping_norm") -> None:
    if not (math.isfinite(clipping_norm) and clipping_norm > 0):
        raise ValueError(f"{what} must be a positive number")


class _DPStrategy(Strategy):
    """What every DP wrapper shares: the inner strategy, the accountant, the budget, the state."""

    mode = ""

    def __init__(self, strategy: Strategy, noise_multiplier: float, clipping_norm: float, *,
                 delta: float = 1e-5, max_epsilon: float | None = None,
                 rng: np.random.Generator | None = None) -> None:
        _check_noise(noise_multiplier)
        _check_norm(clipping_norm)
        if max_epsilon is not None and not (math.isfinite(max_epsilon) and max_epsilon > 0):
            raise ValueError("max_epsilon must be a positive number")
        self.strategy = strategy
        self.name = f"dp-{self.mode}({strategy.name})"
        self.rejects_nonfinite = strategy.rejects_nonfinite
        self.noise_multiplier = float(noise_multiplier)
        self.update_noise_multiplier = float(noise_multiplier)
        self.initial_clipping_norm = self.clipping_norm = float(clipping_norm)
        self.max_epsilon = max_epsilon
        self.accountant = PrivacyAccountant(delta=delta)
        self.rng = rng or np.random.default_rng()
        self._sampling_rate = 1.0
        self._epsilon = 0.0
        self._budget_spent: str | None = None

    # accounting ----------------------------------------------------------------------------
    def accounted(self, sampling_rate: float) -> tuple[float, float]:
        """(sampling rate, noise multiplier) the accountant counts a round with."""
        return sampling_rate, self.noise_multiplier

    def _over_budget(self, sampling_rate: float, accountant: PrivacyAccountant | None = None
                     ) -> str | None:
        """Why one more round at ``sampling_rate`` would spend more than ``max_epsilon``, if so."""
        if self.max_epsilon is None:
            return None
        try:
            (accountant or self.accountant).check_budget(self.max_epsilon, *self.accounted(sampling_rate))
        except BudgetExhausted as exc:
            return exc.message
        return None

    def privacy(self) -> dict[str, Any]:
        """Computed when the state is adopted: the status asks under the engine's lock."""
        return {"mode": self.mode, "epsilon": _json_epsilon(self._epsilon), "delta": self.accountant.delta,
                "max_epsilon": self.max_epsilon, "rounds": self.accountant.rounds,
                "noise_multiplier": self.noise_multiplier, "clipping_norm": self.clipping_norm,
                "budget_spent": self._budget_spent}

    def privacy_settings(self) -> dict[str, Any]:
        return {"mode": self.mode, "noise_multiplier": self.noise_multiplier,
                "clipping_norm": self.initial_clipping_norm, "delta": self.accountant.delta,
                "max_epsilon": self.max_epsilon}

    # the strategy interface -----------------------------------------------------------------
    def params(self) -> dict[str, Any]:
        """The inner strategy's settings; the DP settings are in :meth:`privacy`."""
        return self.strategy.params()

    def task_config(self) -> dict[str, Any]:
        return self.strategy.task_config()

    def configure_evaluate(self, devices: Sequence[str], round_number: int, **how: Any) -> tuple[str, ...]:
        return self.strategy.configure_evaluate(devices, round_number, **how)

    def aggregate_evaluate(self, reports: Mapping[str, Mapping[str, Any]],
                           **how: Any) -> dict[str, Any] | None:
        return self.strategy.aggregate_evaluate(reports, **how)

    def min_updates(self) -> int:
        return self.strategy.min_updates()

    def configure(self, available: Iterable[str], *, rng: random.Random, fraction: float = 1.0,
                  min_devices: int = 1) -> RoundPlan:
        """The inner selection; refused with :class:`BudgetExhausted` (the run is over) when the
        round would spend more than ``max_epsilon``."""
        pool = sorted(available)
        plan = super().configure(pool, rng=rng, fraction=fraction, min_devices=min_devices)
        rate = len(plan.devices) / len(pool) if pool else 1.0
        # With a budget, a sampling rate not seen before costs a fraction of a second the first
        # time (its RDP curve, cached after); the rate only changes with the devices available.
        why = self._over_budget(rate)
        if why is not None:
            raise BudgetExhausted(why, "dp_max_epsilon")
        self._sampling_rate = rate
        return plan

    def state(self) -> Weights:
        return {**self.strategy.state(), **self._own_state(self.clipping_norm, self.accountant)}

    def _own_state(self, clipping_norm: float, accountant: PrivacyAccountant) -> Weights:
        state = {CLIP_KEY: np.array(clipping_norm, dtype=np.float64)}
        if accountant.segments:
            state[ACCOUNTANT_KEY] = np.array(accountant.segments, dtype=np.float64)
        return state

    def load_state(self, state: Mapping[str, np.ndarray]) -> None:
        inner = {k: v for k, v in state.items() if k not in (CLIP_KEY, ACCOUNTANT_KEY)}
        norm = float(np.asarray(state.get(CLIP_KEY, self.initial_clipping_norm)))
        _check_norm(norm)
        segments = np.asarray(state.get(ACCOUNTANT_KEY, np.zeros((0, 3))), dtype=np.float64)
        if segments.ndim != 2 or segments.shape[1] != 3:
            raise ValueError(f"state entry {ACCOUNTANT_KEY!r} must be rows of 3 numbers")
        accountant = PrivacyAccountant.from_dict(
            {"delta": self.accountant.delta, "segments": segments.tolist()})
        self.strategy.load_state(inner)
        self.clipping_norm, self.accountant = norm, accountant
        self._epsilon = accountant.epsilon()
        # Another round like the last one would exceed the budget: the run stops here.
        self._budget_spent = self._over_budget(float(segments[-1][0])) if len(segments) else None

    def reset(self) -> None:
        self.strategy.reset()
        self.clipping_norm = self.initial_clipping_norm
        self.accountant = PrivacyAccountant(delta=self.accountant.delta)
        self._epsilon = 0.0
        self._budget_spent = None

    def next_clipping_norm(self, unclipped: int, count: int) -> float:
        """The bound for the next round (fixed clipping keeps it)."""
        return self.clipping_norm


class _PrivateRound(RoundAggregator):
    """What both aggregators share: the round's privacy record and the state after it."""

    strategy: _DPStrategy

    def __init__(self, owner: _DPStrategy, global_weights: Mapping[str, np.ndarray],
                 spill_dir: str | Path | None, memory_budget: int) -> None:
        super().__init__(owner, global_weights, {})
        self._inner = owner.strategy.begin(global_weights, spill_dir=spill_dir, memory_budget=memory_budget)
        self._sampling_rate = owner._sampling_rate
        self._privacy: dict[str, Any] = {}

    def _accounted(self) -> tuple[float, float]:
        """(sampling rate, noise multiplier) this round is counted with."""
        return self.strategy.accounted(self._sampling_rate)

    def _account(self, inner: RoundResult, clipping_norm: float, next_norm: float,
                 extra: Mapping[str, Any]) -> tuple[Weights, Weights]:
        """The new weights and state, with this round counted by a copy of the accountant (the
        strategy adopts it with :meth:`_DPStrategy.load_state` once the round is durable)."""
        owner = self.strategy
        accountant = PrivacyAccountant.from_dict(owner.accountant.to_dict())
        rate, noise_multiplier = self._accounted()
        epsilon = accountant.record_round(rate, noise_multiplier)
        self._privacy = {
            "mode": owner.mode, "epsilon": _json_epsilon(epsilon), "delta": accountant.delta,
            "max_epsilon": owner.max_epsilon, "rounds": accountant.rounds,
            "sampling_rate": self._sampling_rate, "noise_multiplier": noise_multiplier,
            "clipping_norm": clipping_norm, **extra,
            "budget_spent": owner._over_budget(self._sampling_rate, accountant)}
        state = {**inner.state, **owner._own_state(next_norm, accountant)}
        return {k: np.asarray(v, dtype=np.float64) for k, v in inner.weights.items()}, state

    def restate(self, state: Mapping[str, np.ndarray]) -> None:
        self._inner.restate({k: v for k, v in state.items() if k not in (CLIP_KEY, ACCOUNTANT_KEY)})

    def result(self) -> RoundResult:
        result = super().result()
        result.metrics["privacy"] = self._privacy
        return result

    def _release(self) -> None:
        self._inner.close()


class _CentralRound(_PrivateRound):
    """Sums clipped changes (O(model) memory); at the end noises their mean and hands it to the
    inner strategy as its one update."""

    def __init__(self, owner: _DPStrategy, global_weights: Mapping[str, np.ndarray],
                 spill_dir: str | Path | None, memory_budget: int) -> None:
        super().__init__(owner, global_weights, spill_dir, memory_budget)
        self._clipping_norm = owner.clipping_norm  # fixed for the round, even if adapted after
        self._sum = {n: np.zeros(a.shape, dtype=np.float64) for n, a in self.template.items()}
        self._clipped = 0

    @property
    def partial_clipping_norm(self) -> float:  # type: ignore[override]
        """A relay clips each change to the round's norm and sums them (:mod:`...partials`)."""
        return self._clipping_norm

    def _fold_partial(self, shares: Sequence[Any], sums: Mapping[str, np.ndarray], unclipped: int) -> None:
        # Each change was clipped to C at the relay: the sum of k of them is at most k C long.
        # (The relay is trusted with the updates, as the server is; this bounds what it can send.)
        bound = len(shares) * self._clipping_norm
        norm = l2_norm(sums)
        if norm > bound * (1 + 1e-9):
            raise InvalidUpdate(f"the partial sum's L2 norm {norm:.6g} is more than its {len(shares)} "
                                f"device(s) times the clipping norm {self._clipping_norm:g}", "clipping_norm")
        for name, total in self._sum.items():
            np.add(total, np.asarray(sums[name], dtype=np.float64), out=total)
        self._clipped += len(shares) - unclipped

    def _fold(self, device: str, weights: Mapping[str, np.ndarray], num_examples: int, *,
              metrics: Mapping[str, Any]) -> None:
        clipped = clip_by_norm(difference(weights, self.template), self._clipping_norm)
        for name, total in self._sum.items():
            np.add(total, clipped.tensors[name], out=total)
        self._clipped += clipped.clipped

    def _combine(self) -> tuple[Weights, Weights, dict[str, dict[str, Any]]]:
        owner = self.strategy
        n = len(self.used())
        std = central_noise_std(owner.update_noise_multiplier, self._clipping_norm, n)
        mean = add_gaussian_noise({k: s / n for k, s in self._sum.items()}, std, owner.rng)
        private = {k: (g.astype(np.float64) + mean[k]).astype(g.dtype) for k, g in self.template.items()}
        self._inner.add(PRIVATE_MEAN, private, max(1, self.total_examples), {})
        inner = self._inner.result()
        next_norm = owner.next_clipping_norm(n - self._clipped, n)
        # Which updates were clipped is not noised: it stays out of what the round publishes.
        weights, state = self._account(inner, self._clipping_norm, next_norm,
                                       {"noise_std": std, "next_clipping_norm": next_norm})
        return weights, state, {}


class _LocalRound(_PrivateRound):
    """Local DP: the devices clipped and noised their updates; the inner strategy aggregates."""

    def _fold(self, device: str, weights: Mapping[str, np.ndarray], num_examples: int, *,
              metrics: Mapping[str, Any]) -> None:
        self._inner.add(device, weights, num_examples, metrics)  # qfedavg weighs by start_loss

    def _combine(self) -> tuple[Weights, Weights, dict[str, dict[str, Any]]]:
        inner = self._inner.result()
        weights, state = self._account(inner, self.strategy.clipping_norm, self.strategy.clipping_norm,
                                       {"noise_std": self.strategy.noise_multiplier
                                        * self.strategy.clipping_norm})
        return weights, state, dict(inner.metrics["updates"])


class _DistributedRound(_PrivateRound):
    """Distributed DP: the devices clipped and noised their changes and the server only gets
    their sum, unmasked by secure aggregation; the inner strategy steps on its mean."""

    strategy: DistributedDP

    def __init__(self, owner: DistributedDP, global_weights: Mapping[str, np.ndarray],
                 spill_dir: str | Path | None, memory_budget: int) -> None:
        super().__init__(owner, global_weights, spill_dir, memory_budget)
        self._survivors = 0

    def _fold(self, device: str, weights: Mapping[str, np.ndarray], num_examples: int, *,
              metrics: Mapping[str, Any]) -> None:
        raise ValueError("distributed DP takes only sums unmasked by secure aggregation")

    def add_secure_mean(self, devices: Sequence[str], mean: Mapping[str, np.ndarray], weight: int) -> None:
        """The survivors' mean, summed under secure aggregation, each with weight 1."""
        self._inner.add_secure_mean(devices, mean, weight)
        with self._lock:
            self._record_secure(devices, weight)
            self._survivors += len(devices)

    def _accounted(self) -> tuple[float, float]:
        return self.strategy.accounted(self._sampling_rate, self._survivors)

    def _combine(self) -> tuple[Weights, Weights, dict[str, dict[str, Any]]]:
        owner = self.strategy
        inner = self._inner.result()
        _, z = self._accounted()
        weights, state = self._account(inner, owner.clipping_norm, owner.clipping_norm, {
            "noise_std": z * owner.clipping_norm / max(1, self._survivors),  # on the mean
            "noise_share_std": owner.noise_share_std, "min_devices": owner.min_devices,
            "survivors": self._survivors})
        return weights, state, {}


class _CentralDP(_DPStrategy):
    sums_only = True  # a relay's sum of clipped changes (RoundAggregator.partial_clipping_norm)

    def __init__(self, strategy: Strategy, noise_multiplier: float, clipping_norm: float,
                 **kwargs: Any) -> None:
        if not isinstance(strategy, Averaging):
            raise ValueError(f"central DP wraps an averaging strategy (fedavg, fedavgm, fedprox, "
                             f"fedadam, fedyogi, fedadagrad), not {strategy.name}: it sees one "
                             "private mean, nothing to compare; use local DP with robust strategies")
        super().__init__(strategy, noise_multiplier, clipping_norm, **kwargs)

    def min_updates(self) -> int:
        return 1

    def begin(self, global_weights: Mapping[str, np.ndarray], *, spill_dir: str | Path | None = None,
              memory_budget: int = DEFAULT_MEMORY_BUDGET) -> RoundAggregator:
        return _CentralRound(self, global_weights, spill_dir, memory_budget)


class DPFixedClipping(_CentralDP):
    """Central DP with a fixed clipping bound C: each change clipped to L2 norm C, and Gaussian
    noise of standard deviation noise_multiplier * C / n on the mean of the n updates."""

    mode = "central-fixed"


class DPAdaptiveClipping(_CentralDP):
    """Central DP whose bound follows a quantile of the update norms (Andrew et al. 2021).

    Each round, with b the share of updates whose norm is at most C, noised with standard
    deviation ``clipped_count_stddev`` / n, the bound moves geometrically:
    C <- C * exp(-clip_norm_lr * (b - target_quantile)). The count is private too: the updates'
    noise multiplier is raised to (z^-2 - (2 sigma_b)^-2)^-1/2 so that both together spend what
    ``noise_multiplier`` z alone would.
    """

    mode = "central-adaptive"

    def __init__(self, strategy: Strategy, noise_multiplier: float, num_sampled: int, *,
                 initial_clipping_norm: float = 0.1, target_quantile: float = 0.5,
                 clip_norm_lr: float = 0.2, clipped_count_stddev: float | None = None,
                 **kwargs: Any) -> None:
        super().__init__(strategy, noise_multiplier, initial_clipping_norm, **kwargs)
        if num_sampled < 1:
            raise ValueError("num_sampled must be at least 1")
        if not 0 <= target_quantile <= 1:
            raise ValueError("target_quantile must be from 0 to 1")
        if not (math.isfinite(clip_norm_lr) and clip_norm_lr > 0):
            raise ValueError("clip_norm_lr must be a positive number")
        if noise_multiplier == 0:
            count_stddev = 0.0 if clipped_count_stddev is None else clipped_count_stddev
        else:
            # Andrew et al. suggest the expected number of updates / 20.
            count_stddev = num_sampled / 20 if clipped_count_stddev is None else clipped_count_stddev
            if not noise_multiplier < 2 * count_stddev:
                raise params.SettingError(
                    f"{{0}} {noise_multiplier} must be below 2 x {{1}} ({2 * count_stddev:g}): raise {{1}} "
                    f"(above {noise_multiplier / 2:g}) or the devices per round",
                    "dp.noise_multiplier", "dp.clipped_count_stddev")
            self.update_noise_multiplier = (noise_multiplier ** -2 - (2 * count_stddev) ** -2) ** -0.5
        if not (math.isfinite(count_stddev) and count_stddev >= 0):
            raise ValueError("clipped_count_stddev must be a non-negative number")
        self.target_quantile = target_quantile
        self.clip_norm_lr = clip_norm_lr
        self.clipped_count_stddev = count_stddev

    def privacy_settings(self) -> dict[str, Any]:
        return {**super().privacy_settings(), "target_quantile": self.target_quantile,
                "clip_norm_lr": self.clip_norm_lr, "clipped_count_stddev": self.clipped_count_stddev}

    def next_clipping_norm(self, unclipped: int, count: int) -> float:
        share = (unclipped + self.rng.normal(0.0, self.clipped_count_stddev)) / count
        return self.clipping_norm * math.exp(-self.clip_norm_lr * (share - self.target_quantile))


class LocalDP(_DPStrategy):
    """Local DP: each selected device clips its change to L2 norm C and adds Gaussian noise of
    standard deviation noise_multiplier * C before it uploads, so the server never sees a
    noiseless update. Epsilon is per device, against the server itself: it knows who was
    selected (no sampling amplification), and a device's two possible updates differ by up to
    2C, so each round counts as the Gaussian mechanism with noise multiplier z / 2."""

    mode = "local"

    def accounted(self, sampling_rate: float) -> tuple[float, float]:
        return 1.0, self.noise_multiplier / 2

    def task_config(self) -> dict[str, Any]:
        return {**self.strategy.task_config(), LOCAL_CLIP: self.clipping_norm,
                LOCAL_NOISE: self.noise_multiplier}

    def begin(self, global_weights: Mapping[str, np.ndarray], *, spill_dir: str | Path | None = None,
              memory_budget: int = DEFAULT_MEMORY_BUDGET) -> RoundAggregator:
        return _LocalRound(self, global_weights, spill_dir, memory_budget)


class DistributedDP(_DPStrategy):
    """Distributed DP under secure aggregation: each device clips its change to L2 norm C and
    adds Gaussian noise of standard deviation z * C / sqrt(n) (n: the devices a round needs)
    before masking, so the server only ever sees a sum that carries noise of standard deviation
    at least z * C, and counts epsilon as central DP does. Each device counts once (secure
    aggregation sums the changes with weight 1), so one device moves the sum by at most C.

    Fewer than n survivors leave less noise in the sum, and the server has seen it once it is
    unmasked: that round is counted with the noise the m survivors did add, noise multiplier
    z * sqrt(m / n). More survivors add more noise, counted as z (never less private than said).
    """

    mode = "distributed"

    def __init__(self, strategy: Strategy, noise_multiplier: float, clipping_norm: float,
                 min_devices: int, **kwargs: Any) -> None:
        if not isinstance(strategy, Averaging):
            raise ValueError(f"distributed DP wraps an averaging strategy (fedavg, fedavgm, fedprox, "
                             f"fedadam, fedyogi, fedadagrad), not {strategy.name}: secure aggregation "
                             "reveals only the sum")
        super().__init__(strategy, noise_multiplier, clipping_norm, **kwargs)
        self.min_devices = int(min_devices)
        self.noise_share_std = distributed_noise_std(self.noise_multiplier, self.clipping_norm,
                                                     self.min_devices)

    def accounted(self, sampling_rate: float, survivors: int | None = None) -> tuple[float, float]:
        if survivors is None or survivors >= self.min_devices:
            return sampling_rate, self.noise_multiplier
        return sampling_rate, self.noise_multiplier * math.sqrt(survivors / self.min_devices)

    def min_updates(self) -> int:
        return 1

    def task_config(self) -> dict[str, Any]:
        return {**self.strategy.task_config(), SHARE_CLIP: self.clipping_norm,
                SHARE_NOISE: self.noise_share_std}

    def privacy(self) -> dict[str, Any]:
        return {**super().privacy(), "noise_share_std": self.noise_share_std,
                "min_devices": self.min_devices}

    def privacy_settings(self) -> dict[str, Any]:
        return {**super().privacy_settings(), "min_devices": self.min_devices}

    def begin(self, global_weights: Mapping[str, np.ndarray], *, spill_dir: str | Path | None = None,
              memory_budget: int = DEFAULT_MEMORY_BUDGET) -> RoundAggregator:
        return _DistributedRound(self, global_weights, spill_dir, memory_budget)


def _task_numbers(config: Mapping[str, Any], keys: tuple[str, str]) -> tuple[float, float] | None:
    """The two numbers ``keys`` name in a task config (from the network), None if both are
    absent; ValueError if one is missing or not a number."""
    if not any(k in config for k in keys):
        return None
    values = tuple(config.get(k) for k in keys)
    for key, value in zip(keys, values, strict=True):
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ValueError(f"task config {key} must be a number, got {value!r}")
    return float(values[0]), float(values[1])


def distributed_dp_task(config: Mapping[str, Any]) -> tuple[float, float] | None:
    """The (clipping norm, noise std) a task config asks a device to apply to its change before
    masking it (distributed DP), or None. ValueError if malformed."""
    found = _task_numbers(config, (SHARE_CLIP, SHARE_NOISE))
    if found is not None:
        _check_norm(found[0], SHARE_CLIP)
        if not (math.isfinite(found[1]) and found[1] >= 0):
            raise ValueError(f"{SHARE_NOISE} must be a non-negative number")
    return found


def local_dp_task(config: Mapping[str, Any]) -> tuple[float, float] | None:
    """The (clipping norm, noise multiplier) a task config asks a device to apply before it
    uploads (local DP), or None. The config comes from the network: ValueError if malformed."""
    found = _task_numbers(config, (LOCAL_CLIP, LOCAL_NOISE))
    if found is not None:
        _check_norm(found[0], LOCAL_CLIP)
        _check_noise(found[1])
    return found
