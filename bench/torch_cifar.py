"""PyTorch on CIFAR-10 through real FedHub processes, against one centralized epoch (issue 19, part 4).

    python bench/torch_cifar.py [--devices 10] [--per-device 5000] [--rounds 10] [--threads 1] \\
        [--test-limit N] [--memory-images 5000] [--json FILE] [--chart [PNG]] [--data-dir DIR]
    python bench/torch_cifar.py --results FILE [--chart [PNG]]

One call: split CIFAR-10 IID over ``--devices`` folders of ``--per-device`` images, start
``server.py --framework torch --dataset cifar-10`` (the seed's CNN, FedAvg, Adam 1e-3, batch 32,
one local epoch, every device every round) and one ``device/device.py`` process per folder, and
record, for each round, the seconds from the call to its test accuracy on the 10,000 test images
(``closed_at``: aggregated, evaluated, saved). Then, in this process, one centralized epoch over the
same images (the same network, optimizer settings and ``--threads`` as each device process gets,
through ``OMP_NUM_THREADS``). Last, the memory of a device: one PyTorch and one Keras device process
each train one round of the same network (``cnn``) on the same Fashion-MNIST images, their peak
resident memory read from ``/proc/PID/status`` (``VmHWM``) and sampled with psutil while they train.

Targets: 50 % test accuracy within 10 rounds; the first round's result within 2x a centralized
epoch plus the federation's start (the call to round 1 opening: server, devices, enrolment); steady
rounds (the median gap between results after the first) within 1.1x a centralized epoch.

Any of ``--devices 10 --per-device 5000 --rounds 10``, the whole test set or ``--memory-images 5000``
changed is a reduced run: the JSON says which, with the full size beside it. Progress lines go to
stderr, the report (Markdown) to stdout, the raw figures to ``--json``
(default bench/results/torch_cifar.json); ``--chart`` draws accuracy against time (default
docs/torch_cifar.png). Bad arguments: one ``error:`` line, exit 2.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import requests

from fedhub.options.parser import Parser

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "torch_cifar.json"
CHART = ROOT / "docs" / "torch_cifar.png"
FULL = {"devices": 10, "per_device": 5000, "rounds": 10, "test_limit": None, "memory_images": 5000}
TRAIN = {"epochs": 1, "batch_size": 32, "learning_rate": 1e-3}
SECRET = "bench-torch-cifar-enroll"
CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def thread_env(threads: int) -> dict[str, str]:
    """What pins a process to ``threads`` compute threads: PyTorch's intra-op pool follows
    OMP_NUM_THREADS at start-up, TensorFlow its own two variables."""
    n = str(threads)
    return {"OMP_NUM_THREADS": n, "MKL_NUM_THREADS": n, "TF_NUM_INTRAOP_THREADS": n,
            "TF_NUM_INTEROP_THREADS": n}


def peak_rss(pid: int) -> int | None:
    """The kernel's high-water mark of a live process's resident memory (bytes), or None."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


