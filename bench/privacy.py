"""Accuracy against privacy spent: central DP on Fashion-MNIST with 10 and 100 devices (issue 11).

    python bench/privacy.py --run [--rounds R] [--samples-per-device N] [--noise 0,0.3,1]
    python bench/privacy.py --report   # Markdown table and PNG chart from the results file

Each run is FedAvg behind the DP wrapper with a fixed clipping bound (``--dp central-fixed``),
``basic`` model, IID split, one local epoch a round, 10 devices taking part in each round: all
of them with 10 devices (sampling rate 1), a tenth with 100 (rate 0.1, which the accountant
credits). Noise multiplier 0 is the reference without noise (clipping only; epsilon infinite).
Epsilon at delta = 1e-5 after each round comes from the wrapper's accountant (dp-accounting's
RDP), exactly what a real run records.

The federation runs in one process, as ``bench/strategies.py`` runs it (the same local
training loop and data): the updates go through the real ``fedhub.engine.privacy`` wrapper
(configure, begin, add, result, load_state). Finished runs are saved at once; a run already
in the results file is skipped. Seeds are fixed.
"""

from __future__ import annotations

import argparse
import math
import os
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.strategies import Data, LocalTraining, Results, count
from fedhub.engine.privacy import DPConfig
from fedhub.engine.strategies import FedAvg
from fedhub.options.parser import Parser

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "bench" / "results" / "privacy.json"
DOCS = ROOT / "docs"
PER_ROUND = 10  # devices taking part in each round
DELTA = 1e-5
DEFAULT_NOISE = (0.0, 0.05, 0.1, 0.3, 1.0, 2.0, 4.0)
LEARNING_RATE = 1e-3


def simulate(devices: int, noise: float, clip: float, rounds: int, samples: int, seed: int,
             data: Data, trainer: LocalTraining, log: Any) -> dict[str, Any]:
    """One federation under central DP; per round the test accuracy and epsilon."""
    trainer.reset()
    strategy = DPConfig(mode="central-fixed", noise_multiplier=noise, clipping_norm=clip,
                        delta=DELTA).wrap(FedAvg(), PER_ROUND)
    strategy.rng = np.random.default_rng(seed)
    names = [f"device{i:03d}" for i in range(1, devices + 1)]
    shards = dict(zip(names, data.shards("iid", devices, samples, seed), strict=True))
    select = random.Random(seed)
    weights = trainer.initial
    out: dict[str, Any] = {"devices": devices, "noise_multiplier": noise, "clip": clip, "rounds": rounds,
                           "samples_per_device": samples, "seed": seed, "accuracy": [], "epsilon": [],
                           "update_norm": []}
    for rnd in range(1, rounds + 1):
        started = time.perf_counter()
        plan = strategy.configure(names, rng=select, fraction=PER_ROUND / devices)
        norms = []
        with strategy.begin(weights) as agg:
            for device in plan.devices:
                x, y = shards[device]
                rng = np.random.default_rng([seed, rnd, names.index(device)])
                trained, loss = trainer.train(device, weights, x, y, rng=rng, learning_rate=LEARNING_RATE,
                                              proximal_mu=0.0)
                norms.append(math.sqrt(sum(float(np.square(trained[k].astype(np.float64) - weights[k]).sum())
                                           for k in weights)))
                agg.add(device, trained, len(x), {"loss": loss})
            result = agg.result()
        strategy.load_state(result.state)
        weights = result.weights
        accuracy, _ = trainer.evaluate(weights, data.x_test, data.y_test)
        epsilon = result.metrics["privacy"]["epsilon"]
        out["accuracy"].append(accuracy)
        out["epsilon"].append(epsilon)
        out["update_norm"].append(float(np.median(norms)))
        shown = math.inf if epsilon is None else epsilon
        log(f"  round {rnd:2d}/{rounds}: accuracy {accuracy:.4f}, epsilon {shown:.3g}, median update "
            f"norm {np.median(norms):.3g} ({time.perf_counter() - started:.1f} s)")
    return out


def key(devices: int, noise: float, clip: float, rounds: int, samples: int, seed: int) -> str:
    return f"d{devices}|z{noise:g}|C{clip:g}|r{rounds}|n{samples}|s{seed}"


