"""TensorFlow's start-up: its chatter turned off, and in FedHub's own processes its extras left out.

TensorFlow 2.21 prints, on every import, "oneDNN custom operations are on ..." (twice) and
"This TensorFlow binary is optimized to use available CPU instructions ...", each behind an
absl "All log messages before absl::InitializeLog() ..." line, into every server and device
log. ``TF_CPP_MIN_LOG_LEVEL`` alone does not silence the oneDNN line (it is written before
TensorFlow reads the variable); it goes only when oneDNN's custom operations are off
(``TF_ENABLE_ONEDNN_OPTS=0``), which also makes CPU results reproducible from run to run.
Both are defaults: a value already in the environment wins. Child processes inherit them.
"""

from __future__ import annotations

import importlib.abc
import os
import sys

SETTINGS = {
    "TF_CPP_MIN_LOG_LEVEL": "2",  # C++ INFO and WARNING lines (cpu_feature_guard and friends)
    "TF_ENABLE_ONEDNN_OPTS": "0",  # the oneDNN notice
}


def quiet() -> None:
    """Call before anything imports TensorFlow or Keras (every entry point does)."""
    for name, value in SETTINGS.items():
        os.environ.setdefault(name, value)
    try:
        from absl import logging as absl_logging  # TensorFlow's Python-side logger
    except ImportError:
        return
    absl_logging.set_verbosity(absl_logging.ERROR)


# What Keras and TensorFlow import at start-up only when installed, for features FedHub does not
# use (scikit-learn estimator wrappers, matplotlib image galleries, pandas frames as training data):
# 1.6 s of a 4.8 s `import keras` on a 2-core machine, paid by every device, worker and server.
OPTIONAL_EXTRAS = frozenset({"sklearn", "matplotlib", "pandas"})
_FRAMEWORKS = ("keras.", "tensorflow.", "tf_keras.")


class _SkipFrameworkExtras(importlib.abc.MetaPathFinder):
    """Refuses :data:`OPTIONAL_EXTRAS` to Keras and TensorFlow, as if not installed (they import
    them in ``try/except ImportError``), while anything else still imports them as usual."""

    def find_spec(self, name: str, path: object = None, target: object = None) -> None:
        top = name.partition(".")[0]
        if top not in OPTIONAL_EXTRAS or top in sys.modules:
            return None
        frame = sys._getframe(1)
        while frame is not None and frame.f_globals.get("__name__", "").startswith(
                ("importlib", "_frozen_importlib")):
            frame = frame.f_back
        importer = "" if frame is None else frame.f_globals.get("__name__", "")
        if importer.startswith(_FRAMEWORKS):
            raise ModuleNotFoundError(f"{top} is left out of Keras in a FedHub process", name=name)
        return None


def lean() -> None:
    """Call at the start of a FedHub command (server, device, worker, simulation, demo), not on
    ``import fedhub``: a user's own program may want Keras' scikit-learn wrappers or pandas
    support, so only FedHub's own processes go without them."""
    if not any(isinstance(finder, _SkipFrameworkExtras) for finder in sys.meta_path):
        sys.meta_path.insert(0, _SkipFrameworkExtras())
