"""``fedhub.Server``: the FedHub server for any Keras model, or FedHub's own networks in Keras or
PyTorch, started from Python.

It is ``server.create_app`` (engine, HTTP API, TensorBoard hook) served through
``fedhub.api.serving`` (waitress, with ``server.py``'s connection limit, body spooling and
long-poll limit) in a background thread of this process: the same server as
``python server.py``, reachable by devices in this process, in child processes or
on other machines.
"""

from __future__ import annotations

import dataclasses
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from fedhub import frameworks
from fedhub.api.serving import Serving
from fedhub.engine import auth
from fedhub.engine.errors import FedHubError
from fedhub.engine.plural import plural
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
    accuracy. The keyword arguments are the run's settings, by the names of ``server.py``'s
    flags and of ``--config``'s keys (``max_staleness=`` is ``--max-staleness``; README, "Server
    options"), declared once in the config dataclasses (:mod:`fedhub.settings`): an unknown name
    or a bad value is a ValueError naming the setting. The defaults are ``server.py``'s, except
    :attr:`DEFAULTS`. ``strategy`` is a name from ``--list-strategies`` and ``strategy_params``
    its parameters (``{"num_malicious": 1}``). ``dp`` adds differential privacy, as ``--dp``: a
    :class:`fedhub.DPConfig` or its settings (``{"mode": "central-fixed", "noise_multiplier": 1.0,
    "max_epsilon": 8}``); ``secagg`` turns secure aggregation on (True, a ``SecAggConfig`` or its
    settings). Use it as a context manager, or call :meth:`start` and :meth:`stop`.
    """

    # Where the Python API's defaults differ from server.py's, on purpose: a server made in a
    # script is for the devices it starts next, so they start active and training starts as soon
    # as min_devices are there; it picks a free port and needs fewer threads.
    DEFAULTS: ClassVar[dict[str, Any]] = {"auto_activate": True, "start": True, "port": 0, "threads": 16}

    def __init__(self, model: Any = None, *, test_data: tuple[np.ndarray, np.ndarray] | None = None,
                 enroll_secret: str | None = None, admin_token: str | None = None,
                 **settings: Any) -> None:
        from fedhub import serve as server_cli
        from fedhub import settings as declared

        values = {**self.DEFAULTS, **declared.keywords(settings)}
        builtin = model is None or isinstance(model, str)
        framework = values.get("framework", FRAMEWORK)
        if builtin and "dataset" not in values:  # the data set the named network takes
            values["dataset"] = (frameworks.network_dataset(framework, model) if isinstance(model, str)
                                 else None) or DATASET
        if isinstance(model, str):
            values["model"] = model
        values.setdefault("state_dir", Path(tempfile.mkdtemp(prefix="fedhub-server-")))
        # ValueError now (an unknown setting, a bad strategy parameter, a number out of its range, a
        # network the framework does not have for the data set), not at start(): server.py's
        # checks, which import no framework.
        config = declared.build(server_cli.ServerConfig, values,
                                **({} if builtin else {"keras_model": model}))
        config.validate()
        self.config = config
        self.federation = config.federation
        self._model = model if not builtin else config.model
        self.framework = config.framework  # what trains FedHub's network (a model of your own: Keras)
        self.dataset = config.dataset  # the data set whose test set FedHub's network is tested on
        self.network_name: str | None = config.model if builtin else None
        self._test_data = test_data
        self.host = config.host
        self.port = config.port
        self.state_dir = Path(config.state_dir)
        self.enroll_secret = enroll_secret or auth.new_token()
        self.admin_token = admin_token or auth.new_token()
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
        models: dict[str, Any] = {}
        if not self.builtin:  # Keras loads only when a server starts
            from .model_files import portable

            models = {"keras_model": portable(self._model, self.model_path)}
        config = dataclasses.replace(self.config, port=self.port, eval_dir=self.state_dir / "eval",
                                     test_data=self._test_data, enroll_secret=self.enroll_secret,
                                     admin_token=self.admin_token, **models)
        app = server_cli.create_app(config)
        self.engine = app.extensions["fedhub"]
        self._global_model = app.extensions["fedhub_global_model"]
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
    def measure_efficiency(self) -> None:
        """With ``efficiency=True``: time one process training the network again, now (see
        :mod:`fedhub.efficiency`). ``fedhub.simulate`` calls it once every device has enrolled and
        waits: at the server's start the workers are booting beside the measurement."""
        from fedhub import serve as server_cli

        reference = server_cli.reference_of(self.config, self._global_model)
        if reference is not None:
            self._require().set_efficiency(reference)

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
