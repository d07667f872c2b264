"""Experiment tracking: each run's name and settings, and its MLflow run (``--mlflow URI``).

TensorBoard (:mod:`fedhub.tensorboard_log`) and MLflow see the same run: one name
(:func:`run_name`: ``--run-id``, else the start time and the strategy) and one flat mapping of
its settings (:func:`tracked_settings`: what the run was, not where it was served from).

:class:`MlflowLog` is a round hook that logs a run to an MLflow tracking store with MLflow's
own client (``MlflowClient``, no fluent global state, so two servers in one process each log
their own run): the settings as params, every round's global and per-device metrics (step =
round), epsilon under differential privacy, and at the run's end the final global model as
artifacts. MLflow is an optional extra (``pip install 'fedhub[mlflow]'``, the light
``mlflow-skinny`` client); ``--mlflow`` without it is refused before anything loads.

A tracker must never take the server down: the MLflow run is created on the hooks' thread at
the first completed round (a server that fails to start, or never completes a round, leaves no
empty run behind, and a slow store does not delay the start), and the first failure (a store
that cannot be reached, a refusal) logs one warning and ends the tracking, not the run.
"""

from __future__ import annotations

import importlib.util
import logging
import math
import os
import re
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import numpy as np

from fedhub.engine import federated_eval
from fedhub.engine.params import SettingError

log = logging.getLogger("fedhub.tracking")

EXTRA = "pip install 'fedhub[mlflow]'"
# Settings of how and where the server serves, not of the run: left out of MLflow params and
# TensorBoard HParams (with the folders and files fedhub.settings.flat_values leaves out anyway).
# The tracking URI may carry credentials.
NOT_TRACKED = ("host", "port", "threads", "max_upload_mb", "max_image_mb", "max_wait", "reset",
               "channel_timeout", "header_timeout", "auth_failures_per_minute", "run_id", "tensorboard",
               "tensorboard_devices", "mlflow", "mlflow_experiment")
# MLflow's stores refuse longer param values (500 characters before MLflow 2.x servers took 6,000):
# the shortest limit, so an older tracking server takes them too.
MAX_PARAM_VALUE = 500
MAX_BATCH = 100  # params or tags per log_batch call, MLflow's limit
MAX_METRICS_BATCH = 1000
_NOT_IN_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")  # what MLflow's metric names may hold
DATABASE_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
SPREAD = ("loss", "accuracy")  # device metrics whose mean, min and max over a round are logged
# How long the reachability check of an http(s) tracking server may take: MLflow's own client
# retries a refused connection with backoff for minutes, which would hold every later round's hooks.
PROBE_TIMEOUT = 5.0


def run_name(config: Any, run: Mapping[str, Any] | None = None) -> str:
    """The run's name in TensorBoard and MLflow: ``--run-id``, else the engine's name of the run
    (``run``), else the start time and strategy (``20261207-021500-krum``): runs told apart by
    what they were, not only when."""
    if config.run_id:
        return str(config.run_id)
    if run and run.get("name"):
        return str(run["name"])
    return f"{time.strftime('%Y%m%d-%H%M%S')}-{config.federation.strategy}"


def tracked_settings(config: Any) -> dict[str, Any]:
    """The run's settings as one flat mapping (``dp.noise_multiplier``), for MLflow params and
    TensorBoard HParams."""
    from fedhub import settings

    return settings.flat_values(config, NOT_TRACKED)


GROUPS = ("dp", "secagg")  # a run's named groups: None is off


def flatten(settings: Mapping[str, Any]) -> dict[str, Any]:
    """A run's settings as the engine keeps them (``{"dp": {"noise_multiplier": 1.0}}``,
    ``"dp": None`` when off) in the flat form of :func:`tracked_settings`."""
    out: dict[str, Any] = {}
    for key, value in settings.items():
        if key in GROUPS and (value is None or isinstance(value, Mapping)):
            out[key] = value is not None
        if isinstance(value, Mapping):
            out.update({f"{key}.{k}": v for k, v in value.items() if v is not None})
        elif value is not None:
            out[key] = value
    return out


