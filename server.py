"""FedHub server: ``python server.py 4000`` (or ``--port 4000`` and more; see ``--help``).

Builds the engine (storage, device registry, round coordinator) around a
Keras model and the held-out test set, wraps it in the Flask app, and serves
it with waitress, a production WSGI server.
"""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path

from flask import Flask

from api import build_app
from api.predictor import Predictor
from fedcore import auth, history
from fedcore.config import FederationConfig, TrainingConfig
from fedcore.devices import DeviceRegistry
from fedcore.rounds import Coordinator
from fedcore.storage import Storage

ROOT = Path(__file__).resolve().parent
ENROLL_SECRET_FILE = "enroll.secret"
ADMIN_TOKEN_FILE = "admin.token"
log = logging.getLogger("fedhub.server")


@dataclass
class ServerConfig:
    """Everything the server needs; the CLI fills it, tests build it directly."""

    host: str = "127.0.0.1"
    port: int = 4000
    state_dir: Path = ROOT / "server_training"
    eval_dir: Path = ROOT / "eval"
    model: str = "basic"
    data_dir: str | None = None
    test_limit: int | None = None
    enroll_secret: str | None = None
    admin_token: str | None = None
    max_upload_bytes: int = 64 * 1024 * 1024
    max_image_bytes: int = 16 * 1024 * 1024
    max_wait: float = 30.0
    threads: int = 32
    reset: bool = False
    federation: FederationConfig = field(default_factory=FederationConfig)


def _secrets(config: ServerConfig) -> tuple[str, str]:
    """Secrets come from the config or environment, else from owner-only files beside the state."""
    enroll = (config.enroll_secret or os.environ.get("FEDHUB_ENROLL_SECRET")
              or auth.load_or_create_secret(Path(config.state_dir) / ENROLL_SECRET_FILE))
    admin = (config.admin_token or os.environ.get("FEDHUB_ADMIN_TOKEN")
             or auth.load_or_create_secret(Path(config.state_dir) / ADMIN_TOKEN_FILE))
    return enroll, admin


def build_engine(config: ServerConfig) -> Coordinator:
    """The engine with a Keras model: initial weights, and evaluation on the test set."""
    from model import Model
    from utils.format_dataset import load_fashion_mnist

    _, (x_test, y_test) = load_fashion_mnist(config.data_dir)
    if config.test_limit:
        x_test, y_test = x_test[: config.test_limit], y_test[: config.test_limit]
    config.federation.training.model = config.model
    evaluator = Model(config.model, seed=config.federation.seed)

    def evaluate(weights):
        evaluator.set_weights(weights)
        return evaluator.evaluate(x_test, y_test)

    state_dir = Path(config.state_dir)
    if config.reset:
        from utils.cleaner import clean_server_state

        clean_server_state(state_dir, Path(config.eval_dir))
    state_dir.mkdir(parents=True, exist_ok=True)
    enroll, _ = _secrets(config)
    storage = Storage(state_dir)
    devices = DeviceRegistry(storage, enroll_secret=enroll,
                             auto_activate=config.federation.auto_activate,
                             device_timeout=config.federation.device_timeout)
    engine = Coordinator(storage, devices, initial_weights=evaluator.get_weights(),
                         config=config.federation, evaluate=evaluate,
                         max_upload_bytes=config.max_upload_bytes)
    csv_path = Path(config.eval_dir) / "history.csv"
    engine.add_hook(lambda _row, _w: history.write_csv(csv_path, engine.history()))
    return engine


def create_app(config: ServerConfig | None = None) -> Flask:
    """The app factory: a fresh engine and Flask app for ``config``, its round driver started."""
    config = config or ServerConfig()
    engine = build_engine(config)
    _, admin = _secrets(config)
    # The predictor serves the latest trained global model and swaps in each new round's.
    predictor = Predictor(config.model)
    predictor.install(*engine.global_weights())
    engine.add_hook(predictor.on_round)
    app = build_app(engine, admin_token=admin, max_wait=config.max_wait, predictor=predictor,
                    max_image_bytes=config.max_image_bytes)
    engine.start()
    return app


