"""The demo behind ``make demo``: a real federated run on this machine.

Splits Fashion-MNIST over N device folders, starts the server and N device
processes on loopback, and prints each round's global test accuracy as it
completes. ``python -m fedhub.demo --help`` for the knobs.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

import requests

from fedhub import tensorflow_env
from fedhub.checkout import ROOT
from fedhub.engine.plural import plural
from fedhub.options.parser import Parser
from fedhub.round_report import round_line
from fedhub.server_process import free_port


def wait_for_server(url: str, proc: subprocess.Popen, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            if requests.get(f"{url}/health", timeout=2).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the server did not answer at {url} within {timeout:.0f}s")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The demo's options, checked (one ``error: ...`` line and exit 2 for a bad one)."""
    p = Parser(prog="python -m fedhub.demo", description=__doc__,
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--devices", type=int, default=3)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--split", default="iid", choices=["iid", "dirichlet", "classes"])
    p.add_argument("--model", default="basic", choices=["basic", "cnn"])
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--limit", type=int, default=None, help="examples per device (default: all)")
    p.add_argument("--data-dir", default=None, help="Fashion-MNIST folder (else $FEDHUB_DATA_DIR)")
    p.add_argument("--port", type=int, default=0, help="server port (0: any free port)")
    p.add_argument("--state-dir", type=Path, default=ROOT / "server_training" / "demo",
                   help="the demo's own state directory: server state, logs and its devices/")
    p.add_argument("--devices-root", type=Path, default=None,
                   help="where the demo splits the data (default: the state directory's devices/, "
                        "so a split of your own in devices/ is never touched)")
    p.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    a = p.parse_args(argv)
    if not 1 <= a.devices <= 100 or a.rounds < 1 or a.epochs < 1 or not a.timeout > 0:
        p.error("--devices must be from 1 to 100, --rounds and --epochs at least 1, --timeout positive")
    if a.limit is not None and a.limit < 1:
        p.error("--limit must be at least 1")
    a.devices_root = a.devices_root or a.state_dir / "devices"
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    tensorflow_env.lean()

    from fedhub.device.launcher import launch, stop
    from fedhub.split import DatasetError, split_to_devices

    print(f"1/3 splitting Fashion-MNIST over {plural(a.devices, 'device')} ({a.split})", flush=True)
    try:
        summary = split_to_devices(a.devices_root, a.devices, scheme=a.split, data_dir=a.data_dir,
                                   limit=a.limit)
    except DatasetError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    names = list(summary)

    port = a.port or free_port()
    url = f"http://127.0.0.1:{port}"
    log_dir = a.state_dir / "logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "fedhub.serve", "--port", str(port), "--rounds", str(a.rounds),
           "--min-devices", str(a.devices), "--auto-activate", "--start", "--reset",
           "--model", a.model, "--epochs", str(a.epochs), "--state-dir", str(a.state_dir),
           "--eval-dir", str(ROOT / "eval")]
    if a.data_dir:
        cmd += ["--data-dir", a.data_dir]
    print(f"2/3 starting the server on {url} (log: {log_dir / 'server.log'})", flush=True)
    with open(log_dir / "server.log", "ab") as server_log:
        server = subprocess.Popen(cmd, stdout=server_log, stderr=subprocess.STDOUT, cwd=ROOT)
    devices: list[subprocess.Popen] = []
    try:
        wait_for_server(url, server)
        print(f"3/3 starting {plural(len(names), 'device')}; each trains on its own folder", flush=True)
        devices = launch(url, names, devices_root=a.devices_root,
                         extra_args=["--state-dir", str(a.state_dir)])
        return _watch(url, a.rounds, server, devices, a.timeout)
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        return 130
    finally:
        stop(devices)
        stop([server])


def _watch(url: str, rounds: int, server: subprocess.Popen, devices: list[subprocess.Popen],
           timeout: float) -> int:
    seen = 0
    deadline = time.monotonic() + timeout
    started = time.monotonic()
    history: list[dict] = []
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server exited with code {server.returncode}")
        if all(d.poll() is not None for d in devices) and seen < rounds:
            raise RuntimeError("every device exited before the run finished")
        history = requests.get(f"{url}/api/history", timeout=5).json()["rounds"]
        for r in history[seen:]:
            print(round_line(r, time.monotonic() - started), flush=True)
        seen = len(history)
        if seen >= rounds:
            print(f"done: {plural(rounds, 'round')}, final global test accuracy "
                  f"{history[-1]['test_accuracy']:.4f}; history in eval/history.csv", flush=True)
            return 0
        time.sleep(1.0)
    raise RuntimeError(f"the run did not finish within {timeout:.0f}s")


if __name__ == "__main__":
    raise SystemExit(main())
