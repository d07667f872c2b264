"""A FedHub server in a child process on loopback: started, waited for, driven and stopped.

The tests and the benchmarks measure the real server from outside, as its users meet it; they
start it here, in one way.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import requests

from fedhub.checkout import ROOT
from fedhub.engine.auth import new_token


def free_port() -> int:
    """A loopback port that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """A real ``server.py`` in a child process on a loopback port, its log kept for failure messages.

    The state and eval folders go under ``tmp``; the admin token and enrollment secret are
    made for it (``admin_token``, ``enroll_secret``) so that the caller can drive the run."""

    def __init__(self, tmp: Path, data_dir: Path, *args: str, port: int | None = None,
                 env: dict[str, str] | None = None, verify: bool | str = True) -> None:
        self.port = port or free_port()
        self.verify = verify
        scheme = "https" if "--certfile" in args else "http"
        self.url = f"{scheme}://127.0.0.1:{self.port}"
        self.state_dir = tmp / "server_training"
        self.eval_dir = tmp / "eval"
        self.log_path = tmp / f"server-{self.port}.log"
        self.admin_token = new_token()  # made for this server, known to its caller
        self.enroll_secret = new_token()
        self.args = args
        self.data_dir = data_dir
        self.env = {**os.environ, "FEDHUB_ADMIN_TOKEN": self.admin_token,
                    "FEDHUB_ENROLL_SECRET": self.enroll_secret, **(env or {})}
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 90.0) -> ServerProcess:
        cmd = [sys.executable, "-m", "fedhub.serve", str(self.port),
               "--state-dir", str(self.state_dir), "--eval-dir", str(self.eval_dir),
               "--data-dir", str(self.data_dir), *self.args]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                                         env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited {self.proc.returncode}:\n{self.log()}")
            try:
                if requests.get(f"{self.url}/health", timeout=1, verify=self.verify).ok:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"server did not start:\n{self.log()}")

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
