"""TensorFlow's start-up chatter, turned off before TensorFlow is imported.

TensorFlow 2.21 prints, on every import, "oneDNN custom operations are on ..." (twice) and
"This TensorFlow binary is optimized to use available CPU instructions ...", each behind an
absl "All log messages before absl::InitializeLog() ..." line, into every server and device
log. ``TF_CPP_MIN_LOG_LEVEL`` alone does not silence the oneDNN line (it is written before
TensorFlow reads the variable); it goes only when oneDNN's custom operations are off
(``TF_ENABLE_ONEDNN_OPTS=0``), which also makes CPU results reproducible from run to run.
Both are defaults: a value already in the environment wins. Child processes inherit them.
"""

from __future__ import annotations

import os

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
