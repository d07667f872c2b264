"""What secure aggregation (SecAgg+) costs per round, against plain FedAvg, for N devices.

    python bench/secagg.py [--devices 10 50 100] [--params 101770] [--dropout 0.1]

Runs the protocol in one process with the engine's own parts: each simulated device is a
:class:`fedhub.engine.secagg.DeviceRound` and the server a :class:`fedhub.engine.secagg.ServerRound`,
exchanging the exact bytes that travel over HTTP (the task's JSON message, the answer's JSON
or safetensors body). Training is left out (it is the same with and without secure
aggregation). Prints a Markdown table per setting:

- requests per device per round (tasks fetched and answers sent; the model download is the
  same in both and counted once);
- bytes per device per round, down (tasks, shares, the model) and up (keys, shares, the
  masked update), against plain FedAvg's download and upload;
- device CPU per round (mean over devices): key generation, dealing shares, quantizing and
  masking, revealing; plain FedAvg: encoding the update;
- server CPU per round: checking and relaying the messages, summing the masked updates,
  closing the stages and unmasking (rebuilding the masks of survivors and of dropped
  devices); plain FedAvg: decoding and folding in each update.

``--params`` is the model size (101,770: FedHub's ``basic`` network). ``--dropout`` is the
share of devices dropping out after dealing their shares (their masks rebuilt by the server).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from fedhub.engine import wire
from fedhub.engine.aggregation import WeightedSum
from fedhub.engine.secagg import (
    DeviceRound,
    KeyDirectory,
    SecAggConfig,
    ServerRound,
    ShareBundle,
    UnmaskRequest,
)
from fedhub.engine.secagg.codec import dumps
from fedhub.options.parser import Parser

ROOT = Path(__file__).resolve().parents[1]


def cpu(fn: Callable[[], Any]) -> tuple[Any, float]:
    started = time.process_time()
    result = fn()
    return result, time.process_time() - started


def secure_round(n: int, params: int, dropout: float, rng: np.random.Generator) -> dict[str, float]:
    names = [f"device{i:04d}" for i in range(n)]
    dropped = set(rng.choice(names, size=round(dropout * n), replace=False)) if dropout else set()
    weights = {name: int(rng.integers(100, 1000)) for name in names}
    updates = {name: rng.normal(0, 0.01, params) for name in names}
    config = SecAggConfig()
    server_cpu = 0.0
    device_cpu = {name: 0.0 for name in names}
    down = {name: 0 for name in names}
    up = {name: 0 for name in names}
    requests = {name: 0 for name in names}

    round_params, t = cpu(lambda: config.for_round(1, names, params))
    server = ServerRound(round_params)
    server_cpu += t
    devices: dict[str, DeviceRound] = {}

    def exchange(name: str, answer: Callable[[dict[str, Any]], bytes]) -> None:
        nonlocal server_cpu
        task, t = cpu(lambda: dumps({"action": "secagg", "message": server.request(name).to_dict()}))
        server_cpu += t
        body, t = cpu(lambda: answer(json.loads(task)["message"]))
        device_cpu[name] += t
        _, t = cpu(lambda: server.receive_bytes(name, body))
        server_cpu += t
        down[name] += len(task)
        up[name] += len(body)
        requests[name] += 2

    def advertise(name: str, message: dict[str, Any]) -> bytes:
        from fedhub.engine.secagg import RoundParams

        devices[name] = DeviceRound(name, RoundParams.from_dict(message))
        return devices[name].advertise().to_bytes()

    for name in names:
        exchange(name, lambda m, name=name: advertise(name, m))
    server_cpu += cpu(server.close_stage)[1]
    for name in names:
        exchange(name, lambda m, name=name: devices[name].share_keys(KeyDirectory.from_dict(m)).to_bytes())
    server_cpu += cpu(server.close_stage)[1]
    for name in names:
        if name in dropped:
            continue
        exchange(name, lambda m, name=name: devices[name].masked_input(
            ShareBundle.from_dict(m), updates[name], weights[name]).to_bytes(round_params))
    server_cpu += cpu(server.close_stage)[1]
    for name in names:
        if name in dropped:
            continue
        exchange(name, lambda m, name=name: devices[name].unmask(UnmaskRequest.from_dict(m)).to_bytes())
    result, t = cpu(server.finish)
    server_cpu += t
    survivors = [name for name in names if name not in dropped]
    want = (sum(np.clip(updates[s], -0.5, 0.5) * weights[s] for s in survivors)
            / sum(weights[s] for s in survivors))
    error = float(np.abs(result.mean - want).max())
    model = len(wire.encode({"w": np.zeros(params, np.float32)}, wire.Meta(round=1, model_version=1)))
    alive = survivors
    return {"requests": np.mean([requests[s] for s in alive]) + 1,
            "down": np.mean([down[s] for s in alive]) + model, "up": np.mean([up[s] for s in alive]),
            "device_cpu": np.mean([device_cpu[s] for s in alive]), "server_cpu": server_cpu,
            "max_error": error, "step": round_params.clip_range / round_params.levels,
            "neighbours": round_params.shares, "threshold": round_params.threshold,
            "recovered": len(result.recovered)}


def plain_round(n: int, params: int, rng: np.random.Generator) -> dict[str, float]:
    template = {"w": np.zeros(params, np.float32)}
    model = len(wire.encode(template, wire.Meta(round=1, model_version=1)))
    total = WeightedSum(template)
    device_cpu = server_cpu = 0.0
    up = 0
    for _ in range(n):
        update = {"w": rng.normal(0, 0.01, params).astype(np.float32)}
        body, t = cpu(lambda update=update: wire.encode(update, wire.Meta(round=1, model_version=0,
                                                                          num_examples=500)))
        device_cpu += t
        up += len(body)

        def fold(body: bytes = body) -> None:
            weights, meta = wire.decode(body, wire.spec_of(template))
            total.add(weights, meta.num_examples)

        server_cpu += cpu(fold)[1]
    server_cpu += cpu(total.mean)[1]
    return {"requests": 3, "down": model, "up": up / n, "device_cpu": device_cpu / n,
            "server_cpu": server_cpu}


def kib(value: float) -> str:
    return f"{value / 1024:,.0f} KiB"


def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__.splitlines()[0])
    p.add_argument("--devices", type=int, nargs="+", default=[10, 50, 100])
    p.add_argument("--params", type=int, default=101_770, help="model size (default: the basic network's)")
    p.add_argument("--dropout", type=float, default=0.1, help="share of devices dropping after sharing")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "secagg.json",
                   help="the raw results (default bench/results/secagg.json)")
    a = p.parse_args(argv)
    if min(a.devices) < 2 or a.params < 1 or not 0 <= a.dropout < 1:
        p.error("--devices must each be at least 2, --params at least 1 and --dropout from 0 to below 1")
    rng = np.random.default_rng(a.seed)
    print(f"Model of {a.params:,} parameters; SecAgg+ with the defaults (11 shares, 32 bits, clip ±0.5).\n")
    print("| devices | protocol | requests / device | down / device | up / device | device CPU | server CPU |"
          " recovered | max error (1 step) |")
    print("|---|---|---|---|---|---|---|---|---|")
    raw: list[dict[str, Any]] = []  # written to bench/results/secagg.json at the end
    for n in a.devices:
        plain = plain_round(n, a.params, rng)
        raw.append({"devices": n, "protocol": "fedavg", **plain})
        print(f"| {n} | FedAvg | {plain['requests']:.0f} | {kib(plain['down'])} | {kib(plain['up'])} | "
              f"{plain['device_cpu'] * 1e3:.1f} ms | {plain['server_cpu']:.2f} s | – | – |")
        for dropout in (0.0, a.dropout):
            s = secure_round(n, a.params, dropout, rng)
            raw.append({"devices": n, "protocol": "secagg+", "dropout": dropout, **s})
            print(f"| {n} | SecAgg+ ({s['neighbours']} shares, threshold {s['threshold']}), "
                  f"{dropout:.0%} dropout | {s['requests']:.0f} | {kib(s['down'])} | {kib(s['up'])} | "
                  f"{s['device_cpu'] * 1e3:.1f} ms | {s['server_cpu']:.2f} s | {s['recovered']} | "
                  f"{s['max_error']:.1e} ({s['step']:.1e}) |", flush=True)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps({"args": vars(a), "rounds": raw}, indent=1, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
