"""The run's settings and their defaults, shared by the engine, the HTTP layer, the CLI and
the Python API: every default lives here, once."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from . import compression, params
from .privacy import DistributedDP, DPConfig
from .secagg import SecAggConfig
from .strategies import DEFAULT_MEMORY_BUDGET, Strategy, make_strategy
from .strategies.averaging import Averaging


@dataclass
class TrainingConfig:
    """What each selected device does in a round; travels with the task."""

    model: str = "basic"
    framework: str = "keras"  # what the devices train with (fedhub.frameworks): keras or torch
    epochs: int = params.number(1, 1, 10_000, flag="--epochs")
    batch_size: int = params.number(32, 1, 1_000_000, flag="--batch-size")
    learning_rate: float = params.number(1e-3, above=0, high=10, flag="--learning-rate")
    compression: str = "none"  # how devices send updates (fedhub.engine.compression.parse)

    def validate(self) -> None:
        """ValueError (one line) for a setting out of its range or an unknown compression."""
        params.check_numbers(self)
        compression.parse(self.compression)

    def task(self) -> dict[str, Any]:
        """The task config every selected device gets (a strategy may add to it)."""
        task = {"model": self.model, "epochs": self.epochs, "batch_size": self.batch_size,
                "learning_rate": self.learning_rate}
        if self.framework != "keras":  # a task without it means Keras, as from servers before it
            task["framework"] = self.framework
        if self.compression != "none":
            task["compression"] = self.compression
        return task


@dataclass
class FederationConfig:
    """How rounds are formed, aggregated and closed."""

    # Each number declares its range (fedhub.engine.params.check_numbers refuses the rest at start-up).
    rounds: int = params.number(3, 0, 10_000_000, flag="--rounds")  # total rounds; 0 runs until paused
    min_devices: int = params.number(1, 1, 10_000_000, flag="--min-devices")  # to open a round
    # share of the selected devices that must report by the deadline
    quorum: float = params.number(0.5, above=0, high=1, flag="--quorum")
    # seconds from a round's opening to its deadline (at most 30 days)
    round_timeout: float = params.number(600.0, above=0, high=30 * 86_400, flag="--round-timeout")
    # a device unseen this long (and not training) is offline
    device_timeout: float = params.number(60.0, above=0, high=30 * 86_400, flag="--device-timeout")
    # share of the available devices selected each round
    fraction: float = params.number(1.0, above=0, high=1, flag="--fraction")
    auto_activate: bool = False  # new devices start active
    start: bool = False  # training starts without an admin's "start"
    strategy: str = "fedavg"  # a name from fedhub.engine.strategies (--list-strategies)
    strategy_params: dict[str, Any] = field(default_factory=dict)  # its constructor arguments
    # Bytes of a round's buffered updates (robust strategies) kept in RAM before spilling to disk.
    memory_budget: int = params.number(DEFAULT_MEMORY_BUDGET, 0, 2**50, flag="--strategy-memory-mb",
                                       scale=2**20, unit="MiB")
    seed: int = params.number(0, 0, 2**63 - 1, flag="--seed")
    compress_downlink: bool = False  # the global model download goes out compressed too
    # Asynchronous rounds (FedBuff): devices train continuously; a new model every buffer_size
    # updates, each weighted by (1 + staleness) ** -staleness_exponent, none older than max_staleness.
    mode: str = "sync"  # or "async"
    buffer_size: int = params.number(10, 1, 1_000_000, flag="--buffer")
    max_staleness: int = params.number(10, 0, 10_000, flag="--max-staleness")
    staleness_exponent: float = params.number(0.5, 0, 10, flag="--staleness-exponent")
    training: TrainingConfig = field(default_factory=TrainingConfig)
    privacy: DPConfig | None = None  # differential privacy (--dp), wrapping the strategy
    secagg: SecAggConfig | None = None  # secure aggregation (SecAgg+) of every round; None: off

    def __post_init__(self) -> None:
        if isinstance(self.privacy, Mapping):  # from the Python API or to_dict(): typed, one line
            self.privacy = params.build(DPConfig, self.privacy, "dp")

    def validate(self) -> None:
        """ValueError (one line) for settings that cannot work, the strategy's included: every
        number (the training's and the privacy's too) finite and in its declared range first."""
        params.check_numbers(self)
        self.training.validate()
        if self.compress_downlink and not compression.parse(self.training.compression).active:
            raise ValueError("compress_downlink (--compress-downlink) needs a compression (--compression) "
                             "other than none")
        strategy = self.make_strategy()
        if self.mode not in ("sync", "async"):
            raise ValueError(f"mode must be sync or async, got {self.mode!r}")
        if self.mode == "async":
            self.check_async()
        if self.secagg is not None:
            self.check_secagg(strategy)
        elif isinstance(strategy, DistributedDP):
            raise ValueError("--dp distributed needs --secure-aggregation: each device's share of "
                             "the noise protects only a masked sum")

    def check_async(self) -> None:
        """Asynchronous versions go through the strategy's own aggregator, one per buffer of
        changes: every strategy, compression, central and local DP work. Secure aggregation's
        staged rounds do not fit a buffer filled by whoever comes (yet), and a compressed
        download is not kept for older versions, so the server could not tell what a device's
        change was made from."""
        for option, on in (("--secure-aggregation", self.secagg is not None),
                           ("--compress-downlink", self.compress_downlink)):
            if on:
                raise ValueError(f"asynchronous mode (--mode async) does not work with {option} yet")

    def check_secagg(self, strategy: Strategy) -> None:
        """Secure aggregation hides each update, so only a strategy that needs just their
        weighted mean can work with it, and a round needs at least the threshold of devices."""
        assert self.secagg is not None
        self.secagg.validate()
        if self.privacy is not None and not isinstance(strategy, DistributedDP):
            raise ValueError(f"--dp {self.privacy.mode} does not work with --secure-aggregation, which "
                             "hides each update from the server: use --dp distributed")
        if isinstance(strategy, DistributedDP):
            self.check_noise_share(strategy)
            strategy = strategy.strategy
        if not isinstance(strategy, Averaging):
            raise ValueError(f"strategy {strategy.name} needs every device's update, which secure "
                             "aggregation hides: use fedavg, fedavgm, fedprox, fedadam, fedyogi or "
                             "fedadagrad with --secure-aggregation")
        needed = max(2, self.secagg.threshold or 2)
        if self.min_devices < needed:
            raise ValueError(f"secure aggregation needs at least {needed} devices a round; "
                             f"min_devices is {self.min_devices}")
        if compression.parse(self.training.compression).active:
            raise ValueError("secure aggregation quantizes each update itself: use --compression none "
                             "with --secure-aggregation")

    def check_noise_share(self, strategy: DistributedDP) -> None:
        """A coordinate of a change clipped to L2 norm C is at most C; with a noise share of std
        s added, secure aggregation's coordinate clip must leave room for C + 4 s, or it would cut
        the noise (and the clipped change) more than rarely (4 s: a share per 16,000 coordinates)."""
        assert self.secagg is not None
        needed = strategy.clipping_norm + 4 * strategy.noise_share_std
        if self.secagg.clip_range < needed:
            raise ValueError(f"--secagg-clip {self.secagg.clip_range:g} is too small for --dp distributed: "
                             f"raise it to at least {needed:.4g} (the clip bound {strategy.clipping_norm:g} "
                             f"+ 4 x the noise share std {strategy.noise_share_std:.4g}) or lower --dp-clip")

    def make_strategy(self) -> Strategy:
        """The configured strategy, refused (ValueError) if it cannot aggregate the smallest
        round these settings allow."""
        strategy = self.check_strategy(make_strategy(self.strategy, **self.strategy_params))
        if self.privacy is not None:
            strategy = self.privacy.wrap(strategy, self.per_round())
        return strategy

    def per_round(self) -> int:
        """The fewest updates a round is made from (a version in asynchronous mode)."""
        return self.buffer_size if self.mode == "async" else self.min_devices

    def check_strategy(self, strategy: Strategy) -> Strategy:
        """``strategy``, refused (ValueError) if the smallest round could not be aggregated."""
        if self.mode == "async":
            strategy.check_min_devices(self.buffer_size, "buffer_size (--buffer)")
        else:
            strategy.check_min_devices(self.min_devices)
        return strategy

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# The defaults, for signatures and help texts that show them.
FEDERATION = FederationConfig()
TRAINING = TrainingConfig()
