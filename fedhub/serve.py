"""FedHub server: ``python server.py 4000`` (or ``--port 4000`` and more; see ``--help``).

Builds the engine (storage, device registry, round coordinator) around a
global model of the chosen framework (``--framework keras|torch``, through
:mod:`fedhub.frameworks`) and the chosen data set's held-out test set
(``--dataset fashion-mnist|cifar-10``), wraps it in the Flask app, and serves
it with waitress, a production WSGI server.
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flask import Flask

from fedhub import state_dir as state
from fedhub.api import build_app
from fedhub.api.app import BODY_SLACK, MAX_IMAGE_BYTES, MAX_WAIT
from fedhub.api.predictor import Predictor
from fedhub.api.serving import ServeOptions
from fedhub.api.throttle import FAILURES_PER_MINUTE, check_secret
from fedhub.engine import auth, history, params, wire
from fedhub.engine.config import FEDERATION, TRAINING, FederationConfig, TrainingConfig
from fedhub.engine.devices import DeviceRegistry
from fedhub.engine.plural import plural
from fedhub.engine.rounds import Coordinator
from fedhub.engine.storage import Storage
from fedhub.engine.strategies import STRATEGIES, ParamError, format_strategies, parse_strategy_args
from fedhub.options import framework as framework_options
from fedhub.options import secagg as secagg_options
from fedhub.options.dp import add_dp_options, dp_config
from fedhub.options.parser import Parser
from fedhub.state_dir import ADMIN_TOKEN_FILE, ENROLL_SECRET_FILE

log = logging.getLogger("fedhub.server")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass
class ServerConfig:
    """Everything the server needs; the CLI fills it, tests build it directly.

    ``state_dir`` holds the database, checkpoints and secrets; ``None`` means the state
    directory of :func:`fedhub.state_dir.resolve` ($FEDHUB_STATE_DIR, else ``server_training/``).
    ``eval_dir`` defaults to that state directory's ``eval/``.
    """

    host: str = ServeOptions.host
    port: int = params.number(ServeOptions.port, 0, 65535, flag="--port")  # 0: any free port
    state_dir: Path | None = None
    eval_dir: Path | None = None
    model: str = TRAINING.model
    # FedHub's own networks: which framework trains them and which data set they learn
    framework: str = "keras"
    dataset: str = "fashion-mnist"
    data_dir: str | None = None
    test_limit: int | None = params.number(None, 1, 10**9, flag="--test-limit")
    enroll_secret: str | None = None
    admin_token: str | None = None
    # Each number declares its range: validate() refuses the rest before anything loads.
    max_upload_bytes: int = params.number(wire.DEFAULT_MAX_BYTES, 2**16, 2**40, flag="--max-upload-mb",
                                          scale=2**20, unit="MiB")
    max_image_bytes: int = params.number(MAX_IMAGE_BYTES, 2**16, 2**32, flag="--max-image-mb",
                                         scale=2**20, unit="MiB")
    max_wait: float = params.number(MAX_WAIT, 0, 3600, flag="--max-wait")
    threads: int = params.number(ServeOptions.threads, 1, 1024, flag="--threads")
    reset: bool = False
    federation: FederationConfig = field(default_factory=FederationConfig)
    # HTTPS when both are given (devices verify the certificate; see --ca on the device).
    certfile: Path | None = None
    keyfile: Path | None = None
    # before an idle or trickling connection closes
    channel_timeout: float = params.number(ServeOptions.channel_timeout, above=0, high=86_400,
                                           flag="--channel-timeout")
    # to send the request headers
    header_timeout: float = params.number(ServeOptions.header_timeout, above=0, high=3600,
                                          flag="--header-timeout")
    # per client address (0: no limit)
    auth_failures_per_minute: int = params.number(FAILURES_PER_MINUTE, 0, 10**6,
                                                  flag="--auth-failures-per-minute")
    # Bring your own model: any compiled keras.Model (the Python API), or a factory
    # "package.module:build" returning one; either replaces `model`. `test_data` (an .npz
    # path with arrays x, y, or an (x, y) pair) gives it per-round test metrics.
    keras_model: Any = None
    model_factory: str | None = None
    test_data: Any = None
    # TensorBoard event files under runs_dir/run_id/ (None: none written).
    runs_dir: Path | None = None
    run_id: str | None = None
    # devices that get a TensorBoard run of their own
    tensorboard_devices: int = params.number(32, 0, 100_000, flag="--tensorboard-devices")

    def __post_init__(self) -> None:
        layout = state.resolve(self.state_dir)
        self.state_dir = layout.server_dir
        self.eval_dir = Path(self.eval_dir) if self.eval_dir is not None else layout.eval_dir

    def validate(self) -> None:
        """ValueError (one line, naming the option) for a setting that would leave the server
        unusable: every number finite and in its declared range (no worker threads, an upload
        limit no update fits), then the run's settings (:meth:`FederationConfig.validate`).
        ``server.py`` and ``fedhub.Server`` both pass here before loading anything."""
        params.check_numbers(self)
        self.check_framework()
        self.federation.validate()

    def check_framework(self) -> None:
        """ValueError (one line) for a framework, data set or network that do not go together, or
        a feature the framework cannot serve yet; checked without importing any framework."""
        from fedhub import datasets, frameworks

        if self.framework not in frameworks.NAMES:
            raise ValueError(f"--framework must be one of {', '.join(frameworks.NAMES)}, "
                             f"got {self.framework!r}")
        datasets.get(self.dataset)  # DatasetError (a ValueError) naming the choices
        if self.keras_model is not None:
            if self.framework != "keras":
                raise ValueError(f"a keras.Model of your own cannot run with --framework {self.framework}; "
                                 "give a --model-factory returning an nn.Module instead")
            return
        if self.model_factory:  # Keras: a compiled keras.Model; PyTorch: an nn.Module on --dataset
            return
        frameworks.default_network(self.framework, self.dataset)  # one network for it, at least
        fits = frameworks.networks(self.framework, self.dataset)
        if self.model not in fits:
            takes = frameworks.network_dataset(self.framework, self.model)
            why = f"it takes {takes} images" if takes else f"{self.framework} has no network {self.model!r}"
            raise ValueError(f"--model {self.model} cannot learn {self.dataset} with --framework "
                             f"{self.framework} ({why}); choose {', '.join(fits)}")


def _secrets(config: ServerConfig) -> tuple[str, str]:
    """Secrets come from the config or environment, else from owner-only files beside the state."""
    enroll = (config.enroll_secret or os.environ.get("FEDHUB_ENROLL_SECRET")
              or auth.load_or_create_secret(Path(config.state_dir) / ENROLL_SECRET_FILE))
    admin = (config.admin_token or os.environ.get("FEDHUB_ADMIN_TOKEN")
             or auth.load_or_create_secret(Path(config.state_dir) / ADMIN_TOKEN_FILE))
    check_secret(enroll, "the enrollment secret (FEDHUB_ENROLL_SECRET)")  # guessable: fedhub/api/throttle.py
    check_secret(admin, "the admin token (FEDHUB_ADMIN_TOKEN)")
    return enroll, admin


def load_global_model(config: ServerConfig):
    """The server's side of the global model: FedHub's own network of ``config.framework`` on
    ``config.dataset``'s test set, or the user's Keras model (``keras_model``, ``model_factory``)
    with its own test set. Bad settings raise ValueError."""
    from fedhub.engine.errors import InvalidInput
    from fedhub.global_model import GlobalModel, load_npz

    test = config.test_data
    try:
        if isinstance(test, str | Path):
            test = load_npz(Path(test), field="test_data")
        # FedHub's networks and a PyTorch module of the user's own are tested on --dataset's test
        # set; a Keras model of the user's own only on its --test-data
        own_keras = config.keras_model is not None or (config.model_factory and config.framework == "keras")
        if test is None and not own_keras:
            from fedhub import datasets

            _, test = datasets.load(config.dataset, config.data_dir)
        if test is not None and config.test_limit:
            test = (test[0][: config.test_limit], test[1][: config.test_limit])
        if config.keras_model is not None:
            model = GlobalModel(config.keras_model, test_data=test)
        elif config.model_factory:
            model = GlobalModel.from_factory(config.model_factory, test_data=test,
                                             framework=config.framework, dataset=config.dataset,
                                             seed=config.federation.seed)
        else:
            model = GlobalModel.named(config.model, seed=config.federation.seed, test_data=test,
                                      framework=config.framework)
    except InvalidInput as exc:
        raise ValueError(f"test data: {exc.message}") from None
    config.federation.training.model = model.name
    config.federation.training.framework = model.framework
    return model


def build_engine(config: ServerConfig, global_model=None) -> Coordinator:
    """The engine with the global model: initial weights, and evaluation on the test set."""
    global_model = global_model or load_global_model(config)
    evaluate = global_model.evaluate

    state_dir = Path(config.state_dir)
    if config.reset:
        from fedhub.cleaner import clean_server_state

        clean_server_state(state_dir, Path(config.eval_dir))
    state_dir.mkdir(parents=True, exist_ok=True)
    enroll, _ = _secrets(config)
    storage = Storage(state_dir)
    devices = DeviceRegistry(storage, enroll_secret=enroll,
                             auto_activate=config.federation.auto_activate,
                             device_timeout=config.federation.device_timeout)
    engine = Coordinator(storage, devices, initial_weights=global_model.initial_weights(),
                         config=config.federation, evaluate=evaluate,
                         max_upload_bytes=config.max_upload_bytes)
    csv_path = Path(config.eval_dir) / "history.csv"
    engine.add_hook(lambda _row, _w: history.write_csv(csv_path, engine.history()))
    return engine


def create_app(config: ServerConfig | None = None) -> Flask:
    """The app factory: a fresh engine and Flask app for ``config``, its round driver started.
    A setting out of range is a ValueError before anything loads."""
    config = config or ServerConfig()
    config.validate()
    _, admin = _secrets(config)  # a secret file readable by others is said before the slow model load
    global_model = load_global_model(config)
    engine = build_engine(config, global_model)
    predictor = None
    if global_model.network is not None:  # pictures need a network that takes them: FedHub's
        # own or a PyTorch module of the user's (on --dataset's images), not a Keras model of theirs.
        # The predictor serves the latest trained global model and swaps in each new round's.
        predictor = Predictor(global_model.name, global_model.framework, build=global_model.new_network)
        predictor.install(*engine.global_weights())
        engine.add_hook(predictor.on_round)
    if config.runs_dir is not None:
        from fedhub.tensorboard_log import TensorBoardLog

        engine.add_hook(TensorBoardLog(config.runs_dir, config.run_id, config.tensorboard_devices))
    app = build_app(engine, admin_token=admin, max_wait=config.max_wait, predictor=predictor,
                    max_image_bytes=config.max_image_bytes,
                    auth_failures_per_minute=config.auth_failures_per_minute)
    app.extensions["fedhub_global_model"] = global_model  # export and validation (routes_models)
    engine.start()
    return app


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    d, fed, train = ServerConfig(), FEDERATION, TRAINING  # the defaults, each set in one place
    p = Parser(prog="server.py", description="FedHub federated-learning server.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("port_pos", nargs="?", type=int, metavar="PORT", help="port (original form)")
    p.add_argument("--port", type=int, default=None, help=f"port to listen on (default {d.port})")
    p.add_argument("--host", default=d.host, help="interface to bind")
    framework_options.add_options(p, framework=d.framework, dataset=d.dataset)
    p.add_argument("--model-factory", metavar="MODULE:NAME",
                   help="your own global model instead: a function returning a compiled keras.Model, "
                        "or with --framework torch an nn.Module taking --dataset's images (devices "
                        "give the same --model-factory)")
    p.add_argument("--test-data", type=Path,
                   help=".npz with arrays x, y: the test set for --model-factory's model (PyTorch: "
                        "else --dataset's)")
    p.add_argument("--runs-dir", type=Path, default=None,
                   help="TensorBoard event files go to RUNS_DIR/RUN_ID/ (default: the state dir's runs/)")
    p.add_argument("--run-id", default=None, help="TensorBoard run name (default: the start time)")
    p.add_argument("--no-tensorboard", action="store_true", help="write no TensorBoard event files")
    p.add_argument("--tensorboard-devices", type=int, default=d.tensorboard_devices, metavar="N",
                   help="the first N devices to report get a TensorBoard run each; the global run charts "
                        f"every device's loss and accuracy as histograms (default {d.tensorboard_devices})")
    p.add_argument("--data-dir", default=None,
                   help="folder with the data set's files, or one holding fashion-mnist/ and cifar-10/ "
                        "(else $FEDHUB_DATA_DIR, else ../shared/data beside the checkout, else "
                        "Keras' download)")
    p.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N test images")
    state.add_option(p)
    p.add_argument("--eval-dir", type=Path, default=None,
                   help="where history.csv goes (default: the state directory's eval/)")
    p.add_argument("--rounds", type=int, default=fed.rounds, help="rounds in the run (0: until paused)")
    p.add_argument("--min-devices", type=int, default=fed.min_devices, help="devices needed to open a round")
    p.add_argument("--quorum", type=float, default=fed.quorum,
                   help="share of selected devices needed to close a round at its deadline")
    p.add_argument("--round-timeout", type=float, default=fed.round_timeout, help="seconds per round")
    p.add_argument("--device-timeout", type=float, default=fed.device_timeout,
                   help="seconds unseen before a device counts as offline")
    p.add_argument("--fraction", type=float, default=fed.fraction,
                   help="share of devices selected per round")
    p.add_argument("--strategy", default=fed.strategy, choices=list(STRATEGIES), metavar="NAME",
                   help=f"aggregation strategy: {', '.join(STRATEGIES)} (--list-strategies)")
    p.add_argument("--strategy-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a parameter of the strategy, repeatable (e.g. num_malicious=1)")
    p.add_argument("--list-strategies", action="store_true",
                   help="print every strategy with its parameters and defaults, and exit")
    p.add_argument("--strategy-memory-mb", type=float, default=fed.memory_budget / 2**20,
                   help="MiB of a round's updates that median, trimmed mean, Krum and Bulyan keep in "
                        "RAM; beyond it they go to a file in the state folder")
    p.add_argument("--compression", default=train.compression, metavar="SCHEME",
                   help="how devices send updates: none, q8, q4 (8/4-bit deltas; q8:tensor, "
                        "q8:block=N for the scales) or topk:FRACTION (sparse, with error feedback)")
    p.add_argument("--compress-downlink", action="store_true",
                   help="send the global model download compressed too (as its change)")
    add_dp_options(p)
    secagg_options.add_options(p)
    p.add_argument("--mode", default=fed.mode, choices=["sync", "async"],
                   help="sync: rounds; async: devices train continuously, FedBuff (see --buffer)")
    p.add_argument("--buffer", type=int, default=fed.buffer_size, metavar="K",
                   help="async: a new global model version every K updates")
    p.add_argument("--max-staleness", type=int, default=fed.max_staleness, metavar="S",
                   help="async: refuse updates trained from a model more than S versions old")
    p.add_argument("--staleness-exponent", type=float, default=fed.staleness_exponent, metavar="A",
                   help="async: weigh an update by (1 + staleness) ** -A (0.5: 1/sqrt(1 + staleness))")
    p.add_argument("--epochs", type=int, default=train.epochs, help="local epochs per round")
    p.add_argument("--batch-size", type=int, default=train.batch_size)
    p.add_argument("--learning-rate", type=float, default=train.learning_rate)
    p.add_argument("--seed", type=int, default=fed.seed)
    p.add_argument("--auto-activate", action="store_true", help="new devices start active")
    p.add_argument("--start", action="store_true", help="start training without waiting for an admin")
    p.add_argument("--reset", action="store_true", help="wipe rounds and checkpoints first")
    p.add_argument("--max-upload-mb", type=float, default=d.max_upload_bytes / 2**20,
                   help="largest accepted update")
    p.add_argument("--max-image-mb", type=float, default=d.max_image_bytes / 2**20,
                   help="largest accepted POST /api/predict body (pictures)")
    p.add_argument("--threads", type=int, default=d.threads, help="waitress worker threads")
    p.add_argument("--certfile", type=Path, help="TLS certificate (PEM): serve HTTPS")
    p.add_argument("--keyfile", type=Path, help="TLS private key (PEM) for --certfile")
    p.add_argument("--max-wait", type=float, default=d.max_wait,
                   help="longest long poll a device may ask for (GET .../task?wait=S)")
    p.add_argument("--channel-timeout", type=float, default=d.channel_timeout,
                   help="seconds before an idle or slow (slow-loris) connection is closed")
    p.add_argument("--header-timeout", type=float, default=d.header_timeout,
                   help="seconds a connection has to send its request line and headers")
    p.add_argument("--auth-failures-per-minute", type=int, default=d.auth_failures_per_minute,
                   help="wrong credentials a client address may send per minute before it gets 429 "
                        "(0: no limit, e.g. behind a reverse proxy that limits)")
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                   help="server log detail: " + ", ".join(LOG_LEVELS))
    a = p.parse_args(argv)
    if a.list_strategies:
        print(format_strategies())
        sys.exit(0)
    if a.port is not None and a.port_pos is not None and a.port != a.port_pos:
        p.error("give the port once")
    port = a.port or a.port_pos or d.port
    if not 0 < port < 65536:
        p.error("port must be between 1 and 65535")
    if (a.certfile is None) != (a.keyfile is None):
        p.error("--certfile and --keyfile go together")
    model = framework_options.network(a, d.model)
    try:
        strategy_params = parse_strategy_args(a.strategy, a.strategy_arg)
    except ParamError as exc:
        p.error(str(exc))
    federation = FederationConfig(
        rounds=a.rounds, min_devices=a.min_devices, quorum=a.quorum,
        round_timeout=a.round_timeout, device_timeout=a.device_timeout, fraction=a.fraction,
        auto_activate=a.auto_activate, start=a.start, strategy=a.strategy,
        strategy_params=strategy_params, memory_budget=int(a.strategy_memory_mb * 2**20), seed=a.seed,
        compress_downlink=a.compress_downlink,
        mode=a.mode, buffer_size=a.buffer, max_staleness=a.max_staleness,
        staleness_exponent=a.staleness_exponent,
        training=TrainingConfig(model=model, framework=a.framework, epochs=a.epochs, batch_size=a.batch_size,
                                learning_rate=a.learning_rate, compression=a.compression),
        privacy=dp_config(p, a, a.buffer if a.mode == "async" else a.min_devices))
    federation.secagg = secagg_options.config_from(a)
    layout = state.resolve(a.state_dir)
    config = ServerConfig(
        host=a.host, port=port, state_dir=layout.server_dir, eval_dir=a.eval_dir, model=model,
        framework=a.framework, dataset=a.dataset, data_dir=a.data_dir, test_limit=a.test_limit,
        reset=a.reset, threads=a.threads,
        max_upload_bytes=int(a.max_upload_mb * 1024 * 1024),
        max_image_bytes=int(a.max_image_mb * 1024 * 1024), federation=federation,
        certfile=a.certfile, keyfile=a.keyfile, channel_timeout=a.channel_timeout, max_wait=a.max_wait,
        header_timeout=a.header_timeout, auth_failures_per_minute=a.auth_failures_per_minute,
        model_factory=a.model_factory, test_data=a.test_data, run_id=a.run_id,
        tensorboard_devices=a.tensorboard_devices,
        runs_dir=None if a.no_tensorboard else (a.runs_dir or layout.runs_dir))
    try:
        config.validate()
    except ParamError as exc:
        p.error(str(exc))
    except ValueError as exc:
        hint = " (--min-devices)" if "min_devices is" in str(exc) else ""
        hint += secagg_options.hint(exc)
        p.error(f"{exc}{hint}")
    logging.basicConfig(level=a.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return config


def check_port(host: str, port: int) -> None:
    """OSError with one plain sentence if ``host:port`` cannot be listened on (another server
    has it), checked the way waitress binds (``SO_REUSEADDR``), before anything slow starts."""
    if port == 0:
        return
    try:
        family, kind, proto, _, address = socket.getaddrinfo(
            host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)[0]
    except socket.gaierror as exc:
        raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    with socket.socket(family, kind, proto) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(address)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise OSError(f"port {port} is in use (another FedHub server?)") from None
            raise OSError(f"cannot listen on {host}:{port}: {exc.strerror}") from None


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def serve_options(config: ServerConfig) -> ServeOptions:
    """How the HTTP server runs for ``config``: ``server.py`` and ``fedhub.Server`` alike."""
    return ServeOptions(
        host=config.host, port=config.port, threads=config.threads,
        max_body_bytes=max(config.max_upload_bytes, config.max_image_bytes) + BODY_SLACK,
        channel_timeout=config.channel_timeout, header_timeout=config.header_timeout,
        certfile=config.certfile, keyfile=config.keyfile)


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    from fedhub.api.serving import Serving, check_tls_files
    from fedhub.split import DatasetError

    try:
        options = serve_options(config)
        # A port in use or a missing file is said now, not after the model, data and state load.
        check_port(config.host, config.port)
        check_tls_files(options)
        app = create_app(config)
        serving = Serving(app, options)
    except (DatasetError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    engine: Coordinator = app.extensions["fedhub"]
    signal.signal(signal.SIGINT, signal.default_int_handler)  # as a device does (fedhub.device.main)
    folder = Path(config.state_dir)
    rounds = config.federation.rounds
    print(f"FedHub server on {serving.url}  "
          f"(model {config.federation.training.model}, "
          f"{config.federation.training.framework}, {config.dataset}, "
          f"{plural(rounds, 'round') if rounds else 'unlimited rounds'}, "
          f"status {engine.status()['status']})", flush=True)
    if not (config.admin_token or os.environ.get("FEDHUB_ADMIN_TOKEN")):
        print(f"admin token in {folder / ADMIN_TOKEN_FILE}; enrollment secret in "
              f"{folder / ENROLL_SECRET_FILE}", flush=True)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        serving.run()
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        engine.stop()  # first: wakes the long polls, so no worker is mid-answer when sockets close
        serving.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
