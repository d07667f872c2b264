"""Simulate a federation of many devices on this machine (or a Ray cluster), in one command.

    python -m fedhub.simulate --devices 1000 --fraction 0.1 --workers 2 --rounds 5 \\
        --split dirichlet --alpha 0.5 --model basic --data-dir DIR
    python -m fedhub.simulate --framework torch --dataset cifar-10 --devices 10 --fraction 1

Splits the data set's training set (--dataset: Fashion-MNIST by default, or CIFAR-10) over
the devices (memory-mappable device folders), trains FedHub's network of --framework (Keras by
default, or PyTorch: then no process of the run imports TensorFlow),
starts a FedHub server in this process and a pool of workers hosting the devices, and runs
the rounds: a progress bar per round (devices done of those selected), each round's global
test accuracy, and as the last line a JSON summary (rounds, final_accuracy, wall_s,
first_round_s, peak_rss_mb of all its processes together, bytes_up, bytes_down, ...).
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
import types
from pathlib import Path
from typing import Any

from tqdm import tqdm

from fedhub.engine.config import FederationConfig, TrainingConfig
from fedhub.engine.plural import plural
from fedhub.engine.strategies import STRATEGIES, parse_strategy_args
from fedhub.options import framework as framework_options
from fedhub.options import secagg as secagg_options
from fedhub.options.dp import add_dp_options, dp_config
from fedhub.options.parser import Parser
from fedhub.simulation import simulate

BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} devices [{elapsed}]"


class RoundBars:
    """One progress bar per round (devices done of selected) and a line per completed round."""

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self._bar: tqdm | None = None
        self._round: int | None = None
        self._started = time.monotonic()

    def progress(self, status: dict[str, Any]) -> None:
        current = status.get("round") or {}
        if not self.enabled or "selected" not in current:
            return
        if current["number"] != self._round:
            self._close()
            self._round = current["number"]
            # Counts, not a rate: n jumps as reports arrive, so tqdm's rate (n / a few
            # milliseconds since the bar opened) read "270600.26device/s".
            self._bar = tqdm(total=len(current["selected"]), desc=f"round {self._round}",
                             bar_format=BAR_FORMAT, leave=False, file=sys.stderr, dynamic_ncols=True)
        assert self._bar is not None
        total, done = len(current["selected"]), len(current["reported"])  # a dropped device leaves
        if (total, done) != (self._bar.total, self._bar.n):
            self._bar.total, self._bar.n = total, done
            self._bar.refresh()

    def round_done(self, entry: dict[str, Any]) -> None:
        if self._round == entry["round"]:
            self._close()
        accuracy, loss = entry["test_accuracy"], entry["test_loss"]
        spent = ""
        if entry.get("privacy"):  # --dp: the privacy spent so far (None: infinite)
            epsilon = entry["privacy"]["epsilon"]
            spent = f", epsilon {'inf' if epsilon is None else f'{epsilon:.3g}'}"
        what = "model version" if entry.get("mode") == "async" else "round"
        print(f"{what} {entry['round']}: global test accuracy "
              f"{'n/a' if accuracy is None else f'{accuracy:.4f}'} "
              f"(loss {'n/a' if loss is None else f'{loss:.4f}'}), {entry['num_updates']} devices, "
              f"{entry['num_examples']} examples{spent}, {time.monotonic() - self._started:.1f}s"
              + secure_text(entry.get("secagg")), flush=True)

    def _close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def secure_text(secagg: dict[str, Any] | None) -> str:
    """How a round's secure aggregation went, for its line."""
    if not secagg:
        return ""
    return (f"; secure aggregation: {plural(secagg['survivors'], 'masked update')} (threshold "
            f"{secagg['threshold']}), {plural(len(secagg['recovered']), 'dropout')} recovered")


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="python -m fedhub.simulate", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--devices", type=int, default=100, help="simulated devices (default 100)")
    p.add_argument("--fraction", type=float, default=0.1,
                   help="share of the devices selected each round (default 0.1)")
    p.add_argument("--rounds", type=int, default=5, help="rounds (default 5)")
    p.add_argument("--workers", type=int, default=None,
                   help="worker processes hosting the devices (default: the number of cores; with "
                        "--backend ray, as many as the cluster's CPUs hold)")
    p.add_argument("--split", choices=("iid", "dirichlet", "classes"), default="iid",
                   help="how the training set is split over the devices (default iid)")
    p.add_argument("--alpha", type=float, default=0.5, help="Dirichlet concentration (default 0.5)")
    p.add_argument("--classes-per-device", type=int, default=2, help="for --split classes (default 2)")
    p.add_argument("--limit", type=int, default=None, help="at most N examples per device")
    framework_options.add_options(p)  # --framework, --dataset, --model: as server.py's
    p.add_argument("--epochs", type=int, default=1, help="local epochs per round (default 1)")
    p.add_argument("--batch-size", type=int, default=32, help="(default 32)")
    p.add_argument("--learning-rate", type=float, default=1e-3, help="(default 0.001)")
    p.add_argument("--data-dir", default=None,
                   help="folder with the data set's files, or one holding fashion-mnist/ and cifar-10/ "
                        "(else $FEDHUB_DATA_DIR, else ../shared/data beside the checkout, else "
                        "Keras' download)")
    p.add_argument("--test-limit", type=int, default=None, help="evaluate on the first N test images")
    p.add_argument("--seed", type=int, default=0, help="seed of the split and the selection (default 0)")
    p.add_argument("--backend", choices=("process", "ray"), default="process",
                   help="workers as processes here, or as Ray actors (pip install -e '.[ray]')")
    p.add_argument("--ray-address", default=None,
                   help="Ray cluster to join (e.g. auto, HOST:6379); default: a local Ray")
    p.add_argument("--cpus-per-worker", type=float, default=1.0, help="Ray CPUs per worker (default 1)")
    p.add_argument("--gpus-per-worker", type=float, default=0.0, help="Ray GPUs per worker (default 0)")
    p.add_argument("--root", type=Path, default=None,
                   help="folder for device folders, server state and logs (default: a temporary one, "
                        "removed afterwards); on a Ray cluster every machine must see it at this path")
    p.add_argument("--timeout", type=float, default=None, help="give up after this many seconds")
    p.add_argument("--history", type=Path, default=None, help="also write the full history (JSON) here")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.add_argument("--strategy", default="fedavg", choices=list(STRATEGIES), metavar="NAME",
                   help=f"aggregation strategy, as server.py's: {', '.join(STRATEGIES)} (default fedavg)")
    p.add_argument("--strategy-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a parameter of the strategy, repeatable (server.py --list-strategies)")
    p.add_argument("--compression", default="none", metavar="SCHEME",
                   help="how devices send updates, as server.py's: none, q8, q4, topk:FRACTION")
    p.add_argument("--compress-downlink", action="store_true",
                   help="send the global model download compressed too")
    add_dp_options(p)
    secagg_options.add_options(p)
    p.add_argument("--dropout", type=float, default=0.0, metavar="P",
                   help="with --secure-aggregation: the chance that a device drops out of a round right "
                        "after dealing its key shares (default 0)")
    p.add_argument("--mode", choices=("sync", "async"), default="sync",
                   help="sync: rounds; async: every device trains continuously (FedBuff); "
                        "--rounds then counts model versions")
    p.add_argument("--buffer", type=int, default=10, metavar="K",
                   help="async: a new model version every K updates (default 10)")
    p.add_argument("--max-staleness", type=int, default=10, metavar="S",
                   help="async: refuse updates more than S versions old (default 10)")
    p.add_argument("--slow-devices", type=float, default=0.0, metavar="SHARE",
                   help="share of the devices that are slow (e.g. 0.2; default 0)")
    p.add_argument("--slowdown", type=float, default=5.0, metavar="FACTOR",
                   help="how many times slower the slow devices are (default 5)")
    return p


