"""The run's settings and their defaults, shared by the engine, the HTTP layer, the CLI and
the Python API: every default lives here, once."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

from . import compression, params
from .privacy import DistributedDP, DPConfig
from .secagg import SecAggConfig
from .secagg.errors import ConfigError
from .strategies import DEFAULT_MEMORY_BUDGET, STRATEGIES, Strategy, make_strategy
from .strategies.averaging import Averaging
from .strategies.fairness import QFedAvg

PERSONALIZATION: tuple[str, ...] = ("none", "finetune", "fedper", "ditto")


@dataclass
class TrainingConfig:
    """What each selected device does in a round; travels with the task."""

    # which network and framework: the server's (ServerConfig.model, .framework) once it loads it
    model: str = "basic"
    framework: str = "keras"
    epochs: int = params.number(1, 1, 10_000, help="local epochs per round")
    batch_size: int = params.number(32, 1, 1_000_000, help="devices' training batch size")
    learning_rate: float = params.number(1e-3, above=0, high=10, help="devices' learning rate")
    compression: str = params.setting(
        "none", "how devices send updates: none, q8, q4 (8/4-bit deltas; q8:tensor, q8:block=N for "
        "the scales) or topk:FRACTION (sparse, with error feedback)", metavar="SCHEME")
    # Personalization: what each device keeps of its own beside the global model.
    personalization: str = params.setting(
        "none", "each device's own model: none, finetune (the global model after local training), "
        "fedper (personal layers stay on the device) or ditto (a personal model pulled toward the "
        "global one)", choices=PERSONALIZATION, metavar="METHOD")
    personal_layers: str = params.setting(
        "", "fedper: comma-separated name prefixes of the tensors that stay on each device (default: "
        "the network's last layer)", metavar="PREFIXES")
    ditto_lambda: float = params.number(0.1, 0, 1000, help="ditto: strength of the pull of each personal "
                                        "model toward the global one")

    def validate(self) -> None:
        """ValueError (one line) for a setting out of its range or an unknown compression."""
        params.check_numbers(self)
        try:
            compression.parse(self.compression)
        except ValueError as exc:
            raise params.SettingError(f"{{0}}: {exc}", "compression") from None
        if self.personalization not in PERSONALIZATION:
            raise params.SettingError(f"{{0}} must be one of {', '.join(PERSONALIZATION)}, got "
                                      f"{self.personalization!r}", "personalization")
        if self.personal_layers and self.personalization != "fedper":
            raise params.SettingError("{0} names FedPer's personal layers: it needs {1} fedper",
                                      "personal_layers", "personalization")
        prefixes = self.personal_layers.split(",") if self.personal_layers else []
        if len(self.personal_layers) > 1000 or not all(p.strip() for p in prefixes):
            raise params.SettingError("{0} must be comma-separated tensor name prefixes (at most 1000 "
                                      "characters)", "personal_layers")

    def task(self) -> dict[str, Any]:
        """The task config every selected device gets (a strategy may add to it)."""
        task = {"model": self.model, "epochs": self.epochs, "batch_size": self.batch_size,
                "learning_rate": self.learning_rate}
        if self.framework != "keras":  # a task without it means Keras, as from servers before it
            task["framework"] = self.framework
        if self.compression != "none":
            task["compression"] = self.compression
        if self.personalization != "none":
            task["personalization"] = self.personalization
            if self.personalization == "fedper" and self.personal_layers:
                task["personal_layers"] = self.personal_layers
            if self.personalization == "ditto":
                task["ditto_lambda"] = self.ditto_lambda
        return task


@dataclass
class FederationConfig:
    """How rounds are formed, aggregated and closed. Each setting declares its default, range and
    help here (fedhub.engine.params.check_numbers refuses the rest at start-up)."""

    rounds: int = params.number(3, 0, 10_000_000, help="rounds in the run (0: until paused)")
    min_devices: int = params.number(1, 1, 10_000_000, help="active, online devices needed to open a round")
    quorum: float = params.number(
        0.5, above=0, high=1, help="share of the selected devices needed to close a round at its deadline")
    round_timeout: float = params.number(600.0, above=0, high=30 * 86_400,
                                         help="seconds from a round's opening to its deadline")
    device_timeout: float = params.number(60.0, above=0, high=30 * 86_400,
                                          help="seconds unseen before an idle device counts as offline")
    fraction: float = params.number(1.0, above=0, high=1,
                                    help="share of the available devices selected each round")
    fed_eval_every: int = params.number(
        1, 0, 10_000_000, metavar="N", help="devices evaluate the global model on their held-out data "
        "every N rounds (0: never)")
    fed_eval_fraction: float = params.number(
        1.0, above=0, high=1, metavar="F", help="share of a round's devices asked to evaluate")
    auto_activate: bool = params.setting(False, "new devices start active")
    start: bool = params.setting(False, "training starts without an admin's start call")
    strategy: str = params.setting("fedavg", "the aggregation strategy (--list-strategies)",
                                   choices=STRATEGIES, metavar="NAME")
    # Its constructor's arguments: repeated KEY=VALUE on the command line, a table in a file.
    strategy_params: dict[str, Any] = params.setting(
        help="the strategy's parameters (KEY=VALUE, repeatable; a [strategy_params] table in a file)",
        factory=dict, flag="--strategy-arg", metavar="KEY=VALUE")
    # MiB of a round's buffered updates (robust strategies) kept in RAM before spilling to disk.
    strategy_memory_mb: float = params.number(
        DEFAULT_MEMORY_BUDGET / 2**20, 0, 2**30, help="MiB of a round's updates that median, trimmed "
        "mean, Krum and Bulyan keep in RAM; beyond it they go to a file in the state directory")
    seed: int = params.number(0, 0, 2**63 - 1, help="seed of the device selection and the initial weights")
    compress_downlink: bool = params.setting(
        False, "the global model download is compressed too (with a compression other than none)")
    # Asynchronous rounds (FedBuff): devices train continuously; a new model every buffer_size
    # updates, each weighted by (1 + staleness) ** -staleness_exponent, none older than max_staleness.
    mode: str = params.setting("sync", "sync: rounds; async: devices train continuously (FedBuff)",
                               choices=("sync", "async"))
    buffer_size: int = params.number(10, 1, 1_000_000, aliases=("--buffer",), metavar="K",
                                     help="async: a new global model version every K updates")
    max_staleness: int = params.number(
        10, 0, 10_000, metavar="S", help="async: refuse updates trained from a model over S versions old")
    staleness_exponent: float = params.number(0.5, 0, 10, metavar="A",
                                              help="async: weigh an update by (1 + staleness) ** -A")
    training: TrainingConfig = params.group(factory=TrainingConfig, flat=True)
    # differential privacy, wrapping the strategy (None: off)
    dp: DPConfig | None = params.group(switch="mode")
    secagg: SecAggConfig | None = params.group(
        flag="--secure-aggregation",
        help="SecAgg+: the server learns only the weighted mean of each round's updates")

    @property
    def memory_budget(self) -> int:
        """Bytes of a round's updates a robust strategy keeps in RAM (the engine's unit)."""
        return int(self.strategy_memory_mb * 2**20)

    def __post_init__(self) -> None:
        if isinstance(self.dp, Mapping):  # from the Python API or to_dict(): typed, one line
            self.dp = params.build(DPConfig, self.dp, "dp")
        self.sync_secagg()

    def sync_secagg(self) -> None:
        """Secure aggregation quantizes each change itself, so ``compression`` q8 / q4 with it
        means: quantize to 8 / 4 bits and mask in the smallest field that holds the round's sum
        (SecAggConfig.quantization). Set here, which every front end passes through, so the
        compression and the secure rounds cannot disagree; validate() refuses the rest."""
        if self.secagg is None:
            return
        try:
            scheme = compression.parse(self.training.compression)
        except ValueError:
            return  # validate() says why
        bits = scheme.bits if scheme.kind in ("q8", "q4") else 0
        if self.secagg.quantization != bits:
            self.secagg = self.secagg.quantized(bits)

    def validate(self) -> None:
        """:class:`params.SettingError` (one line, naming the settings) for settings that cannot
        work, the strategy's included: every number (the training's, DP's and secure
        aggregation's too) finite and in its declared range first."""
        Error = params.SettingError
        params.check_numbers(self)
        self.training.validate()
        self.sync_secagg()  # the compression may have been set after construction
        if self.compress_downlink and not compression.parse(self.training.compression).active:
            raise Error("{0} needs a {1} other than none", "compress_downlink", "compression")
        strategy = self.make_strategy()
        if self.mode not in ("sync", "async"):
            raise Error(f"{{0}} must be sync or async, got {self.mode!r}", "mode")
        if self.mode == "async":
            self.check_async()
        if self.secagg is not None:
            self.check_secagg(strategy)
        elif isinstance(strategy, DistributedDP):
            raise Error("{0}=distributed needs {1}: each device adds only a share of the noise, which "
                        "protects a sum only while the updates in it stay masked", "dp.mode", "secagg")

    def check_async(self) -> None:
        """Asynchronous versions go through the strategy's own aggregator, one per buffer of
        changes: every strategy, compression, central and local DP work. What cannot is refused
        with the reason (tests/test_combinations.py walks every combination)."""
        if self.secagg is not None:
            raise params.SettingError(
                "asynchronous mode ({0}=async) cannot use {1}: a masked sum needs a fixed cohort that "
                "deals key shares before anyone uploads, while a buffer is filled by whoever comes",
                "mode", "secagg")
        if self.compress_downlink:
            raise params.SettingError(
                "asynchronous mode ({0}=async) cannot use {1}: the server keeps only the latest "
                "broadcast model, so it could not tell which compressed copy of an older version a "
                "device's change was made from", "mode", "compress_downlink")

    def check_secagg(self, strategy: Strategy) -> None:
        """Secure aggregation hides each update, so only a strategy that needs just their
        weighted mean can work with it, and a round needs at least the threshold of devices.
        Each refusal says why the combination cannot work."""
        assert self.secagg is not None
        Error = params.SettingError
        try:
            self.secagg.validate()
        except ConfigError as exc:  # its own message, naming the setting at fault after it
            raise Error(f"{exc} ({{0}})", f"secagg.{exc.field}") from None
        if self.dp is not None and self.dp.mode == "local":
            raise Error("{0}=local cannot be used with {1}: each device would add the noise meant for an "
                        "update the server sees alone, sqrt(devices) times what a masked sum needs; use "
                        "{0}=distributed", "dp.mode", "secagg")
        if self.dp is not None and not isinstance(strategy, DistributedDP):
            raise Error(f"{{0}}={self.dp.mode} cannot be used with {{1}}: central DP clips each device's "
                        "update on the server, which secure aggregation never shows it; use "
                        "{0}=distributed", "dp.mode", "secagg")
        if isinstance(strategy, DistributedDP):
            self.check_noise_share(strategy)
            strategy = strategy.strategy
        if isinstance(strategy, QFedAvg):
            raise Error(f"strategy {strategy.name} cannot be used with {{0}}: it weighs each device's "
                        "update by that device's own loss, and secure aggregation shows the server only "
                        "the sum of the updates; use fedavg, fedavgm, fedprox, fedadam, fedyogi or "
                        "fedadagrad", "secagg")
        if not isinstance(strategy, Averaging):
            raise Error(f"strategy {strategy.name} cannot be used with {{0}}: it compares the devices' "
                        "updates one by one, and secure aggregation shows the server only their sum; "
                        "use fedavg, fedavgm, fedprox, fedadam, fedyogi or fedadagrad", "secagg")
        needed = max(2, self.secagg.threshold or 2)
        if self.min_devices < needed:
            raise Error(f"secure aggregation needs at least {needed} devices a round; "
                        f"{{0}} is {self.min_devices}", "min_devices")
        self.check_secagg_compression()

    def check_secagg_compression(self) -> None:
        """q8 and q4 quantize the masked change to 8 or 4 bits (SecAggConfig.quantization); the
        rest cannot be masked without losing what it saves, or needs what masking hides."""
        Error = params.SettingError
        scheme = compression.parse(self.training.compression)
        if scheme.kind == "topk":
            raise Error(f"{{0}} {scheme} cannot be used with {{1}}: each device keeps different "
                        "coordinates, while the masks that cancel in the sum cover every coordinate, so "
                        "a masked upload is dense and saves nothing; use q8 or q4", "compression", "secagg")
        if scheme.active and scheme.block != compression.BLOCK:
            raise Error(f"{{0}} {scheme} cannot be used with {{1}}: the devices' codes add up only if all "
                        f"quantize with one shared scale (the secure-aggregation clip range), not scales "
                        f"of their own; use {scheme.kind}", "compression", "secagg")
        if self.compress_downlink:
            raise Error("{0} cannot be used with {1}: the unmasked mean change is added to the server's "
                        "exact model, while each device's change would start from the compressed copy "
                        "it holds", "compress_downlink", "secagg")

    def check_noise_share(self, strategy: DistributedDP) -> None:
        """A coordinate of a change clipped to L2 norm C is at most C; with a noise share of std
        s added, secure aggregation's coordinate clip must leave room for C + 4 s, or it would cut
        the noise (and the clipped change) more than rarely (4 s: a share per 16,000 coordinates)."""
        assert self.secagg is not None
        needed = strategy.clipping_norm + 4 * strategy.noise_share_std
        if self.secagg.clip_range < needed:
            raise params.SettingError(
                f"{{0}} {self.secagg.clip_range:g} is too small for {{1}}=distributed: raise it to at "
                f"least {needed:.4g} (the clip bound {strategy.clipping_norm:g} + 4 x the noise share std "
                f"{strategy.noise_share_std:.4g}) or lower {{2}}",
                "secagg.clip_range", "dp.mode", "dp.clipping_norm")

    def make_strategy(self) -> Strategy:
        """The configured strategy, refused (ValueError) if it cannot aggregate the smallest
        round these settings allow."""
        strategy = self.check_strategy(make_strategy(self.strategy, **self.strategy_params))
        if self.dp is not None:
            strategy = self.dp.wrap(strategy, self.per_round())
        return strategy

    def per_round(self) -> int:
        """The fewest updates a round is made from (a version in asynchronous mode)."""
        return self.buffer_size if self.mode == "async" else self.min_devices

    def check_strategy(self, strategy: Strategy) -> Strategy:
        """``strategy``, refused (:class:`params.SettingError` naming the setting that bounds a
        round) if the smallest round could not be aggregated."""
        setting = "buffer_size" if self.mode == "async" else "min_devices"
        try:
            strategy.check_min_devices(self.per_round(), "{0}")
        except ValueError as exc:
            raise params.SettingError(str(exc), setting) from None
        return strategy

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# The defaults, for signatures and help texts that show them.
FEDERATION = FederationConfig()
TRAINING = TrainingConfig()
