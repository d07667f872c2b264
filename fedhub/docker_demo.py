"""The demo behind ``make docker-demo``: the compose federation, watched from the host.

Starts docker-compose.yml (the server, three devices and the dashboard, from the images
``make docker`` built) under a project name of its own, so that a federation of yours is
left alone; prints each round's global test accuracy from the server's ``/api/history`` as
``make demo`` does; and stops the containers at the end, keeping their volumes unless
``--remove-volumes``. Each run starts afresh unless ``--resume``. ``--framework torch`` runs
the PyTorch federation on CIFAR-10 instead (docker-compose.torch.yml over the default file, the
images ``FEDHUB_FRAMEWORK=torch make docker`` built). Standard library only: the host needs
Docker and Python, not FedHub's virtualenv.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import secrets
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

from fedhub.checkout import ROOT
from fedhub.engine.plural import plural
from fedhub.options.parser import Parser
from fedhub.round_report import round_line

COMPOSE_FILE = ROOT / "docker-compose.yml"
IMAGES = ("fedhub-server", "fedhub-device", "fedhub-dashboard")
DEVICES = ("device1", "device2", "device3")


@dataclass(frozen=True)
class Federation:
    """What the demo runs for one framework: compose files, images and the data set it needs."""

    compose_files: tuple[Path, ...]
    images: tuple[str, ...]
    dataset: str
    # The data set's test file, in FEDHUB_DATA_DIR or in the one folder below it that may hold it.
    test_file: str
    folder: str


FEDERATIONS = {
    "keras": Federation((COMPOSE_FILE,), IMAGES, "Fashion-MNIST", "t10k-images-idx3-ubyte.gz",
                        "the folder of the four official .gz files"),
    "torch": Federation((COMPOSE_FILE, ROOT / "docker-compose.torch.yml"),
                        ("fedhub-server:torch", "fedhub-device:torch", "fedhub-dashboard"), "CIFAR-10",
                        "cifar-10-batches-py/test_batch", "the folder holding cifar-10-batches-py"),
}


class DemoError(RuntimeError):
    """The demo cannot go on; the message says why."""


def compose_command() -> list[str]:
    """``docker compose`` where the v2 plugin is installed, else ``docker-compose`` (v1, as
    Debian ships it)."""
    if shutil.which("docker") and subprocess.run(
            ["docker", "compose", "version"], capture_output=True, check=False).returncode == 0:
        return ["docker", "compose"]
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    raise DemoError("neither `docker compose` nor `docker-compose` is installed")


class Compose:
    """docker-compose.yml under one project name, with the environment it interpolates."""

    def __init__(self, project: str, env: dict[str, str], files: tuple[Path, ...] = (COMPOSE_FILE,)) -> None:
        self.project = project
        self.env = env
        self.base = [*compose_command(), "--project-name", project,
                     *(arg for file in files for arg in ("--file", str(file)))]

    def run(self, *args: str, capture: bool = False) -> str:
        proc = subprocess.run([*self.base, *args], env=self.env, cwd=ROOT, text=True, check=False,
                              stdout=subprocess.PIPE if capture else None,
                              stderr=subprocess.STDOUT if capture else None)
        if proc.returncode != 0:
            detail = f":\n{proc.stdout.strip()}" if capture and proc.stdout else ""
            raise DemoError(f"`{' '.join(self.base[:2])} {' '.join(args)}` failed "
                            f"(exit {proc.returncode}){detail}")
        return proc.stdout or ""

    def url(self, service: str, port: int) -> str:
        """The host address a service's published port got (``127.0.0.1:PORT``)."""
        out = self.run("port", service, str(port), capture=True)
        found = re.findall(r"^(?:0\.0\.0\.0|127\.0\.0\.1):(\d+)$", out, flags=re.MULTILINE)
        if not found:
            raise DemoError(f"{service} has no published port {port} (not running?)")
        return f"http://127.0.0.1:{found[-1]}"

    def states(self) -> dict[str, str]:
        """Each service's container state (running, restarting, exited, ...)."""
        ids = subprocess.run(
            ["docker", "ps", "--all", "--quiet", "--filter",
             f"label=com.docker.compose.project={self.project}"],
            capture_output=True, text=True, check=False).stdout.split()
        if not ids:
            return {}
        out = subprocess.run(
            ["docker", "inspect", "--format",
             '{{index .Config.Labels "com.docker.compose.service"}} {{.State.Status}}', *ids],
            capture_output=True, text=True, check=False).stdout
        return dict(line.split(" ", 1) for line in out.splitlines() if " " in line)

    def logs(self, service: str, lines: int = 30) -> str:
        try:
            return self.run("logs", "--no-color", "--tail", str(lines), service, capture=True)
        except DemoError as exc:
            return str(exc)


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.load(resp)


