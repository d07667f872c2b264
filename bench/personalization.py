"""Federated evaluation, personalization and fairness on Fashion-MNIST (issue 22).

    python bench/personalization.py [--partitions classes2,dir0.1] [--methods fedavg,...] \\
        [--rounds 30] [--limit N] [--test-limit N] [--q Q ...] [--qffl-lr LR ...] \\
        [--ditto-lambda L ...] [--json FILE] [--chart [PNG]] [--data-dir DIR]
    python bench/personalization.py --report [--json FILE] [--chart [PNG]]   # from the saved runs

For each partition (two classes per device; Dirichlet(0.1)) and each method, one whole
federation through ``python -m fedhub.simulate`` (a real server in its process, a pool of 2
worker processes hosting the 10 virtual devices): PyTorch ``basic`` network, full Fashion-MNIST,
10 devices, all of them every round, Adam 1e-3, batch 32, one local epoch, the same seed. Each
device keeps 10 % of its share held out (``--holdout 0.1``) and evaluates on it every round
(``--fed-eval-every 1``). The methods:

* ``fedavg``: FedAvg; each device uses the global model;
* ``finetune``: FedAvg + local fine-tuning: each device uses the global model after its local
  training (``--personalization finetune``);
* ``fedper``: FedPer, the last layer stays on each device (``--personalization fedper``);
* ``ditto``: Ditto, a personal model per device pulled toward the global one with
  ``--ditto-lambda``;
* ``qfedavg``: q-FFL (``--strategy qfedavg``, ``q`` and ``learning_rate``); each device uses the
  global model.

Recorded per round: the server's test accuracy (10,000 test images) and the held-out accuracy of
the model each device would use, per device and as mean / worst 10 % (with 10 devices: the worst
device). For the global-model methods that is model r, the one round r produced; a device
evaluates the global model before it trains, so the run has one round more than ``--rounds``,
whose only use is its devices' evaluation of the last model (its own training is not reported).
For the personal methods, round r's figure is each device's own model after round r's local
training. Both are thus after ``--rounds`` rounds of training.

Every finished run is saved at once (atomically) to ``--json`` (default
bench/results/personalization.json) with the machine's load average before and after it; a run
already there is skipped, so an interrupted grid resumes. ``--rounds 30``, no ``--limit`` and no
``--test-limit`` is the full size; anything else is a reduced run and says so. Progress lines go
to stderr, the report (Markdown) to stdout, ``--chart`` draws the curves (default
docs/personalization.png). Bad arguments: one ``error:`` line, exit 2.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from fedhub.options.parser import Parser

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "bench" / "results" / "personalization.json"
CHART = ROOT / "docs" / "personalization.png"
DEVICES = 10
WORKERS = 2
HOLDOUT = 0.1
FULL = {"rounds": 30, "limit": 0, "test_limit": 0}
TRAIN = {"epochs": 1, "batch_size": 32, "learning_rate": 1e-3}
PARTITIONS: dict[str, list[str]] = {
    "classes2": ["--split", "classes", "--classes-per-device", "2"],
    "dir0.1": ["--split", "dirichlet", "--alpha", "0.1"],
}
PARTITION_TITLES = {"classes2": "2 classes per device", "dir0.1": "Dirichlet(0.1)"}
METHODS = ("fedavg", "finetune", "fedper", "ditto", "qfedavg")
METHOD_TITLES = {"fedavg": "FedAvg", "finetune": "FedAvg + fine-tuning", "fedper": "FedPer",
                 "ditto": "Ditto", "qfedavg": "q-FFL"}
PERSONAL = ("finetune", "fedper", "ditto")  # each device uses its own model; the others the global one
# The settings used unless given: chosen by the sweep in docs/benchmarks.md (q-FFL) and the
# library's default (Ditto).
DEFAULT_Q = (0.5,)
DEFAULT_QFFL_LR = (1000.0,)
DEFAULT_DITTO_LAMBDA = (0.1,)
LAST = 5  # the final figures are also given as the mean of the last LAST rounds (less noisy)


def progress(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


@dataclass(frozen=True)
class Run:
    """One federation; its key identifies it in the results file."""

    partition: str
    method: str
    rounds: int
    limit: int = 0  # examples per device (0: each device's whole share)
    test_limit: int = 0  # server test images (0: all 10,000)
    seed: int = 0
    devices: int = DEVICES
    params: dict[str, float] = field(default_factory=dict)

    @property
    def key(self) -> str:
        settings = ",".join(f"{k}={v:g}" for k, v in sorted(self.params.items()))
        return (f"{self.partition}|{self.method}({settings})|r{self.rounds}|n{self.limit}|t{self.test_limit}"
                f"|d{self.devices}|s{self.seed}")

    @property
    def label(self) -> str:
        settings = ", ".join(f"{'lr' if k == 'learning_rate' else k} {v:g}"
                             for k, v in sorted(self.params.items()))
        return METHOD_TITLES[self.method] + (f" ({settings})" if settings else "")

    @property
    def full_size(self) -> bool:
        return {"rounds": self.rounds, "limit": self.limit, "test_limit": self.test_limit} == FULL

    def __hash__(self) -> int:
        return hash(self.key)

    def command(self, history: Path, data_dir: str | None, workers: int) -> list[str]:
        """``python -m fedhub.simulate`` for this run: one round more than reported (see above)."""
        cmd = [sys.executable, "-m", "fedhub.simulate", "--framework", "torch", "--dataset", "fashion-mnist",
               "--model", "basic", "--devices", str(self.devices), "--fraction", "1",
               "--workers", str(workers),
               "--rounds", str(self.rounds + 1), "--seed", str(self.seed), "--holdout", str(HOLDOUT),
               "--fed-eval-every", "1", "--epochs", str(TRAIN["epochs"]),
               "--batch-size", str(TRAIN["batch_size"]), "--learning-rate", str(TRAIN["learning_rate"]),
               "--history", str(history), "--quiet", *PARTITIONS[self.partition]]
        if self.limit:
            cmd += ["--limit", str(self.limit)]
        if self.test_limit:
            cmd += ["--test-limit", str(self.test_limit)]
        if data_dir:
            cmd += ["--data-dir", data_dir]
        if self.method in PERSONAL:
            cmd += ["--personalization", self.method]
        if self.method == "ditto":
            cmd += ["--ditto-lambda", f"{self.params['ditto_lambda']:g}"]
        if self.method == "qfedavg":
            cmd += ["--strategy", "qfedavg", "--strategy-arg", f"q={self.params['q']:g}",
                    "--strategy-arg", f"learning_rate={self.params['learning_rate']:g}"]
        return cmd


def plan(a: argparse.Namespace) -> list[Run]:
    runs = []
    for partition in a.partitions:
        for method in a.methods:
            if method == "qfedavg":
                grid = [{"q": q, "learning_rate": lr} for q, lr in itertools.product(a.q, a.qffl_lr)]
            elif method == "ditto":
                grid = [{"ditto_lambda": lam} for lam in a.ditto_lambda]
            else:
                grid = [{}]
            runs += [Run(partition, method, a.rounds, a.limit, a.test_limit, a.seed, params=p) for p in grid]
    return runs


# --------------------------------------------------------------------------- one run


def _summary(accuracies: Mapping[str, float], summary: Mapping[str, Any] | None) -> dict[str, Any]:
    """Per-device figures of one model per device: the mean over devices (each device once), the
    example-weighted mean and the worst 10 % as the server summarized them."""
    values = sorted(accuracies.values())
    return {"mean": sum(values) / len(values), "weighted_mean": summary["accuracy"] if summary else None,
            "worst_10pct": summary["worst_10pct"] if summary else None, "worst": values[0],
            "best": values[-1],
            "devices": len(values)}


def figures(run: Run, history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Per round r = 1..rounds: the server's test accuracy of model r, and the per-device held-out
    figures of the model each device would use after r rounds (``used``), beside those of the
    global model r and, with personalization, of each device's own model."""
    if len(history) != run.rounds + 1:
        raise RuntimeError(f"expected {run.rounds + 1} rounds in the history, got {len(history)}")
    out: dict[str, Any] = {"test_accuracy": [], "test_loss": [], "global": [], "personal": [], "used": [],
                           "round_seconds": []}
    for r in range(1, run.rounds + 1):
        entry, after = history[r - 1], history[r]
        out["test_accuracy"].append(entry["test_accuracy"])
        out["test_loss"].append(entry["test_loss"])
        out["round_seconds"].append(round(entry["closed_at"] - entry["started_at"], 3))
        fe_global = after["federated_evaluation"]  # devices evaluate model r before round r + 1's training
        if fe_global["model_version"] != r:
            raise RuntimeError(f"round {r + 1} evaluated model {fe_global['model_version']}, not {r}")
        g = {d: v["global"]["accuracy"] for d, v in fe_global["devices"].items()}
        out["global"].append({**_summary(g, fe_global["global"]), "per_device": g})
        fe_own = entry["federated_evaluation"]
        if run.method in PERSONAL:
            p = {d: v["personal"]["accuracy"] for d, v in fe_own["devices"].items()}
            out["personal"].append({**_summary(p, fe_own["personal"]), "per_device": p})
        else:
            out["personal"].append(None)
        out["used"].append(out["personal"][-1] if run.method in PERSONAL else out["global"][-1])
    tail = out["used"][-LAST:]
    out["final"] = {
        "test_accuracy": out["test_accuracy"][-1],
        "device_mean": out["used"][-1]["mean"], "device_weighted_mean": out["used"][-1]["weighted_mean"],
        "device_worst_10pct": out["used"][-1]["worst_10pct"],
        f"last{LAST}_test_accuracy": sum(out["test_accuracy"][-LAST:]) / len(tail),
        f"last{LAST}_device_mean": sum(u["mean"] for u in tail) / len(tail),
        f"last{LAST}_device_worst_10pct": sum(u["worst_10pct"] for u in tail) / len(tail),
        "per_device": out["used"][-1]["per_device"],
        "devices_held_out": {d: v["num_examples"] for d, v in history[run.rounds - 1]["federated_evaluation"]
                             ["devices"].items()},
    }
    return out


