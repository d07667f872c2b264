"""The framework seam: ``get("keras")`` or ``get("torch")``, imported only when asked for.

A PyTorch run must never import TensorFlow (it costs seconds and hundreds of MiB in every
process), and a Keras run need not import PyTorch, so nothing here imports either library:
:func:`get` imports the one module asked for. The interface is in :mod:`.base`.
"""

from __future__ import annotations

import importlib
import importlib.util

from fedhub.frameworks.base import Framework, Network

__all__ = ["DEFAULT", "NAMES", "Framework", "Network", "default_network", "get", "network_dataset",
           "networks"]

NAMES: tuple[str, ...] = ("keras", "torch")
# The library each framework needs, installed with the extra of the framework's name.
_LIBRARY = {"keras": "keras", "torch": "torch"}
DEFAULT = "keras"
# The networks each framework has, by name, and the data set each takes (what --model accepts),
# kept here so that checking a command line imports no framework.
_NETWORKS: dict[str, dict[str, str]] = {
    "keras": {"basic": "fashion-mnist", "cnn": "fashion-mnist", "cifar": "cifar-10"},
    "torch": {"cifar": "cifar-10", "basic": "fashion-mnist", "cnn": "fashion-mnist"},
}


def get(name: str) -> Framework:
    """The framework called ``name``, its module imported now; ValueError naming the choices."""
    if name not in NAMES:
        raise ValueError(f"unknown framework {name!r}; choose one of {', '.join(NAMES)}")
    if importlib.util.find_spec(_LIBRARY[name]) is None:  # found, not imported
        raise ValueError(f"--framework {name} needs {_LIBRARY[name]}, which is not installed: "
                         f"pip install 'fedhub[{name}]' (make venv installs both frameworks)")
    return importlib.import_module(f"fedhub.frameworks.{name}").FRAMEWORK


def networks(framework: str, dataset: str | None = None) -> tuple[str, ...]:
    """The networks of ``framework`` (for ``dataset`` only, when given), without importing it."""
    if framework not in NAMES:
        raise ValueError(f"unknown framework {framework!r}; choose one of {', '.join(NAMES)}")
    return tuple(n for n, d in _NETWORKS[framework].items() if dataset is None or d == dataset)


def network_dataset(framework: str, network: str) -> str | None:
    """The data set whose images ``network`` of ``framework`` takes (None: no such network)."""
    return _NETWORKS.get(framework, {}).get(network)


def default_network(framework: str, dataset: str) -> str:
    """The network a run of ``framework`` on ``dataset`` uses without ``--model``; ValueError
    in one line when the framework has none for that data set."""
    found = networks(framework, dataset)
    if not found:
        raise ValueError(f"the {framework} framework has no network for {dataset} yet (its networks: "
                         f"{', '.join(networks(framework))}); try another --framework")
    return found[0]