def report(results: Results, docs: Path) -> str:
    """A Markdown table (final accuracy and epsilon per run) and a PNG chart of accuracy
    against epsilon, round by round, one line per noise multiplier."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = sorted(results.runs.values(), key=lambda r: (r["devices"], r["noise_multiplier"]))
    if not runs:
        return "no results yet: run with --run"
    first = runs[0]
    size = (f"{first['rounds']} rounds, {first['samples_per_device']} examples per device, "
            f"clipping bound {first['clip']:g}, delta {DELTA:g}, seed {first['seed']}")
    lines = [f"Central DP (fixed clipping) around FedAvg, `basic` model, IID, {PER_ROUND} devices per "
             f"round; {size}.\n",
             "| devices | sampling rate | noise multiplier | final accuracy | epsilon after the last round |",
             "|---:|---:|---:|---:|---:|"]
    for r in runs:
        eps = r["epsilon"][-1]
        lines.append(f"| {r['devices']} | {PER_ROUND / r['devices']:g} | {r['noise_multiplier']:g} | "
                     f"{100 * r['accuracy'][-1]:.1f}% | {'∞ (no noise)' if eps is None else f'{eps:.3g}'} |")
    devices = sorted({r["devices"] for r in runs})
    fig, axes = plt.subplots(1, len(devices), figsize=(5.5 * len(devices), 4.2), squeeze=False, sharey=True)
    for ax, n in zip(axes[0], devices, strict=True):
        for r in (r for r in runs if r["devices"] == n):
            acc = 100 * np.array(r["accuracy"])
            if r["epsilon"][-1] is None:
                ax.axhline(acc[-1], color="black", linestyle="--", linewidth=1,
                           label=f"no noise (final {acc[-1]:.1f}%)")
                continue
            ax.plot(r["epsilon"], acc, marker=".", label=f"z = {r['noise_multiplier']:g}")
        ax.set_xscale("log")
        ax.set_title(f"{n} devices ({PER_ROUND} a round, q = {PER_ROUND / n:g})")
        ax.set_xlabel(f"epsilon spent (delta {DELTA:g}), one point per round")
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=8)
    axes[0][0].set_ylabel("test accuracy (%)")
    fig.suptitle("Fashion-MNIST: accuracy against privacy spent")
    fig.tight_layout()
    name = "privacy_accuracy_epsilon.png"
    fig.savefig(docs / name, dpi=90)
    plt.close(fig)
    lines.append(f"\n![accuracy against epsilon]({name})\n")
    return "\n".join(lines)


def _floats(text: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise argparse.ArgumentTypeError("noise multipliers must be numbers of 0 or more")
    return values




def parser() -> argparse.ArgumentParser:
    p = Parser(prog="python bench/privacy.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="store_true", help="run the grid (runs already saved are skipped)")
    p.add_argument("--devices", type=lambda t: [count(1)(v) for v in t.split(",")], default=[10, 100],
                   help="comma-separated device counts (default 10,100)")
    p.add_argument("--noise", type=_floats, default=list(DEFAULT_NOISE),
                   help="comma-separated noise multipliers (default 0,0.05,0.1,0.3,1,2,4)")
    p.add_argument("--clip", type=float, default=0.5, help="clipping bound C (default 0.5)")
    p.add_argument("--rounds", type=count(1), default=30, help="rounds per run (default 30)")
    p.add_argument("--samples-per-device", type=count(1), default=600,
                   help="each device's first N examples (default 600: all of 100 devices' shares)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--results", type=Path, default=RESULTS, help=f"results file (default {RESULTS})")
    p.add_argument("--report", action="store_true", help="print the table and write the chart to --docs")
    p.add_argument("--docs", type=Path, default=DOCS)
    p.add_argument("--data-dir", default=os.environ.get("FEDHUB_DATA_DIR"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    p = parser()
    a = p.parse_args(argv)
    if not a.run and not a.report:
        p.error("give --run and/or --report")
    if not (math.isfinite(a.clip) and a.clip > 0):
        p.error("--clip must be a positive number")
    if any(d < PER_ROUND for d in a.devices):
        p.error(f"--devices must each be at least {PER_ROUND} (devices per round)")
    results = Results(a.results)
    todo = [(d, z) for d in a.devices for z in a.noise
            if key(d, z, a.clip, a.rounds, a.samples_per_device, a.seed) not in results.runs] if a.run else []
    if todo:
        if (data := Data.open(a.data_dir)) is None:
            return 2
        trainer = LocalTraining("basic", a.seed)
        for devices, noise in todo:
            k = key(devices, noise, a.clip, a.rounds, a.samples_per_device, a.seed)
            print(k, flush=True)
            started = time.perf_counter()
            record = simulate(devices, noise, a.clip, a.rounds, a.samples_per_device, a.seed, data,
                              trainer, lambda text: print(text, flush=True))
            record["seconds"] = time.perf_counter() - started
            results.save(k, record)
    if a.report:
        a.docs.mkdir(parents=True, exist_ok=True)
        print(report(results, a.docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
