"""FedHub server: ``python server.py 4000`` (or ``--port 4000`` and more; see ``--help``).

Builds the engine (storage, device registry, round coordinator) around a
global model of the chosen framework (``--framework keras|torch``, through
:mod:`fedhub.frameworks`) and the chosen data set's held-out test set
(``--dataset fashion-mnist|cifar-10``), wraps it in the Flask app, and serves
it with waitress, a production WSGI server.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flask import Flask

from fedhub import settings, tensorflow_env, tracking
from fedhub import state_dir as state
from fedhub.api import build_app
from fedhub.api.app import BODY_SLACK, MAX_IMAGE_BYTES, MAX_WAIT
from fedhub.api.predictor import Predictor
from fedhub.api.serving import ServeOptions
from fedhub.api.throttle import FAILURES_PER_MINUTE, check_secret
from fedhub.engine import auth, history, params, wire
from fedhub.engine.config import TRAINING, FederationConfig
from fedhub.engine.devices import DeviceRegistry
from fedhub.engine.plural import plural
from fedhub.engine.rounds import Coordinator
from fedhub.engine.storage import Storage
from fedhub.engine.strategies import format_strategies
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

    host: str = params.setting(ServeOptions.host, "interface to bind")
    port: int = params.number(ServeOptions.port, 0, 65535,
                              help="port to listen on (also PORT; 0: any free port)")
    state_dir: Path | None = params.setting(
        None, "the run's state directory: the database, checkpoints and secrets, with eval/, devices/ "
        f"and runs/ inside (default: ${state.STATE_DIR_ENV}, else server_training/)", metavar="DIR")
    eval_dir: Path | None = params.setting(
        None, "where history.csv goes (default: the state directory's eval/)", metavar="DIR")
    # FedHub's own networks: which framework trains them, which data set they learn, which network
    framework: str = params.setting(
        "keras", "what trains FedHub's networks, on the server and every device: keras or torch",
        metavar="NAME")
    dataset: str = params.setting("fashion-mnist", "the data set the network learns (its test set is "
                                  "evaluated each round): fashion-mnist or cifar-10", metavar="NAME")
    model: str | None = params.setting(
        None, "the framework's network: keras basic or cnn (fashion-mnist); torch cifar (cifar-10), basic "
        "or cnn (fashion-mnist) (default: the first for the data set)", metavar="NAME")
    data_dir: str | None = params.setting(
        None, "folder with the data set's files, or one holding fashion-mnist/ and cifar-10/ (default: "
        "$FEDHUB_DATA_DIR, else ../shared/data beside the checkout, else Keras' download)", metavar="DIR")
    test_limit: int | None = params.number(None, 1, 10**9, metavar="N",
                                           help="evaluate on the first N test images (default: all)")
    data_split: str | None = params.setting(
        None, "how the devices' data was split, recorded with the run's settings (e.g. iid over 10 devices, "
        "dirichlet alpha=0.5); the server cannot see it, so it is what you say (fedhub.simulate says it)",
        metavar="TEXT")
    efficiency: bool = params.setting(
        False, "measure once, at start-up, how long one process takes to train the network on a sample "
        "of the test images, and give each round its efficiency: that time for the round's images over "
        "the round's own time (fedhub.simulate turns it on)")
    enroll_secret: str | None = None
    admin_token: str | None = None
    # Each number declares its range: validate() refuses the rest before anything loads.
    max_upload_mb: float = params.number(wire.DEFAULT_MAX_BYTES / 2**20, 1 / 16, 2**20,
                                         help="largest accepted update body in MiB (413 above)")
    max_image_mb: float = params.number(MAX_IMAGE_BYTES / 2**20, 1 / 16, 2**12,
                                        help="largest accepted POST /api/predict body in MiB (pictures)")
    max_wait: float = params.number(MAX_WAIT, 0, 3600, help="longest long poll a device may ask for "
                                    "(GET .../task?wait=S; 400 above)")
    threads: int = params.number(ServeOptions.threads, 1, 1024, help="waitress worker threads")
    reset: bool = params.setting(False, "wipe the state directory's runs (rounds, checkpoints and history) "
                                 "first")
    # Which run: the current one if unfinished with these settings, else a new one (fedhub.engine.runs)
    resume: str | None = params.setting(
        None, "continue this run (its id or name), finished or stopped, for more rounds: refused, naming "
        "each, if its settings differ (default: the current run if unfinished with these settings, else a "
        "new run)", metavar="RUN")
    new_run: str | None = params.setting(None, "start a new run with this name (default: a new run is "
                                         "named after its strategy and id)", metavar="NAME")
    federation: FederationConfig = params.group(factory=FederationConfig, flat=True)
    # HTTPS when both are given (devices verify the certificate; see --ca on the device).
    certfile: Path | None = params.setting(None, "TLS certificate (PEM): serve HTTPS", metavar="FILE")
    keyfile: Path | None = params.setting(None, "TLS private key (PEM) for the certfile", metavar="FILE")
    channel_timeout: float = params.number(ServeOptions.channel_timeout, above=0, high=86_400,
                                           help="seconds before an idle or slow (slow-loris) connection "
                                                "is closed")
    header_timeout: float = params.number(ServeOptions.header_timeout, above=0, high=3600,
                                          help="seconds a connection has to send its request line "
                                               "and headers")
    auth_failures_per_minute: int = params.number(
        FAILURES_PER_MINUTE, 0, 10**6, help="wrong credentials a client address may send per minute before "
        "it gets 429 (0: no limit, e.g. behind a reverse proxy that limits)")
    # Bring your own model: any compiled keras.Model (the Python API), or a factory
    # "package.module:build" returning one; either replaces `model`. `test_data` (an .npz
    # path with arrays x, y, or an (x, y) pair) gives it per-round test metrics.
    keras_model: Any = None
    model_factory: str | None = params.setting(
        None, "your own global model instead: a function returning a compiled keras.Model, or with "
        "framework torch an nn.Module taking the data set's images (devices give the same)",
        metavar="MODULE:NAME")
    test_data: Any = params.setting(None, ".npz with arrays x, y: the test set for model_factory's model "
                                    "(PyTorch: else the data set's)", kind=Path, metavar="FILE")
    # TensorBoard event files under runs_dir/run_id/ (None: none written; server.py: the state dir's runs/).
    runs_dir: Path | None = params.setting(
        None, "TensorBoard event files go to RUNS_DIR/NAME/, NAME the run's name (server.py's default: the "
        "state directory's runs/)", metavar="DIR")
    run_id: str | None = params.setting(
        None, "the run's name in TensorBoard (its folder under RUNS_DIR) and MLflow (default: the run's own "
        "name, see --new-run)")
    # server.py: runs_dir defaults to the state directory's runs/; the Python API writes them only
    # to a runs_dir it is given
    tensorboard: bool = params.setting(True, "write TensorBoard event files (to runs_dir)")
    tensorboard_devices: int = params.number(
        32, 0, 100_000, metavar="N", help="the first N devices to report get a TensorBoard run each; the "
        "global run charts every device's loss and accuracy as histograms")
    # MLflow (fedhub.tracking): an optional extra, checked by validate() before anything loads
    mlflow: str | None = params.setting(
        None, "log each run to this MLflow tracking store (http://HOST:5000, sqlite:///mlflow.db, a folder): "
        "its settings, every round's metrics, the final model; pip install 'fedhub[mlflow]'", metavar="URI")
    mlflow_experiment: str = params.setting("fedhub", "the MLflow experiment the runs go to", metavar="NAME")

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 2**20)

    @property
    def max_image_bytes(self) -> int:
        return int(self.max_image_mb * 2**20)

    def __post_init__(self) -> None:
        layout = state.resolve(self.state_dir)
        self.state_dir = layout.server_dir
        if self.model is None:  # the framework's first network for the data set
            from fedhub.options.framework import default_network

            self.model = default_network(self.framework, self.dataset, TRAINING.model)
        # what the devices are told to train (load_global_model sets it again from the model loaded)
        self.federation.training.model, self.federation.training.framework = self.model, self.framework
        self.eval_dir = Path(self.eval_dir) if self.eval_dir is not None else layout.eval_dir

    def validate(self) -> None:
        """ValueError (one line, naming the option) for a setting that would leave the server
        unusable: every number finite and in its declared range (no worker threads, an upload
        limit no update fits), then the run's settings (:meth:`FederationConfig.validate`).
        ``server.py`` and ``fedhub.Server`` both pass here before loading anything."""
        params.check_numbers(self)
        if not self.host.strip():  # '' would bind every interface, not the loopback default
            raise params.SettingError("{0} must name an interface (0.0.0.0 for every one), got an empty "
                                      "string", "host")
        self.check_framework()
        if self.mlflow:
            tracking.check_mlflow(self.mlflow)
        self.federation.validate()

    def check_framework(self) -> None:
        """:class:`params.SettingError` (one line) for a framework, data set or network that do not
        go together, or a feature the framework cannot serve yet; checked without importing any
        framework."""
        from fedhub import datasets, frameworks

        Error = params.SettingError
        if self.framework not in frameworks.NAMES:
            raise Error(f"{{0}} must be one of {', '.join(frameworks.NAMES)}, got {self.framework!r}",
                        "framework")
        try:
            datasets.get(self.dataset)
        except ValueError as exc:  # DatasetError naming the choices
            raise Error(str(exc), "dataset") from None
        if self.keras_model is not None:
            if self.framework != "keras":
                raise Error(f"a keras.Model of your own cannot run with {{0}} {self.framework}; give a "
                            "{1} returning an nn.Module instead", "framework", "model_factory")
            return
        if self.model_factory:  # Keras: a compiled keras.Model; PyTorch: an nn.Module on the data set
            return
        frameworks.default_network(self.framework, self.dataset)  # one network for it, at least
        fits = frameworks.networks(self.framework, self.dataset)
        if self.model not in fits:
            takes = frameworks.network_dataset(self.framework, self.model)
            why = f"it takes {takes} images" if takes else f"{self.framework} has no network {self.model!r}"
            raise Error(f"{{0}} {self.model} cannot learn {self.dataset} with {{1}} {self.framework} "
                        f"({why}); choose {', '.join(fits)}", "model", "framework")


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


def reference_of(config: ServerConfig, global_model: Any) -> dict[str, Any] | None:
    """With ``--efficiency``: one process's training rate on the server's network, measured now
    (:mod:`fedhub.efficiency`), before any device has work; None (with a warning) when the server
    cannot build a network of its own to time."""
    if not config.efficiency:
        return None
    from fedhub import efficiency

    training = config.federation.training
    try:
        reference = efficiency.measure(global_model, batch_size=training.batch_size,
                                       learning_rate=training.learning_rate)
    except ValueError as exc:
        log.warning("no efficiency figure: %s", exc)
        return None
    log.info("efficiency reference: one process trains %d images in %.2f s (%.0f images/s; start-up "
             "%.2f s)", reference.images, reference.seconds, reference.images / reference.seconds,
             reference.startup_s)
    return reference.describe()


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
    # what the run's settings hold besides the federation's: the data set, and the split if said
    identity = {"dataset": config.dataset, **({"data_split": config.data_split} if config.data_split else {})}
    engine = Coordinator(storage, devices, initial_weights=global_model.initial_weights(),
                         config=config.federation, evaluate=evaluate,
                         max_upload_bytes=config.max_upload_bytes, identity=identity,
                         resume=config.resume, new_run=config.new_run,
                         efficiency=reference_of(config, global_model))
    # eval/history.csv is the current run's history: rewritten after each of its rounds, and when
    # another run becomes current (each run's own: fedhub runs export)
    csv_path = Path(config.eval_dir) / "history.csv"
    engine.add_hook(lambda _row, _w: history.write_csv(csv_path, engine.history()))
    engine.add_run_listener(lambda _run: history.write_csv(csv_path, engine.history()))
    if csv_path.exists():
        history.write_csv(csv_path, engine.history())
    return engine


def create_app(config: ServerConfig | None = None) -> Flask:
    """The app factory: a fresh engine and Flask app for ``config``, its round driver started.
    A setting out of range is a ValueError before anything loads."""
    config = config or ServerConfig()
    config.validate()
    _, admin = _secrets(config)  # a secret file readable by others is said before the slow model load
    global_model = load_global_model(config)
    engine = build_engine(config, global_model)
    run = engine.run()  # the current run: one name for it in TensorBoard and MLflow
    run_name = tracking.run_name(config, run)
    predictor = None
    if global_model.network is not None:  # pictures need a network that takes them: FedHub's
        # own or a PyTorch module of the user's (on --dataset's images), not a Keras model of theirs.
        # The predictor serves the latest trained global model and swaps in each new round's.
        predictor = Predictor(global_model.name, global_model.framework, build=global_model.new_network)
        predictor.install(*engine.global_weights())
        engine.add_hook(predictor.on_round)
        engine.add_run_listener(lambda _run: predictor.install(*engine.global_weights()))
    trackers: list[Any] = []
    if config.runs_dir is not None and config.tensorboard:
        from fedhub.tensorboard_log import TensorBoardLog

        trackers.append(TensorBoardLog(config.runs_dir, run_name, config.tensorboard_devices,
                                       settings=tracking.tracked_settings(config), run_id=run["id"]))
    if config.mlflow:
        trackers.append(tracking.mlflow_hook(config, engine, global_model, run_name=run_name,
                                             run_id=run["id"]))
    for tracker in trackers:  # each run its own TensorBoard folder and MLflow run
        engine.add_hook(tracker)
        engine.add_run_listener(tracker.switch)
    app = build_app(engine, admin_token=admin, max_wait=config.max_wait, predictor=predictor,
                    max_image_bytes=config.max_image_bytes,
                    auth_failures_per_minute=config.auth_failures_per_minute)
    app.extensions["fedhub_global_model"] = global_model  # export and validation (routes_models)
    engine.start()
    return app


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    """The server's settings: the declared defaults, then ``--config FILE``, then the flags (each
    setting's flag comes from its field, :mod:`fedhub.settings`). A refusal is one ``error:``
    line and exit 2, naming the setting as its flag (or, for a file's own mistakes, its key)."""
    every = settings.settings_of(ServerConfig)
    p = Parser(prog="server.py", description="FedHub federated-learning server.")
    p.add_argument("port_pos", nargs="?", type=int, metavar="PORT", help="the port (as --port)")
    settings.add_file_options(p)
    p.add_argument("--list-strategies", action="store_true",
                   help="print every strategy with its parameters and defaults, and exit")
    p.add_argument("--log-level", default="INFO", type=str.upper, choices=LOG_LEVELS,
                   help="server log detail: " + ", ".join(LOG_LEVELS))
    settings.add_options(p, every)
    a = p.parse_args(argv)
    if a.list_strategies:
        print(format_strategies())
        sys.exit(0)
    if a.port_pos is not None:  # the original form: server.py PORT
        if getattr(a, "port", a.port_pos) != a.port_pos:
            p.error("give the port once")
        a.port = a.port_pos
    config = settings.resolve(p, a, every, ServerConfig)
    if (config.certfile is None) != (config.keyfile is None):
        p.error("--certfile and --keyfile go together")
    if config.runs_dir is None and config.tensorboard:  # the state directory's runs/ (the checkout's)
        default = state.resolve()
        config.runs_dir = (default if Path(config.state_dir) == default.server_dir
                           else state.resolve(config.state_dir)).runs_dir
    try:
        config.validate()
    except ValueError as exc:
        p.error(settings.cli_message(exc))
    settings.print_config(a, config, every)
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
    tensorflow_env.lean()
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
    print(engine.run_message, flush=True)  # which run, and why: continued, resumed or new
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