class Federation:
    """A real server and its device processes, for one run; stopped on exit."""

    def __init__(self, tmp: Path, label: str, server_args: list[str], devices_root: Path, names: list[str],
                 threads: int, data_dir: str | None) -> None:
        self.tmp, self.label, self.names, self.threads = tmp, label, names, threads
        self.server_args, self.devices_root, self.data_dir = server_args, devices_root, data_dir
        self.server: subprocess.Popen | None = None
        self.devices: list[subprocess.Popen] = []

    def __enter__(self) -> Federation:
        from fedhub.demo import wait_for_server
        from fedhub.device.launcher import launch
        from fedhub.server_process import free_port

        port = free_port()
        self.url = f"http://127.0.0.1:{port}"
        state = self.tmp / f"{self.label}-state"
        cmd = [sys.executable, str(ROOT / "server.py"), str(port), *self.server_args, "--auto-activate",
               "--start", "--no-tensorboard", "--fraction", "1", "--min-devices", str(len(self.names)),
               "--epochs", str(TRAIN["epochs"]), "--batch-size", str(TRAIN["batch_size"]),
               "--learning-rate", str(TRAIN["learning_rate"]),
               "--state-dir", str(state), "--eval-dir", str(self.tmp / f"{self.label}-eval")]
        if self.data_dir:
            cmd += ["--data-dir", self.data_dir]
        env = {**os.environ, "FEDHUB_ENROLL_SECRET": SECRET, "FEDHUB_ADMIN_TOKEN": "bench-torch-cifar-admin"}
        log = open(self.tmp / f"{self.label}-server.log", "ab")  # the child owns it
        self.server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        log.close()
        try:
            wait_for_server(self.url, self.server, timeout=300)
            self.devices = launch(self.url, self.names, devices_root=self.devices_root,
                                  env={"FEDHUB_ENROLL_SECRET": SECRET, **thread_env(self.threads)},
                                  log_dir=self.tmp / f"{self.label}-logs")
        except BaseException:
            self.__exit__()  # a server that never answered is not left running
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        from fedhub.device.launcher import stop

        stop(self.devices)
        if self.server is not None:
            stop([self.server])

    def status(self) -> dict[str, Any]:
        if self.server is not None and self.server.poll() is not None:
            raise RuntimeError(f"the {self.label} server exited with code {self.server.returncode} "
                               f"(log: {self.tmp / f'{self.label}-server.log'})")
        for p, name in zip(self.devices, self.names, strict=True):
            if p.poll() is not None:
                raise RuntimeError(f"{self.label} device {name} exited with code {p.returncode} "
                                   f"(log: {self.tmp / f'{self.label}-logs' / f'{name}.log'})")
        return requests.get(f"{self.url}/api/status", timeout=10).json()

    def history(self) -> list[dict[str, Any]]:
        return requests.get(f"{self.url}/api/history", timeout=10).json()["rounds"]


def watch(fed: Federation, rounds: int, called: float, timeout: float,
          on_round: Any = None) -> tuple[list[dict[str, Any]], dict[str, dict[str, int | None]]]:
    """Poll until ``rounds`` rounds are complete; the history, and each device's peak memory
    (``peak``: VmHWM just before it is stopped; ``sampled``: psutil's largest RSS seen)."""
    import psutil

    handles = {name: psutil.Process(p.pid) for name, p in zip(fed.names, fed.devices, strict=True)}
    sampled = dict.fromkeys(fed.names, 0)
    seen = 0
    history: list[dict[str, Any]] = []
    while True:
        if time.time() - called > timeout:
            raise RuntimeError(f"{fed.label}: {seen} of {rounds} rounds after {timeout:.0f} s (--timeout)")
        status = fed.status()
        for name, handle in handles.items():
            with contextlib.suppress(psutil.Error):
                sampled[name] = max(sampled[name], handle.memory_info().rss)
        history = fed.history()
        for entry in history[seen:]:
            if on_round is not None:
                on_round(entry)
        seen = len(history)
        if seen >= rounds or status.get("status") == "finished":
            break
        time.sleep(0.5)
    memory = {name: {"peak": peak_rss(p.pid), "sampled": sampled[name] or None}
              for name, p in zip(fed.names, fed.devices, strict=True)}
    return history, memory