class RunFollower:
    """Which run each round's entry belongs to, for a tracker (TensorBoard, MLflow).

    The engine says when another run becomes current (:meth:`switch`, a run listener: a reset,
    ``POST /api/runs``); entries of the run before it may still wait for the hooks' thread, so
    the switch applies from the first entry of a round started after it. A round number that
    goes back (an engine that says nothing: rounds from 1 again) starts another run too.
    """

    def __init__(self, name: str, run_id: str | int | None, settings: Mapping[str, Any]) -> None:
        self.name, self.run_id, self.settings = name, run_id, dict(settings)
        self.last_step = 0
        self._base, self._count = name, 1  # rounds from 1 again, unannounced: <name>-2, -3, ...
        self._pending: tuple[Mapping[str, Any], float] | None = None
        self._lock = threading.Lock()

    def switch(self, run: Mapping[str, Any]) -> None:
        with self._lock:
            self._pending = (run, time.time())

    def new_run(self, entry: Mapping[str, Any], started: bool) -> bool:
        """Whether ``entry`` (a completed round's) opens another run than the last one; then
        ``name``, ``run_id`` and ``settings`` are that run's."""
        step = int(entry["round"])
        with self._lock:
            pending = self._pending
            began = entry.get("started_at")
            if pending is not None and (not isinstance(began, int | float) or began >= pending[1] - 1e-3
                                        or (started and step <= self.last_step)):
                run, _ = pending
                self._pending = None
                given = run.get("settings") or {}
                self.name = self._base = str(run.get("name") or self._base)
                self.run_id, self._count = run.get("id"), 1
                self.settings = {**{k: v for k, v in self.settings.items() if k.split(".")[0] not in given},
                                 **flatten(given)}
                return True
        if started and step <= self.last_step:
            self._count += 1
            self.name = f"{self._base}-{self._count}"
            return True
        return False


def check_mlflow(uri: str | None = None) -> None:
    """:class:`SettingError` (one line naming ``--mlflow``) when MLflow is not installed, or the
    store needs what the light client lacks (a database store needs the full ``mlflow``)."""
    if not _installed("mlflow"):
        raise SettingError(f"{{0}} needs MLflow: {EXTRA}", "mlflow")
    if uri and urlparse(uri).scheme.split("+")[0] in DATABASE_SCHEMES and not _installed("sqlalchemy"):
        raise SettingError(f"{{0}} {uri} is a database store, which needs the full MLflow package (pip "
                           "install mlflow); or give a tracking server (http://HOST:5000) or a folder",
                           "mlflow")


def _installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def store_uri(uri: str) -> str:
    """MLflow's URI for ``uri``: a folder (``./mlruns``) becomes ``file:`` + its absolute path.

    MLflow 3 keeps its folder store in maintenance mode and refuses it unless
    ``MLFLOW_ALLOW_FILE_STORE`` is set; a user who names a folder has chosen it, so it is allowed
    here (where the variable is not already set to something else)."""
    parsed = urlparse(uri)
    if parsed.scheme in ("", "file") or (len(parsed.scheme) == 1 and os.name == "nt"):
        path = Path(parsed.path if parsed.scheme == "file" else uri).expanduser().resolve()
        os.environ.setdefault("MLFLOW_ALLOW_FILE_STORE", "true")
        return path.as_uri()
    return uri


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float | np.number):
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def _metric_key(key: str) -> str:
    """A metric name MLflow takes: a device's own metric names come from the device, and one that
    MLflow refuses would fail the round's whole batch (and end the tracking)."""
    return _NOT_IN_KEY.sub("_", key)[:250]


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300]}" if text else type(exc).__name__


