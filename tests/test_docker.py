"""The container images and the compose federation, built and run for real.

The images are built with ``make docker`` while decoy secrets and data lie where a careless
build would pick them up, and are then searched, layer history and files, for those and for
the test suite's tokens. ``make docker-demo`` runs the compose federation; half-way, the
server container is restarted and must go on from its last completed round; after the
demo's ``down``, the state in the volumes must still be there. The PyTorch images
(``FEDHUB_FRAMEWORK=torch make docker``) run the CIFAR-10 federation of
docker-compose.torch.yml, with no TensorFlow in them.

Marked ``docker`` (``-m "not docker"`` deselects them). Without a Docker engine they skip,
except in CI (CI=true), where they fail: .ci/run installs and starts Docker's engine.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import subprocess
import tarfile
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import requests

from fedhub.docker_demo import DEVICES, FEDERATIONS, IMAGES, DemoError, compose_command, watch

from .conftest import CIFAR_DIR, DATA_DIR

ROOT = Path(__file__).resolve().parents[1]

# The tokens tests/ uses; no image may contain them.
TEST_SUITE_SECRETS = ("admin-test-token", "enroll-test-secret", "admin-secret")
# Paths no image may hold: data, device folders, server state, secrets, tests, the repository.
FORBIDDEN_PATHS = re.compile(
    r"-ubyte|(^|/)devices/[^/]+/data/|train\.npz$|(^|/)server_training(/|$)|(^|/)eval/history\.csv$"
    r"|(^|/)admin\.token$|(^|/)enroll\.secret$|(^|/)\.env$|^app/tests(/|$)|(^|/)\.git(/|$)"
    r"|^app/docker/wheels(/|$)|(^|/)\.venv(/|$)|^var/lib/fedhub/.")
ROUNDS = 3


def needs_docker(test):
    """Marked ``docker`` and ``slow``, with time to build from an empty Docker cache (minutes:
    the base image, the wheels, TensorFlow)."""
    return pytest.mark.docker(pytest.mark.slow(pytest.mark.timeout(2400)(test)))


def _docker_missing() -> str | None:
    if shutil.which("docker") is None:
        return "the docker command is not installed"
    if subprocess.run(["docker", "info"], capture_output=True, check=False).returncode != 0:
        return "no Docker engine is running"
    try:
        compose_command()
    except DemoError as exc:
        return str(exc)
    return None


def _run(*cmd: str, timeout: float = 600, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env,
                          check=False)
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


class Decoys:
    """Secret-looking and data-looking files planted in the work tree, then removed."""

    def __init__(self) -> None:
        self.values = [secrets.token_urlsafe(24) for _ in range(2)]
        self._created: list[Path] = []

    def plant(self, relative: str, content: bytes) -> None:
        path = ROOT / relative
        if path.exists():  # someone's real file: leave it, but search the images for it too
            if path.suffix in (".token", ".secret"):
                self.values.append(path.read_text().strip())
            return
        top = path
        while not top.parent.exists():
            top = top.parent
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(content)
        self._created.append(top)

    def remove(self) -> None:
        for path in reversed(self._created):
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink(missing_ok=True)


@pytest.fixture(scope="module")
def built() -> Iterator[list[str]]:
    """``make docker`` with decoys in place; yields the decoy secrets."""
    reason = _docker_missing()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"{reason}: CI must run the container tests (.ci/run installs Docker's engine)")
        pytest.skip(reason)
    decoys = Decoys()
    admin, enroll = (v.encode() for v in decoys.values[:2])
    decoys.plant(".env", b"FEDHUB_ADMIN_TOKEN=" + admin + b"\nFEDHUB_ENROLL_SECRET=" + enroll + b"\n")
    decoys.plant("server_training/admin.token", admin)
    decoys.plant("server_training/enroll.secret", enroll)
    decoys.plant("devices/decoy/data/train.npz", b"decoy " + admin)
    decoys.plant("eval/history.csv", b"round,decoy\n")
    # Inside folders the build context admits: .dockerignore must still keep them out.
    decoys.plant("fedhub/engine/decoy.secret", admin)
    decoys.plant("utils/decoy-images-idx3-ubyte.gz", b"decoy " + enroll)
    try:
        _run("make", "docker", timeout=2000)
    finally:
        decoys.remove()
    yield decoys.values


def _contains(stream, needles: list[bytes], chunk: int = 1 << 20) -> bytes | None:
    """The first needle found in a file stream, read in chunks that overlap by a needle's length."""
    overlap = max(len(n) for n in needles) - 1
    tail = b""
    while block := stream.read(chunk):
        window = tail + block
        for needle in needles:
            if needle in window:
                return needle
        tail = window[-overlap:]
    return None


@pytest.mark.parametrize("image", IMAGES)
@needs_docker
def test_images_hold_no_secrets_and_no_data(built: list[str], image: str) -> None:
    _check_image(built, image)


