"""Learning quality of every aggregation strategy on Fashion-MNIST (issue 9, section 5).

    python bench/strategies.py --part a [--part b] [--part c] [--rounds R] [--samples-per-device N]
    python bench/strategies.py --report    # Markdown tables and PNG charts from the results file

Parts (10 devices, one local epoch a round, Adam lr 1e-3, batch 32: the devices' defaults):
  a. every strategy, ``basic`` model, on IID, Dirichlet(0.5), Dirichlet(0.1) and two classes per
     device, 20 rounds;
  b. FedAvg and the two best strategies of part a on Dirichlet(0.5) (or ``--strategies``), ``cnn``
     model, 30 rounds;
  c. robustness, ``basic`` model on IID: 2 of 10 devices attack (sign-flip, scale, label-flip),
     FedAvg and each robust strategy, each also without attackers.

The federation runs in one process, which measures learning quality, not transport: one
Keras model is trained in turn on each selected device's shard, starting from the global
weights, with that device's own Adam state kept between rounds (as a real device keeps its
model); an attacking device poisons its labels or its trained weights with ``fedhub.device.attacks``;
the updates go through the real ``fedhub.engine.strategies`` (configure, begin, add, result,
load_state) and the global model is evaluated on the 10,000 test images after every round.
FedProx's proximal term (mu/2)·||w - w_global||² is in this loop's loss, with mu taken from
the task config the strategy sends.

Every finished run is saved at once (atomically) to the results file; a run already there is
skipped, so an interrupted grid resumes where it stopped. Seeds are fixed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from fedhub.device.attacks import Attack, parse_attack
from fedhub.engine.files import atomic_write_text
from fedhub.engine.params import ParamError
from fedhub.engine.strategies import STRATEGIES, AggregationError, InvalidUpdate, make_strategy
from fedhub.options.parser import Parser
from fedhub.split import DatasetError, load_fashion_mnist, partition

ROOT = Path(__file__).resolve().parents[1]

RESULTS = ROOT / "bench" / "results" / "strategies.json"
DOCS = ROOT / "docs"
DEVICES = 10
ATTACKERS = 2
BATCH_SIZE = 32
LEARNING_RATE = 1e-3
PARTITIONS: dict[str, dict[str, Any]] = {
    "iid": {"scheme": "iid"},
    "dir0.5": {"scheme": "dirichlet", "alpha": 0.5},
    "dir0.1": {"scheme": "dirichlet", "alpha": 0.1},
    "classes2": {"scheme": "classes", "classes_per_device": 2},
}
PARTITION_TITLES = {"iid": "IID", "dir0.5": "Dirichlet(0.5)", "dir0.1": "Dirichlet(0.1)",
                    "classes2": "2 classes per device"}
# Settings for 10 devices of which 2 may attack. Bulyan needs n >= 4f + 3, so with 10 updates
# it can assume at most one attacker; Krum and Multi-Krum can assume both (n >= 2f + 3).
STRATEGY_PARAMS: dict[str, dict[str, Any]] = {
    "krum": {"num_malicious": 2},
    "multikrum": {"num_malicious": 2},
    "bulyan": {"num_malicious": 1},
}
ROBUST = ("fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan")
ATTACKS = ("sign-flip", "scale", "label-flip")
DEFAULT_ROUNDS = {"a": 20, "b": 30, "c": 20}
DEFAULT_MODEL = {"a": "basic", "b": "cnn", "c": "basic"}
DEFAULT_PARTITIONS = {"a": tuple(PARTITIONS), "b": ("dir0.5",), "c": ("iid",)}
# Part b ranks part a's strategies by the mean accuracy of their last rounds, which damps the
# round-to-round noise of one final value.
RANK_LAST_ROUNDS = 3


@dataclass(frozen=True)
class Run:
    """One federation to simulate; its key identifies it in the results file."""

    model: str
    partition: str
    strategy: str
    attack: str  # "none", or parse_attack's KIND[:KEY=VALUE,...]
    rounds: int
    samples_per_device: int  # 0: each device's whole share
    attackers: int = 0
    devices: int = DEVICES
    seed: int = 0

    @property
    def params(self) -> dict[str, Any]:
        return STRATEGY_PARAMS.get(self.strategy, {})

    @property
    def key(self) -> str:
        settings = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return (f"{self.model}|{self.partition}|{self.strategy}({settings})|{self.attack}x{self.attackers}"
                f"|r{self.rounds}|n{self.samples_per_device}|d{self.devices}|s{self.seed}")


def attack_from(text: str) -> Attack:
    """``KIND`` or ``KIND:KEY=VALUE,...`` as ``--attack KIND --attack-arg KEY=VALUE``."""
    kind, _, args = text.partition(":")
    return parse_attack(kind, [a for a in args.split(",") if a])


# --------------------------------------------------------------------------- the federation


class LocalTraining:
    """One Keras model trained in turn for every device, each device with its own Adam state.

    The loop is the built-in trainer's (Adam, sparse cross-entropy on logits, batch 32,
    shuffled, one epoch) written out so that FedProx's proximal term can join the loss.
    """

    def __init__(self, model_name: str, seed: int) -> None:
        import keras
        import tensorflow as tf

        from fedhub.frameworks.keras_model import Model

        self.model = Model(model_name, seed=seed)
        self.initial = self.model.get_weights()
        keras_model = self.model.keras_model
        self.variables = keras_model.trainable_variables
        self.optimizer = keras_model.optimizer
        self.optimizer.build(self.variables)
        self.fresh_optimizer = [np.array(v.numpy()) for v in self.optimizer.variables]
        self.optimizer_states: dict[str, list[np.ndarray]] = {}
        self.anchors = [tf.Variable(v.numpy(), trainable=False) for v in self.variables]
        self.mu = tf.Variable(0.0, trainable=False)
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
        image = tf.TensorSpec([None, 28, 28, 1], tf.float32)

        def step(x, y):
            with tf.GradientTape() as tape:
                loss = loss_fn(y, keras_model(x, training=True))
                proximal = tf.add_n([tf.reduce_sum(tf.square(v - a))
                                     for v, a in zip(self.variables, self.anchors, strict=True)])
                total = loss + 0.5 * self.mu * proximal
            grads = tape.gradient(total, self.variables)
            self.optimizer.apply_gradients(zip(grads, self.variables, strict=True))
            return loss

        # The whole epoch in one graph: twice as fast as a Python loop over batches here.
        @tf.function(input_signature=[image, tf.TensorSpec([None], tf.int64)])
        def epoch(x, y):
            steps = (tf.shape(x)[0] + BATCH_SIZE - 1) // BATCH_SIZE
            total = tf.constant(0.0)
            for i in tf.range(steps):
                total += step(x[i * BATCH_SIZE:(i + 1) * BATCH_SIZE], y[i * BATCH_SIZE:(i + 1) * BATCH_SIZE])
            return total / tf.cast(steps, tf.float32)

        @tf.function(input_signature=[image])
        def logits(x):
            return keras_model(x, training=False)

        self._epoch = epoch
        self._logits = logits

    def reset(self) -> None:
        """A new federation: every device starts with a fresh optimizer."""
        self.optimizer_states.clear()

    def train(self, device: str, weights: Mapping[str, np.ndarray], x: np.ndarray, y: np.ndarray, *,
              learning_rate: float, proximal_mu: float, rng: np.random.Generator) -> tuple[dict, float]:
        """One local epoch from ``weights``; the trained weights and the mean training loss."""
        self.model.set_weights(weights)
        for anchor, v in zip(self.anchors, self.variables, strict=True):
            anchor.assign(v.value)
        self.mu.assign(proximal_mu)
        state = self.optimizer_states.get(device, self.fresh_optimizer)
        for var, value in zip(self.optimizer.variables, state, strict=True):
            var.assign(value)
        self.optimizer.learning_rate = learning_rate
        order = rng.permutation(len(x))
        loss = float(self._epoch(x[order], y[order]))
        self.optimizer_states[device] = [np.array(v.numpy()) for v in self.optimizer.variables]
        return self.model.get_weights(), loss

    def evaluate(self, weights: Mapping[str, np.ndarray], x: np.ndarray,
                 y: np.ndarray) -> tuple[float, float]:
        """(accuracy, loss) of ``weights`` on preprocessed ``x``."""
        self.model.set_weights(weights)
        logits = np.concatenate([self._logits(x[i:i + 1000]).numpy()
                                 for i in range(0, len(x), 1000)]).astype(np.float64)
        logits -= logits.max(axis=1, keepdims=True)
        log_p = logits - np.log(np.exp(logits).sum(axis=1, keepdims=True))
        loss = float(-log_p[np.arange(len(y)), y].mean())
        return float((logits.argmax(axis=1) == y).mean()), loss


class Data:
    """Fashion-MNIST, preprocessed once; each partition's device shards cached."""

    @classmethod
    def open(cls, data_dir: str | None) -> Data | None:
        """The data set, or None once the reason it cannot be read is printed (exit 2)."""
        try:
            return cls(data_dir)
        except (DatasetError, OSError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return None

    def __init__(self, data_dir: str | None) -> None:
        from fedhub.frameworks.keras_model import preprocess

        self._preprocess = preprocess
        (self.x_train, self.y_train), (x_test, y_test) = load_fashion_mnist(data_dir)
        self.x_test, self.y_test = preprocess(x_test), y_test.astype(np.int64)
        self._shards: dict[tuple, list[tuple[np.ndarray, np.ndarray]]] = {}

    def shards(self, name: str, devices: int, limit: int, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
        """Each device's (images, labels): its share under partition ``name``, its first ``limit``
        examples if ``limit`` (as ``fedhub.split --limit`` keeps them)."""
        key = (name, devices, limit, seed)
        if key not in self._shards:
            parts = partition(self.y_train, devices, seed=seed, **PARTITIONS[name])
            self._shards[key] = [(self._preprocess(self.x_train[idx]), self.y_train[idx].astype(np.int64))
                                 for idx in (p[:limit] if limit else p for p in parts)]
        return self._shards[key]


def simulate(run: Run, data: Data, trainers: dict[str, LocalTraining], log: Any) -> dict[str, Any]:
    """Run one federation; per round the test accuracy and loss, and what the strategy rejected."""
    if run.model not in trainers:
        trainers[run.model] = LocalTraining(run.model, run.seed)
    trainer = trainers[run.model]
    trainer.reset()
    strategy = make_strategy(run.strategy, **run.params)
    attack = attack_from(run.attack) if run.attack != "none" else Attack()
    names = [f"device{i:02d}" for i in range(1, run.devices + 1)]
    attackers = set(names[:run.attackers])
    shards = dict(zip(names, data.shards(run.partition, run.devices, run.samples_per_device, run.seed),
                      strict=True))
    for name in attackers:
        x, y = shards[name]
        shards[name] = (x, attack.poison_labels(y))
    select_rng = random.Random(run.seed)
    weights = trainer.initial
    out: dict[str, Any] = {"run": asdict(run), "params": strategy.params(), "attackers": sorted(attackers),
                           "accuracy": [], "loss": [], "rejected": [], "refused": [], "failed": [],
                           "round_seconds": []}
    for rnd in range(1, run.rounds + 1):
        started = time.perf_counter()
        plan = strategy.configure(names, rng=select_rng, fraction=1.0, min_devices=run.devices)
        refused = []
        with strategy.begin(weights) as agg:
            for device in plan.devices:
                config = plan.config[device]
                rng = np.random.default_rng([run.seed, rnd, names.index(device)])
                x, y = shards[device]
                trained, loss = trainer.train(
                    device, weights, x, y, rng=rng,
                    learning_rate=float(config.get("learning_rate", LEARNING_RATE)),
                    proximal_mu=float(config.get("proximal_mu", 0.0)))
                if device in attackers:
                    trained = attack.poison_weights(trained, weights, rng)
                try:
                    agg.add(device, trained, len(x), {"loss": loss})
                except InvalidUpdate:  # the server would answer 4xx; the round goes on without it
                    refused.append(device)
            try:
                result = agg.result()
            except AggregationError as exc:  # the server fails the round and runs it again
                out["failed"].append({"round": rnd, "reason": exc.reason})
                result = None
        if result is not None:
            weights = result.weights
            strategy.load_state(result.state)
            rejected = sorted(d for d, u in result.metrics["updates"].items() if u["status"] != "used")
        else:
            rejected = []
        accuracy, loss = trainer.evaluate(weights, data.x_test, data.y_test)
        seconds = time.perf_counter() - started
        out["accuracy"].append(accuracy)
        out["loss"].append(loss)
        out["rejected"].append(rejected)
        out["refused"].append(refused)
        out["round_seconds"].append(seconds)
        log(f"  round {rnd:2d}/{run.rounds}: accuracy {accuracy:.4f}, loss {loss:.4f}"
            + (f", rejected {','.join(rejected)}" if rejected else "")
            + (f", refused {','.join(refused)}" if refused else "")
            + (" (round failed)" if result is None else "") + f" ({seconds:.1f} s)")
    return out


# --------------------------------------------------------------------------- the grid


class Results:
    """The results file: finished runs by key, written atomically after each run."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.runs: dict[str, dict[str, Any]] = {}
        if path.exists():
            self.runs = json.loads(path.read_text())["runs"]

    def save(self, key: str, record: dict[str, Any]) -> None:
        self.runs[key] = record
        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, json.dumps({"runs": self.runs}, indent=1, sort_keys=True) + "\n")

    def matching(self, **fields: Any) -> list[dict[str, Any]]:
        return [r for r in self.runs.values() if all(r["run"][k] == v for k, v in fields.items())]


def tail_accuracy(record: Mapping[str, Any]) -> float:
    return float(np.mean(record["accuracy"][-RANK_LAST_ROUNDS:]))


def best_of_part_a(results: Results, seed: int) -> list[str]:
    """The two strategies (FedAvg aside) with the highest part-a accuracy on Dirichlet(0.5),
    from the largest part-a grid (rounds x samples) in the results file."""
    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for r in results.matching(model="basic", partition="dir0.5", attack="none", seed=seed):
        groups.setdefault((r["run"]["rounds"], r["run"]["samples_per_device"]), []).append(r)
    if not groups:
        raise SystemExit("error: part b picks the best two strategies from part a's Dirichlet(0.5) "
                         "runs: run part a first or give --strategies")
    _, chosen = max(groups.items(), key=lambda g: (len(g[1]), g[0][1] or math.inf, g[0][0]))
    ranked = sorted((r for r in chosen if r["run"]["strategy"] != "fedavg"), key=tail_accuracy, reverse=True)
    return [r["run"]["strategy"] for r in ranked[:2]]


def plan_runs(part: str, a: argparse.Namespace, results: Results) -> list[Run]:
    rounds = a.rounds or DEFAULT_ROUNDS[part]
    models = a.models or [DEFAULT_MODEL[part]]
    partitions = a.partitions or DEFAULT_PARTITIONS[part]
    common = {"rounds": rounds, "samples_per_device": a.samples_per_device, "seed": a.seed}
    if part == "a":
        strategies = a.strategies or list(STRATEGIES)
        return [Run(m, p, s, "none", **common) for m in models for p in partitions for s in strategies]
    if part == "b":
        strategies = a.strategies or ["fedavg", *best_of_part_a(results, a.seed)]
        return [Run(m, p, s, "none", **common) for m in models for p in partitions for s in strategies]
    strategies = a.strategies or ["fedavg", *ROBUST]
    return [Run(m, p, s, attack, attackers=ATTACKERS if attack != "none" else 0, **common)
            for m in models for p in partitions for attack in ("none", *a.attacks) for s in strategies]


# --------------------------------------------------------------------------- the report


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def _size(record: Mapping[str, Any]) -> str:
    run = record["run"]
    n = run["samples_per_device"]
    return f"{run['rounds']} rounds, " + (f"{n:,} samples per device" if n else "each device's whole share")


def _groups(records: Iterable[dict[str, Any]]) -> dict[tuple, list[dict[str, Any]]]:
    """Records by size (model, rounds, samples per device, seed), largest first."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        run = r["run"]
        groups.setdefault((run["model"], run["rounds"], run["samples_per_device"], run["seed"]), []).append(r)
    return dict(sorted(groups.items(), key=lambda g: (g[0][0], -(g[0][2] or 10**9), -g[0][1])))


def _order(strategy: str) -> int:
    return list(STRATEGIES).index(strategy)


def report(results: Results, docs: Path) -> str:
    """Markdown tables of every part found in the results, and a PNG chart per table."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    lines: list[str] = []
    clean = [r for r in results.runs.values() if r["run"]["attack"] == "none"]
    attacked = [r for r in results.runs.values() if r["run"]["attack"] != "none"]

    def chart(panels: dict[str, list[dict[str, Any]]], title: str, name: str) -> None:
        cols = {4: 2}.get(len(panels), min(len(panels), 3))
        rows = math.ceil(len(panels) / cols)
        fig, axes = plt.subplots(rows, cols, figsize=(5.5 * cols, 3.8 * rows + 0.8), squeeze=False,
                                 sharey=True)
        colours = [*plt.get_cmap("tab10").colors, (0.0, 0.0, 0.0)]
        for ax, (panel, records) in zip(axes.flat, panels.items(), strict=False):
            for r in sorted(records, key=lambda r: _order(r["run"]["strategy"])):
                strategy = r["run"]["strategy"]
                acc = 100 * np.array(r["accuracy"])
                ax.plot(np.arange(1, len(acc) + 1), acc, label=strategy, color=colours[_order(strategy)],
                        linestyle="--" if strategy in ROBUST else "-", linewidth=1.4)
            ax.set_title(panel)
            ax.set_xlabel("round")
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        for ax in axes.flat[len(panels):]:
            ax.set_visible(False)
        for row in axes:
            row[0].set_ylabel("test accuracy (%)")
        handles, labels = axes.flat[0].get_legend_handles_labels()
        ncol = min(len(labels), 6)
        legend_inches = 0.25 + 0.22 * math.ceil(len(labels) / ncol)
        fig.legend(handles, labels, loc="lower center", ncol=ncol, fontsize=8, frameon=False)
        fig.suptitle(title)
        fig.tight_layout(rect=(0, legend_inches / fig.get_figheight(), 1, 1))
        fig.savefig(docs / name, dpi=90)
        plt.close(fig)
        lines.append(f"![{title}]({name})\n")

    # Part a: every strategy on the four partitions of the basic model.
    basic = (r for r in clean if r["run"]["model"] == "basic")
    for (model, rounds, n, seed), records in _groups(basic).items():
        by = {(r["run"]["partition"], r["run"]["strategy"]): r for r in records}
        partitions = [p for p in PARTITIONS if any(k[0] == p for k in by)]
        strategies = sorted({k[1] for k in by}, key=_order)
        if len(partitions) < 2 and len(strategies) < 3:
            continue
        size = _size(records[0])
        lines.append(f"### a. Every strategy, `{model}` model, {size} (seed {seed})\n")
        lines.append("Final test accuracy % (best round's in brackets).\n")
        lines.append("| strategy | " + " | ".join(PARTITION_TITLES[p] for p in partitions) + " |")
        lines.append("|---|" + "---:|" * len(partitions))
        for s in strategies:
            cells = []
            for p in partitions:
                r = by.get((p, s))
                cells.append(f"{_pct(r['accuracy'][-1])} ({_pct(max(r['accuracy']))})" if r else "")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
        tag = f"{model}_r{rounds}_n{n}"
        chart({PARTITION_TITLES[p]: [r for k, r in by.items() if k[0] == p] for p in partitions},
              f"{model} model, 10 devices, {size}", f"strategies_a_{tag}.png")

    # Part b: the cnn model on Dirichlet(0.5).
    for (model, rounds, n, seed), records in _groups(r for r in clean if r["run"]["model"] == "cnn").items():
        records = sorted(records, key=lambda r: _order(r["run"]["strategy"]))
        size = _size(records[0])
        lines.append(f"### b. `{model}` model on Dirichlet(0.5), {size} (seed {seed})\n")
        lines.append("| strategy | final accuracy % | best accuracy % (round) | mean round s |")
        lines.append("|---|---:|---:|---:|")
        for r in records:
            acc = r["accuracy"]
            lines.append(f"| {r['run']['strategy']} | {_pct(acc[-1])} | {_pct(max(acc))} "
                         f"({int(np.argmax(acc)) + 1}) | {np.mean(r['round_seconds']):.1f} |")
        lines.append("")
        chart({PARTITION_TITLES[records[0]["run"]["partition"]]: records},
              f"{model} model, 10 devices, {size}", f"strategies_b_{model}_r{rounds}_n{n}.png")

    # Part c: robustness against 2 of 10 attacking devices.
    for (model, rounds, n, seed), records in _groups(attacked).items():
        part = records[0]["run"]["partition"]
        attacks = sorted({r["run"]["attack"] for r in records}, key=lambda k: (k not in ATTACKS,
                         ATTACKS.index(k) if k in ATTACKS else 0, k))
        by = {(r["run"]["strategy"], r["run"]["attack"]): r for r in records}
        strategies = sorted({s for s, _ in by}, key=_order)
        for r in clean:
            run = r["run"]
            if (run["model"], run["rounds"], run["samples_per_device"], run["seed"], run["partition"]) \
                    == (model, rounds, n, seed, part) and run["strategy"] in strategies:
                by[(run["strategy"], "none")] = r
        size = _size(records[0])
        attackers = records[0]["run"]["attackers"]
        lines.append(f"### c. Robustness: {attackers} of {records[0]['run']['devices']} devices attack, "
                     f"`{model}` model, {PARTITION_TITLES[part]}, {size} (seed {seed})\n")
        lines.append("Final test accuracy %; in brackets the change from the same strategy's run without "
                     "attackers.\n")
        lines.append("| strategy | no attack | " + " | ".join(attacks) + " |")
        lines.append("|---|---:|" + "---:|" * len(attacks))
        for s in strategies:
            base = by.get((s, "none"))
            cells = [_pct(base["accuracy"][-1]) if base else ""]
            for k in attacks:
                r = by.get((s, k))
                if not r:
                    cells.append("")
                    continue
                delta = f" ({100 * (r['accuracy'][-1] - base['accuracy'][-1]):+.1f})" if base else ""
                cells.append(_pct(r["accuracy"][-1]) + delta)
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
        lines.append("Share of the attackers' updates (and of the honest ones) that the strategy rejected\n"
                     "outright, over all rounds (Krum, Multi-Krum and Bulyan's selection; the median and\n"
                     "trimmed mean cut coordinates, not updates).\n")
        lines.append("| strategy | " + " | ".join(attacks) + " |")
        lines.append("|---|" + "---:|" * len(attacks))
        for s in strategies:
            if s not in ("krum", "multikrum", "bulyan"):
                continue
            cells = []
            for k in attacks:
                r = by.get((s, k))
                if not r:
                    cells.append("")
                    continue
                bad = set(r["attackers"])
                rejected = [d for rnd in r["rejected"] for d in rnd]
                n_bad = len(bad) * len(r["rejected"])
                n_good = (r["run"]["devices"] - len(bad)) * len(r["rejected"])
                cells.append(f"{_pct(sum(d in bad for d in rejected) / n_bad)} "
                             f"({_pct(sum(d not in bad for d in rejected) / n_good)})")
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
        chart({("no attack" if k == "none" else k): [r for (s, kk), r in by.items() if kk == k]
               for k in ("none", *attacks)},
              f"{model} model, {PARTITION_TITLES[part]}, {attackers} of 10 devices attacking, {size}",
              f"strategies_c_{model}_r{rounds}_n{n}.png")
    return "\n".join(lines)


# --------------------------------------------------------------------------- command line


def _names(allowed: Sequence[str], what: str):
    def parse(text: str) -> list[str]:
        names = [t for t in text.split(",") if t]
        unknown = [t for t in names if t not in allowed]
        if unknown or not names:
            raise argparse.ArgumentTypeError(f"unknown {what} {', '.join(unknown) or text!r}; "
                                             f"choose from {', '.join(allowed)}")
        return names
    return parse


def _attacks(text: str) -> list[str]:
    names = [t for t in text.split(";") if t]
    for t in names:
        try:
            attack_from(t)
        except ParamError as exc:
            raise argparse.ArgumentTypeError(str(exc)) from None
    return names


def count(minimum: int = 0):
    """An argparse type: an integer of at least ``minimum`` (the benchmarks' counts and sizes)."""
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be {minimum} or more, got {value}")
        return value
    return parse




def parser() -> argparse.ArgumentParser:
    p = Parser(prog="python bench/strategies.py", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", action="append", choices=("a", "b", "c"),
                   help="which runs (repeatable; run in the order a, c, b); default: none, with --report")
    p.add_argument("--rounds", type=count(), default=0,
                   help="rounds per run (default: 20 for parts a and c, 30 for b)")
    p.add_argument("--samples-per-device", type=count(), default=0,
                   help="keep each device's first N examples (default 0: its whole share)")
    p.add_argument("--strategies", type=_names(tuple(STRATEGIES), "strategy"),
                   help="comma-separated (default: a: all; b: fedavg and part a's best two; "
                        "c: fedavg and the robust ones)")
    p.add_argument("--partitions", type=_names(tuple(PARTITIONS), "partition"),
                   help="comma-separated (default: a: all four; b: dir0.5; c: iid)")
    p.add_argument("--models", type=_names(("basic", "cnn"), "model"),
                   help="comma-separated (default: basic for a and c, cnn for b)")
    p.add_argument("--attacks", type=_attacks, default=list(ATTACKS),
                   help="part c's attacks, ';'-separated KIND[:KEY=VALUE,...] "
                        "(default: sign-flip;scale;label-flip with their default settings)")
    p.add_argument("--seed", type=count(), default=0)
    p.add_argument("--results", type=Path, default=RESULTS, help=f"results file (default {RESULTS})")
    p.add_argument("--report", action="store_true",
                   help="print the Markdown tables and write the PNG charts to --docs")
    p.add_argument("--docs", type=Path, default=DOCS, help="where the charts go (default docs/)")
    p.add_argument("--data-dir", default=os.environ.get("FEDHUB_DATA_DIR"))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    a = parser().parse_args(argv)
    if not a.part and not a.report:
        parser().error("give --part a|b|c and/or --report")
    try:
        results = Results(a.results)
    except (OSError, ValueError, KeyError) as exc:
        print(f"error: cannot read results file {a.results}: {exc}", file=sys.stderr)
        return 2

    def log(text: str) -> None:
        print(text, flush=True)

    data: Data | None = None
    trainers: dict[str, LocalTraining] = {}
    for part in sorted(set(a.part or ()), key="acb".index):
        runs = plan_runs(part, a, results)
        todo = [r for r in runs if r.key not in results.runs]
        log(f"part {part}: {len(runs)} runs, {len(runs) - len(todo)} already in {a.results}")
        for i, run in enumerate(todo, start=1):
            if data is None and (data := Data.open(a.data_dir)) is None:
                return 2
            log(f"[{part} {i}/{len(todo)}] {run.key}")
            started = time.perf_counter()
            record = simulate(run, data, trainers, log)
            record["seconds"] = time.perf_counter() - started
            record["finished"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            results.save(run.key, record)
            log(f"  final accuracy {record['accuracy'][-1]:.4f} in {record['seconds']:.0f} s")
    if a.report:
        a.docs.mkdir(parents=True, exist_ok=True)
        print(report(results, a.docs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