class MlflowLog:
    """The hook: ``hook(history_entry, global_weights)`` after each completed round logs it to
    the MLflow run of ``run_name`` in ``experiment`` at ``uri``.

    ``settings``: the run's settings (params); ``tags``: more tags (framework, data set, mode);
    ``max_devices``: the first N devices to report get metrics of their own
    (``device/<name>/accuracy``), as TensorBoard's ``--tensorboard-devices``: every device's
    spread is logged as ``devices/accuracy_mean``/``_min``/``_max``. The run ends FINISHED with
    the round ``last_round``, or at :meth:`close` (the server stopping): FINISHED where
    ``finished()`` says the run ended (a privacy budget spent before the last round), else
    KILLED. ``export`` (``(weights) -> bytes``, ``suffix``) adds the framework's own file of the
    final model beside its safetensors weights. A reset (rounds that start again from 1) opens
    a new MLflow run, ``<run_name>-2``: it never writes into the finished one.
    """

    def __init__(self, uri: str, *, run_name: str, run_id: str | int | None = None,
                 settings: Mapping[str, Any] | None = None, experiment: str = "fedhub",
                 tags: Mapping[str, Any] | None = None, max_devices: int = 32,
                 last_round: int | None = None, finished: Callable[[], bool] | None = None,
                 export: tuple[Callable[[Mapping[str, np.ndarray]], bytes], str] | None = None) -> None:
        check_mlflow(uri)
        self.uri = store_uri(uri)
        self.experiment = experiment
        self.run = RunFollower(run_name, run_id, settings or {})
        self.tags = {f"fedhub.{k}": str(v) for k, v in (tags or {}).items() if v is not None}
        self.max_devices = max_devices
        self.last_round = last_round
        self._finished = finished
        self._export = export
        self._lock = threading.Lock()
        self._client: Any = None
        self._run: str | None = None  # the open MLflow run's id
        self._started = False  # a run was opened (it may have ended since)
        self._weights: Mapping[str, np.ndarray] | None = None
        self._devices: list[str] = []
        self._broken = False
        self.run_ids: list[str] = []  # every MLflow run this hook opened or went on with, oldest first

    # the hook ----------------------------------------------------------------------------------
    def __call__(self, entry: Mapping[str, Any], weights: Mapping[str, np.ndarray]) -> None:
        with self._lock:
            if self._broken:
                return
            try:
                step = int(entry["round"])
                if self.run.new_run(entry, self._started):  # a reset, another run
                    self._end("KILLED")
                    self._started, self._weights, self._devices = False, None, []
                if self._run is None:
                    self._start(step)
                self._log_round(entry, step)
                self.run.last_step, self._weights = step, weights
                last = self.last_round
                if self.run.settings.get("rounds") is not None:  # the run's own (a new run may differ)
                    last = int(self.run.settings["rounds"])
                if last and step >= last:
                    self._end("FINISHED")
            except Exception as exc:  # a tracker never takes the server down
                self._give_up(exc)

    def switch(self, run: Mapping[str, Any]) -> None:
        """Another run became current (the engine's run listener): its rounds go to an MLflow run
        of its name and settings."""
        self.run.switch(run)

    def close(self, status: str | None = None) -> None:
        """End the open run (the server stops): its latest model, and FINISHED, KILLED or
        ``status`` (``FAILED``)."""
        with self._lock:
            if self._broken or self._run is None:
                return
            try:
                done = status or ("FINISHED" if self._finished is not None and self._finished()
                                  else "KILLED")
                self._end(done)
            except Exception as exc:
                self._give_up(exc)

    # MLflow ------------------------------------------------------------------------------------
    def _connect(self) -> Any:
        if self._client is None:
            if urlparse(self.uri).scheme in ("http", "https"):
                import requests

                try:  # any answer will do: a proxy in front of MLflow may not route /health
                    requests.get(self.uri.rstrip("/") + "/health", timeout=PROBE_TIMEOUT)
                except requests.RequestException as exc:
                    raise ConnectionError(f"cannot reach {self.uri}: {type(exc).__name__}") from None
            from mlflow.tracking import MlflowClient

            self._client = MlflowClient(tracking_uri=self.uri)
        return self._client

    def _experiment_id(self, client: Any) -> str:
        # One at a time in a process: MLflow's file store lets two threads that both found no
        # experiment of the name each create one (two "compare" experiments, a run in each).
        with _EXPERIMENTS:
            found = client.get_experiment_by_name(self.experiment)
            if found is not None:
                return found.experiment_id
            try:
                return client.create_experiment(self.experiment)
            except Exception:  # another server created it meanwhile
                found = client.get_experiment_by_name(self.experiment)
                if found is None:
                    raise
                return found.experiment_id

    def _start(self, step: int) -> None:
        """Open the MLflow run at its first logged round. A run that goes on (a server restarted
        in its middle, or a run resumed for more rounds: its first round here is not round 1)
        goes on in its MLflow run, where there is one not finished."""
        from mlflow.entities import Param, RunTag

        client = self._connect()
        experiment_id = self._experiment_id(client)
        name, run_id = self.run.name, self.run.run_id
        self._started = True
        if step > 1:
            found = self._find(client, experiment_id, name, run_id)
            # the engine's run id names one run (of this name: ids repeat across state folders),
            # which may go on after it finished; a name alone only a run not finished
            if found is not None and (run_id is not None or found.info.status != "FINISHED"):
                self._run = found.info.run_id
                client.update_run(self._run, status="RUNNING")
                self.run_ids.append(self._run)
                return
        tags = {**self.tags, "fedhub.run_name": name,
                **({"fedhub.run_id": str(run_id)} if run_id is not None else {})}
        run = client.create_run(experiment_id, run_name=name, tags=tags)
        self._run = run.info.run_id
        self.run_ids.append(self._run)
        params = [Param(key[:250], self._param_value(value))
                  for key, value in sorted(self.run.settings.items())]
        for i in range(0, len(params), MAX_BATCH):
            client.log_batch(self._run, params=params[i:i + MAX_BATCH])
        client.log_batch(self._run, tags=[RunTag("mlflow.note.content", f"FedHub run {name}")])

    @staticmethod
    def _find(client: Any, experiment_id: str, name: str, run_id: str | int | None) -> Any:
        def quoted(text: str) -> str:
            return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"

        query = f"tags.`fedhub.run_name` = {quoted(name)}"
        if run_id is not None:
            query += f" and tags.`fedhub.run_id` = {quoted(str(run_id))}"
        found = client.search_runs([experiment_id], query, max_results=1,
                                   order_by=["attributes.start_time DESC"])
        return found[0] if found else None

    @staticmethod
    def _param_value(value: Any) -> str:
        text = str(value).lower() if isinstance(value, bool) else str(value)
        return text if len(text) <= MAX_PARAM_VALUE else text[:MAX_PARAM_VALUE - 3] + "..."

    def _log_round(self, entry: Mapping[str, Any], step: int) -> None:
        from mlflow.entities import Metric

        stamp = int(1000 * float(entry.get("closed_at") or time.time()))
        values: dict[str, float | None] = {
            key: _number(entry.get(key))
            for key in ("test_loss", "test_accuracy", "num_updates", "num_used", "num_examples",
                        "bytes_up", "bytes_down")}
        values["dp_epsilon"] = _number((entry.get("privacy") or {}).get("epsilon"))
        reported = {d: m for d, m in (entry.get("devices") or {}).items() if "num_examples" in m}
        for name in SPREAD:
            column = [v for m in reported.values() if (v := _number(m.get(name))) is not None]
            if column:
                values.update({f"devices/{name}_mean": float(np.mean(column)),
                               f"devices/{name}_min": min(column), f"devices/{name}_max": max(column)})
        for device, metrics in reported.items():
            if device not in self._devices:
                if len(self._devices) >= self.max_devices:
                    continue
                self._devices.append(device)
            values.update({f"device/{device}/{key}": _number(v) for key, v in metrics.items()})
        metrics = [Metric(_metric_key(key), value, stamp, step) for key, value in values.items()
                   if value is not None]
        metrics += [Metric(_metric_key(key), value, stamp, at)
                    for at, key, value in federated_eval.scalars(entry)]
        for i in range(0, len(metrics), MAX_METRICS_BATCH):
            self._client.log_batch(self._run, metrics=metrics[i:i + MAX_METRICS_BATCH])

    def _end(self, status: str) -> None:
        """Log the model of the run's latest round, and end the run with ``status``."""
        run, self._run = self._run, None
        if run is None:
            return
        if self._weights is not None:
            self._log_model(run, self._weights, self.run.last_step)
        self._client.set_terminated(run, status)

    def _log_model(self, run: str, weights: Mapping[str, np.ndarray], step: int) -> None:
        """``model/weights.safetensors`` (the global model's tensors by name, the round in its
        metadata), the framework's own file where the server has one (``model/model.keras``,
        ``model/model.pt2``), and a README saying how to load them."""
        from safetensors.numpy import save_file

        with tempfile.TemporaryDirectory(prefix="fedhub-mlflow-") as tmp:
            folder = Path(tmp)
            save_file({k: np.ascontiguousarray(v) for k, v in weights.items()},
                      str(folder / "weights.safetensors"),
                      metadata={"round": str(step), "fedhub.run_name": self.run.name})
            exported = ""
            if self._export is not None:
                export, suffix = self._export
                try:
                    (folder / f"model{suffix}").write_bytes(export(weights))
                    exported = f"model{suffix}"
                except Exception as exc:  # the weights are logged regardless
                    log.warning("MLflow: the final model could not be exported (%s); its weights are "
                                "logged", _one_line(exc))
            (folder / "README.md").write_text(_model_readme(step, exported))
            self._client.log_artifacts(run, tmp, artifact_path="model")

    def _give_up(self, exc: BaseException) -> None:
        self._broken = True
        log.warning("MLflow tracking at %s stopped (%s); the run goes on without it", self.uri,
                    _one_line(exc))


