"""The README's multi-machine form from the command line: a Ray cluster started the usual way
(``ray start --head``, here on loopback), and ``python -m fedhub.simulate --backend ray
--ray-address HOST:PORT`` joining it. The cluster is stopped at the end, and the test checks
that none of its processes is left.

Ray is an optional extra (``pip install -e ".[ray]"``; ``make test`` installs it)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from fedhub.server_process import free_port

from .conftest import ROOT, wait_until

pytestmark = pytest.mark.slow

RAY = Path(sys.executable).with_name("ray")
if not RAY.exists():  # a skip outside CI only: `make test` installs the extra
    if os.environ.get("CI"):
        raise RuntimeError(f"Ray's command {RAY} is missing: pip install -e '.[ray]'")
    pytest.skip("Ray is not installed (pip install -e \".[ray]\")", allow_module_level=True)


def processes_mentioning(text: str) -> list[int]:
    """The live processes whose command line holds ``text`` (this cluster's own folder)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if text in cmdline:
            found.append(int(entry.name))
    return found


@pytest.fixture
def ray_head(tmp_path) -> Iterator[tuple[str, Path]]:
    """``ray start --head --block`` on 127.0.0.1: its address and its temporary folder. Ray keeps
    unix sockets there, whose paths must stay short, hence a folder of its own in /tmp. Stopped
    with SIGTERM to the blocking command (which shuts down the processes it started), never with
    ``ray stop``, which would stop every Ray on the machine."""
    port = free_port()
    temp = Path(tempfile.mkdtemp(prefix="fhray-", dir="/tmp"))
    log = open(tmp_path / "ray-head.log", "wb")  # noqa: SIM115 (closed below)
    head = subprocess.Popen(
        [str(RAY), "start", "--head", "--block", "--node-ip-address", "127.0.0.1", "--port", str(port),
         "--num-cpus", "2", "--include-dashboard", "false", "--object-store-memory", str(80 * 2**20),
         "--temp-dir", str(temp), "--disable-usage-stats"],
        stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
    try:
        def started() -> bool:
            assert head.poll() is None, (tmp_path / "ray-head.log").read_text(errors="replace")[-3000:]
            return (temp / "ray_current_cluster").exists()

        wait_until(started, 120, "the Ray head to start", interval=0.5)
        yield f"127.0.0.1:{port}", temp
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(90)
        except subprocess.TimeoutExpired:
            head.kill()
            head.wait()
        log.close()
        try:
            wait_until(lambda: not processes_mentioning(str(temp)), 60, "the cluster's processes to end")
        finally:
            for pid in processes_mentioning(str(temp)):  # only this cluster's, by their folder
                os.kill(pid, signal.SIGKILL)
            shutil.rmtree(temp, ignore_errors=True)


def test_simulate_joins_a_ray_cluster_started_with_ray_start(tmp_path, data_dir, ray_head):
    address, temp = ray_head
    history_path = tmp_path / "history.json"
    out = subprocess.run(
        [sys.executable, "-m", "fedhub.simulate", "--backend", "ray", "--ray-address", address,
         "--devices", "4", "--fraction", "1", "--rounds", "2", "--workers", "2", "--cpus-per-worker", "1",
         "--gpus-per-worker", "0", "--limit", "100", "--test-limit", "300", "--data-dir", str(data_dir),
         "--root", str(tmp_path / "sim"), "--history", str(history_path), "--quiet", "--timeout", "400"],
        cwd=ROOT, capture_output=True, text=True, timeout=500)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert (summary["backend"], summary["workers"], summary["rounds"]) == ("ray", 2, 2), summary
    history = json.loads(history_path.read_text())
    names = [f"device{i}" for i in range(1, 5)]
    for entry in history:
        assert sorted(entry["devices"]) == names and entry["num_updates"] == 4
        assert entry["num_examples"] == 400
    # 400 images, two rounds: well above chance (0.1) on the 300 test images
    assert history[-1]["test_accuracy"] > 0.3, [e["test_accuracy"] for e in history]
    # The actors ran on this cluster: the head's own session holds their Ray worker logs, and
    # each FedHub worker wrote its log under --root.
    assert list(temp.glob("session_*/logs/worker-*")), "no Ray worker ran on the started cluster"
    for k in (0, 1):
        assert "round 2: loss" in (tmp_path / "sim" / "logs" / f"worker-{k}.log").read_text()
