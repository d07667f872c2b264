"""Simulating many devices: time to each round's result and memory of all processes together.

    python bench/simulation.py [--parts ten many ray] [--data-dir DIR] [--json FILE]

Prints a Markdown report (results and commands go to docs/benchmarks.md):

* ``ten``: 10 IID devices of 6,000 Fashion-MNIST images, the basic model, Adam 1e-3, batch
  32, one local epoch, 8 rounds on a pool of 2 workers: seconds from the call to each round's
  global accuracy, against one centralized epoch over the same 60,000 images measured in the
  same run (a fresh process: TensorFlow's start-up, the model, one epoch). ``--baseline``
  also runs today's one-process-per-device simulation of the same federation.
* ``many``: 100 and 1,000 IID devices, 10 % per round, 2 workers: peak resident memory of
  every process together (sampled), time per round, time to 85 % test accuracy.
* ``ray``: the same with the workers as Ray actors, on a local Ray and on a two-node Ray
  cluster started on this machine (``ray.cluster_utils.Cluster``, one CPU per node).
* ``scale``: 1,000 devices (10 % a round) and 10,000 devices (1 % a round), IID, 2 workers,
  ``--rounds-scale`` rounds: each round's efficiency (:mod:`fedhub.efficiency`: one process's time
  for the round's images, measured in the same run, over the round's time), the first round,
  the steady round and the peak memory of all processes (issue 23's starting point).
* ``secure``: the same under secure aggregation (``--secure``, default 200 devices, a quarter a
  round): the workers as relays (one masked sum each a round) against each masked update on its
  own, in one run: bytes up, the steady round, each round's accuracy.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from fedhub.engine.strategies import STRATEGIES, ParamError, parse_strategy_args
from fedhub.options.parser import Parser
from fedhub.simulate import efficiency_summary

ROOT = Path(__file__).resolve().parents[1]
TARGET = 0.85
CENTRAL = """
import json, sys, time
started = time.perf_counter()
from fedhub.frameworks.keras_model import Model
from fedhub.split import load_fashion_mnist
(x, y), _ = load_fashion_mnist(sys.argv[1])
model = Model("basic")
ready = time.perf_counter()
model.train(x, y, epochs=1, batch_size=32, learning_rate=1e-3)
first = time.perf_counter()
model.train(x, y, epochs=1, batch_size=32, learning_rate=1e-3)
second = time.perf_counter()
print(json.dumps({"startup_s": ready - started, "epoch_s": first - ready, "second_epoch_s": second - first,
                  "process_s": first - started}))
