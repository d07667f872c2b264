"""A FedHub device: ``python device/device.py 4000 device1`` (or with flags; see ``--help``).

It trains on its own data folder (``devices/device1/data/train.npz``, made by
``python -m fedhub.split``; ``<state-dir>/devices/device1/...`` with a state
directory) and only ever sends weights.
"""

from __future__ import annotations

import argparse
import logging
import os
import pkgutil
import signal
import sys
from pathlib import Path

from fedhub import state_dir as state
from fedhub import tensorflow_env
from fedhub.device.attacks import ATTACKS, describe_attacks, parse_attack
from fedhub.device.client import Client, server_url
from fedhub.device.runner import DeviceRunner
from fedhub.device.trainer import FROM_FOLDER
from fedhub.engine.devices import check_name
from fedhub.engine.errors import InvalidInput
from fedhub.engine.params import ParamError
from fedhub.options.parser import Parser


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = Parser(prog="device/device.py", description="A FedHub training device.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("port_pos", nargs="?", metavar="PORT", help="server port on localhost (original form)")
    p.add_argument("name_pos", nargs="?", metavar="DEVICE", help="device name (original form)")
    p.add_argument("--server", help="server address: http(s)://host:port, or host:port for http")
    p.add_argument("--name", help="device name (its folder under --devices-root)")
    state.add_option(p)
    p.add_argument("--devices-root", type=Path,
                   default=os.environ.get("FEDHUB_DEVICES_ROOT") or None,
                   help="device folders live in DIR/<name> (default: $FEDHUB_DEVICES_ROOT, else the state "
                        "directory's devices/)")
    p.add_argument("--data", type=Path, help="data file (default: <devices-root>/<name>/data/train.npz)")
    p.add_argument("--enroll-secret", help="enrollment secret (else $FEDHUB_ENROLL_SECRET, else the "
                   "local server's enroll.secret in the state directory, read again while refused)")
    p.add_argument("--auto-activate", action="store_true", help="ask to start active")
    p.add_argument("--framework", choices=["keras", "torch"], default=None,
                   help="the framework this device trains with; it must be the server's (default: the "
                        "server's, learnt from GET /api/status before enrolling)")
    p.add_argument("--model-factory", metavar="MODULE:NAME",
                   help="your own network, as the server's --model-factory: a function returning a "
                        "torch nn.Module (--framework torch)")
    p.add_argument("--model", default=None,
                   help="network to build before the server says otherwise (default: the framework's "
                        "first network for the data's images)")
    p.add_argument("--trainer", metavar="MODULE:NAME",
                   help="your own trainer instead of the built-in one: NAME(data_dir) must return "
                        "an object with validate/initialise/train/evaluate (see fedhub/device/trainer.py); "
                        "data_dir is the folder of --data, else <devices-root>/<name>/data")
    p.add_argument("--holdout", type=float, default=0.0, metavar="SHARE",
                   help="hold out this share of the local data for federated evaluation when its folder "
                        "has no held-out file (data/eval.npz, written by python -m fedhub.split)")
    p.add_argument("--stay", action="store_true",
                   help="when a run finishes, save the final model and keep waiting, enrolled, for the "
                        "next run (a Reset or a new run) until stopped (Ctrl-C, SIGTERM), instead of "
                        "leaving the federation")
    p.add_argument("--poll-wait", type=float, default=20.0, help="long-poll seconds")
    p.add_argument("--retry-for", type=float, default=300.0,
                   help="seconds to keep retrying while the server is unreachable")
    p.add_argument("--ca", help="CA bundle to verify the server's certificate")
    p.add_argument("--verbose", action="store_true", help="show Keras' progress bar (Keras runs)")
    p.add_argument("--attack", metavar="KIND", choices=list(ATTACKS),
                   help="attack the federation, to demonstrate robust strategies: "
                        + "; ".join(f"{a['kind']}: {a['summary']}" for a in describe_attacks()))
    p.add_argument("--attack-arg", action="append", default=[], metavar="KEY=VALUE",
                   help="a parameter of the attack, repeatable (e.g. factor=10)")
    p.add_argument("--secagg-dropout", type=float, default=0.0, metavar="P",
                   help="simulate dropouts: the chance of leaving each secure-aggregation round right "
                        "after dealing its key shares")
    a = p.parse_args(argv)
    a.attack_obj = None
    if not 0 <= a.holdout < 1:
        p.error("--holdout must be from 0 to below 1")
    if not 0 <= a.secagg_dropout <= 1:
        p.error("--secagg-dropout must be from 0 to 1")
    if not 0 <= a.poll_wait <= 3600 or not 0 <= a.retry_for <= 30 * 86_400:
        p.error("--poll-wait must be from 0 to 3600 seconds and --retry-for from 0 to 2592000")
    if a.attack_arg and not a.attack:
        p.error("--attack-arg needs --attack KIND")
    if a.attack:
        try:
            a.attack_obj = parse_attack(a.attack, a.attack_arg)
        except ParamError as exc:
            p.error(str(exc))
        if a.trainer and a.trainer != FROM_FOLDER and a.attack_obj.poisons_labels:
            p.error(f"--attack {a.attack} changes the device's own labels, which a custom --trainer "
                    "loads itself; use it with the built-in trainer")
    if a.server and a.port_pos and not a.name_pos and not a.name:
        a.name_pos, a.port_pos = a.port_pos, None
    if a.server is None:
        if a.port_pos is None:
            p.error("give the server: PORT or --server URL")
        if not str(a.port_pos).isdigit():
            p.error(f"PORT must be a number, got {a.port_pos!r}")
        a.server = f"http://127.0.0.1:{a.port_pos}"
    try:
        a.server = server_url(a.server)
    except ValueError as exc:
        p.error(f"--server: {exc}")
    a.name = a.name or a.name_pos
    if not a.name:
        p.error("give the device name: DEVICE or --name")
    try:
        check_name(a.name)
    except InvalidInput as exc:
        p.error(exc.message)
    return a


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    tensorflow_env.lean()
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    from fedhub.device.trainer import ImageTrainer
    from fedhub.split import DatasetError, load_device_data, read_device_holdout, split_holdout

    layout = state.resolve(a.state_dir)
    folder = (a.devices_root or layout.devices_root) / a.name
    if a.trainer:
        try:
            trainer = pkgutil.resolve_name(a.trainer)(a.data.parent if a.data else folder / "data")
        except (ImportError, AttributeError, TypeError, ValueError, OSError) as exc:
            print(f"error: --trainer {a.trainer}: {exc}", file=sys.stderr)
            return 2
        if a.attack_obj is not None:
            trainer.y = a.attack_obj.poison_labels(trainer.y)  # FROM_FOLDER only (see parse_args)
    else:
        data = a.data.parent.parent if a.data else folder
        try:
            x, y = load_device_data(data)
            holdout = read_device_holdout(data)
        except DatasetError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        if holdout is None and a.holdout:
            (x, y), holdout = split_holdout(x, y, a.holdout)
        if a.attack_obj is not None:
            y = a.attack_obj.poison_labels(y)
        trainer = ImageTrainer(x, y, model=a.model, framework=a.framework, model_factory=a.model_factory,
                               verbose=1 if a.verbose else 0, holdout=holdout)
    secret = a.enroll_secret or os.environ.get("FEDHUB_ENROLL_SECRET")
    client = Client(a.server, a.name, verify=a.ca or True, retry_for=a.retry_for)
    runner = DeviceRunner(client, trainer, folder, enroll_secret=secret,
                          secret_file=None if secret else layout.enroll_secret_file,
                          auto_activate=True if a.auto_activate else None, poll_wait=a.poll_wait,
                          attack=a.attack_obj, secagg_dropout=a.secagg_dropout, stay=a.stay)

    def _interrupt(signum, frame):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, _interrupt)
    # Ctrl-C, and the launchers' SIGINT, stop it even when a script started it in the background
    # (a shell without job control starts those with SIGINT ignored, and Python keeps that).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return runner.run()
    except KeyboardInterrupt:
        runner.stopped_by_user()  # says why it goes (finished or interrupted) and tells the server
        return 0


if __name__ == "__main__":
    sys.exit(main())
