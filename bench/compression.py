"""Bytes per round and final accuracy of each update compression against none (issue 12, section 3).

    python bench/compression.py [--rounds 20] [--samples-per-device N] [--schemes none q8 q4 topk:0.1]
    python bench/compression.py --report    # the Markdown table from the results file

Fashion-MNIST, 10 devices (IID), ``basic`` model, every device in every round, one local epoch
(Adam lr 1e-3, batch 32), FedAvg. The federation runs in one process as in
``bench/strategies.py`` (whose training loop it reuses), and every byte is what the server
would move: each update goes through ``fedhub.engine.compression.encode_update`` (with its top-k
residual per device) and ``decode_update`` into the real FedAvg aggregator, and each download
through ``Downlink`` (``--compress-downlink``: the first whole, then the change) or the plain
safetensors model. Seeds are fixed and the same for every scheme, so accuracies differ only by
what compression does.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from bench.strategies import Data, LocalTraining
from fedhub.engine import compression, wire
from fedhub.engine.files import atomic_write_text
from fedhub.engine.strategies import make_strategy
from fedhub.options.parser import Parser

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "bench" / "results" / "compression.json"
DEVICES = 10
SCHEMES = ("none", "q8", "q4", "topk:0.1", "topk:0.01")
TARGET_BYTES, TARGET_POINTS = 0.25, 0.5


def run(scheme_text: str, downlink: bool, rounds: int, data: Data, trainer: LocalTraining,
        samples: int, seed: int, log: Any) -> dict[str, Any]:
    """One federation: per round the test accuracy and the bytes moved each way."""
    scheme = compression.parse(scheme_text)
    trainer.reset()
    names = [f"device{i:02d}" for i in range(1, DEVICES + 1)]
    shards = dict(zip(names, data.shards("iid", DEVICES, samples, seed), strict=True))
    residuals: dict[str, dict[str, np.ndarray]] = {n: {} for n in names}
    weights = trainer.initial
    spec = wire.spec_of(weights)
    down = compression.Downlink(scheme, rng=np.random.default_rng(seed)) if downlink else None
    held: dict[str, str] = {}  # each device's ETag of the model it holds
    strategy = make_strategy("fedavg")
    out: dict[str, Any] = {"accuracy": [], "bytes_up": [], "bytes_down": []}
    for rnd in range(1, rounds + 1):
        started = time.perf_counter()
        up = down_bytes = 0
        if down is not None:
            down.install(rnd - 1, weights)
            reference = down.model
        else:
            reference = weights
            plain = len(wire.encode(weights, wire.Meta(round=rnd - 1, model_version=rnd - 1)))
        with strategy.begin(weights) as agg:
            for i, device in enumerate(names):
                if down is not None:
                    down_bytes += len(down.body_for({held.get(device, "")}))
                    held[device] = down.etag(rnd - 1)
                else:
                    down_bytes += plain
                rng = np.random.default_rng([seed, rnd, i])
                x, y = shards[device]
                trained, loss = trainer.train(device, reference, x, y, learning_rate=1e-3,
                                              proximal_mu=0.0, rng=rng)
                meta = wire.Meta(round=rnd, model_version=rnd - 1, num_examples=len(x),
                                 metrics={"loss": loss})
                body, residuals[device] = compression.encode_update(
                    trained, reference, scheme, meta, residual=residuals[device], rng=rng)
                up += len(body)
                payload, meta = compression.decode_update(body, spec, scheme)
                agg.add(device, compression.apply(reference, payload) if scheme.active else payload,
                        meta.num_examples, meta.metrics)
            weights = agg.result().weights
        accuracy, _ = trainer.evaluate(weights, data.x_test, data.y_test)
        out["accuracy"].append(accuracy)
        out["bytes_up"].append(up)
        out["bytes_down"].append(down_bytes)
        log(f"  round {rnd:2d}/{rounds}: accuracy {accuracy:.4f}, up {up / 2**20:.2f} MiB, "
            f"down {down_bytes / 2**20:.2f} MiB ({time.perf_counter() - started:.1f} s)")
    return out


def key(scheme: str, downlink: bool, rounds: int, samples: int, seed: int) -> str:
    return f"{scheme}|down={downlink}|r{rounds}|n{samples}|d{DEVICES}|s{seed}"


def report(runs: dict[str, dict[str, Any]]) -> str:
    """One table per (rounds, samples) setting: bytes per round and accuracy against none. The
    target (issue 12): at most 0.25x the bytes of none, both ways together, within 0.5 points."""
    lines = []
    settings = sorted({(r["rounds"], r["samples"], r["seed"]) for r in runs.values()})
    for rounds, samples, seed in settings:
        group = {k: r for k, r in runs.items()
                 if (r["rounds"], r["samples"], r["seed"]) == (rounds, samples, seed)}
        base = next((r for r in group.values() if r["scheme"] == "none" and not r["downlink"]), None)
        if base is None:
            continue
        base_up = np.mean(base["bytes_up"])
        base_bytes = base_up + np.mean(base["bytes_down"])
        base_acc = base["accuracy"][-1]
        lines += [f"{rounds} rounds, {samples or 'all'} examples per device, {DEVICES} devices, seed {seed}:",
                  "", "| compression | downlink | up / round | up vs none | down / round | total vs none | "
                  "final accuracy | vs none (points) | target met |", "|---|---|---|---|---|---|---|---|---|"]
        for r in sorted(group.values(), key=lambda r: (SCHEMES.index(r["scheme"])
                                                       if r["scheme"] in SCHEMES else 99, r["downlink"])):
            up, down = np.mean(r["bytes_up"]), np.mean(r["bytes_down"])
            ratio = (up + down) / base_bytes
            points = 100 * (r["accuracy"][-1] - base_acc)
            met = "yes" if ratio <= TARGET_BYTES and points >= -TARGET_POINTS else "no"
            met = "-" if r["scheme"] == "none" else met
            lines.append(f"| {r['scheme']} | {'compressed' if r['downlink'] else 'plain'} | "
                         f"{up / 2**20:.3f} MiB | {up / base_up:.3f}x | {down / 2**20:.3f} MiB | "
                         f"{ratio:.3f}x | "
                         f"{r['accuracy'][-1]:.4f} | {points:+.2f} | {met} |")
        lines.append("")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rounds", type=int, default=20)
    p.add_argument("--samples-per-device", type=int, default=0, help="0: each device's whole share")
    p.add_argument("--schemes", nargs="+", default=list(SCHEMES))
    p.add_argument("--downlink", choices=("plain", "compressed", "both"), default="both",
                   help="the global model download, for compressed schemes (default both)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--report", action="store_true", help="print the Markdown table and exit")
    a = p.parse_args(argv)
    for text in a.schemes:
        try:
            compression.parse(text)
        except ValueError as exc:
            p.error(str(exc))
    if a.rounds < 1 or a.samples_per_device < 0:
        p.error("--rounds must be at least 1 and --samples-per-device 0 or more")
    runs = json.loads(a.results.read_text())["runs"] if a.results.exists() else {}
    if a.report:
        print(report(runs))
        return 0
    if (data := Data.open(a.data_dir)) is None:
        return 2
    trainer = LocalTraining("basic", a.seed)
    for scheme in a.schemes:
        choices = {"plain": [False], "compressed": [True], "both": [False, True]}[a.downlink]
        for downlink in choices if scheme != "none" else [False]:
            k = key(scheme, downlink, a.rounds, a.samples_per_device, a.seed)
            if k in runs:
                continue
            print(f"{k}", flush=True)
            started = time.perf_counter()
            record = run(scheme, downlink, a.rounds, data, trainer, a.samples_per_device, a.seed, print)
            runs[k] = {**record, "scheme": scheme, "downlink": downlink, "rounds": a.rounds,
                       "samples": a.samples_per_device, "seed": a.seed,
                       "seconds": round(time.perf_counter() - started, 1)}
            a.results.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(a.results, json.dumps({"runs": runs}, indent=1, sort_keys=True) + "\n")
    print(report(runs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