"""


def central_epoch(data_dir: str | None) -> dict[str, float]:
    """One centralized epoch in a fresh process (as a simulation's devices start fresh)."""
    out = subprocess.run([sys.executable, "-c", CENTRAL, data_dir or ""], cwd=ROOT, capture_output=True,
                         text=True, timeout=1800)
    if out.returncode:
        raise RuntimeError(out.stderr[-2000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def split(root: Path, devices: int, data_dir: str | None, limit: int | None = None) -> Path:
    from fedhub.split import split_to_devices

    split_to_devices(root, devices, limit=limit, data_dir=data_dir, progress=False, memmap=True)
    return root


def figures(history: Any) -> dict[str, Any]:
    round_s = history.stats["round_s"]
    accuracy = [entry["test_accuracy"] for entry in history]
    steps = [b - a for a, b in itertools.pairwise(round_s)]
    reached = next((t for t, acc in zip(round_s, accuracy, strict=True) if acc >= TARGET), None)
    return {"rounds": len(history), "first_round_s": round_s[0], "steady_round_s": statistics.median(steps)
            if steps else None, "wall_s": round_s[-1], "to_85_s": reached,
            "to_85_round": accuracy.index(next(a for a in accuracy if a >= TARGET)) + 1 if reached else None,
            "final_accuracy": accuracy[-1], "accuracy": accuracy, "round_s": round_s,
            "peak_rss_mb": history.stats["peak_rss_mb"],
            "worker_peak_rss_mb": history.stats.get("worker_peak_rss_mb"),
            "bytes_up": history.stats.get("bytes_up"), "bytes_down": history.stats.get("bytes_down"),
            "nodes": len({t["node"] for t in history.stats.get("tasks", [])}),
            "restarts": history.stats.get("restarts"), **efficiency_summary(history), **test_share(history)}


def test_share(history: Any) -> dict[str, Any]:
    """The steady rounds' server test (the new model on the test set) against one process's time
    for their images, and the efficiency a round could reach if all else were as fast as that one
    process: ``centralized / (centralized + test)``."""
    steady = [e["efficiency"] for e in list(history)[1:] if e.get("efficiency")]
    tested = [f for f in steady if f.get("test_s") is not None]
    if not tested:
        return {}
    test_s = statistics.median(f["test_s"] for f in tested)
    centralized = statistics.median(f["centralized_s"] for f in tested)
    return {"steady_test_s": round(test_s, 4), "steady_centralized_s": round(centralized, 4),
            "ceiling_with_test": round(centralized / (centralized + test_s), 4)}


def run_pool(devices_root: Path, root: Path, rounds: int, fraction: float, data_dir: str | None,
             **options: Any) -> dict[str, Any]:
    """One pool simulation; ``options`` override the issue's local training (1 epoch, batch 32,
    Adam 1e-3) and reach ``fedhub.simulate`` (workers, backend, strategy, ...)."""
    import fedhub

    options = {"epochs": 1, "batch_size": 32, "learning_rate": 1e-3, "quiet": False, **options}
    history = fedhub.simulate("basic", devices_root, rounds=rounds, fraction=fraction, data_dir=data_dir,
                              root=root, **options)
    return figures(history)


def run_baseline(devices: int, root: Path, rounds: int, data_dir: str | None) -> dict[str, Any]:
    """Today's way: one device process (with its own TensorFlow) per device, same federation."""
    import fedhub
    from fedhub.frameworks.keras_model import build_keras_model, preprocess
    from fedhub.split import load_fashion_mnist, partition

    (x, y), (xt, yt) = load_fashion_mnist(data_dir)
    parts = partition(y, devices, "iid")

    def build():  # the basic network, fed preprocessed images (what the built-in trainer feeds it)
        import keras

        model = build_keras_model("basic")
        model.compile(optimizer=keras.optimizers.Adam(1e-3),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
        return model

    history = fedhub.simulate(build, [(preprocess(x[p]), y[p]) for p in parts], rounds=rounds, workers=0,
                              test_data=(preprocess(xt), yt), epochs=1, batch_size=32, learning_rate=1e-3,
                              root=root)
    return figures(history)


def ray_cluster() -> Any:
    import ray
    from ray.cluster_utils import Cluster

    small = {"num_cpus": 1, "object_store_memory": 200 * 2**20}
    cluster = Cluster(initialize_head=True, head_node_args={**small, "include_dashboard": False})
    cluster.add_node(**small)
    ray.init(address=cluster.address, runtime_env={"env_vars": {"PYTHONPATH": str(ROOT)}})
    return cluster


def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", nargs="+", choices=["ten", "many", "ray", "scale", "secure"],
                   default=["ten", "many", "ray"])
    p.add_argument("--data-dir", default=os.environ.get("FEDHUB_DATA_DIR"))
    p.add_argument("--devices", type=int, nargs="+", default=[100, 1000], help="for many and ray")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds-ten", type=int, default=8)
    p.add_argument("--rounds-many", type=int, default=40)
    p.add_argument("--rounds-ray", type=int, default=10)
    p.add_argument("--rounds-scale", type=int, default=5)
    p.add_argument("--rounds-secure", type=int, default=4)
    p.add_argument("--secure", default="200:0.25", metavar="DEVICES:FRACTION",
                   help="the secure part's federation")
    p.add_argument("--relay", nargs="+", choices=["on", "off"], default=["on", "off"],
                   help="scale part: the workers as relays (one partial sum each a round), or each "
                        "update on its own (today's path before relays); both by default, in one run")
    p.add_argument("--scale", nargs="+", default=["1000:0.1", "10000:0.01"], metavar="DEVICES:FRACTION",
                   help="the scale part's federations")
    p.add_argument("--baseline", action="store_true",
                   help="also one process per device (ten: 10 TensorFlows)")
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "simulation.jsonl",
                   help="append each result as a JSON line here (default bench/results/simulation.jsonl)")
    many = p.add_argument_group("local training and strategy of the many part (default: as the ten part)")
    many.add_argument("--epochs", type=int, default=1)
    many.add_argument("--batch-size", type=int, default=32)
    many.add_argument("--learning-rate", type=float, default=1e-3)
    many.add_argument("--strategy", default="fedavg", choices=list(STRATEGIES))
    many.add_argument("--strategy-arg", action="append", default=[], metavar="KEY=VALUE")
    a = p.parse_args(argv)
    if min(a.devices) < 1 or a.workers < 1 or min(a.rounds_ten, a.rounds_many, a.rounds_ray,
                                                    a.rounds_scale, a.rounds_secure) < 1:
        p.error("--devices, --workers and the --rounds-* options must be at least 1")
    try:
        scale = [(int(n), float(f)) for n, f in (item.split(":") for item in a.scale)]
        secure = [(int(n), float(f)) for n, f in [a.secure.split(":")]]
    except ValueError:
        p.error("--scale and --secure take DEVICES:FRACTION, e.g. 10000:0.01")
    if any(n < 1 or not 0 < f <= 1 for n, f in scale + secure):
        p.error("--scale, --secure: DEVICES at least 1, FRACTION in (0, 1]")
    try:
        params = parse_strategy_args(a.strategy, a.strategy_arg)
        training = {"epochs": a.epochs, "batch_size": a.batch_size, "learning_rate": a.learning_rate,
                    "strategy": a.strategy, "strategy_params": params}
    except ParamError as exc:
        p.error(str(exc))
    tmp = Path(tempfile.mkdtemp(prefix="fedhub-bench-sim-"))
    results: list[dict[str, Any]] = []

    def record(**result: Any) -> None:
        results.append(result)
        print(json.dumps(result), file=sys.stderr, flush=True)
        if a.json:
            with a.json.open("a") as f:
                f.write(json.dumps(result) + "\n")

    if "ten" in a.parts:
        central = central_epoch(a.data_dir)
        record(part="central", **central)
        folder = split(tmp / "ten" / "devices", 10, a.data_dir)
        record(part="ten", setup=f"pool, {a.workers} workers", **run_pool(
            folder, tmp / "ten", a.rounds_ten, 1.0, a.data_dir, workers=a.workers, efficiency=True))
        if a.baseline:
            record(part="ten", setup="one process per device",
                   **run_baseline(10, tmp / "ten-base", a.rounds_ten, a.data_dir))
    if "many" in a.parts:
        for devices in a.devices:
            folder = split(tmp / f"many{devices}" / "devices", devices, a.data_dir)
            record(part="many", setup=f"{devices} devices, pool, {a.workers} workers", devices=devices,
                   training=training,
                   **run_pool(folder, tmp / f"many{devices}", a.rounds_many, 0.1, a.data_dir,
                              workers=a.workers, **training))
    parts = [("scale", combo, a.rounds_scale, {}) for combo in scale if "scale" in a.parts]
    parts += [("secure", combo, a.rounds_secure, {"secagg": True}) for combo in secure if "secure" in a.parts]
    for (part, (devices, fraction), rounds, extra), relay in itertools.product(parts, a.relay):
        # A fresh split for each way (the same one, seeded): device folders keep their tokens.
        folder = split(tmp / f"{part}{devices}-{relay}" / "devices", devices, a.data_dir)
        how = "workers as relays" if relay == "on" else "each update on its own"
        record(part=part, devices=devices,
               setup=f"{devices:,} devices, {fraction:g} a round, {a.workers} workers, {how}",
               fraction=fraction, relay=relay == "on", load_average=os.getloadavg(),
               **run_pool(folder, tmp / f"{part}{devices}-{relay}", rounds, fraction, a.data_dir,
                          workers=a.workers, efficiency=True, relay=relay == "on", **extra))
    if "ray" in a.parts:
        import ray

        for devices in a.devices:
            folder = split(tmp / f"ray{devices}" / "devices", devices, a.data_dir)
            record(part="ray", setup=f"{devices} devices, local Ray, {a.workers} actors", devices=devices,
                   **run_pool(folder, tmp / f"ray{devices}", a.rounds_ray, 0.1, a.data_dir, workers=a.workers,
                              backend="ray"))
            cluster = ray_cluster()
            try:
                record(part="ray", setup=f"{devices} devices, two-node Ray cluster, 2 actors",
                       devices=devices,
                       **run_pool(folder, tmp / f"ray{devices}-cluster", a.rounds_ray, 0.1, a.data_dir,
                                  workers=2, backend="ray", ray_address=cluster.address))
            finally:
                ray.shutdown()
                cluster.shutdown()
    report(results, a)
    return 0


def report(results: list[dict[str, Any]], a: argparse.Namespace) -> None:
    def num(value: Any, digits: int = 1) -> str:
        return "-" if value is None else f"{value:,.{digits}f}"

    scaled = [r for r in results if r["part"] == "scale"]
    if scaled:
        print("## Close to the compute limit? Efficiency at scale (IID, basic model, one local epoch)\n")
        print("Efficiency: one process's time for a round's images (measured in the same run) over the "
              "round's time; 1.0 is one process holding all the data.\n")
        print("| setup | rounds | first round | its efficiency | steady round | of it, the server's test | "
              "one process, the round's images | steady efficiency | at most, with the test | "
              "final accuracy | peak RSS, all processes |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in scaled:
            print(f"| {r['setup']} | {r['rounds']} | {num(r['first_round_s'])} s | "
                  f"{num(r.get('first_round_efficiency'), 3)} | {num(r['steady_round_s'], 2)} s | "
                  f"{num(r.get('steady_test_s'), 3)} s | {num(r.get('steady_centralized_s'), 3)} s | "
                  f"{num(r.get('steady_efficiency'), 3)} | {num(r.get('ceiling_with_test'), 2)} | "
                  f"{r['final_accuracy']:.4f} | {num(r['peak_rss_mb'], 0)} MB |")
        print()

    secured = [r for r in results if r["part"] == "secure"]
    if secured:
        print("## Secure aggregation with the workers as relays (IID, basic model, one local epoch)\n")
        print("| setup | rounds | first round | steady round | MB up | accuracy each round |")
        print("|---|---:|---:|---:|---:|---|")
        for r in secured:
            accuracy = ", ".join(f"{acc:.4f}" for acc in r["accuracy"])
            print(f"| {r['setup']} | {r['rounds']} | {num(r['first_round_s'])} s | "
                  f"{num(r['steady_round_s'])} s | {num(r['bytes_up'] / 1e6)} | {accuracy} |")
        print()

    central = next((r for r in results if r["part"] == "central"), None)
    print(f"# Simulation benchmark ({time.strftime('%Y-%m-%d')})\n")
    if central:
        print("## 10 IID devices x 6,000 images, basic model, 1 epoch per round\n")
        epoch = central["epoch_s"]
        print(f"One centralized epoch over the 60,000 images, in a fresh process: {epoch:.1f} s "
              f"(second epoch {central['second_epoch_s']:.1f} s; "
              f"start-up before it {central['startup_s']:.1f} s).\n")
        print("| setup | first round's result | vs one epoch | steady round | vs one epoch | rounds | "
              "final accuracy | peak RSS, all processes |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|")
        for r in (r for r in results if r["part"] == "ten"):
            print(f"| {r['setup']} | {num(r['first_round_s'])} s | {r['first_round_s'] / epoch:.2f}x | "
                  f"{num(r['steady_round_s'])} s | {r['steady_round_s'] / epoch:.2f}x | {r['rounds']} | "
                  f"{r['final_accuracy']:.4f} | {num(r['peak_rss_mb'], 0)} MB |")
        print()
    many = [r for r in results if r["part"] in ("many", "ray")]
    if many:
        t = next((r["training"] for r in many if "training" in r), None)
        local = ("one local epoch, batch 32" if t is None else
                 f"{t['epochs']} local epoch(s), batch {t['batch_size']}, Adam {t['learning_rate']:g}, "
                 f"{t['strategy']} {t['strategy_params'] or ''}".rstrip())
        print(f"## Many devices, 10 % per round (IID, {local})\n")
        print("| setup | rounds | first round | steady round | time to 85 % (round) | final accuracy | "
              "peak RSS, all processes | per worker after start-up | MB up / down | nodes |")
        print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
        for r in many:
            to85 = f"{num(r['to_85_s'])} s ({r['to_85_round']})" if r["to_85_s"] else f"not in {r['rounds']}"
            workers = ", ".join(f"{m:,.0f}" for m in r["worker_peak_rss_mb"] or [])
            print(f"| {r['setup']} | {r['rounds']} | {num(r['first_round_s'])} s | "
                  f"{num(r['steady_round_s'])} s | {to85} | {r['final_accuracy']:.4f} | "
                  f"{num(r['peak_rss_mb'], 0)} MB | {workers} MB | "
                  f"{num(r['bytes_up'] / 1e6)} / {num(r['bytes_down'] / 1e6)} | {r['nodes']} |")


if __name__ == "__main__":
    sys.exit(main())
