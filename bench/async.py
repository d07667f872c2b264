"""Synchronous against asynchronous rounds on a heterogeneous fleet: time to 85 % test accuracy.

    python bench/async.py [--devices 10] [--slow-devices 0.2] [--slowdown 5] [--buffer 5] \\
        [--limit N] [--json FILE] [--data-dir DIR]

The same IID split of Fashion-MNIST, the same devices (one per worker process, so each has
its own share of the machine, as a device has its own hardware) and the same slow devices
(``--slow-devices`` of them, picked with the seed, ``--slowdown`` times slower: their update
arrives after that many times their training time) run once with rounds (every round waits
for its slowest device) and once in asynchronous mode (FedBuff: a new model version every
``--buffer`` updates, stale updates weighted by 1/sqrt(1 + staleness)). The figure is the
seconds from the start of training (every device enrolled) to the first global model with
85 % test accuracy (``--target``); the target is asynchronous <= 0.6x synchronous. Prints a
Markdown table; ``--chart PNG`` also draws accuracy against time, and ``--results JSON ...``
tabulates and draws runs saved with ``--json`` instead of running again.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedhub.options.parser import Parser

ROOT = Path(__file__).resolve().parents[1]


def run(mode: str, devices_root: Path, a: argparse.Namespace) -> dict[str, Any]:
    from fedhub.simulation import simulate

    options: dict[str, Any] = {"mode": mode, "fraction": 1.0}
    rounds = a.rounds
    if mode == "async":
        options.update(buffer_size=a.buffer, max_staleness=a.max_staleness)
        rounds = a.versions
    with tempfile.TemporaryDirectory(prefix=f"fedhub-bench-{mode}-") as root:
        history = simulate("basic", devices_root, rounds=rounds, workers=a.devices, root=root,
                           data_dir=a.data_dir, test_limit=a.test_limit, seed=a.seed,
                           slow_devices=a.slow_devices, slowdown=a.slowdown, timeout=a.timeout,
                           epochs=1, batch_size=32, learning_rate=1e-3, **options)
    start = history.stats["training_started_at"]
    points = [(round(e["closed_at"] - start, 2), e["test_accuracy"]) for e in history]
    reached = next(((t, i + 1) for i, (t, acc) in enumerate(points) if acc >= a.target), (None, None))
    staleness = [u["staleness"] for e in history for u in e.get("updates", [])]
    return {"mode": mode, "steps": len(history), "to_target_s": reached[0], "to_target_step": reached[1],
            "final_accuracy": points[-1][1], "best_accuracy": max(acc for _, acc in points),
            "wall_s": points[-1][0], "points": points,
            "mean_staleness": round(sum(staleness) / len(staleness), 2) if staleness else None,
            "max_staleness_seen": max(staleness) if staleness else None}


def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=10)
    p.add_argument("--limit", type=int, default=None, help="at most N images per device")
    p.add_argument("--slow-devices", type=float, default=0.2)
    p.add_argument("--slowdown", type=float, default=5.0)
    p.add_argument("--buffer", type=int, default=5)
    p.add_argument("--max-staleness", type=int, default=10)
    p.add_argument("--rounds", type=int, default=10, help="synchronous rounds at most")
    p.add_argument("--versions", type=int, default=24, help="asynchronous model versions at most")
    p.add_argument("--test-limit", type=int, default=None)
    p.add_argument("--target", type=float, default=0.85, help="test accuracy to reach (default 0.85)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600.0)
    p.add_argument("--modes", nargs="+", default=["sync", "async"], choices=["sync", "async"])
    p.add_argument("--data-dir", default=os.environ.get("FEDHUB_DATA_DIR"))
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "async.json",
                   help="also write the raw results here (default bench/results/async.json)")
    p.add_argument("--chart", type=Path, default=None, help="draw test accuracy against time here (PNG)")
    p.add_argument("--results", type=Path, nargs="+", default=None,
                   help="report these saved runs (--json files) instead of running")
    a = p.parse_args(argv)
    if (a.devices < 1 or a.buffer < 1 or a.max_staleness < 0 or a.rounds < 1 or a.versions < 1
            or not 0 <= a.slow_devices <= 1 or not 1 <= a.slowdown <= 1000 or not 0 < a.target <= 1
            or a.timeout <= 0):
        p.error("--devices, --buffer, --rounds and --versions must be at least 1, --max-staleness 0 or "
                "more, --slow-devices from 0 to 1, --slowdown from 1 to 1000, --target in (0, 1] and "
                "--timeout positive")
    if a.results:
        runs = [json.loads(path.read_text())["results"] for path in a.results]
        for results in runs:
            print(table(results, a.target))
        if a.chart:
            chart(runs, a.target, a.chart)
        return 0
    results = measure(a)
    if a.json:
        a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()}, "results": results},
                                     indent=1))
    print(table(results, a.target))
    if a.chart:
        chart([results], a.target, a.chart)
    return 0


def measure(a: argparse.Namespace) -> list[dict[str, Any]]:
    """Each mode in ``a.modes`` once, on one split of the data."""
    from fedhub.split import split_to_devices

    results = []
    with tempfile.TemporaryDirectory(prefix="fedhub-bench-async-") as tmp:
        devices_root = Path(tmp) / "devices"
        split_to_devices(devices_root, a.devices, limit=a.limit, data_dir=a.data_dir, seed=a.seed,
                         progress=False, memmap=True)
        for mode in a.modes:
            began = time.monotonic()
            results.append(run(mode, devices_root, a))
            print(f"{mode}: {json.dumps(results[-1])} ({time.monotonic() - began:.0f} s)", file=sys.stderr,
                  flush=True)
    return results


def table(results: list[dict[str, Any]], target: float) -> str:
    """One run's modes as a Markdown table, and the ratio of their times to the target."""
    label = f"{target:.0%}".replace("%", " %")
    lines = [f"| mode | steps run | time to {label} | step reaching it | best accuracy | staleness |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in results:
        to = "not reached" if r["to_target_s"] is None else f"{r['to_target_s']:.1f} s"
        stale = "-" if r["mean_staleness"] is None else f"{r['mean_staleness']} / {r['max_staleness_seen']}"
        lines.append(f"| {r['mode']} | {r['steps']} | {to} | {r['to_target_step'] or '-'} | "
                     f"{r['best_accuracy']:.4f} | {stale} |")
    times = {r["mode"]: r["to_target_s"] for r in results}
    if times.get("sync") and times.get("async"):
        lines.append(f"\nasynchronous / synchronous time to {label}: {times['async'] / times['sync']:.2f}x")
    return "\n".join(lines) + "\n"


def chart(runs: list[list[dict[str, Any]]], target: float, path: Path) -> None:
    """Test accuracy against seconds since training started: one line per mode and run, a
    point per round (synchronous) or model version (asynchronous), the target as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    colours = {"sync": "tab:blue", "async": "tab:orange"}
    for i, results in enumerate(runs):
        for r in results:
            seconds, accuracy = zip(*r["points"], strict=True)
            ax.plot(seconds, [100 * acc for acc in accuracy], marker=".", color=colours[r["mode"]],
                    linestyle="-" if i == 0 else "--",
                    label=f"{'synchronous' if r['mode'] == 'sync' else 'asynchronous'}"
                          + (f", run {i + 1}" if len(runs) > 1 else ""))
    ax.axhline(100 * target, color="black", linewidth=1, linestyle=":", label=f"target {target:.0%}")
    ax.set_xlabel("seconds since training started")
    ax.set_ylabel("global test accuracy (%)")
    ax.set_title("Synchronous rounds against asynchronous (FedBuff), slow devices in the fleet")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    sys.exit(main())
