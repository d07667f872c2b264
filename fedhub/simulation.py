"""``fedhub.simulate``: a whole federated run on one machine, in one call."""

from __future__ import annotations

import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from device.attacks import Attack
from fedcore.plural import plural

from .devices import Device
from .servers import Server


class History(list):
    """The completed rounds (as ``/api/history``), plus ``model``: the final global Keras model."""

    model: Any = None


def simulate(model: Any, partitions: Sequence[tuple[np.ndarray, np.ndarray]], *, rounds: int = 3,
             test_data: tuple[np.ndarray, np.ndarray] | None = None, processes: bool = True,
             epochs: int = 1, batch_size: int = 32, learning_rate: float = 1e-3,
             root: str | Path | None = None, timeout: float | None = None,
             on_round: Callable[[dict[str, Any]], None] | None = None, quiet: bool = True,
             attacks: Mapping[str, Attack] | None = None, **server_options: Any) -> History:
    """Run ``rounds`` rounds of federated learning with one device per partition.

    ``model`` is a compiled Keras model or a function returning one (called once);
    ``partitions`` is a list of ``(x, y)`` arrays, device ``i`` getting the i-th as
    ``device<i>``. Each device runs in a child process (``processes=True``) or in a
    thread of this process, against a :class:`fedhub.Server` started here on a free
    loopback port; every round waits for all devices. ``on_round(entry)`` is called
    as each round completes. ``attacks`` maps device names to the attack each mounts
    (``fedhub.make_attack("scale", factor=10)``); ``server_options`` are
    :class:`fedhub.Server`'s (``strategy="krum", strategy_params={"num_malicious": 1}``).
    Returns the history, with the final model as ``.model``. Raises RuntimeError if a
    device fails (for instance invalid data: its reason is in the message) and
    TimeoutError after ``timeout`` seconds.
    """
    import keras

    if not partitions:
        raise ValueError("give at least one partition (x, y)")
    names = [f"device{i}" for i in range(1, len(partitions) + 1)]
    unknown = sorted(set(attacks or {}) - set(names))
    if unknown:
        raise ValueError(f"attacks name no device: {', '.join(unknown)} (devices are device1 .. "
                         f"device{len(names)})")
    if not isinstance(model, keras.Model):
        model = model()
    root = Path(root) if root else Path(tempfile.mkdtemp(prefix="fedhub-simulation-"))
    server = Server(model, test_data=test_data, rounds=rounds, min_devices=len(partitions),
                    epochs=epochs, batch_size=batch_size, learning_rate=learning_rate, quorum=1.0,
                    auto_activate=True, start=True, state_dir=root / "server", **server_options)
    with server:
        devices = [Device(server, name, x, y, root=root / "devices", quiet=quiet,
                          attack=(attacks or {}).get(name))
                   for name, (x, y) in zip(names, partitions, strict=True)]
        for device in devices:
            device.spawn() if processes else device.start()
        try:
            _follow(server, devices, timeout, on_round)
        except BaseException:
            for device in devices:
                device.stop(timeout=5)
            raise
        history = History(server.history())
        history.model = server.global_model()
        for device in devices:  # each saves the final model and exits on "finish"
            device.join(timeout=60)
    return history


def _follow(server: Server, devices: list[Device], timeout: float | None,
            on_round: Callable[[dict[str, Any]], None] | None) -> None:
    deadline = None if timeout is None else time.monotonic() + timeout
    seen = 0
    while True:
        history = server.history()
        for entry in history[seen:]:
            if on_round is not None:
                on_round(entry)
        seen = len(history)
        if server.status()["status"] == "finished":
            return
        for device in devices:
            if device.poll() not in (None, 0):
                why = next((d["lifecycle_reason"] for d in server.devices() if d["name"] == device.name), "")
                raise RuntimeError(f"device {device.name} stopped with exit code {device.exit_code}"
                                   + (f": {why}" if why else f" (see {device.log_path})"))
        if deadline is not None and time.monotonic() > deadline:
            status = server.status()
            raise TimeoutError(f"the simulation did not finish in {timeout:g}s: {status['completed_rounds']}"
                               f" of {plural(status['total_rounds'], 'round')} done. "
                               f"{status.get('reason', '')}")
        time.sleep(0.5)