@pytest.mark.parametrize("image", FEDERATIONS["torch"].images[:2])
@needs_docker
def test_pytorch_images_hold_no_secrets_and_no_data(built_torch: list[str], image: str) -> None:
    _check_image(built_torch, image)


def _check_image(decoys: list[str], image: str) -> None:
    """No decoy or test-suite secret in the image's history, config or files; no data, state or
    tests among its files; it runs as the unprivileged user."""
    needles = [v.encode() for v in (*decoys, *TEST_SUITE_SECRETS)]
    history = _run("docker", "history", "--no-trunc", "--format", "{{.CreatedBy}}", image)
    config = _run("docker", "image", "inspect", "--format", "{{json .Config}}", image)
    for needle in needles:
        assert needle.decode() not in history and needle.decode() not in config
    assert "FEDHUB_ADMIN_TOKEN" not in config and "FEDHUB_ENROLL_SECRET" not in config
    assert _run("docker", "image", "inspect", "--format", "{{.Config.User}}", image).strip() == "fedhub"

    container = _run("docker", "create", image).strip()
    names = []
    try:
        export = subprocess.Popen(["docker", "export", container], stdout=subprocess.PIPE)
        with tarfile.open(fileobj=export.stdout, mode="r|") as tar:
            for member in tar:
                names.append(member.name)
                assert not FORBIDDEN_PATHS.search(member.name), f"{image} holds {member.name}"
                if member.isfile():
                    found = _contains(tar.extractfile(member), needles)
                    assert found is None, f"{image}: {member.name} contains {found!r}"
        assert export.wait() == 0
    finally:
        _run("docker", "rm", container)
    assert "app/server.py" in names and "app/fedhub/engine/rounds.py" in names  # the scan saw the image


def _compose(project: str) -> list[str]:
    return [*compose_command(), "--project-name", project, "--file", str(ROOT / "docker-compose.yml")]


def _server_url(project: str, env: dict[str, str]) -> str:
    out = _run(*_compose(project), "port", "server", "4000", env=env)
    return "http://127.0.0.1:" + re.findall(r":(\d+)$", out, flags=re.MULTILINE)[-1]


def _wait_healthy(project: str, env: dict[str, str], timeout: float = 240) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            url = _server_url(project, env)
            if requests.get(f"{url}/health", timeout=2).ok:
                return url
        except (AssertionError, requests.RequestException):
            pass
        time.sleep(0.5)
    raise AssertionError(f"the server did not come back within {timeout:.0f}s")


def _printed_rounds(output: str) -> list[tuple[int, float]]:
    return [(int(n), float(acc)) for n, acc in
            re.findall(r"^== round (\d+): global test accuracy ([\d.]+)", output, flags=re.MULTILINE)]