def _check(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    """Every refusal as one ``error: ...`` line (exit 2) before anything starts: this command's
    own options here, the run's settings by the one :meth:`FederationConfig.validate` the
    server would apply (ranges, strategy, compression, mode, privacy, secure aggregation)."""
    if a.devices < 1:
        p.error("--devices must be at least 1")
    if not 0 < a.fraction <= 1:
        p.error("--fraction must be in (0, 1]")
    if a.rounds < 1:
        p.error("--rounds must be at least 1")
    if a.workers is not None and a.workers < 1:
        p.error("--workers must be at least 1")
    for flag in ("limit", "test_limit"):
        value = getattr(a, flag)
        if value is not None and value < 1:
            p.error(f"--{flag.replace('_', '-')} must be at least 1")
    for flag in ("alpha", "timeout"):
        value = getattr(a, flag)
        if value is not None and not value > 0:
            p.error(f"--{flag.replace('_', '-')} must be a positive number")
    if not 0 <= a.slow_devices <= 1 or not 1 <= a.slowdown <= 1000:
        p.error("--slow-devices must be a share from 0 to 1 and --slowdown from 1 to 1000")
    if a.cpus_per_worker <= 0 or a.gpus_per_worker < 0:
        p.error("--cpus-per-worker must be positive and --gpus-per-worker not negative")
    from fedhub.serve import ServerConfig

    a.model = framework_options.network(a, TrainingConfig.model)
    try:
        # server.py's check of the three: one network of that framework for that data set
        ServerConfig(model=a.model, framework=a.framework, dataset=a.dataset).check_framework()
        a.strategy_params = parse_strategy_args(a.strategy, a.strategy_arg)
    except ValueError as exc:
        p.error(str(exc))
    # each round selects a fraction of the devices; an asynchronous version takes --buffer updates
    per_round = a.buffer if a.mode == "async" else math.ceil(a.fraction * a.devices)
    a.privacy = dp_config(p, a, per_round)
    a.secagg = secagg_options.config_from(a)
    if not 0 <= a.dropout <= 1 or (a.dropout and a.secagg is None):
        p.error("--dropout must be from 0 to 1, and goes with --secure-aggregation")
    try:
        FederationConfig(
            rounds=a.rounds, min_devices=per_round, fraction=a.fraction, seed=a.seed,
            strategy=a.strategy, strategy_params=a.strategy_params, mode=a.mode, buffer_size=a.buffer,
            max_staleness=a.max_staleness, compress_downlink=a.compress_downlink,
            training=TrainingConfig(model=a.model, framework=a.framework, epochs=a.epochs,
                                    batch_size=a.batch_size, learning_rate=a.learning_rate,
                                    compression=a.compression),
            privacy=a.privacy, secagg=a.secagg).validate()
    except ValueError as exc:
        message = (str(exc).replace("min_devices is", "--fraction x --devices is")
                   .replace("min_devices (--min-devices)", "--fraction x --devices"))
        p.error(message + secagg_options.hint(exc))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, checked: a refusal is one ``error: ...`` line and exit 2, before anything
    starts (tests call this in-process)."""
    p = _parser()
    a = p.parse_args(argv)
    _check(p, a)
    if a.backend == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            p.error("--backend ray needs Ray: pip install -e '.[ray]'")
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    from fedhub.split import DatasetError, split_to_devices

    started = time.monotonic()
    root = a.root or Path(tempfile.mkdtemp(prefix="fedhub-simulate-"))
    try:
        split_to_devices(root / "devices", a.devices, scheme=a.split, seed=a.seed, alpha=a.alpha,
                         classes_per_device=a.classes_per_device, data_dir=a.data_dir, limit=a.limit,
                         progress=False, memmap=True, dataset=a.dataset)
        split_s = time.monotonic() - started
        bars = RoundBars(enabled=not a.quiet)
        history = simulate(
            a.model, root / "devices", rounds=a.rounds, workers=a.workers, backend=a.backend,
            ray_address=a.ray_address, cpus_per_worker=a.cpus_per_worker,
            gpus_per_worker=a.gpus_per_worker, epochs=a.epochs, batch_size=a.batch_size,
            learning_rate=a.learning_rate, root=root, timeout=a.timeout, on_round=bars.round_done,
            on_progress=bars.progress, fraction=a.fraction, seed=a.seed, data_dir=a.data_dir,
            test_limit=a.test_limit, strategy=a.strategy, strategy_params=a.strategy_params,
            compression=a.compression, compress_downlink=a.compress_downlink, privacy=a.privacy,
            secure_aggregation=a.secagg or False, dropout=a.dropout,
            mode=a.mode, buffer_size=a.buffer, max_staleness=a.max_staleness,
            slow_devices=a.slow_devices, slowdown=a.slowdown, framework=a.framework, dataset=a.dataset)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if a.root is None:
            shutil.rmtree(root, ignore_errors=True)
    if a.history:
        a.history.write_text(json.dumps(list(history)))
    stats = history.stats
    nodes = sorted({task["node"] for task in stats["tasks"]})
    print(json.dumps({
        "rounds": len(history), "final_accuracy": history[-1]["test_accuracy"] if history else None,
        "accuracy": [entry["test_accuracy"] for entry in history],
        "wall_s": stats["wall_s"], "first_round_s": stats["first_round_s"],
        "round_s": stats["round_s"], "split_s": round(split_s, 3), "peak_rss_mb": stats["peak_rss_mb"],
        "bytes_up": stats["bytes_up"], "bytes_down": stats["bytes_down"], "devices": a.devices,
        "compression": a.compression, "compress_downlink": a.compress_downlink,
        "fraction": a.fraction, "workers": stats["workers"], "backend": a.backend,
        "mode": a.mode, "framework": a.framework, "dataset": a.dataset, "model": a.model,
        "nodes": len(nodes), "restarts": stats["restarts"], "failed_steps": stats["failures"],
        "epsilon": (history[-1].get("privacy") or {}).get("epsilon") if history else None,
    }), flush=True)
    return 0


class _CallableModule(types.ModuleType):
    """``import fedhub.simulate`` (this command's module) binds the name ``fedhub.simulate``
    to the module, over the function of the same name: calling it still runs a simulation."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return simulate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())  # TensorFlow's log settings: ``import fedhub`` made them
