"""The run's settings and their defaults, shared by the engine, the HTTP layer, the CLI and
the Python API: every default lives here, once."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from .strategies import DEFAULT_MEMORY_BUDGET, Strategy, make_strategy
from .strategies.averaging import Averaging


@dataclass
class TrainingConfig:
    """What each selected device does in a round; travels with the task."""

    model: str = "basic"
    epochs: int = 1
    batch_size: int = 32
    learning_rate: float = 1e-3

    def validate(self) -> None:
        if self.epochs < 1:
            raise ValueError("epochs must be at least 1")
        if self.batch_size < 1:
            raise ValueError("batch_size must be at least 1")
        if not 0 < self.learning_rate < 10:
            raise ValueError("learning_rate must be in (0, 10)")

    def task(self) -> dict[str, Any]:
        """The task config every selected device gets (a strategy may add to it)."""
        return {"model": self.model, "epochs": self.epochs, "batch_size": self.batch_size,
                "learning_rate": self.learning_rate}


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
    # Asynchronous rounds (FedBuff): devices train continuously; a new model every buffer_size
    # updates, each weighted by (1 + staleness) ** -staleness_exponent, none older than max_staleness.
    mode: str = "sync"  # or "async"
    buffer_size: int = 10
    max_staleness: int = 10
    staleness_exponent: float = 0.5
    training: TrainingConfig = field(default_factory=TrainingConfig)

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
        strategy = self.make_strategy()
        if self.mode not in ("sync", "async"):
            raise ValueError(f"mode must be sync or async, got {self.mode!r}")
        if self.buffer_size < 1:
            raise ValueError("buffer_size (--buffer) must be at least 1")
        if not 0 <= self.max_staleness <= 10_000:
            raise ValueError("max_staleness (--max-staleness) must be from 0 to 10000")
        if not 0 <= self.staleness_exponent <= 10:
            raise ValueError("staleness_exponent must be from 0 to 10")
        if self.mode == "async" and not isinstance(strategy, Averaging):
            raise ValueError(f"asynchronous mode needs a streaming strategy (fedavg, fedprox, fedavgm, "
                             f"fedadam, fedyogi, fedadagrad); {strategy.name} keeps every update")

    def make_strategy(self) -> Strategy:
        """The configured strategy, refused (ValueError) if it cannot aggregate the smallest
        round these settings allow."""
        strategy = make_strategy(self.strategy, **self.strategy_params)
        strategy.check_min_devices(self.min_devices)
        return strategy

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# The defaults, for signatures and help texts that show them.
FEDERATION = FederationConfig()
TRAINING = TrainingConfig()