def parse_args(argv: list[str] | None = None) -> ServerConfig:
    p = argparse.ArgumentParser(
        prog="server.py", description="FedHub federated-learning server.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("port_pos", nargs="?", type=int, metavar="PORT", help="port (original form)")
    p.add_argument("--port", type=int, default=None, help="port to listen on (default 4000)")
    p.add_argument("--host", default="127.0.0.1", help="interface to bind")
    p.add_argument("--model", default="basic", choices=["basic", "cnn"], help="global model")
    p.add_argument("--data-dir", default=None,
                   help="folder with the Fashion-MNIST .gz files (else $FEDHUB_DATA_DIR, else Keras)")
    p.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N test images")
    p.add_argument("--state-dir", type=Path, default=ROOT / "server_training")
    p.add_argument("--eval-dir", type=Path, default=ROOT / "eval")
    p.add_argument("--rounds", type=int, default=3, help="rounds in the run (0: until paused)")
    p.add_argument("--min-devices", type=int, default=1, help="devices needed to open a round")
    p.add_argument("--quorum", type=float, default=0.5,
                   help="share of selected devices needed to close a round at its deadline")
    p.add_argument("--round-timeout", type=float, default=600.0, help="seconds per round")
    p.add_argument("--device-timeout", type=float, default=60.0,
                   help="seconds unseen before a device counts as offline")
    p.add_argument("--fraction", type=float, default=1.0, help="share of devices selected per round")
    p.add_argument("--strategy", default="fedavg", choices=["fedavg", "fedavgm"])
    p.add_argument("--epochs", type=int, default=1, help="local epochs per round")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--learning-rate", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--auto-activate", action="store_true", help="new devices start active")
    p.add_argument("--start", action="store_true", help="start training without waiting for an admin")
    p.add_argument("--reset", action="store_true", help="wipe rounds and checkpoints first")
    p.add_argument("--max-upload-mb", type=float, default=64.0, help="largest accepted update")
    p.add_argument("--max-image-mb", type=float, default=16.0,
                   help="largest accepted POST /api/predict body (pictures)")
    p.add_argument("--threads", type=int, default=32, help="waitress worker threads")
    p.add_argument("--log-level", default="INFO")
    a = p.parse_args(argv)
    if a.port is not None and a.port_pos is not None and a.port != a.port_pos:
        p.error("give the port once")
    port = a.port or a.port_pos or 4000
    if not 0 < port < 65536:
        p.error("port must be between 1 and 65535")
    federation = FederationConfig(
        rounds=a.rounds, min_devices=a.min_devices, quorum=a.quorum,
        round_timeout=a.round_timeout, device_timeout=a.device_timeout, fraction=a.fraction,
        auto_activate=a.auto_activate, start=a.start, strategy=a.strategy, seed=a.seed,
        training=TrainingConfig(model=a.model, epochs=a.epochs, batch_size=a.batch_size,
                                learning_rate=a.learning_rate))
    try:
        federation.validate()
    except ValueError as exc:
        p.error(str(exc))
    logging.basicConfig(level=a.log_level.upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return ServerConfig(
        host=a.host, port=port, state_dir=a.state_dir, eval_dir=a.eval_dir, model=a.model,
        data_dir=a.data_dir, test_limit=a.test_limit, reset=a.reset, threads=a.threads,
        max_upload_bytes=int(a.max_upload_mb * 1024 * 1024),
        max_image_bytes=int(a.max_image_mb * 1024 * 1024), federation=federation)


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    from waitress import create_server

    from utils.format_dataset import DatasetError

    try:
        app = create_app(config)
    except (DatasetError, ValueError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    engine: Coordinator = app.extensions["fedhub"]
    server = create_server(app, host=config.host, port=config.port, threads=config.threads,
                           max_request_body_size=config.max_upload_bytes + 1024 * 1024,
                           channel_timeout=60, ident="fedhub")
    state = Path(config.state_dir)
    print(f"FedHub server on http://{config.host}:{server.effective_port}  "
          f"(model {config.model}, {config.federation.rounds or 'unlimited'} rounds, "
          f"status {engine.status()['status']})", flush=True)
    if not (config.admin_token or os.environ.get("FEDHUB_ADMIN_TOKEN")):
        print(f"admin token in {state / ADMIN_TOKEN_FILE}; enrollment secret in "
              f"{state / ENROLL_SECRET_FILE}", flush=True)
    signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        server.run()
    except KeyboardInterrupt:
        print("stopping", flush=True)
    finally:
        server.close()
        engine.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