def federated(a: argparse.Namespace, tmp: Path, devices_root: Path, called: float) -> dict[str, Any]:
    names = [f"device{i}" for i in range(1, a.devices + 1)]
    server_args = ["--framework", "torch", "--dataset", "cifar-10", "--model", "cifar",
                   "--strategy", "fedavg", "--rounds", str(a.rounds), "--seed", str(a.seed)]
    if a.test_limit:
        server_args += ["--test-limit", str(a.test_limit)]

    def report(entry: dict[str, Any]) -> None:
        progress(f"round {entry['round']}: test accuracy {entry['test_accuracy']:.4f} "
                 f"{entry['closed_at'] - called:.1f} s after the call")

    with Federation(tmp, "cifar", server_args, devices_root, names, a.threads, a.data_dir) as fed:
        progress(f"server up {time.time() - called:.1f} s after the call; "
                 f"{a.devices} device processes started")
        history, memory = watch(fed, a.rounds, called, a.timeout, report)
    rounds = []
    previous = None
    for entry in history:
        trains = [d["train_seconds"] for d in entry["devices"].values()
                  if d.get("train_seconds") is not None]
        rounds.append({"round": entry["round"], "seconds_since_call": round(entry["closed_at"] - called, 3),
                       "round_seconds": round(entry["closed_at"] - (previous or entry["started_at"]), 3),
                       "opened_since_call": round(entry["started_at"] - called, 3),
                       "test_accuracy": entry["test_accuracy"], "test_loss": entry["test_loss"],
                       "num_updates": entry["num_updates"], "num_examples": entry["num_examples"],
                       "slowest_device_train_s": round(max(trains), 3) if trains else None})
        previous = entry["closed_at"]
    peaks = [m["peak"] or m["sampled"] for m in memory.values() if m["peak"] or m["sampled"]]
    return {"rounds": rounds, "process_start_s": rounds[0]["opened_since_call"] if rounds else None,
            "device_peak_rss_mib": {name: _mib(m["peak"]) for name, m in memory.items()},
            "device_sampled_rss_mib": {name: _mib(m["sampled"]) for name, m in memory.items()},
            "max_device_peak_rss_mib": _mib(max(peaks)) if peaks else None}


def centralized(a: argparse.Namespace, devices_root: Path) -> dict[str, Any]:
    """One epoch over the devices' images together, in this process, with the devices' settings."""
    import numpy as np
    import torch

    from fedhub import datasets
    from fedhub.frameworks.torch import TorchNetwork
    from fedhub.split import load_device_data

    torch.set_num_threads(a.threads)
    parts = [load_device_data(devices_root / f"device{i}") for i in range(1, a.devices + 1)]
    x = np.concatenate([p[0] for p in parts])
    y = np.concatenate([p[1] for p in parts])
    _, (x_test, y_test) = datasets.load("cifar-10", datasets.locate("cifar-10", a.data_dir))
    if a.test_limit:
        x_test, y_test = x_test[: a.test_limit], y_test[: a.test_limit]
    net = TorchNetwork("cifar", seed=a.seed)
    progress(f"centralized: one epoch over {len(x)} images, {torch.get_num_threads()} thread(s)")
    started = time.perf_counter()
    train = net.train(x, y, **TRAIN)
    epoch = time.perf_counter() - started
    test = net.evaluate(x_test, y_test)
    progress(f"centralized: {epoch:.1f} s, test accuracy {test['accuracy']:.4f}")
    return {"examples": len(x), "epoch_s": round(epoch, 3), "threads": torch.get_num_threads(),
            "train_loss": train["loss"], "test_accuracy": test["accuracy"], "test_loss": test["loss"]}


def memory(a: argparse.Namespace, tmp: Path) -> dict[str, Any]:
    """Peak RSS of one PyTorch and one Keras device process training one round of ``cnn`` on the
    same Fashion-MNIST images (the same network in both, so the gap is the framework's)."""
    from fedhub.split import split_to_devices

    root = tmp / "fmnist-devices"
    split_to_devices(root, 1, limit=a.memory_images, data_dir=a.fmnist_data_dir, progress=False,
                     dataset="fashion-mnist")
    out: dict[str, Any] = {"network": "cnn", "dataset": "fashion-mnist", "images": a.memory_images}
    for framework in a.memory_frameworks:
        started = time.time()
        args = ["--framework", framework, "--dataset", "fashion-mnist", "--model", "cnn", "--rounds", "1",
                "--test-limit", "1000"]
        fed = Federation(tmp, f"memory-{framework}", args, root, ["device1"], a.threads, a.fmnist_data_dir)
        with fed:
            history, mem = watch(fed, 1, started, a.timeout)
        m = mem["device1"]
        out[framework] = {"peak_rss_mib": _mib(m["peak"]), "sampled_max_rss_mib": _mib(m["sampled"]),
                          "round_test_accuracy": history[0]["test_accuracy"] if history else None,
                          "seconds": round(time.time() - started, 1)}
        progress(f"memory: {framework} device peak RSS {out[framework]['peak_rss_mib']} MiB")
    return out


