"""The ``--framework``, ``--dataset`` and ``--model`` options, shared by ``server.py`` and
``python -m fedhub.simulate``: one declaration, so both commands accept the same names with the
same defaults, and one check (``server.ServerConfig.check_framework``) refuses the rest.

Nothing here imports a framework: checking a command line must not load TensorFlow or PyTorch.
"""

from __future__ import annotations

import argparse

from fedhub import frameworks

FRAMEWORK = frameworks.DEFAULT  # keras
DATASET = "fashion-mnist"


def add_options(p: argparse.ArgumentParser, *, framework: str = FRAMEWORK, dataset: str = DATASET) -> None:
    """Add ``--framework``, ``--dataset`` and ``--model`` (default None: :func:`network` picks)."""
    p.add_argument("--framework", default=framework, metavar="NAME",
                   help="what trains FedHub's networks, on the server and every device: "
                        f"{' or '.join(frameworks.NAMES)}")
    p.add_argument("--dataset", default=dataset, metavar="NAME",
                   help="the data set the network learns (its test set is evaluated each round): "
                        "fashion-mnist or cifar-10")
    p.add_argument("--model", default=None, metavar="NAME",
                   help="the framework's network: keras basic or cnn (fashion-mnist); torch cifar "
                        "(cifar-10), basic or cnn (fashion-mnist) (default: the first for the data set)")


def network(a: argparse.Namespace, fallback: str) -> str:
    """The network the options name: ``--model``, else the framework's first for the data set.
    A framework or data set that is wrong gives ``fallback``: the caller's check then says which,
    in one line (``ServerConfig.check_framework``)."""
    if a.model is not None:
        return a.model
    try:
        return frameworks.default_network(a.framework, a.dataset)
    except ValueError:
        return fallback
