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
(``fedcore``), the HTTP API (``api``, served by waitress), the device protocol
(``device.client``), loop (``device.runner``) and pool (``device.pool``). Every
device, even one in this process, talks HTTP to the server.
"""

from utils import tensorflow_env

tensorflow_env.quiet()  # before anything below imports TensorFlow or Keras

from device.attacks import make_attack  # noqa: E402
from device.trainer import KerasModelTrainer, Trainer, TrainResult  # noqa: E402
from fedcore.privacy import DPConfig  # noqa: E402
from fedcore.strategies import describe_strategies  # noqa: E402

from .devices import Device  # noqa: E402
from .evaluation import evaluate  # noqa: E402
from .servers import Server  # noqa: E402
from .simulation import History, simulate  # noqa: E402

__all__ = ["DPConfig", "Device", "History", "KerasModelTrainer", "Server", "TrainResult", "Trainer",
           "describe_strategies", "evaluate", "make_attack", "simulate"]