def _mib(value: int | None) -> float | None:
    return None if value is None else round(value / 2**20, 1)


def checks(results: dict[str, Any], target: float) -> dict[str, Any]:
    """The issue's targets, each with the figure and the limit it was held to."""
    fed, central = results["federation"], results["centralized"]
    rounds = fed["rounds"]
    reached = next((r for r in rounds if r["test_accuracy"] is not None and r["test_accuracy"] >= target),
                   None)
    first = rounds[0]["seconds_since_call"] if rounds else None
    first_limit = 2 * central["epoch_s"] + fed["process_start_s"] if rounds else None
    steady = [r["round_seconds"] for r in rounds[1:]]
    steady_s = statistics.median(steady) if steady else None
    out = {"target_accuracy": target, "rounds_to_target": reached["round"] if reached else None,
           "seconds_to_target": reached["seconds_since_call"] if reached else None,
           "target_within_10_rounds": bool(reached and reached["round"] <= 10),
           "best_accuracy": max((r["test_accuracy"] for r in rounds if r["test_accuracy"] is not None),
                                default=None),
           "first_result_s": first, "first_result_limit_s": round(first_limit, 3) if first_limit else None,
           "first_result_ok": bool(first is not None and first <= first_limit),
           "steady_round_s": round(steady_s, 3) if steady_s is not None else None,
           "steady_round_limit_s": round(1.1 * central["epoch_s"], 3),
           "steady_round_ok": None if steady_s is None else bool(steady_s <= 1.1 * central["epoch_s"])}
    if steady_s is not None:
        out["steady_round_vs_epoch"] = round(steady_s / central["epoch_s"], 2)
    return out


def table(results: dict[str, Any]) -> str:
    """The run as Markdown: the per-round figures, then the targets, then memory."""
    fed, central, c = results["federation"], results["centralized"], results["checks"]
    lines = ["| round | seconds since the call | round seconds | slowest device's training | test accuracy |",
             "|---:|---:|---:|---:|---:|"]
    for r in fed["rounds"]:
        lines.append(f"| {r['round']} | {r['seconds_since_call']:.1f} | {r['round_seconds']:.1f} | "
                     f"{r['slowest_device_train_s'] or 0:.1f} | {r['test_accuracy']:.4f} |")
    yes = {True: "yes", False: "**no**", None: "-"}
    label = f"{c['target_accuracy']:.0%}".replace("%", " %")
    lines += ["", "| target | measured | limit | met |", "|---|---:|---:|---|",
              f"| {label} test accuracy within 10 rounds | "
              + (f"round {c['rounds_to_target']} ({c['seconds_to_target']:.1f} s)" if c["rounds_to_target"]
                 else f"not reached (best {c['best_accuracy']:.4f})")
              + f" | round 10 | {yes[c['target_within_10_rounds']]} |",
              f"| first result <= 2 x centralized epoch + start | {c['first_result_s']:.1f} s | "
              f"2 x {central['epoch_s']:.1f} + {fed['process_start_s']:.1f} = "
              f"{c['first_result_limit_s']:.1f} s | "
              f"{yes[c['first_result_ok']]} |"]
    if c["steady_round_s"] is not None:
        lines.append(f"| steady round (median) <= 1.1 x centralized epoch | {c['steady_round_s']:.1f} s "
                     f"({c['steady_round_vs_epoch']:.2f}x) | {c['steady_round_limit_s']:.1f} s | "
                     f"{yes[c['steady_round_ok']]} |")
    lines.append(f"\ncentralized epoch: {central['examples']} images in {central['epoch_s']:.1f} s "
                 f"({central['threads']} thread(s)), test accuracy after it {central['test_accuracy']:.4f}")
    mem = results.get("memory") or {}
    rows = [(fw, mem[fw]) for fw in ("torch", "keras") if fw in mem]
    if rows or fed.get("max_device_peak_rss_mib"):
        lines += ["", "| device process | peak RSS (VmHWM) | largest RSS sampled |", "|---|---:|---:|"]
        if fed.get("max_device_peak_rss_mib"):
            lines.append(f"| PyTorch, `cifar` on CIFAR-10 (largest of the federation's devices) | "
                         f"{fed['max_device_peak_rss_mib']} MiB | "
                         f"{max(v for v in fed['device_sampled_rss_mib'].values() if v)} MiB |")
        for fw, m in rows:
            name = {"torch": "PyTorch", "keras": "Keras"}[fw]
            lines.append(f"| {name}, `cnn` on {mem['images']} Fashion-MNIST images | "
                         f"{m['peak_rss_mib']} MiB | {m['sampled_max_rss_mib']} MiB |")
    return "\n".join(lines) + "\n"