@needs_docker
def test_docker_demo_resumes_after_a_server_restart_and_after_down_and_up(built: list[str]) -> None:
    project = f"fedhub-test-{secrets.token_hex(3)}"
    env = {**os.environ, "FEDHUB_DATA_DIR": str(DATA_DIR),
           "FEDHUB_ADMIN_TOKEN": secrets.token_urlsafe(24),
           "FEDHUB_ENROLL_SECRET": secrets.token_urlsafe(24)}
    demo = subprocess.Popen(["make", "docker-demo", f"DOCKER_DEMO_ARGS=--project {project}"], cwd=ROOT,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    restart = None
    try:
        for line in demo.stdout:
            lines.append(line)
            match = re.search(r"waiting for the server at (http://\S+)", line)
            if match:
                url = match.group(1)
            if line.startswith("== round 1:") and restart is None:
                before = requests.get(f"{url}/api/history", timeout=10).json()["rounds"]
                assert len(before) < ROUNDS, "the run was over before the server could be restarted"
                _run(*_compose(project), "restart", "server", env=env, timeout=180)
                url = _wait_healthy(project, env)
                # At once, before a new round can complete: the restarted server has every
                # round completed before the restart, from its volume.
                after = requests.get(f"{url}/api/history", timeout=10).json()["rounds"]
                logs = _run(*_compose(project), "logs", "--no-color", "server", env=env)
                restart = before, after, logs
        assert demo.wait(timeout=900) == 0, "".join(lines)
    finally:
        if demo.poll() is None:
            demo.kill()
    output = "".join(lines)
    try:
        assert restart is not None, output
        before, after, logs = restart
        assert after[: len(before)] == before, output
        resumed = [int(n) for n in re.findall(r"resuming after completed round (\d+)", logs)]
        assert resumed and resumed[-1] >= len(before), logs
        rounds = _printed_rounds(output)
        assert [n for n, _ in rounds] == list(range(1, ROUNDS + 1)), output
        assert rounds[-1][1] >= 0.8, output

        # The demo ended with `down`, keeping the volumes: `up` again finds the run finished, keeps
        # it and trains the next one from the initial model with the devices it knows, in fresh
        # processes, so its first round is the first run's first round again. (Its later rounds
        # need not be: the first run's devices went through a server restart in round 2.)
        again = _run("python3", "-m", "fedhub.docker_demo", "--project", project, "--resume", env=env)
        next_rounds = _printed_rounds(again)
        assert [n for n, _ in next_rounds] == list(range(1, ROUNDS + 1)), again
        assert next_rounds[0] == rounds[0] and next_rounds[-1][1] >= 0.8, again
        assert "done: 3 rounds" in again
    finally:
        subprocess.run([*_compose(project), "down", "--volumes"], env=env, cwd=ROOT,
                       capture_output=True, check=False, timeout=300)


@pytest.fixture(scope="module")
def built_torch(built: list[str]) -> list[str]:
    """``FEDHUB_FRAMEWORK=torch make docker``, after the Keras images (the dashboard and the
    base layers are shared); yields the decoy secrets of the first build."""
    _run("make", "docker", env={**os.environ, "FEDHUB_FRAMEWORK": "torch"}, timeout=2000)
    return built


@needs_docker
def test_pytorch_images_run_the_cifar_10_federation_without_tensorflow(built_torch: list[str]) -> None:
    server, device, _ = FEDERATIONS["torch"].images
    for image in (server, device):
        probe = _run("docker", "run", "--rm", "--entrypoint", "python", image, "-c",
                     "import importlib.util as u; print(bool(u.find_spec('torch')), "
                     "bool(u.find_spec('tensorflow')), bool(u.find_spec('keras')))")
        assert probe.split() == ["True", "False", "False"], (image, probe)

    project = f"fedhub-torch-{secrets.token_hex(3)}"
    env = {**os.environ, "FEDHUB_DATA_DIR": str(CIFAR_DIR), "FEDHUB_ADMIN_TOKEN": secrets.token_urlsafe(24),
           "FEDHUB_ENROLL_SECRET": secrets.token_urlsafe(24)}
    try:
        out = subprocess.run(["python3", "-m", "fedhub.docker_demo", "--framework", "torch", "--rounds", "2",
                              "--limit", "3000", "--project", project, "--remove-volumes"],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200, check=False)
        assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
        assert "splits off its share of CIFAR-10" in out.stdout
        rounds = _printed_rounds(out.stdout)
        assert [n for n, _ in rounds] == [1, 2], out.stdout
        assert rounds[-1][1] > 0.2, out.stdout  # ten classes: chance is 0.1
    finally:
        subprocess.run([*_compose(project), "--file", str(ROOT / "docker-compose.torch.yml"), "down",
                        "--volumes"], env=env, cwd=ROOT, capture_output=True, check=False, timeout=300)


@pytest.mark.slow
def test_docker_demo_refuses_bad_input_in_one_line(tmp_path: Path) -> None:
    for args, message in ((["--data-dir", str(tmp_path)], "no Fashion-MNIST in"),
                          (["--framework", "torch", "--data-dir", str(DATA_DIR)], "no CIFAR-10 in"),
                          (["--framework", "jax"], "argument --framework: invalid choice"),
                          (["--rounds", "0"], "must be at least 1")):
        proc = subprocess.run(["python3", "-m", "fedhub.docker_demo", *args], cwd=ROOT, capture_output=True,
                              text=True, timeout=60, check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr


class _History(BaseHTTPRequestHandler):
    """``/api/history`` answering whatever rounds its server holds."""

    def do_GET(self) -> None:
        body = json.dumps({"rounds": self.server.rounds}).encode()  # type: ignore[attr-defined]
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


class _RestartingCompose:
    """A compose project whose server moved to another port after one poll, while its old port
    now answers for another program (another test's server, in CI)."""

    def __init__(self, old: str, new: str) -> None:
        self.urls = iter([old])
        self.new = new

    def url(self, service: str, port: int) -> str:
        return next(self.urls, self.new)

    def states(self) -> dict[str, str]:
        return dict.fromkeys(DEVICES, "running")

    def logs(self, service: str, lines: int = 30) -> str:
        return ""


def test_the_demo_follows_a_restarted_server_to_its_new_port(capsys: pytest.CaptureFixture[str]) -> None:
    row = {"round": 1, "test_accuracy": 0.8, "test_loss": 0.5, "num_updates": 3, "num_examples": 54000}
    servers = []
    for rounds in ([row], [row, {**row, "round": 2}, {**row, "round": 3, "test_accuracy": 0.84}]):
        server = ThreadingHTTPServer(("127.0.0.1", 0), _History)
        server.rounds = rounds  # type: ignore[attr-defined]
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
    old, new = (f"http://127.0.0.1:{s.server_address[1]}" for s in servers)
    try:
        accuracy = watch(3, _RestartingCompose(old, new), timeout=30, unreachable_for=30)
    finally:
        for server in servers:
            server.shutdown()
    assert accuracy == 0.84
    assert [n for n, _ in _printed_rounds(capsys.readouterr().out)] == [1, 2, 3]
