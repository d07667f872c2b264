"""The network a run trains when none is named: the framework's first for the data set.

The ``framework``, ``dataset`` and ``model`` settings themselves are ``ServerConfig``'s fields (one
declaration for ``server.py``, ``fedhub.simulate`` and the Python API); one check
(``ServerConfig.check_framework``) refuses what does not go together. Nothing here imports a
framework: checking a command line must not load TensorFlow or PyTorch.
"""

from __future__ import annotations

from fedhub import frameworks

FRAMEWORK = frameworks.DEFAULT  # keras
DATASET = "fashion-mnist"


def default_network(framework: str, dataset: str, fallback: str) -> str:
    """The framework's first network for the data set. A framework or data set that is wrong
    gives ``fallback``: the caller's check then says which, in one line
    (``ServerConfig.check_framework``)."""
    try:
        return frameworks.default_network(framework, dataset)
    except ValueError:
        return fallback