def chart(results: dict[str, Any], path: Path) -> None:
    """Test accuracy against seconds since the call, a point per round; the centralized epoch's
    accuracy drawn at the federation's start plus the epoch's time, and the target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fed, central, c = results["federation"], results["centralized"], results["checks"]
    seconds = [r["seconds_since_call"] for r in fed["rounds"]]
    accuracy = [100 * r["test_accuracy"] for r in fed["rounds"]]
    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(seconds, accuracy, marker="o", color="tab:blue",
            label=f"FedAvg, {results['args']['devices']} PyTorch devices x "
                  f"{results['args']['per_device']} images")
    for r, s, acc in zip(fed["rounds"], seconds, accuracy, strict=True):
        ax.annotate(str(r["round"]), (s, acc), textcoords="offset points", xytext=(0, 6), ha="center",
                    fontsize=7)
    ax.plot([fed["process_start_s"] + central["epoch_s"]], [100 * central["test_accuracy"]], marker="*",
            markersize=12, color="tab:red", linestyle="none",
            label=f"centralized, 1 epoch ({central['epoch_s']:.0f} s), drawn after the federation's start")
    ax.axvline(fed["process_start_s"], color="grey", linewidth=1, linestyle="--",
               label=f"round 1 opens ({fed['process_start_s']:.0f} s: server, devices, enrolment)")
    ax.axhline(100 * c["target_accuracy"], color="black", linewidth=1, linestyle=":",
               label=f"target {c['target_accuracy']:.0%}")
    ax.set_xlabel("seconds since the call")
    ax.set_ylabel("global test accuracy (%)")
    size = "full size" if results["full_size"] else "reduced run"
    ax.set_title(f"PyTorch, CIFAR-10, the seed's CNN: accuracy against time ({size})")
    ax.set_xlim(left=0)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=FULL["devices"], help="device processes (default 10)")
    p.add_argument("--per-device", type=int, default=FULL["per_device"],
                   help="images per device, IID (default 5000; devices x images at most 50000)")
    p.add_argument("--rounds", type=int, default=FULL["rounds"], help="rounds (default 10)")
    p.add_argument("--test-limit", type=int, default=None,
                   help="test on the first N test images (default all)")
    p.add_argument("--threads", type=int, default=1,
                   help="compute threads of each device process and of the centralized epoch (default 1)")
    p.add_argument("--memory-images", type=int, default=FULL["memory_images"],
                   help="Fashion-MNIST images for the memory comparison's device (default 5000)")
    p.add_argument("--memory-frameworks", nargs="*", default=["torch", "keras"], choices=["torch", "keras"],
                   help="frameworks whose device memory to measure (none: skip)")
    p.add_argument("--target", type=float, default=0.5, help="test accuracy to reach (default 0.5)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds a federation may take")
    p.add_argument("--data-dir", default=None,
                   help="the CIFAR-10 folder (default: fedhub.datasets' lookup: $FEDHUB_DATA_DIR, then "
                        "the shared folder beside the checkout)")
    p.add_argument("--fmnist-data-dir", default=None,
                   help="the Fashion-MNIST folder (default: the usual lookup)")
    p.add_argument("--json", type=Path, default=RESULTS,
                   help=f"raw results (default {RESULTS.relative_to(ROOT)})")
    p.add_argument("--chart", type=Path, nargs="?", const=CHART, default=None,
                   help=f"draw accuracy against time (default {CHART.relative_to(ROOT)})")
    p.add_argument("--results", type=Path, default=None, help="report a saved --json file instead of running")
    a = p.parse_args(argv)
    if a.results is not None:
        if not a.results.is_file():
            p.error(f"--results: no such file {a.results}")
        return a
    if min(a.devices, a.per_device, a.rounds, a.threads, a.memory_images) < 1:
        p.error("--devices, --per-device, --rounds, --threads and --memory-images must be at least 1")
    if a.devices * a.per_device > CIFAR_TRAIN:
        p.error(f"--devices x --per-device is {a.devices * a.per_device}, more than CIFAR-10's "
                f"{CIFAR_TRAIN} training images")
    if a.test_limit is not None and not 1 <= a.test_limit <= CIFAR_TEST:
        p.error(f"--test-limit must be from 1 to {CIFAR_TEST}")
    if a.threads > 64:
        p.error("--threads must be at most 64")
    if not 0 < a.target <= 1 or a.timeout <= 0:
        p.error("--target must be in (0, 1] and --timeout positive")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    if a.results is not None:
        try:
            results = json.loads(a.results.read_text())
            print(table(results))
        except (ValueError, KeyError, TypeError) as exc:
            print(f"error: --results: {a.results} is not this benchmark's JSON ({exc})", file=sys.stderr)
            return 2
        if a.chart:
            chart(results, a.chart)
        return 0
    from fedhub import datasets
    from fedhub.split import split_to_devices

    try:
        datasets.load("cifar-10", datasets.locate("cifar-10", a.data_dir))
    except datasets.DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    load_start = os.getloadavg()
    began = time.time()
    size = {"devices": a.devices, "per_device": a.per_device, "rounds": a.rounds, "test_limit": a.test_limit,
            "memory_images": a.memory_images}
    reduced = {k: {"run": v, "full": FULL[k]} for k, v in size.items() if v != FULL[k]}
    with tempfile.TemporaryDirectory(prefix="fedhub-bench-torch-cifar-") as name:
        tmp = Path(name)
        devices_root = tmp / "devices"
        progress(f"splitting CIFAR-10: {a.devices} IID devices x {a.per_device} images")
        split_to_devices(devices_root, a.devices, limit=a.per_device, data_dir=a.data_dir, seed=a.seed,
                         progress=False, dataset="cifar-10")
        try:
            called = time.time()
            progress("starting the server and the devices (the call)")
            fed = federated(a, tmp, devices_root, called)
            central = centralized(a, devices_root)
            mem = memory(a, tmp) if a.memory_frameworks else None
        except (RuntimeError, requests.RequestException) as exc:
            print(f"bench failed: {exc}", file=sys.stderr)
            logs = sorted(tmp.glob("*.log")) + sorted(tmp.glob("*-logs/*.log"))
            for log in logs[:3]:
                tail = log.read_text(errors="replace").splitlines()[-15:]
                print(f"--- {log.name} (last lines)\n" + "\n".join(tail), file=sys.stderr)
            return 1
    import torch

    results: dict[str, Any] = {
        "args": {**size, "threads": a.threads, "seed": a.seed, "target": a.target, **TRAIN,
                 "network": "cifar", "strategy": "fedavg", "partition": "iid"},
        "full_size": not reduced, "reduced": reduced,
        "federation": fed, "centralized": central, "memory": mem,
        "load_average": {"start": list(load_start), "end": list(os.getloadavg())},
        "cpus": os.cpu_count(), "torch": torch.__version__, "python": sys.version.split()[0],
        "wall_s": round(time.time() - began, 1),
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(began)),
    }
    results["checks"] = checks(results, a.target)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(results, indent=1) + "\n")
    progress(f"wrote {a.json}")
    print(table(results))
    if a.chart:
        chart(results, a.chart)
        progress(f"drew {a.chart}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
