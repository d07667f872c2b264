"""Shared fixtures: the data folder, free ports, and real server/device processes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from utils.demo import free_port

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = Path(os.environ.get("FEDHUB_DATA_DIR") or ROOT.parent / "shared/data/fashion-mnist")


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not (DATA_DIR / "train-labels-idx1-ubyte.gz").exists():
        pytest.fail(f"Fashion-MNIST not found in {DATA_DIR}; set FEDHUB_DATA_DIR")
    return DATA_DIR


@pytest.fixture(scope="session")
def fashion(data_dir):
    """The whole of Fashion-MNIST, loaded once: ((x_train, y_train), (x_test, y_test))."""
    from utils.format_dataset import load_fashion_mnist

    return load_fashion_mnist(data_dir)




class ServerProcess:
    """A real ``server.py`` on loopback, with its log kept for failure messages."""

    def __init__(self, tmp: Path, data_dir: Path, *args: str, port: int | None = None,
                 env: dict[str, str] | None = None, verify: bool | str = True) -> None:
        self.port = port or free_port()
        self.verify = verify
        scheme = "https" if "--certfile" in args else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.state_dir = tmp / "server_training"
        self.eval_dir = tmp / "eval"
        self.log_path = tmp / f"server-{self.port}.log"
        self.admin_token = "admin-test-token"
        self.enroll_secret = "enroll-test-secret"
        self.args = args
        self.data_dir = data_dir
        self.env = {**os.environ, "FEDHUB_ADMIN_TOKEN": self.admin_token,
                    "FEDHUB_ENROLL_SECRET": self.enroll_secret, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> ServerProcess:
        cmd = [sys.executable, str(ROOT / "server.py"), str(self.port),
               "--state-dir", str(self.state_dir), "--eval-dir", str(self.eval_dir),
               "--data-dir", str(self.data_dir), *self.args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                         env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"server exited {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(f"{self.url}/health", timeout=1, verify=self.verify).ok:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server did not start:\n{self.log()}")

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:]

    def admin(self, method: str, path: str, **kw) -> requests.Response:
        return requests.request(method, self.url + path, timeout=30, verify=self.verify,
                                headers={"Authorization": f"Bearer {self.admin_token}"}, **kw)

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(self.url + path, timeout=30, verify=self.verify, **kw)

    def kill(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


def wait_until(predicate, timeout: float, what: str, interval: float = 0.5):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


@pytest.fixture
def server_factory(tmp_path, data_dir):
    servers: list[ServerProcess] = []

    def make(*args: str, **kw) -> ServerProcess:
        s = ServerProcess(tmp_path, data_dir, *args, **kw)
        servers.append(s)
        return s

    yield make
    for s in servers:
        s.stop()


@pytest.fixture
def split_devices(tmp_path, data_dir):
    """``split_devices(n, limit)``: real Fashion-MNIST shares in device folders, via the real CLI."""

    def make(n: int, limit: int = 300) -> Path:
        root = tmp_path / "devices"
        out = subprocess.run(
            [sys.executable, "-m", "utils.format_dataset", "--devices", str(n), "--limit", str(limit),
             "--data-dir", str(data_dir), "--out", str(root), "--quiet"],
            cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        return root

    return make


def launch_devices(server: ServerProcess, root: Path, names, *extra: str):
    """Real device processes against ``server``, their output in ``root/../logs/NAME.log``."""
    from device.launcher import launch

    return launch(server.url, names, devices_root=root, env={"FEDHUB_ENROLL_SECRET": server.enroll_secret},
                  extra_args=["--poll-wait", "2", "--retry-for", "120", *extra], log_dir=root.parent / "logs")
