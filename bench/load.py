"""The server under load: 200 lightweight devices x 5 rounds on loopback, as in tests/test_load.py.

    python bench/load.py [--clients 200] [--rounds 5] [--threads 4 32] [--data-dir DIR]

For each server thread count, starts a real ``server.py`` (the default basic model), lets
the swarm of device/swarm.py run freely (each device polls, downloads the global model and
uploads random weights of its size, no TensorFlow) and prints a Markdown table: uploads per
second, upload and download latency (p50/p99, as the devices see them), and how far the
server's peak resident memory rose against 200 x the model's float32 bytes.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import requests

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from device.swarm import Swarm  # noqa: E402
from tests.conftest import DATA_DIR, ServerProcess  # noqa: E402
from tests.test_load import load_server_args, warm_up_evaluation  # noqa: E402


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(clients: int, rounds: int, threads: int, poll_wait: float, data_dir: Path) -> dict:
    """One server and one swarm; the swarm's summary plus the server's own count of updates."""
    with tempfile.TemporaryDirectory(prefix="fedhub-load-") as tmp:
        server = ServerProcess(Path(tmp), data_dir, *load_server_args(threads, clients, rounds)).start()
        try:
            warm_up_evaluation(server.url, server.admin_token)
            server_cpu, swarm_cpu = cpu_seconds(server.proc.pid), time.process_time()
            result = Swarm(server.url, clients, rounds, enroll_secret=server.enroll_secret,
                           poll_wait=poll_wait, time_limit=600, server_pid=server.proc.pid).run()
            server_cpu, swarm_cpu = cpu_seconds(server.proc.pid) - server_cpu, time.process_time() - swarm_cpu
            history = requests.get(f"{server.url}/api/history", timeout=30).json()["rounds"]
        finally:
            server.stop()
    summary = result.summary()
    summary["model_bytes"] = sum(math.prod(shape) * np.dtype(dtype).itemsize
                                 for shape, dtype in result.spec.values())
    summary["counted"] = sum(r["num_updates"] for r in history)
    summary["first_errors"] = result.errors[:3]
    summary["server_cpu"], summary["swarm_cpu"] = server_cpu, swarm_cpu
    return summary


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=200)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--threads", type=int, nargs="+", default=[4, 32], help="server worker threads to try")
    p.add_argument("--poll-wait", type=float, default=1.0, help="seconds per device long poll")
    p.add_argument("--data-dir", type=Path, default=DATA_DIR)
    a = p.parse_args()

    rows = [(t, run(a.clients, a.rounds, t, a.poll_wait, a.data_dir)) for t in a.threads]
    model_bytes = rows[0][1]["model_bytes"]
    budget = a.clients * model_bytes
    print(f"### {a.clients} devices x {a.rounds} rounds on loopback (basic model, {model_bytes:,} bytes "
          f"of float32 parameters; {a.clients} x model = {budget / 2**20:.1f} MiB)\n")
    print("| server threads | uploads/s (whole run) | uploads/s (within a round) | upload p50 / p99 (s) "
          "| download p50 / p99 (s) | server peak RSS growth | vs clients x model | updates counted "
          "| 5xx | errors | CPU s: server / swarm |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for threads, s in rows:
        print(f"| {threads} | {s['uploads_per_second']:.1f} | {s['round_uploads_per_second']:.1f} "
              f"| {s['upload_p50']:.2f} / {s['upload_p99']:.2f} | {s['download_p50']:.2f} / "
              f"{s['download_p99']:.2f} | {s['server_peak_growth'] / 2**20:.1f} MiB "
              f"| {s['server_peak_growth'] / budget:.2f} | {s['counted']} of {s['accepted_uploads']} "
              f"| {s['server_5xx']} | {s['errors']} | {s['server_cpu']:.1f} / {s['swarm_cpu']:.1f} |")
    for threads, s in rows:
        for message in s["first_errors"]:
            print(f"\n{threads} threads: {message}", file=sys.stderr)
    return 0 if all(s["errors"] == 0 and s["server_5xx"] == 0 for _, s in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
