"""Start and stop N local devices, for demos and simulations.

``python -m fedhub.device.launcher --server http://127.0.0.1:4000 --devices 3 [--state-dir DIR]``:
one process each.
``python -m fedhub.device.launcher --devices 1000 --workers 2``: 1,000 virtual devices hosted by a
pool of 2 worker processes (:mod:`fedhub.device.pool`), for many devices on one machine.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path

from fedhub import state_dir as state
from fedhub import tensorflow_env
from fedhub.checkout import ROOT
from fedhub.device.client import server_url
from fedhub.options.parser import Parser

DEVICE_COMMAND = [sys.executable, "-m", "fedhub.device.main"]  # device/device.py's main


def launch(server: str, names: Iterable[str], *, devices_root: Path | None = None,
           state_dir: Path | None = None, extra_args: Sequence[str] = (),
           env: dict[str, str] | None = None, log_dir: Path | None = None) -> list[subprocess.Popen]:
    """Start one ``device/device.py`` process per name; output goes to ``log_dir`` or is inherited.

    The devices run in the checkout, so folders are passed on as absolute paths."""
    procs = []
    for name in names:
        cmd = [*DEVICE_COMMAND, "--server", server, "--name", name, *extra_args]
        if state_dir is not None:
            cmd += ["--state-dir", str(Path(state_dir).absolute())]
        if devices_root is not None:
            cmd += ["--devices-root", str(Path(devices_root).absolute())]
        out = None
        if log_dir is not None:
            log_dir.mkdir(parents=True, exist_ok=True)
            out = open(log_dir / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        procs.append(subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT if out else None,
                                      env={**os.environ, **(env or {})}, cwd=ROOT))
        if out is not None:
            out.close()
    return procs


def stop(procs: Iterable[subprocess.Popen], timeout: float = 20.0) -> None:
    """Ask each device to leave (SIGINT, like Ctrl-C), then kill what is still running."""
    procs = list(procs)
    for p in procs:
        if p.poll() is None:
            p.send_signal(signal.SIGINT)
    deadline = time.monotonic() + timeout
    for p in procs:
        try:
            p.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python -m fedhub.device.launcher", description=__doc__)
    p.add_argument("--server", default="http://127.0.0.1:4000",
                   help="server address: http(s)://host:port, or host:port for http")
    p.add_argument("--devices", type=int, default=3, help="how many devices (device1..deviceN)")
    p.add_argument("--prefix", default="device")
    state.add_option(p)
    p.add_argument("--devices-root", type=Path, default=None,
                   help="the devices' folders (default: the state directory's devices/)")
    p.add_argument("--auto-activate", action="store_true")
    p.add_argument("--workers", type=int, default=None,
                   help="host the devices on a pool of this many worker processes (virtual devices: one "
                        "model per worker, data memory-mapped; see fedhub/device/pool.py) instead of one "
                        "process per device")
    p.add_argument("--model", default="basic", choices=["basic", "cnn", "server"],
                   help="with --workers: FedHub's network, or the server's own model (downloaded)")
    p.add_argument("--keepalive", type=float, default=20.0,
                   help="with --workers: seconds between an idle device's task requests; keep it well "
                        "under the server's --device-timeout")
    a = p.parse_args(argv)
    tensorflow_env.lean()
    if a.devices < 1:
        p.error("--devices must be at least 1")
    if a.workers is not None and a.workers < 1:
        p.error("--workers must be at least 1")
    if a.keepalive <= 0:
        p.error("--keepalive must be positive")
    try:
        a.server = server_url(a.server)
    except ValueError as exc:
        p.error(f"--server: {exc}")
    layout = state.resolve(a.state_dir)
    a.devices_root = a.devices_root or layout.devices_root
    names = [f"{a.prefix}{i}" for i in range(1, a.devices + 1)]
    if a.workers is not None:
        return _run_pool(a, layout, names)
    procs = launch(a.server, names, state_dir=layout.server_dir, devices_root=a.devices_root,
                   extra_args=["--auto-activate"] if a.auto_activate else [])
    try:
        codes = [proc.wait() for proc in procs]
    except KeyboardInterrupt:
        stop(procs)
        return 0
    return max(codes)


def _interrupt(signum: int, frame: object) -> None:
    raise KeyboardInterrupt


def enroll_secret(layout: state.StateDir) -> str | None:
    """``$FEDHUB_ENROLL_SECRET``, else the local server's ``enroll.secret`` in ``layout``."""
    from fedhub.engine import auth

    return os.environ.get("FEDHUB_ENROLL_SECRET") or auth.read_secret(layout.enroll_secret_file)


def _run_pool(a: argparse.Namespace, layout: state.StateDir, names: list[str]) -> int:
    from .pool import DevicePool

    secret = enroll_secret(layout)
    pool = DevicePool(a.server, names, a.devices_root, workers=a.workers, model=a.model, enroll_secret=secret,
                      auto_activate=a.auto_activate, keepalive=a.keepalive)
    print(f"{len(names)} devices on {min(a.workers, len(names))} workers; logs in {pool.log_dir}", flush=True)
    signal.signal(signal.SIGTERM, _interrupt)
    pool.start()
    try:
        pool.wait()
    except KeyboardInterrupt:
        pool.stop()
        return 0
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        pool.stop()
        return 1
    pool.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
