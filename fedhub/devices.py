"""``fedhub.Device``: one device from NumPy arrays, in this process, a child process or anywhere.

It is ``fedhub.device.runner.DeviceRunner`` (the loop of ``device/device.py``) with a
:class:`~fedhub.device.trainer.KerasModelTrainer`, so it enrolls, reports its data
validation, trains, can be interrupted and saves its final model exactly as a
command-line device does. The child process *is* ``device/device.py`` with
``--trainer fedhub.device.trainer:from_folder``.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np

from fedhub.checkout import ROOT
from fedhub.device.attacks import Attack, make_attack
from fedhub.device.client import Client
from fedhub.device.runner import DeviceRunner
from fedhub.device.trainer import FROM_FOLDER
from fedhub.engine.devices import check_name
from fedhub.engine.errors import InvalidInput
from fedhub.engine.files import atomic_path


class Device:
    """A FedHub device training ``model`` on ``x, y``.

    ``server`` is a :class:`fedhub.Server` (its URL, enrollment secret and model are
    used) or a URL such as ``"http://10.0.0.5:4000"`` (then give ``enroll_secret``, or
    set ``$FEDHUB_ENROLL_SECRET``). ``model`` is a Keras model or a ``.keras`` path;
    by default it is the server's own model (downloaded from a remote server). Or
    pass any ``trainer`` implementing the Trainer protocol instead of ``x, y, model``
    (in this process only). Files (token, ``saved/final.keras``, ``history.csv``)
    go to ``root/<name>/`` (default: a temporary folder).
    """

    def __init__(self, server: Any, name: str, x: np.ndarray | None = None, y: np.ndarray | None = None,
                 *, model: Any = None, trainer: Any = None, enroll_secret: str | None = None,
                 root: str | Path | None = None, auto_activate: bool = True, poll_wait: float = 5.0,
                 retry_for: float = 60.0, verify: bool | str = True, quiet: bool = False,
                 attack: Attack | str | None = None, attack_params: Mapping[str, Any] | None = None,
                 secagg_dropout: float = 0.0,
                 holdout: tuple[np.ndarray, np.ndarray] | None = None) -> None:
        """``holdout``: the device's held-out ``(x, y)``, never trained on: it evaluates the global
        model (and with personalization its own) on them when the server asks (federated evaluation)."""
        try:
            self.name = check_name(name)
        except InvalidInput as exc:
            raise ValueError(exc.message) from None
        if trainer is None and (x is None or y is None):
            raise ValueError("give the device's data (x and y) or a trainer")
        if isinstance(server, str):
            self.url = server.rstrip("/")
            self._server_model: Path | None = None
            self.enroll_secret = enroll_secret or os.environ.get("FEDHUB_ENROLL_SECRET")
        else:
            if server.builtin and model is None and trainer is None:
                raise ValueError(f"the server trains FedHub's {server.framework} network "
                                 f"{server.network_name!r} on {server.dataset} images: give the device a "
                                 "model, or run it as device/device.py, or simulate with "
                                 "fedhub.simulate(..., workers=K)")
            self.url = server.url
            self._server_model = server.model_path
            self.enroll_secret = enroll_secret or server.enroll_secret
        if not 0 <= secagg_dropout <= 1:
            raise ValueError("secagg_dropout must be from 0 to 1")
        self.secagg_dropout = secagg_dropout
        if isinstance(attack, str):
            attack = make_attack(attack, **dict(attack_params or {}))
        elif attack_params:
            raise ValueError("attack_params go with an attack given by its kind (a string)")
        if attack is not None and attack.poisons_labels and trainer is not None:
            raise ValueError(f"the {attack.kind} attack changes the device's labels, which a custom "
                             "trainer holds itself; give x and y instead")
        self.attack: Attack | None = attack
        self.x, self.y, self.model, self.trainer = x, y, model, trainer
        self.holdout = None if holdout is None else (np.asarray(holdout[0]), np.asarray(holdout[1]))
        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="fedhub-devices-"))
        self.folder = self.root / self.name
        self.auto_activate = auto_activate
        self.poll_wait = poll_wait
        self.retry_for = retry_for
        self.verify = verify
        self.quiet = quiet
        self.exit_code: int | None = None
        self.runner: DeviceRunner | None = None
        self._thread: threading.Thread | None = None
        self._process: subprocess.Popen | None = None

    @property
    def final_model_path(self) -> Path:
        """Where the device saves the run's final global model when the run ends."""
        return self.folder / "saved" / "final.keras"

    @property
    def log_path(self) -> Path:
        """The child process' output (``spawn``)."""
        return self.folder / "device.log"

    def _client(self) -> Client:
        return Client(self.url, self.name, verify=self.verify, retry_for=self.retry_for)

    def _model_file(self) -> Path:
        """The model as a ``.keras`` file in this device's folder (names as the server's)."""
        from .model_files import save_model  # Keras loads only when a model is used

        path = self.folder / "data" / "model.keras"
        if self.model is not None:
            if isinstance(self.model, str | Path):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(Path(self.model).read_bytes())
            else:
                save_model(self.model, path)
        elif self._server_model is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(self._server_model.read_bytes())
        else:  # a remote server: enroll now, then download its model with the device's token
            runner = DeviceRunner(self._client(), None, self.folder, enroll_secret=self.enroll_secret,
                                  auto_activate=self.auto_activate, print_fn=self._print)
            runner.enroll(len(self.x))
            with atomic_path(path) as tmp:
                tmp.write_bytes(runner.client.model_file("latest"))
        return path

    def _print(self, *args: Any, **kwargs: Any) -> None:
        if not self.quiet:
            print(*args, **kwargs)

    # in this process ------------------------------------------------------
    def run(self) -> int:
        """Run the device in this thread until the run ends: 0 when finished or stopped, 1 if
        refused (invalid data, wrong secret, server gone)."""
        from fedhub.device.trainer import KerasModelTrainer

        from .model_files import load_model

        trainer = self.trainer
        if trainer is None:
            y = self.y if self.attack is None else self.attack.poison_labels(self.y)
            trainer = KerasModelTrainer(load_model(self._model_file()), self.x, y, holdout=self.holdout)
        self.runner = DeviceRunner(self._client(), trainer, self.folder, enroll_secret=self.enroll_secret,
                                   auto_activate=self.auto_activate, poll_wait=self.poll_wait,
                                   attack=self.attack, print_fn=self._print,
                                   secagg_dropout=self.secagg_dropout)
        self.exit_code = self.runner.run()
        return self.exit_code

    def start(self) -> Device:
        """Run the device in a background thread of this process."""
        self._thread = threading.Thread(target=self.run, name=f"fedhub-device-{self.name}", daemon=True)
        self._thread.start()
        return self

    # in a child process ---------------------------------------------------
    def spawn(self) -> Device:
        """Run the device as a child process (``device/device.py``); output in :attr:`log_path`."""
        if self.trainer is not None:
            raise ValueError("a custom trainer object cannot move to a child process; use run() or start()")
        model_file = self._model_file()
        with atomic_path(model_file.parent / "arrays.npz") as tmp:
            held = {} if self.holdout is None else {"x_eval": self.holdout[0], "y_eval": self.holdout[1]}
            np.savez(tmp, x=np.asarray(self.x), y=np.asarray(self.y), **held)
        cmd = [sys.executable, "-m", "fedhub.device.main", "--server", self.url, "--name", self.name,
               "--devices-root", str(self.root), "--trainer", FROM_FOLDER,
               "--poll-wait", str(self.poll_wait), "--retry-for", str(self.retry_for)]
        if self.auto_activate:
            cmd.append("--auto-activate")
        if self.attack is not None:
            cmd += ["--attack", self.attack.kind]
            for key, value in self.attack.describe()["params"].items():
                cmd += ["--attack-arg", f"{key}={value}"]
        if self.secagg_dropout:
            cmd += ["--secagg-dropout", str(self.secagg_dropout)]
        if isinstance(self.verify, str):
            cmd += ["--ca", self.verify]
        env = {**os.environ}
        if self.enroll_secret:  # in the environment, not on the command line (ps shows that)
            env["FEDHUB_ENROLL_SECRET"] = self.enroll_secret
        with open(self.log_path, "ab") as log:
            self._process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        return self

    # either ---------------------------------------------------------------
    def join(self, timeout: float | None = None) -> int | None:
        """Wait for the device to end; its exit code (None if still running after ``timeout``)."""
        if self._process is not None:
            try:
                self.exit_code = self._process.wait(timeout)
            except subprocess.TimeoutExpired:
                return None
        elif self._thread is not None:
            self._thread.join(timeout)
        return self.exit_code

    def poll(self) -> int | None:
        """The exit code if the device has ended, else None."""
        if self._process is not None:
            self.exit_code = self._process.poll()
        return self.exit_code

    def stop(self, timeout: float = 20.0) -> None:
        """Leave the federation: SIGINT to a child process (like Ctrl-C), or end the loop."""
        if self._process is not None:
            from fedhub.device.launcher import stop

            stop([self._process], timeout=timeout)
            self.exit_code = self._process.returncode
        elif self.runner is not None:
            self.runner.stop()
            self.join(timeout)