_EXPERIMENTS = threading.Lock()


def _model_readme(step: int, exported: str) -> str:
    own = (f"- `{exported}`: the same model as the framework saves it "
           f"({'keras.saving.load_model' if exported.endswith('.keras') else 'torch.export.load'}).\n"
           if exported else "")
    return (f"# FedHub global model after round {step}\n\n"
            "- `weights.safetensors`: the global model's tensors by name "
            "(`safetensors.numpy.load_file`), the round in its metadata.\n" + own +
            "\nNo MLmodel flavour: MLflow's Keras and PyTorch flavours pickle or re-save the network with "
            "the server's framework imported, and infer its requirements in a subprocess; these files "
            "load with the framework alone.\n")


def mlflow_hook(config: Any, engine: Any, global_model: Any, *, run_name: str,
                run_id: str | int | None = None) -> MlflowLog:
    """The MLflow hook for a server of ``config`` (``create_app``)."""
    federation = config.federation
    return MlflowLog(
        config.mlflow, run_name=run_name, run_id=run_id, settings=tracked_settings(config),
        experiment=config.mlflow_experiment, max_devices=config.tensorboard_devices,
        last_round=federation.rounds, finished=lambda: engine.status()["status"] == "finished",
        export=(global_model.export, global_model.export_suffix),
        tags={"framework": config.framework, "dataset": config.dataset, "model": config.model,
              "mode": federation.mode, "strategy": federation.strategy})
