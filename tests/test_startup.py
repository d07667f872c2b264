"""What a FedHub process imports at start-up.

Keras imports scikit-learn, matplotlib and pandas whenever they are installed, for features FedHub
does not use; FedHub's own commands leave them out (``tensorflow_env.lean``), a user's program that
merely imports ``fedhub`` does not. Each case runs in a fresh interpreter, so it is slow.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from .conftest import ROOT

pytestmark = pytest.mark.slow

EXTRAS = ("sklearn", "matplotlib", "pandas")
PROBE = """
import json, sys
import fedhub
from fedhub import tensorflow_env
if sys.argv[1] == "lean":
    tensorflow_env.lean()
import keras
from keras.src.trainers.data_adapters import array_slicing
loaded = [name for name in {extras!r} if name in sys.modules]
import pandas, sklearn  # still there for anything but Keras
print(json.dumps({{"loaded": loaded, "keras_pandas": array_slicing.pandas is not None,
                  "later": [pandas.__name__, sklearn.__name__]}}))
"""


def _probe(mode: str) -> dict:
    proc = subprocess.run([sys.executable, "-c", PROBE.format(extras=EXTRAS), mode], cwd=ROOT,
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_fedhubs_own_processes_import_keras_without_its_optional_extras() -> None:
    assert _probe("lean") == {"loaded": [], "keras_pandas": False, "later": ["pandas", "sklearn"]}


def test_a_users_program_gets_keras_as_keras_imports_itself() -> None:
    assert _probe("user") == {"loaded": list(EXTRAS), "keras_pandas": True, "later": ["pandas", "sklearn"]}

