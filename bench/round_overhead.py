"""What a federated round costs beyond the training itself, measured in one run.

    python bench/round_overhead.py [--devices 3] [--per-device 5000] [--data-dir DIR]

Prints a Markdown report:
1. bytes on the wire per device per round (download + upload) against the raw
   float32 parameter bytes;
2. the server's time to aggregate K updates (streaming FedAvg) and its
   accumulator memory, which does not grow with K;
3. one real round's wall time (server + device processes on loopback) against
   one process training the same samples.

The raw figures are also written as JSON (``--json``, default bench/results/round_overhead.json).
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

import numpy as np
import requests

from fedhub.engine import wire
from fedhub.engine.aggregation import WeightedSum
from fedhub.options.parser import Parser

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "round_overhead.json"


def wire_bytes(weights: dict[str, np.ndarray]) -> tuple[int, int, int]:
    raw = sum(a.size * 4 for a in weights.values())
    down = len(wire.encode(weights, wire.Meta(round=1, model_version=1)))
    up = len(wire.encode(weights, wire.Meta(round=1, model_version=0, num_examples=5000,
                                            metrics={"loss": 0.5, "accuracy": 0.8, "train_seconds": 1.0})))
    return raw, down, up


def aggregation_times(weights: dict[str, np.ndarray], ks: list[int]) -> list[tuple[int, float, int]]:
    rng = np.random.default_rng(0)
    update = {n: rng.normal(size=a.shape).astype(np.float32) for n, a in weights.items()}
    rows = []
    for k in ks:
        tracemalloc.start()
        acc = WeightedSum(weights)
        started = time.perf_counter()
        for i in range(k):
            acc.add(update, 100 + i)
        acc.result()
        elapsed = time.perf_counter() - started
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        rows.append((k, elapsed, peak))
    return rows


def real_round(devices: int, per_device: int, data_dir: str | None) -> tuple[float, float, float]:
    """(round wall seconds, device train seconds max, central train seconds for the same samples)."""
    from fedhub.device.launcher import launch, stop
    from fedhub.frameworks.keras_model import Model
    from fedhub.split import load_fashion_mnist, split_to_devices

    tmp = Path(tempfile.mkdtemp(prefix="fedhub-bench-"))
    split_to_devices(tmp / "devices", devices, limit=per_device, data_dir=data_dir, progress=False)
    import subprocess

    from fedhub.demo import wait_for_server
    from fedhub.server_process import free_port

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = {**os.environ, "FEDHUB_ENROLL_SECRET": "bench-enroll-secret",
           "FEDHUB_ADMIN_TOKEN": "bench-admin-token-1"}
    cmd = [sys.executable, str(ROOT / "server.py"), str(port), "--rounds", "2", "--min-devices", str(devices),
           "--auto-activate", "--start", "--state-dir", str(tmp / "state"), "--eval-dir", str(tmp / "eval"),
           "--test-limit", "1000"]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    server = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    procs = []
    try:
        wait_for_server(url, server)
        procs = launch(url, [f"device{i}" for i in range(1, devices + 1)], devices_root=tmp / "devices",
                       env={"FEDHUB_ENROLL_SECRET": "bench-enroll-secret"}, log_dir=tmp / "logs")
        while requests.get(f"{url}/api/status", timeout=5).json()["status"] != "finished":
            time.sleep(0.5)
        history = requests.get(f"{url}/api/history", timeout=5).json()["rounds"]
    finally:
        stop(procs)
        stop([server])
    db = sqlite3.connect(tmp / "state" / "fedhub.sqlite3")
    # Round 2 is the steady state: round 1 also pays for each device's first graph tracing.
    started, closed = db.execute("SELECT started_at, closed_at FROM rounds WHERE number = 2").fetchone()
    device_train = max(d["train_seconds"] for d in history[1]["devices"].values())

    (x, y), _ = load_fashion_mnist(data_dir)
    n = devices * per_device
    # Timed as a device's second round runs: the same model object, its training function
    # already traced by a first fit, given fresh weights. (A new Model would trace again inside
    # the timing, which the devices' round 2 does not pay.)
    model = Model("basic")
    initial = model.get_weights()
    model.train(x[:256], y[:256])
    model.set_weights(initial)
    t0 = time.perf_counter()
    model.train(x[:n], y[:n])
    central = time.perf_counter() - t0
    return closed - started, device_train, central


def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=3)
    p.add_argument("--per-device", type=int, default=5000)
    p.add_argument("--data-dir", default=os.environ.get("FEDHUB_DATA_DIR"))
    p.add_argument("--json", type=Path, default=RESULTS, help=f"raw results (default {RESULTS})")
    a = p.parse_args(argv)
    if a.devices < 1 or a.per_device < 1:
        p.error("--devices and --per-device must be at least 1")

    from fedhub.frameworks.keras_model import Model

    weights = Model("basic").get_weights()
    raw, down, up = wire_bytes(weights)
    print("## Bytes on the wire per device per round (basic model)\n")
    print("| what | bytes | vs raw float32 |\n|---|---:|---:|")
    print(f"| raw float32 parameters | {raw:,} | 1.000 |")
    print(f"| download (global model) | {down:,} | {down / raw:.4f} |")
    print(f"| upload (update + metadata) | {up:,} | {up / raw:.4f} |")
    print(f"| total per device per round | {down + up:,} | {(down + up) / raw:.4f} |\n")

    print("## Server aggregation of K updates (streaming FedAvg, float64)\n")
    print("| K | total ms | ms per update | peak accumulator memory | vs model bytes |")
    print("|---:|---:|---:|---:|---:|")
    aggregation = aggregation_times(weights, [2, 10, 50, 200])
    for k, seconds, peak in aggregation:
        print(f"| {k} | {seconds * 1000:.1f} | {seconds * 1000 / k:.2f} | {peak:,} | {peak / raw:.2f} |")

    print(f"\n## One real round (the second of two): {a.devices} device processes x {a.per_device} examples, "
          "1 epoch\n")
    wall, device_train, central = real_round(a.devices, a.per_device, a.data_dir)
    print("| what | seconds | vs one process |\n|---|---:|---:|")
    print(f"| one process trains all {a.devices * a.per_device} samples | {central:.2f} | 1.00 |")
    print(f"| slowest device's own training (in the round) | {device_train:.2f} "
          f"| {device_train / central:.2f} |")
    print(f"| round wall time (open to aggregated, evaluated, saved) | {wall:.2f} | {wall / central:.2f} |")
    results = {"args": {"devices": a.devices, "per_device": a.per_device},
               "bytes": {"raw": raw, "download": down, "upload": up},
               "aggregation": [{"k": k, "seconds": seconds, "peak_bytes": peak}
                               for k, seconds, peak in aggregation],
               "round": {"wall_s": wall, "device_train_s": device_train, "central_train_s": central},
               "load_average": os.getloadavg(), "cpus": os.cpu_count()}
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
