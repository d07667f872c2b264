"""FedHub's Python API in one script: federated learning of a small Keras network on
scikit-learn's handwritten digits, split over N devices, then a test of the final model.

    python -m examples.python_api --devices 3 --rounds 3            # devices in child processes
    python -m examples.python_api --devices 3 --rounds 3 --threads  # devices in this process
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

import fedhub
from examples.digits import load_digits
from fedhub.engine.plural import plural
from fedhub.options.parser import Parser

ROOT = Path(__file__).resolve().parents[1]


def build_model():
    """Any compiled Keras classifier works; this one is a small MLP on the 64 pixels."""
    import keras

    model = keras.Sequential([keras.Input((64,)), keras.layers.Dense(32, activation="relu"),
                              keras.layers.Dense(10)])
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    return model


def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", action="store_true", help="run the devices in this process")
    p.add_argument("--root", type=Path, default=None, help="where the server and devices keep files")
    p.add_argument("--json", type=Path, default=None, help="also write the results here")
    a = p.parse_args(argv)
    if not 1 <= a.devices <= 100 or a.rounds < 1:
        p.error("--devices must be from 1 to 100 and --rounds at least 1")

    x, y = load_digits()
    order = np.random.default_rng(0).permutation(len(x))
    test, train = order[:400], order[400:]
    partitions = [(x[part], y[part]) for part in np.array_split(train, a.devices)]

    history = fedhub.simulate(
        build_model, partitions, rounds=a.rounds, test_data=(x[test], y[test]), epochs=2,
        batch_size=16, learning_rate=0.01, processes=not a.threads, root=a.root, timeout=600,
        on_round=lambda r: print(f"round {r['round']}: test accuracy {r['test_accuracy']:.3f} "
                                 f"from {plural(r['num_updates'], 'device')}", flush=True))
    report = fedhub.evaluate(history.model, x[test], y[test])
    print(f"final global model: accuracy {report['accuracy']:.3f} "
          f"on {report['num_examples']} held-out digits")
    print("per class:", " ".join(f"{k}:{acc:.2f}" for k, acc in enumerate(report["per_class_accuracy"])))
    if a.json:
        a.json.write_text(json.dumps({"history": list(history), "evaluation": report}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
