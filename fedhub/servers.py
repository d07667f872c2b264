"""``fedhub.Server``: the FedHub server for any Keras model, or FedHub's own networks in Keras or
PyTorch, started from Python.

It is ``server.create_app`` (engine, HTTP API, TensorBoard hook) served through
``fedhub.api.serving`` (waitress, with ``server.py``'s connection limit, body spooling and
long-poll limit) in a background thread of this process: the same server as
``python server.py``, reachable by devices in this process, in child processes or
on other machines.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedhub import frameworks
from fedhub.api.serving import ServeOptions, Serving
from fedhub.engine import auth
from fedhub.engine.config import FEDERATION, TRAINING, FederationConfig, TrainingConfig
from fedhub.engine.errors import FedHubError
from fedhub.engine.plural import plural
from fedhub.engine.privacy import DPConfig
from fedhub.engine.secagg import SecAggConfig
from fedhub.options.framework import DATASET, FRAMEWORK

from .evaluation import evaluate


class Server:
    """A federated-learning server for ``model`` in this process.

    ``model`` is any compiled Keras classifier; its current weights are round 0. Or the
    name of one of FedHub's networks of ``framework`` (``"keras"``: ``"basic"``, ``"cnn"``;
    ``"torch"``: ``"cifar"``, ``"basic"``, ``"cnn"``), tested on ``dataset``'s test set
    (default: the one the network takes) from ``data_dir`` (its first ``test_limit`` images),
    as ``server.py --framework --dataset --model`` are; ``model=None`` is the framework's first
    network for ``dataset``. ``test_data=(x, y)`` gives each round test loss and
    accuracy. ``port=0`` picks a free port (see :attr:`url`). The run settings match
    ``server.py``'s flags, with the same defaults, except that here new devices start active
    and training starts as soon as ``min_devices`` are there. ``strategy`` is a name from
    ``--list-strategies`` and ``strategy_params`` its parameters (``{"num_malicious": 1}``);
    ``compression`` and ``compress_downlink`` are ``--compression`` and ``--compress-downlink``.
    ``privacy`` adds differential privacy, as ``--dp``: a :class:`fedhub.DPConfig` or its
    settings (``{"mode": "central-fixed", "noise_multiplier": 1.0, "max_epsilon": 8}``).
    ``secagg`` turns secure aggregation on (``SecAggConfig()``: ``--secure-aggregation``'s defaults).
    Use it as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    def __init__(self, model: Any = None, *, framework: str = FRAMEWORK, dataset: str | None = None,
                 test_data: tuple[np.ndarray, np.ndarray] | None = None,
                 rounds: int = FEDERATION.rounds, min_devices: int = FEDERATION.min_devices,
                 epochs: int = TRAINING.epochs, batch_size: int = TRAINING.batch_size,
                 learning_rate: float = TRAINING.learning_rate, fraction: float = FEDERATION.fraction,
                 quorum: float = FEDERATION.quorum, round_timeout: float = FEDERATION.round_timeout,
                 device_timeout: float = FEDERATION.device_timeout, strategy: str = FEDERATION.strategy,
                 strategy_params: Mapping[str, Any] | None = None, seed: int = FEDERATION.seed,
                 auto_activate: bool = True, start: bool = True,
                 host: str = ServeOptions.host, port: int = 0, state_dir: str | Path | None = None,
                 runs_dir: str | Path | None = None, run_id: str | None = None,
                 enroll_secret: str | None = None, admin_token: str | None = None,
                 threads: int = 16, data_dir: str | Path | None = None,
                 test_limit: int | None = None, compression: str = TRAINING.compression,
                 compress_downlink: bool = FEDERATION.compress_downlink,
                 privacy: DPConfig | Mapping[str, Any] | None = None,
                 secagg: SecAggConfig | None = None, mode: str = FEDERATION.mode,
                 buffer_size: int = FEDERATION.buffer_size, max_staleness: int = FEDERATION.max_staleness,
                 staleness_exponent: float = FEDERATION.staleness_exponent) -> None:
        self.federation = FederationConfig(
            rounds=rounds, min_devices=min_devices, quorum=quorum, round_timeout=round_timeout,
            device_timeout=device_timeout, fraction=fraction, auto_activate=auto_activate, start=start,
            strategy=strategy, strategy_params=dict(strategy_params or {}), seed=seed, mode=mode,
            buffer_size=buffer_size, max_staleness=max_staleness, staleness_exponent=staleness_exponent,
            compress_downlink=compress_downlink,
            training=TrainingConfig(epochs=epochs, batch_size=batch_size, learning_rate=learning_rate,
                                    compression=compression),
            privacy=privacy, secagg=secagg)
        from fedhub import serve as server_cli

        builtin = model is None or isinstance(model, str)
        if dataset is None:  # the data set the named network takes (unknown names: checked below)
            dataset = (frameworks.network_dataset(framework, model) if isinstance(model, str)
                       else None) or DATASET
        if model is None:
            try:
                model = frameworks.default_network(framework, dataset)
            except ValueError:
                model = ""  # the framework or data set is wrong: validate() says which, in one line
        # ValueError now (a bad strategy parameter, a number out of its range, a network the
        # framework does not have for the data set), not at start(): server.py's checks, which
        # import no framework.
        server_cli.ServerConfig(host=host, port=port, threads=threads, test_limit=test_limit,
                                state_dir=state_dir, federation=self.federation,
                                framework=framework, dataset=dataset,
                                **({"model": model} if builtin else {"keras_model": model})).validate()
        self._model = model
        self.framework = framework  # what trains FedHub's network (a model of your own: Keras)
        self.dataset = dataset  # the data set whose test set FedHub's network is tested on
        self.network_name: str | None = model if builtin else None
        self._test_data = test_data
        self.data_dir = str(data_dir) if data_dir else None
        self.test_limit = test_limit
        self.host = host
        self.port = port
        self.state_dir = Path(state_dir) if state_dir else Path(tempfile.mkdtemp(prefix="fedhub-server-"))
        self.runs_dir = Path(runs_dir) if runs_dir else None
        self.run_id = run_id
        self.enroll_secret = enroll_secret or auth.new_token()
        self.admin_token = admin_token or auth.new_token()
        self.threads = threads
        self.model_path = self.state_dir / "model.keras"
        self.engine: Any = None
        self._serving: Any = None

    # running ------------------------------------------------------------
    def start(self) -> Server:
        """Build the engine and serve it; returns once the server accepts connections."""
        if self._serving is not None:
            return self
        from fedhub import serve as server_cli

        self.state_dir.mkdir(parents=True, exist_ok=True)
        if self.builtin:  # the framework's network: a PyTorch server never imports TensorFlow
            models: dict[str, Any] = {"model": self._model, "framework": self.framework,
                                      "dataset": self.dataset, "data_dir": self.data_dir,
                                      "test_limit": self.test_limit}
        else:
            from .model_files import portable  # Keras loads only when a server starts

            models = {"keras_model": portable(self._model, self.model_path)}
        config = server_cli.ServerConfig(
            host=self.host, port=self.port, state_dir=self.state_dir, eval_dir=self.state_dir / "eval",
            test_data=self._test_data, enroll_secret=self.enroll_secret, **models,
            admin_token=self.admin_token, runs_dir=self.runs_dir, run_id=self.run_id,
            threads=self.threads, federation=self.federation)
        app = server_cli.create_app(config)
        self.engine = app.extensions["fedhub"]
        # The same serving set-up as server.py: connection limit, body spooling, long-poll limit.
        self._serving = Serving(app, server_cli.serve_options(config))
        self.port = self._serving.port
        self._serving.start()
        return self

    def stop(self) -> None:
        """Stop serving and stop the round driver (state stays in :attr:`state_dir`)."""
        if self._serving is None:
            return
        self.engine.stop()  # first: it also ends the devices' long polls
        self._serving.stop()
        self._serving = None

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def builtin(self) -> bool:
        """Whether the model is one of FedHub's own networks, given by name."""
        return isinstance(self._model, str)

    def start_training(self, rounds: int | None = None) -> None:
        """Start training now (for a server made with ``start=False``), as an admin's start call."""
        self._require().start_training(rounds)

    # reading ------------------------------------------------------------
    def _require(self) -> Any:
        if self.engine is None:
            raise RuntimeError("the server is not started: call start() first")
        return self.engine

    def status(self) -> dict[str, Any]:
        return self._require().status()

    def history(self) -> list[dict[str, Any]]:
        """Completed rounds: test metrics and each device's reported metrics (as /api/history)."""
        return self._require().history()

    def devices(self) -> list[dict[str, Any]]:
        """Enrolled devices with their state and lifecycle (as /api/devices)."""
        return self._require().list_devices()

    def rounds(self, timeout: float | None = None, poll: float = 0.5) -> Iterator[dict[str, Any]]:
        """Yield each completed round's history entry as it completes, until the run is finished.

        Raises TimeoutError after ``timeout`` seconds without the run finishing.
        """
        engine = self._require()
        deadline = None if timeout is None else time.monotonic() + timeout
        seen = 0
        while True:
            history = engine.history()
            yield from history[seen:]
            seen = len(history)
            status = engine.status()
            if status["status"] == "finished":
                return
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"the run did not finish in {timeout:g}s: {status['status']}, "
                                   f"{plural(status['completed_rounds'], 'round')} done. "
                                   f"{status.get('reason', '')}")
            time.sleep(poll)

    def wait(self, timeout: float | None = None) -> list[dict[str, Any]]:
        """Block until the run is finished; return the history."""
        for _ in self.rounds(timeout):
            pass
        return self.history()

    def global_model(self, round_number: int | None = None) -> Any:
        """A Keras model holding the global weights of ``round_number`` (default: the latest);
        for a network of another framework, that framework's :class:`fedhub.frameworks.Network`
        (``.evaluate``, ``.predict``; a PyTorch one's ``.module`` is the ``torch.nn.Module``)."""
        try:
            _, weights = self._require().round_weights(round_number)
        except FedHubError:
            raise ValueError(f"round {round_number} is not a completed round") from None
        if self.builtin and self.framework != "keras":
            network = frameworks.get(self.framework).build(self._model)
            network.set_weights(weights)
            return network
        from fedhub.frameworks.keras_model import set_keras_weights

        from .model_files import load_model

        if self.builtin:  # FedHub's network: it takes images through model.preprocess
            from fedhub.frameworks.keras_model import build_keras_model

            model = build_keras_model(self._model)
        else:
            model = load_model(self.model_path)
        set_keras_weights(model, weights)
        return model

    def evaluate(self, x: np.ndarray, y: np.ndarray, round_number: int | None = None) -> dict[str, Any]:
        """:func:`fedhub.evaluate` of the global model on held-out ``x, y`` (for a network of another
        framework than Keras, its own ``evaluate``: raw images, the same figures)."""
        model = self.global_model(round_number)
        if self.builtin and self.framework != "keras":
            return model.evaluate(x, y)
        return evaluate(model, x, y)
