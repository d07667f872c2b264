"""The run's settings and their defaults, shared by the engine, the HTTP layer, the CLI and
the Python API: every default lives here, once."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from . import compression, params
from .privacy import DPConfig
from .secagg import SecAggConfig
from .strategies import DEFAULT_MEMORY_BUDGET, Strategy, make_strategy
from .strategies.averaging import Averaging


@dataclass
class TrainingConfig:
    """What each selected device does in a round; travels with the task."""

    model: str = "basic"
    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 1e-3
    compression: str = "none"  # how devices send updates (fedcore.compression.parse)

    def validate(self) -> None:
        compression.parse(self.compression)
        if self.epochs < 1:
            raise ValueError("epochs must be at least 1")
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if not 0 < self.learning_rate < 10:
            raise ValueError("learning_rate must be in (0, 10)")

    def task(self) -> dict[str, Any]:
        """The task config every selected device gets (a strategy may add to it)."""
        task = {"model": self.model, "epochs": self.epochs, "batch_size": self.batch_size,
                "learning_rate": self.learning_rate}
        if self.compression != "none":
            task["compression"] = self.compression
        return task


@dataclass
class FederationConfig:
    """How rounds are formed, aggregated and closed."""

    rounds: int = 3  # total rounds of the run; 0 runs until paused
    min_devices: int = 1  # active, online devices needed to open a round
    quorum: float = 0.5  # share of the selected devices that must report by the deadline
    round_timeout: float = 600.0  # seconds from a round's opening to its deadline
    device_timeout: float = 60.0  # a device unseen this long (and not training) is offline
    fraction: float = 1.0  # share of the available devices selected each round
    auto_activate: bool = False  # new devices start active
    start: bool = False  # training starts without an admin's "start"
    strategy: str = "fedavg"  # a name from fedcore.strategies (--list-strategies)
    strategy_params: dict[str, Any] = field(default_factory=dict)  # its constructor arguments
    # Bytes of a round's buffered updates (robust strategies) kept in RAM before spilling to disk.
    memory_budget: int = DEFAULT_MEMORY_BUDGET
    seed: int = 0
    compress_downlink: bool = False  # the global model download goes out compressed too
    # Asynchronous rounds (FedBuff): devices train continuously; a new model every buffer_size
    # updates, each weighted by (1 + staleness) ** -staleness_exponent, none older than max_staleness.
    mode: str = "sync"  # or "async"
    buffer_size: int = 10
    max_staleness: int = 10
    staleness_exponent: float = 0.5
    training: TrainingConfig = field(default_factory=TrainingConfig)
    privacy: DPConfig | None = None  # differential privacy (--dp), wrapping the strategy
    secagg: SecAggConfig | None = None  # secure aggregation (SecAgg+) of every round; None: off

    def __post_init__(self) -> None:
        if isinstance(self.privacy, Mapping):  # from the Python API or to_dict(): typed, one line
            self.privacy = params.build(DPConfig, self.privacy, "dp")

    def validate(self) -> None:
        """ValueError (one line) for settings that cannot work, the strategy's included."""
        if self.rounds < 0:
            raise ValueError("rounds must be 0 (unlimited) or more")
        if self.min_devices < 1:
            raise ValueError("min_devices must be at least 1")
        if not 0 < self.quorum <= 1:
            raise ValueError("quorum must be in (0, 1]")
        if not 0 < self.fraction <= 1:
            raise ValueError("fraction must be in (0, 1]")
        if self.round_timeout <= 0 or self.device_timeout <= 0:
            raise ValueError("timeouts must be positive")
        if self.memory_budget < 0:
            raise ValueError("memory_budget must be 0 or more")
        self.training.validate()
        if self.compress_downlink and not compression.parse(self.training.compression).active:
            raise ValueError("compress_downlink (--compress-downlink) needs a compression (--compression) "
                             "other than none")
        strategy = self.make_strategy()
        if self.mode not in ("sync", "async"):
            raise ValueError(f"mode must be sync or async, got {self.mode!r}")
        if self.buffer_size < 1:
            raise ValueError("buffer_size (--buffer) must be at least 1")
        if not 0 <= self.max_staleness <= 10_000:
            raise ValueError("max_staleness (--max-staleness) must be from 0 to 10000")
        if not 0 <= self.staleness_exponent <= 10:
            raise ValueError("staleness_exponent must be from 0 to 10")
        if self.mode == "async":
            self.check_async(strategy)
        if self.secagg is not None:
            self.check_secagg(strategy)

    def check_async(self, strategy: Strategy) -> None:
        """Asynchronous rounds fold each update into a running sum as it comes: a strategy that
        keeps every update, a staged protocol or per-round noise does not fit (yet)."""
        for option, on in (("--secure-aggregation", self.secagg is not None),
                           ("--compression", compression.parse(self.training.compression).active),
                           ("--dp", self.privacy is not None)):
            if on:
                raise ValueError(f"asynchronous mode (--mode async) does not work with {option} yet")
        if not isinstance(strategy, Averaging):
            raise ValueError(f"asynchronous mode needs a streaming strategy (fedavg, fedprox, fedavgm, "
                             f"fedadam, fedyogi, fedadagrad); {strategy.name} keeps every update")

    def check_secagg(self, strategy: Strategy) -> None:
        """Secure aggregation hides each update, so only a strategy that needs just their
        weighted mean can work with it, and a round needs at least the threshold of devices."""
        assert self.secagg is not None
        self.secagg.validate()
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

    def make_strategy(self) -> Strategy:
        """The configured strategy, refused (ValueError) if it cannot aggregate the smallest
        round these settings allow."""
        strategy = make_strategy(self.strategy, **self.strategy_params)
        strategy.check_min_devices(self.min_devices)
        if self.privacy is not None:
            strategy = self.privacy.wrap(strategy, self.min_devices)
        return strategy

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# The defaults, for signatures and help texts that show them.
FEDERATION = FederationConfig()
TRAINING = TrainingConfig()
