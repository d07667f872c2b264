"""FedHub's Python API: federated learning with any Keras model on any NumPy arrays.

    import fedhub
    history = fedhub.simulate(build_model, [(x1, y1), (x2, y2)], rounds=3, test_data=(x_test, y_test))
    print(fedhub.evaluate(history.model, x_test, y_test)["accuracy"])

or piece by piece: ``fedhub.Server(model, ...).start()`` in this process, and
``fedhub.Device(server_or_url, name, x, y)`` run in this process (``run``/``start``),
in a child process (``spawn``) or on another machine (give the server's URL).

Many devices: ``fedhub.simulate(model, partitions, workers=K)`` hosts them as virtual
devices on K worker processes (or Ray actors, ``backend="ray"``); the same from the
command line is ``python -m fedhub.simulate --devices 1000 --fraction 0.1``.

It is a thin layer over the same parts as the command line: the engine
(``fedhub.engine``), the HTTP API (``api``, served by waitress), the device protocol
(``fedhub.device.client``), loop (``fedhub.device.runner``) and pool (``fedhub.device.pool``). Every
device, even one in this process, talks HTTP to the server.
"""

from __future__ import annotations

import importlib
from typing import Any

from fedhub import tensorflow_env

tensorflow_env.quiet()  # before anything imports TensorFlow or Keras

# Each public name and the module it lives in, imported on first use: `import fedhub.datasets`
# (which a device process does to read its data) then costs no engine, accountant or TensorFlow.
_EXPORTS = {
    "make_attack": "fedhub.device.attacks",
    "KerasModelTrainer": "fedhub.device.trainer",
    "Trainer": "fedhub.device.trainer",
    "TrainResult": "fedhub.device.trainer",
    "DPConfig": "fedhub.engine.privacy",
    "describe_strategies": "fedhub.engine.strategies",
    "Device": "fedhub.devices",
    "evaluate": "fedhub.evaluation",
    "Server": "fedhub.servers",
    "History": "fedhub.simulation",
    "simulate": "fedhub.simulation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'fedhub' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