def wait_for_server(url: str, compose: Compose, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if get_json(f"{url}/health").get("ok"):
                return
        except (OSError, ValueError):  # refused, reset, not yet JSON: still starting
            pass
        if compose.states().get("server") == "exited":
            raise DemoError(f"the server exited:\n{compose.logs('server')}")
        time.sleep(1.0)
    raise DemoError(f"the server did not answer at {url} within {timeout:.0f}s:\n{compose.logs('server')}")


def watch(rounds: int, compose: Compose, timeout: float, unreachable_for: float) -> float:
    """Print each new round until ``rounds`` are complete; returns the last accuracy.

    The server may restart on the way (``docker compose restart server``), and then comes
    back on another host port unless one was fixed, while its old port may by then be any
    other program's: the port is looked up before every poll, and the demo only fails when
    the server stays unreachable for ``unreachable_for`` seconds.
    """
    seen = 0
    started = last_answer = time.monotonic()
    deadline = started + timeout
    while time.monotonic() < deadline:
        try:
            history = get_json(f"{compose.url('server', 4000)}/api/history")["rounds"]
            last_answer = time.monotonic()
        except (OSError, ValueError, KeyError, DemoError):  # DemoError: not running, no port yet
            if time.monotonic() - last_answer > unreachable_for:
                raise DemoError(f"the server has not answered for {unreachable_for:.0f}s:\n"
                                f"{compose.logs('server')}") from None
            time.sleep(1.0)
            continue
        for row in history[seen:]:
            print(round_line(row, time.monotonic() - started), flush=True)
        seen = len(history)
        if seen >= rounds:
            return history[-1]["test_accuracy"]
        states = compose.states()
        if all(states.get(name) == "exited" for name in DEVICES):
            logs = "\n".join(compose.logs(name) for name in DEVICES)
            raise DemoError(f"every device exited after {seen} of {plural(rounds, 'round')}:\n{logs}")
        time.sleep(1.0)
    raise DemoError(f"the run did not finish within {timeout:.0f}s")


def _environment(a: argparse.Namespace, federation: Federation) -> dict[str, str]:
    """What docker-compose.yml interpolates. Secrets not set are made for this run only."""
    data_dir = a.data_dir or os.environ.get("FEDHUB_DATA_DIR", "")
    test_file = Path(federation.test_file)
    if not data_dir or not any((Path(data_dir) / f).is_file() for f in (test_file, test_file.name)):
        raise DemoError(f"no {federation.dataset} in {data_dir or '(unset)'}: give --data-dir or "
                        f"FEDHUB_DATA_DIR, {federation.folder}")
    env = {**os.environ,
           "FEDHUB_DATA_DIR": str(Path(data_dir).resolve()),
           "FEDHUB_ROUNDS": str(a.rounds),
           "FEDHUB_PORT": str(a.port or ""),  # empty: Docker picks a free host port
           "FEDHUB_DASHBOARD_PORT": str(a.dashboard_port or ""),
           "FEDHUB_SPLIT_ARGS": f"--limit {a.limit}" if a.limit else ""}
    for name in ("FEDHUB_ADMIN_TOKEN", "FEDHUB_ENROLL_SECRET"):
        env[name] = os.environ.get(name) or secrets.token_urlsafe(32)
    return env


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    p = Parser(prog="python3 -m fedhub.docker_demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--framework", choices=sorted(FEDERATIONS), default="keras",
                   help="keras: Fashion-MNIST; torch: PyTorch on CIFAR-10 (docker-compose.torch.yml)")
    p.add_argument("--rounds", type=_positive, default=3)
    p.add_argument("--limit", type=_positive, default=None, help="examples per device (default: all)")
    p.add_argument("--data-dir", default=None,
                   help="the data set's folder: Fashion-MNIST, or CIFAR-10 with --framework torch "
                        "(else $FEDHUB_DATA_DIR)")
    p.add_argument("--project", default="fedhub-demo", help="compose project name")
    p.add_argument("--port", type=_positive, default=None,
                   help="host port for the server (default: any free one)")
    p.add_argument("--dashboard-port", type=_positive, default=None,
                   help="host port for the dashboard (default: any free one)")
    p.add_argument("--resume", action="store_true", help="keep the project's state from before")
    p.add_argument("--remove-volumes", action="store_true", help="forget the state at the end")
    p.add_argument("--timeout", type=float, default=900.0, help="give up after this many seconds")
    a = p.parse_args(argv)

    try:
        federation = FEDERATIONS[a.framework]
        env = _environment(a, federation)
        compose = Compose(a.project, env, federation.compose_files)
        build = "make docker" if a.framework == "keras" else f"FEDHUB_FRAMEWORK={a.framework} make docker"
        for image in federation.images:
            if subprocess.run(["docker", "image", "inspect", image], capture_output=True,
                              check=False).returncode != 0:
                raise DemoError(f"no image {image}: run `{build}` first")
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    try:
        if not a.resume:
            compose.run("down", "--volumes", "--remove-orphans", capture=True)
        print(f"1/3 starting the server, {len(DEVICES)} devices and the dashboard "
              f"(compose project {a.project})", flush=True)
        compose.run("up", "--detach", "--no-build", capture=True)
        url = compose.url("server", 4000)
        print(f"2/3 waiting for the server at {url} (dashboard: {compose.url('dashboard', 8501)})",
              flush=True)
        wait_for_server(url, compose, timeout=300.0)
        print(f"3/3 each device splits off its share of {federation.dataset} and trains; "
              f"{plural(a.rounds, 'round')}", flush=True)
        accuracy = watch(a.rounds, compose, a.timeout, unreachable_for=300.0)
        print(f"done: {plural(a.rounds, 'round')}, final global test accuracy {accuracy:.4f}", flush=True)
        return 0
    except DemoError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", flush=True)
        return 130
    finally:
        try:
            compose.run("down", *(["--volumes"] if a.remove_volumes else []), capture=True)
            if not a.remove_volumes:
                print(f"stopped; the state is kept in project {a.project}'s volumes "
                      "(--resume goes on from it, --remove-volumes forgets it)", flush=True)
        except DemoError as exc:
            print(f"error: {exc}", file=sys.stderr)


if __name__ == "__main__":
    raise SystemExit(main())
