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
import os
import shutil
import sys
import tempfile
import time
import types
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from tqdm import tqdm

from fedhub import settings, tensorflow_env
from fedhub.engine import params
from fedhub.engine.plural import plural
from fedhub.options.parser import Parser
from fedhub.serve import ServerConfig
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
        pace = entry.get("efficiency")  # one process's time for the round's images over the round's
        if pace:  # and how much of the round the server's test of the new model took
            tested = "" if pace.get("test_s") is None else f", {pace['test_s']:.2f}s of it testing"
            pace = f", efficiency {pace['ratio']:.2f}{tested}"
        else:
            pace = ""
        print(f"{what} {entry['round']}: global test accuracy "
              f"{'n/a' if accuracy is None else f'{accuracy:.4f}'} "
              f"(loss {'n/a' if loss is None else f'{loss:.4f}'}), {entry['num_updates']} devices, "
              f"{entry['num_examples']} examples{spent}, {time.monotonic() - self._started:.1f}s{pace}"
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


@dataclass
class SimulationOptions:
    """This command's settings: its own (how the devices are made and hosted) declared here as
    fields, like the run's, which are ``ServerConfig``'s (``run``). Flags, file keys and checks
    come from the declarations (:mod:`fedhub.settings`)."""

    devices: int = params.number(100, 1, 1_000_000, help="simulated devices")
    workers: int | None = params.number(
        None, 1, 4096, help="worker processes hosting the devices (default: the number of cores; with "
        "backend ray, as many as the cluster's CPUs hold)")
    split: str = params.setting("iid", "how the training set is split over the devices",
                                choices=("iid", "dirichlet", "classes"))
    alpha: float = params.number(0.5, above=0, high=1e6, help="Dirichlet concentration")
    classes_per_device: int = params.number(2, 1, 1000, help="for split classes")
    limit: int | None = params.number(None, 1, 10**9, metavar="N", help="at most N examples per device")
    holdout: float = params.number(0.1, 0, 0.9, metavar="SHARE", help="share held out besides each device's "
                                   "training examples, for federated evaluation (0: none)")
    backend: str = params.setting("process", "workers as processes here, or as Ray actors "
                                  "(pip install -e '.[ray]')", choices=("process", "ray"))
    ray_address: str | None = params.setting(None, "Ray cluster to join (e.g. auto, HOST:6379); "
                                             "default: a local Ray")
    cpus_per_worker: float = params.number(1.0, above=0, high=1024, help="Ray CPUs per worker")
    gpus_per_worker: float = params.number(
        0.0, 0, 64, help="GPUs per worker: a share below 1 puts several workers on one GPU, a whole number "
        "gives each its own (process workers: their CUDA_VISIBLE_DEVICES; Ray: the actors' num_gpus); "
        "0: the workers train on the CPU")
    root: Path | None = params.setting(None, "folder for device folders, server state and logs (default: a "
                                       "temporary one, removed afterwards); on a Ray cluster every machine "
                                       "must see it at this path", metavar="DIR")
    timeout: float | None = params.number(None, above=0, high=10**9, help="give up after this many seconds")
    history: Path | None = params.setting(None, "also write the full history (JSON) here", metavar="FILE")
    quiet: bool = params.setting(False, "no progress bars")
    dropout: float = params.number(0.0, 0, 1, metavar="P", help="with secure aggregation: the chance that a "
                                   "device drops out of a round right after dealing its key shares")
    slow_devices: float = params.number(0.0, 0, 1, metavar="SHARE",
                                        help="share of the devices that are slow (e.g. 0.2)")
    slowdown: float = params.number(5.0, 1, 1000, metavar="FACTOR",
                                    help="how many times slower the slow devices are")
    relay: bool = params.setting(True, "each worker is a relay for its devices: in rounds that take "
                                 "partial sums (FedAvg and its server optimizers) it sends one sum of "
                                 "their updates instead of each (--no-relay: every update on its own)")
    run: ServerConfig = params.group(factory=ServerConfig, flat=True)


# The run's settings this command does not take, because it sets them itself: a round selects
# fraction x devices (min_devices) and waits for all of them (quorum 1); every device is active
# at once and training starts when all have enrolled; idle virtual devices are touched every
# device_timeout / 3 (fedhub.simulate), so a long one keeps that traffic low.
SET_HERE = ("min_devices", "quorum", "auto_activate", "start", "device_timeout", "data_split")
# And the server's own (where and how it serves): the simulation's server is in this process.
SERVER_ONLY = ("host", "port", "state_dir", "eval_dir", "max_upload_mb", "max_image_mb", "max_wait",
               "threads", "reset", "certfile", "keyfile", "channel_timeout", "header_timeout",
               "auth_failures_per_minute", "model_factory", "test_data", "runs_dir", "run_id",
               "tensorboard_devices", "tensorboard", "resume", "new_run")
# Where this command's defaults differ from the run's: a quick look at a big federation, five
# rounds of a tenth of the devices, not server.py's three rounds of all of them, and how close
# to the compute limit it ran (the efficiency figure).
DEFAULTS = {"rounds": 5, "fraction": 0.1, "efficiency": True}


def _settings() -> tuple[settings.Setting, ...]:
    return tuple(s for s in settings.settings_of(SimulationOptions)
                 if s.path.split(".")[0] not in SET_HERE + SERVER_ONLY)


def _name(path: str) -> str:
    """A setting as this command names it: min_devices is what fraction x devices makes."""
    return "--fraction x --devices" if path == "min_devices" else settings.flag(path)


def parse_args(argv: list[str] | None = None) -> SimulationOptions:
    """The options, checked: a refusal is one ``error: ...`` line and exit 2, before anything
    starts (tests call this in-process). The run's settings pass the one
    :meth:`ServerConfig.validate` the server would apply, with ``min_devices`` the devices a
    round selects (an asynchronous version takes buffer_size updates)."""
    every = _settings()
    p = Parser(prog="python -m fedhub.simulate", description=__doc__,
               formatter_class=argparse.RawDescriptionHelpFormatter)
    settings.add_file_options(p)
    settings.add_options(p, every, DEFAULTS)
    a = p.parse_args(argv)
    o = settings.resolve(p, a, every, SimulationOptions, DEFAULTS, _name)
    federation = o.run.federation
    federation.min_devices = math.ceil(federation.fraction * o.devices)
    try:
        params.check_numbers(o)
        if o.dropout and federation.secagg is None:
            raise params.SettingError("{0} goes with {1}", "dropout", "secagg")
        o.run.validate()
    except ValueError as exc:
        p.error(settings.cli_message(exc, _name))
    if o.backend == "ray":
        try:
            import ray  # noqa: F401
        except ImportError:
            p.error("--backend ray needs Ray: pip install -e '.[ray]'")
    elif o.gpus_per_worker:  # what the pool will ask of this machine's GPUs, asked now
        from fedhub.device import gpus

        try:
            gpus.assign(min(o.workers or os.cpu_count() or 1, o.devices), o.gpus_per_worker, gpus.visible())
        except ValueError as exc:
            p.error(str(exc))
    settings.print_config(a, o, every)
    return o


def split_text(o: SimulationOptions) -> str:
    """The split as the run's settings record it (``data_split``): scheme, its parameter, devices."""
    scheme = {"dirichlet": f"dirichlet alpha={o.alpha:g}",
              "classes": f"classes {o.classes_per_device} per device"}.get(o.split, o.split)
    limit = f", at most {o.limit} examples each" if o.limit else ""
    return f"{scheme} over {o.devices} devices{limit}"


def main(argv: list[str] | None = None) -> int:
    o = parse_args(argv)
    tensorflow_env.lean()
    from fedhub.split import DatasetError, split_to_devices

    run, federation = o.run, o.run.federation
    started = time.monotonic()
    root = o.root or Path(tempfile.mkdtemp(prefix="fedhub-simulate-"))
    try:
        split_to_devices(root / "devices", o.devices, scheme=o.split, seed=federation.seed, alpha=o.alpha,
                         classes_per_device=o.classes_per_device, data_dir=run.data_dir, limit=o.limit,
                         progress=False, memmap=True, dataset=run.dataset, holdout=o.holdout)
        split_s = time.monotonic() - started
        bars = RoundBars(enabled=not o.quiet)
        # the run's settings as simulate()'s keywords: the same names (fedhub.settings)
        shared = ({s.path.split(".")[0] for s in _settings()} - {f.name for f in fields(SimulationOptions)}
                  - {"model"})
        kwargs = {name: value for name, value in settings.values_of(run).items() if name in shared}
        history = simulate(
            run.model, root / "devices", workers=o.workers, backend=o.backend, ray_address=o.ray_address,
            cpus_per_worker=o.cpus_per_worker, gpus_per_worker=o.gpus_per_worker, root=root,
            timeout=o.timeout, on_round=bars.round_done, on_progress=bars.progress, dropout=o.dropout,
            slow_devices=o.slow_devices, slowdown=o.slowdown, relay=o.relay, data_split=split_text(o),
            **kwargs)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (RuntimeError, TimeoutError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if o.root is None:
            shutil.rmtree(root, ignore_errors=True)
    if o.history:
        o.history.write_text(json.dumps(list(history)))
    stats = history.stats
    nodes = sorted({task["node"] for task in stats["tasks"]})
    compression = federation.training.compression
    print(json.dumps({
        "rounds": len(history), "final_accuracy": history[-1]["test_accuracy"] if history else None,
        "accuracy": [entry["test_accuracy"] for entry in history],
        "wall_s": stats["wall_s"], "first_round_s": stats["first_round_s"],
        "round_s": stats["round_s"], "split_s": round(split_s, 3), "peak_rss_mb": stats["peak_rss_mb"],
        "bytes_up": stats["bytes_up"], "bytes_down": stats["bytes_down"], "devices": o.devices,
        "compression": compression, "compress_downlink": federation.compress_downlink,
        "fraction": federation.fraction, "workers": stats["workers"], "backend": o.backend,
        "mode": federation.mode, "framework": run.framework, "dataset": run.dataset, "model": run.model,
        "nodes": len(nodes), "restarts": stats["restarts"], "failed_steps": stats["failures"],
        "gpus_per_worker": o.gpus_per_worker, "worker_gpus": stats.get("worker_gpus"),
        "epsilon": (history[-1].get("privacy") or {}).get("epsilon") if history else None,
        **efficiency_summary(history),
    }), flush=True)
    return 0


def efficiency_summary(history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What the summary says of the efficiency (:mod:`fedhub.efficiency`): each round's, the
    steady rounds' median (after the first, which carries the start-up) and the first round's."""
    from fedhub import efficiency  # imports no framework

    figures = [e["efficiency"] for e in history if e.get("efficiency")]
    if not figures:
        return {}
    ratios = [round(f["ratio"], 4) for f in figures]
    return {"efficiency": ratios, "first_round_efficiency": ratios[0],
            "steady_efficiency": efficiency.steady(ratios),
            "test_s": [None if f.get("test_s") is None else round(f["test_s"], 4) for f in figures]}


class _CallableModule(types.ModuleType):
    """``import fedhub.simulate`` (this command's module) binds the name ``fedhub.simulate``
    to the module, over the function of the same name: calling it still runs a simulation."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return simulate(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())  # TensorFlow's log settings: ``import fedhub`` made them