def simulate(run: Run, data_dir: str | None, workers: int, timeout: float) -> dict[str, Any]:
    """Run one federation through ``python -m fedhub.simulate``; its figures and its costs."""
    load_before = os.getloadavg()
    started = time.time()
    with tempfile.TemporaryDirectory(prefix="fedhub-bench-personal-") as tmp:
        history_path = Path(tmp) / "history.json"
        cmd = run.command(history_path, data_dir, workers)
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                bufsize=1)
        lines: list[str] = []
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                lines.append(line.rstrip("\n"))
                if line.startswith("round "):
                    number = int(line.split()[1].rstrip(":"))
                    extra = " (evaluation round)" if number > run.rounds else ""
                    progress(f"  {line.strip()}{extra}")
                if time.time() - started > timeout:
                    raise TimeoutError(f"{run.key}: over --timeout {timeout:.0f} s")
            proc.wait(timeout=60)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        if proc.returncode:
            raise RuntimeError(f"{run.key}: fedhub.simulate exited with {proc.returncode}:\n"
                               + "\n".join(lines[-20:]))
        history = json.loads(history_path.read_text())
    summary = json.loads(lines[-1]) if lines and lines[-1].startswith("{") else {}
    record = {"run": asdict(run), "key": run.key, "full_size": run.full_size, "command": cmd_text(run),
              **figures(run, history), "seconds": round(time.time() - started, 1),
              "peak_rss_mb": summary.get("peak_rss_mb"),
              "load_average": {"start": list(load_before), "end": list(os.getloadavg())},
              "finished": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    return record


def cmd_text(run: Run) -> str:
    """The run's command as it would be typed from the repo root (no history file, data found by
    the lookup)."""
    cmd = run.command(Path("history.json"), None, WORKERS)
    return " ".join([".venv/bin/python", *cmd[1:]])


class Results:
    """The results file: finished runs by key, written atomically after each run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = {"runs": {}}
        if path.exists():
            self.data = json.loads(path.read_text())
            if not isinstance(self.data.get("runs"), dict):
                raise ValueError("no 'runs' object")

    @property
    def runs(self) -> dict[str, dict[str, Any]]:
        return self.data["runs"]

    def save(self, key: str | None = None, record: dict[str, Any] | None = None, **meta: Any) -> None:
        from fedhub.engine.files import atomic_write_text

        if key is not None:
            self.runs[key] = record
        self.data.update(meta)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps(self.data, indent=1, sort_keys=True) + "\n")


# --------------------------------------------------------------------------- the report


def _pct(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _size(run: Mapping[str, Any]) -> str:
    parts = [f"{run['rounds']} rounds"]
    parts.append(f"at most {run['limit']:,} examples per device" if run["limit"] else "full Fashion-MNIST")
    if run["test_limit"]:
        parts.append(f"{run['test_limit']:,} test images")
    return ", ".join(parts)


def _groups(records: Iterable[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """Records by size (rounds, limit, test limit, seed, devices), the largest first."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        run = r["run"]
        groups.setdefault((run["rounds"], run["limit"], run["test_limit"], run["seed"], run["devices"]),
                          []).append(r)
    return dict(sorted(groups.items(), key=lambda g: (-(g[0][1] or 10**9), -(g[0][2] or 10**9), -g[0][0])))


def _order(record: Mapping[str, Any]) -> tuple:
    run = record["run"]
    return (list(PARTITIONS).index(run["partition"]), METHODS.index(run["method"]),
            sorted(run["params"].items()))


def _label(record: Mapping[str, Any]) -> str:
    run = record["run"]
    return Run(run["partition"], run["method"], run["rounds"], params=run["params"]).label


def targets(records: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """The issue's targets per partition: the best personalized method's mean per-device accuracy
    at least 10 points above FedAvg's global model's (asked on two classes per device; given for
    both), and q-FFL's worst 10 % above FedAvg's."""
    out = []
    for partition in PARTITIONS:
        rows = [r for r in records if r["run"]["partition"] == partition]
        fedavg = next((r for r in rows if r["run"]["method"] == "fedavg"), None)
        if fedavg is None:
            continue
        f = fedavg["final"]
        personal = [r for r in rows if r["run"]["method"] in PERSONAL]
        if personal:
            best = max(personal, key=lambda r: r["final"]["device_mean"])
            gap = best["final"]["device_mean"] - f["device_mean"]
            out.append({"partition": partition, "target": "personalized mean >= FedAvg + 10 points",
                        "asked": partition == "classes2", "method": _label(best),
                        "measured": best["final"]["device_mean"], "fedavg": f["device_mean"],
                        "difference_points": 100 * gap, "met": gap >= 0.10,
                        f"last{LAST}_difference_points": 100 * (best["final"][f"last{LAST}_device_mean"]
                                                                 - f[f"last{LAST}_device_mean"])})
        for q in (r for r in rows if r["run"]["method"] == "qfedavg"):
            gap = q["final"]["device_worst_10pct"] - f["device_worst_10pct"]
            out.append({"partition": partition, "target": "q-FFL worst 10 % > FedAvg's", "asked": True,
                        "method": _label(q), "measured": q["final"]["device_worst_10pct"],
                        "fedavg": f["device_worst_10pct"], "difference_points": 100 * gap, "met": gap > 0,
                        f"last{LAST}_difference_points": 100 * (q["final"][f"last{LAST}_device_worst_10pct"]
                                                                 - f[f"last{LAST}_device_worst_10pct"])})
    return out


def report(results: Results) -> str:
    lines: list[str] = []
    for (rounds, _, _, seed, devices), records in _groups(results.runs.values()).items():
        records = sorted(records, key=_order)
        full = records[0]["full_size"]
        lines.append(f"### {devices} devices, {_size(records[0]['run'])} (seed {seed})"
                     + ("" if full else " - reduced run") + "\n")
        lines.append(f"Accuracy % after {rounds} rounds (in brackets: the mean of the last {LAST} rounds). "
                     "Per device: the held-out accuracy of the model each device would use (FedAvg and "
                     "q-FFL: the global model; the others: the device's own), its mean over the devices "
                     "(each device once), the example-weighted mean, and the worst 10 % (of 10 devices: "
                     "the worst one).\n")
        lines.append("| partition | method | server test | per-device mean | weighted mean | worst 10 % | "
                     "run s |")
        lines.append("|---|---|---:|---:|---:|---:|---:|")
        for r in records:
            f = r["final"]
            lines.append(f"| {PARTITION_TITLES[r['run']['partition']]} | {_label(r)} | "
                         f"{_pct(f['test_accuracy'])} ({_pct(f[f'last{LAST}_test_accuracy'])}) | "
                         f"{_pct(f['device_mean'])} ({_pct(f[f'last{LAST}_device_mean'])}) | "
                         f"{_pct(f['device_weighted_mean'])} | "
                         f"{_pct(f['device_worst_10pct'])} ({_pct(f[f'last{LAST}_device_worst_10pct'])}) | "
                         f"{r['seconds']:.0f} |")
        lines.append("")
        checks = targets(records)
        if checks:
            lines.append("| partition | target | method | measured | FedAvg | difference (points) | "
                         f"last {LAST} rounds | met |")
            lines.append("|---|---|---|---:|---:|---:|---:|---|")
            for c in checks:
                asked = "" if c["asked"] else " (not asked)"
                lines.append(f"| {PARTITION_TITLES[c['partition']]} | {c['target']}{asked} | {c['method']} | "
                             f"{_pct(c['measured'])} | {_pct(c['fedavg'])} | {c['difference_points']:+.1f} | "
                             f"{c[f'last{LAST}_difference_points']:+.1f} | "
                             f"{'yes' if c['met'] else '**no**'} |")
            lines.append("")
        loads = [x for r in records for x in (r["load_average"]["start"][0], r["load_average"]["end"][0])]
        lines.append(f"Load average (1 min) before and after the runs: {min(loads):.1f} to {max(loads):.1f}; "
                     f"{sum(r['seconds'] for r in records) / 60:.1f} min of runs.\n")
    return "\n".join(lines)


def chart(results: Results, path: Path) -> None:
    """For the largest group of runs: per partition, the server's test accuracy, the per-device
    mean and the worst 10 % of the model each device would use, over the rounds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    groups = _groups(results.runs.values())
    if not groups:
        raise ValueError("no runs to draw")
    records = sorted(next(iter(groups.values())), key=_order)
    partitions = [p for p in PARTITIONS if any(r["run"]["partition"] == p for r in records)]
    panels = (("test_accuracy", "server test accuracy (%)"), ("mean", "per-device mean (%)"),
              ("worst_10pct", "per-device worst 10 % (%)"))
    fig, axes = plt.subplots(len(partitions), 3, figsize=(15, 3.9 * len(partitions) + 0.9), squeeze=False,
                             sharey=True)
    colours = dict(zip(METHODS, plt.get_cmap("tab10").colors, strict=False))
    styles = ["-", "--", ":", "-."]
    for row, partition in zip(axes, partitions, strict=True):
        seen: dict[str, int] = {}
        for r in (r for r in records if r["run"]["partition"] == partition):
            method = r["run"]["method"]
            style = styles[seen.get(method, 0) % len(styles)]
            seen[method] = seen.get(method, 0) + 1
            rounds = range(1, len(r["test_accuracy"]) + 1)
            for ax, (what, _) in zip(row, panels, strict=True):
                values = r["test_accuracy"] if what == "test_accuracy" else [u[what] for u in r["used"]]
                ax.plot(rounds, [100 * v for v in values], label=_label(r), color=colours[method],
                        linestyle=style, linewidth=1.4)
        for ax, (_, title) in zip(row, panels, strict=True):
            ax.set_title(f"{PARTITION_TITLES[partition]}: {title}", fontsize=10)
            ax.set_xlabel("round")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_ylim(0, 100)
            ax.grid(alpha=0.3)
        row[0].set_ylabel("accuracy (%)")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(labels), 5), fontsize=9, frameon=False)
    size = _size(records[0]["run"]) + ("" if records[0]["full_size"] else ", reduced run")
    fig.suptitle(f"Personalization and fairness, {records[0]['run']['devices']} devices, PyTorch basic "
                 f"network, {size}")
    fig.tight_layout(rect=(0, 0.5 / fig.get_figheight() + 0.02, 1, 1))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=80)
    plt.close(fig)


# --------------------------------------------------------------------------- command line


def _names(allowed: Sequence[str], what: str):
    def parse(text: str) -> list[str]:
        names = [t for t in text.split(",") if t]
        unknown = [t for t in names if t not in allowed]
        if unknown or not names:
            shown = ", ".join(unknown) if unknown else repr(text)
            raise argparse.ArgumentTypeError(f"unknown {what} {shown}; "
                                             f"choose from {', '.join(allowed)}")
        return names
    return parse


def _positive(text: str) -> float:
    value = float(text)
    if not (value > 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def _non_negative(text: str) -> float:
    value = float(text)
    if not (value >= 0 and value < float("inf")):
        raise argparse.ArgumentTypeError(f"must be a number, 0 or more, got {text!r}")
    return value


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = Parser(prog="python bench/personalization.py", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--partitions", type=_names(tuple(PARTITIONS), "partition"), default=list(PARTITIONS),
                   help="comma-separated (default: classes2,dir0.1)")
    p.add_argument("--methods", type=_names(METHODS, "method"), default=list(METHODS),
                   help=f"comma-separated (default: {','.join(METHODS)})")
    p.add_argument("--rounds", type=int, default=FULL["rounds"], help="rounds reported (default 30)")
    p.add_argument("--limit", type=int, default=0, help="at most N training examples per device "
                   "(default 0: each device's whole share)")
    p.add_argument("--test-limit", type=int, default=0,
                   help="the server tests on the first N test images (default 0: all)")
    p.add_argument("--q", type=_non_negative, nargs="+", default=list(DEFAULT_Q),
                   help=f"q-FFL's q; several: one run each (default {DEFAULT_Q[0]:g})")
    p.add_argument("--qffl-lr", type=_positive, nargs="+", default=list(DEFAULT_QFFL_LR),
                   help=f"q-FFL's learning_rate (L = 1/learning_rate); several: one run each "
                        f"(default {DEFAULT_QFFL_LR[0]:g})")
    p.add_argument("--ditto-lambda", type=_non_negative, nargs="+", default=list(DEFAULT_DITTO_LAMBDA),
                   help=f"Ditto's lambda; several: one run each (default {DEFAULT_DITTO_LAMBDA[0]:g})")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=WORKERS, help="pool workers (default 2)")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds one run may take (default 3600)")
    p.add_argument("--data-dir", default=os.environ.get("FEDHUB_DATA_DIR"),
                   help="Fashion-MNIST (default: $FEDHUB_DATA_DIR, else fedhub's lookup: "
                        "../shared/data beside the checkout)")
    p.add_argument("--json", type=Path, default=RESULTS, help="the results file (default "
                   f"{RESULTS.relative_to(ROOT)}); runs already in it are not run again")
    p.add_argument("--report", action="store_true", help="run nothing: report the runs in --json")
    p.add_argument("--chart", type=Path, nargs="?", const=CHART, default=None,
                   help=f"draw the curves of the largest group of runs (default {CHART.relative_to(ROOT)})")
    a = p.parse_args(argv)
    if a.rounds < 1 or a.limit < 0 or a.test_limit < 0 or a.seed < 0:
        p.error("--rounds must be at least 1, --limit, --test-limit and --seed 0 or more")
    if a.test_limit > 10_000:
        p.error("--test-limit must be at most 10000")
    if not 1 <= a.workers <= 64 or a.timeout <= 0:
        p.error("--workers must be from 1 to 64 and --timeout positive")
    if a.report and not a.json.is_file():
        p.error(f"--json: no such file {a.json}")
    return a


def main(argv: Sequence[str] | None = None) -> int:
    a = parse_args(argv)
    try:
        results = Results(a.json)
    except (OSError, ValueError, KeyError, AttributeError) as exc:
        print(f"error: cannot read results file {a.json}: {exc}", file=sys.stderr)
        return 2
    if not a.report:
        from fedhub import datasets

        try:
            datasets.load("fashion-mnist", datasets.locate("fashion-mnist", a.data_dir))
        except datasets.DatasetError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        runs = plan(a)
        todo = [r for r in runs if r.key not in results.runs]
        progress(f"{len(runs)} runs, {len(runs) - len(todo)} already in {a.json}; load average "
                 f"{os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
        import torch

        machine = {"cpus": os.cpu_count(), "python": sys.version.split()[0], "torch": torch.__version__}
        for i, run in enumerate(todo, start=1):
            progress(f"[{i}/{len(todo)}] {run.key}")
            try:
                record = simulate(run, a.data_dir, a.workers, a.timeout)
            except (RuntimeError, TimeoutError, OSError, ValueError, KeyError) as exc:
                print(f"bench failed: {exc}", file=sys.stderr)
                return 1
            results.save(run.key, record, machine=machine)
            f = record["final"]
            progress(f"  after {run.rounds} rounds: server test {f['test_accuracy']:.4f}, per device mean "
                     f"{f['device_mean']:.4f}, worst 10 % {f['device_worst_10pct']:.4f} "
                     f"({record['seconds']:.0f} s)")
    if not results.runs:
        print("error: no runs to report", file=sys.stderr)
        return 2
    print(report(results))
    if a.chart:
        chart(results, a.chart)
        progress(f"drew {a.chart}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
