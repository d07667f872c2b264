"""The server under load: lightweight devices on loopback, as in tests/test_load.py.

    python bench/load.py [--clients 200] [--rounds 5] [--threads 4 32] [--data-dir DIR]
    python bench/load.py --clients 1000 --fraction 0.1 --rounds 20 --threads 4 --profile prof.txt

For each server thread count, starts a real ``server.py`` (the default basic model), lets
the swarm of fedhub/device/swarm.py run freely (each device polls, downloads the global model and
uploads random weights of its size, no TensorFlow) and prints a Markdown table: uploads per
second, upload and download latency (p50/p99, as the devices see them), and how far the
server's peak resident memory rose against clients x the model's float32 bytes.

With ``--fraction`` below 1 the server selects that share of the devices per round: every
device enrolls first, then training starts, and the devices are scheduled as ``--workers``
pool workers schedule theirs (``/api/status`` tells who is selected; see fedhub/device/swarm.py).
``--profile`` samples the server with py-spy (the ``bench`` extra) during the swarm and
writes the functions that held the most samples.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import requests

from fedhub.checkout import ROOT
from fedhub.datasets import locate
from fedhub.device.swarm import Swarm
from fedhub.options.parser import Parser
from fedhub.server_process import ServerProcess

DEVICES = 200
ROUNDS = 5
# Each waiting long poll holds a worker thread; the server lets at most half of them wait and
# tells the other devices to retry later, so a few threads serve 200 devices (the GIL
# serialises request handling anyway: 4 threads are as fast as 32 here, see
# docs/benchmarks.md). Few threads also keep the memory bound in tests/test_load.py honest.
THREADS = 4


def load_server_args(threads: int = THREADS, devices: int = DEVICES, rounds: int = ROUNDS) -> tuple[str, ...]:
    """server.py flags for the load run: the default basic model, every round with all devices."""
    return ("--rounds", str(rounds), "--min-devices", str(devices), "--auto-activate", "--start",
            "--test-limit", "1000", "--threads", str(threads))


def warm_up_evaluation(url: str, admin_token: str) -> None:
    """TensorFlow's first evaluation allocates ~30 MB, once; pay it before measuring memory.

    POST /api/rounds/0/validate runs the same evaluation as each round's test metrics.
    """
    rng = np.random.default_rng(0)
    buffer = io.BytesIO()
    np.savez(buffer, x=rng.integers(0, 256, (1000, 28, 28), dtype=np.uint8),
             y=rng.integers(0, 10, 1000))
    reply = requests.post(f"{url}/api/rounds/0/validate", data=buffer.getvalue(), timeout=120,
                          headers={"Authorization": f"Bearer {admin_token}",
                                   "Content-Type": "application/octet-stream"})
    reply.raise_for_status()


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a process has used so far, from /proc/<pid>/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def start_when_enrolled(url: str, admin_token: str, clients: int, pid: int, started: dict[str, float],
                        limit: float = 300) -> threading.Thread:
    """Start training (admin) once ``clients`` devices are enrolled, so that every round
    selects from all of them; ``started["cpu"]`` is then the server's CPU time so far."""
    def wait_and_start() -> None:
        deadline = time.monotonic() + limit
        while time.monotonic() < deadline:
            counts = requests.get(f"{url}/api/status", timeout=30).json()["devices"]
            if sum(counts.values()) >= clients:
                break
            time.sleep(0.5)
        started["cpu"] = cpu_seconds(pid)
        requests.post(f"{url}/api/training/start", timeout=30,
                      headers={"Authorization": f"Bearer {admin_token}"}).raise_for_status()

    thread = threading.Thread(target=wait_and_start, daemon=True)
    thread.start()
    return thread


class Profiler:
    """py-spy sampling one process (``--format raw``: one line per distinct stack and its count)."""

    def __init__(self, pid: int, out: Path) -> None:
        exe = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
        self.out = out
        # --gil: only the thread holding the GIL, i.e. the server's Python work, not its waits.
        self.proc = subprocess.Popen([exe, "record", "--pid", str(pid), "--rate", "100", "--format", "raw",
                                      "--gil", "--output", str(out), "--nonblocking"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)

    def stop(self) -> str:
        self.proc.send_signal(signal.SIGINT)
        _, err = self.proc.communicate(timeout=60)
        return err.decode(errors="replace")


def top_functions(raw: Path, n: int = 20) -> list[tuple[str, float, float]]:
    """(function, inclusive share, own share) of the samples, most inclusive first.

    Samples in a wait (``wait``, ``select``, ``poll``, ``acquire``) are left out: they use no
    CPU, and they would otherwise dominate every profile of a server.
    """
    idle = ("wait (threading.py", "select (selectors.py", "poll (selectors.py", "_worker (waitress",
            "handler_thread (waitress", "loop (asyncore", "acquire", "get (queue.py")
    inclusive: Counter[str] = Counter()
    own: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = stack.split(";")
        if not frames or any(frames[-1].startswith(i) for i in idle):
            continue
        k = int(count)
        total += k
        own[frames[-1]] += k
        for frame in set(frames):
            inclusive[frame] += k
    return [(f, inclusive[f] / total, own[f] / total) for f, _ in inclusive.most_common(n)] if total else []


def run(clients: int, rounds: int, threads: int, poll_wait: float, data_dir: Path, fraction: float,
        workers: int, profile: Path | None) -> dict:
    """One server and one swarm; the swarm's summary plus the server's own count of updates."""
    partial = fraction < 1
    args = load_server_args(threads, math.ceil(fraction * clients), rounds)
    if partial:  # started once every device is enrolled
        args = (*(a for a in args if a != "--start"), "--fraction", str(fraction), "--device-timeout", "600")
    with tempfile.TemporaryDirectory(prefix="fedhub-load-") as tmp:
        server = ServerProcess(Path(tmp), data_dir, *args).start()
        profiler = None
        try:
            warm_up_evaluation(server.url, server.admin_token)
            server_cpu, swarm_cpu = cpu_seconds(server.proc.pid), time.process_time()
            started = {"cpu": server_cpu}
            if partial:
                start_when_enrolled(server.url, server.admin_token, clients, server.proc.pid, started)
            if profile is not None:
                profiler = Profiler(server.proc.pid, profile.with_suffix(f".{threads}.raw"))
            result = Swarm(server.url, clients, rounds, enroll_secret=server.enroll_secret,
                           poll_wait=poll_wait, time_limit=900, server_pid=server.proc.pid,
                           workers=workers).run()
            training_cpu = cpu_seconds(server.proc.pid) - started["cpu"]
            server_cpu, swarm_cpu = cpu_seconds(server.proc.pid) - server_cpu, time.process_time() - swarm_cpu
            if profiler is not None:
                message = profiler.stop()
                if not profiler.out.exists():
                    print(f"py-spy: {message}", file=sys.stderr)
            history = requests.get(f"{server.url}/api/history", timeout=30).json()["rounds"]
        finally:
            server.stop()
    summary = result.summary()
    summary["model_bytes"] = sum(math.prod(shape) * np.dtype(dtype).itemsize
                                 for shape, dtype in result.spec.values())
    summary["counted"] = sum(r["num_updates"] for r in history)
    summary["rounds_done"] = len(history)
    # From the first round's opening to the last one's close (server clock): enrollment left out.
    if history:
        span = max(r["closed_at"] for r in history) - min(r["started_at"] for r in history)
        summary["training_uploads_per_second"] = summary["counted"] / span if span > 0 else float("nan")
        summary["round_seconds"] = float(np.median([r["closed_at"] - r["started_at"] for r in history]))
    # Lost or double-counted: what each round's history says against what the devices had accepted.
    summary["mismatched"] = sum(set(r["devices"]) != set(result.accepted.get(r["round"], {}))
                                for r in history)
    summary["first_errors"] = result.errors[:3]
    summary["server_cpu"], summary["swarm_cpu"] = server_cpu, swarm_cpu
    summary["cpu_ms_per_upload"] = 1000 * training_cpu / max(1, summary["accepted_uploads"])
    if profiler is not None and profiler.out.exists():
        summary["profile"] = top_functions(profiler.out)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = Parser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", "--devices", type=int, default=200, help="lightweight devices")
    p.add_argument("--rounds", type=int, default=5, help="rounds of the run")
    p.add_argument("--fraction", type=float, default=1.0, help="share of the devices selected per round")
    p.add_argument("--workers", type=int, default=2,
                   help="with --fraction: devices scheduled as this many pool workers")
    p.add_argument("--threads", type=int, nargs="+", default=[4, 32], help="server worker threads to try")
    p.add_argument("--poll-wait", type=float, default=1.0, help="seconds per device long poll")
    p.add_argument("--profile", type=Path, default=None,
                   help="sample the server with py-spy; raw stacks go to PROFILE.<threads>.raw")
    p.add_argument("--data-dir", type=Path, default=locate("fashion-mnist"))
    p.add_argument("--json", type=Path, default=ROOT / "bench" / "results" / "load.json",
                   help="the raw results (default bench/results/load.json)")
    a = p.parse_args(argv)
    if not 1 <= a.clients <= 2000:
        p.error("--clients must be between 1 and 2000")
    if not 0 < a.fraction <= 1:
        p.error("--fraction must be in (0, 1]")

    workers = a.workers if a.fraction < 1 else 0
    rows = [(t, run(a.clients, a.rounds, t, a.poll_wait, a.data_dir, a.fraction, workers, a.profile))
            for t in a.threads]
    model_bytes = rows[0][1]["model_bytes"]
    budget = a.clients * model_bytes
    share = f", {a.fraction:g} of them per round, {workers} pool workers" if a.fraction < 1 else ""
    print(f"### {a.clients} devices{share}, {a.rounds} rounds on loopback (basic model, "
          f"{model_bytes:,} bytes of float32 parameters; {a.clients} x model = {budget / 2**20:.1f} MiB)\n")
    print("| server threads | uploads/s (whole run) | uploads/s (training) | uploads/s (within a round) "
          "| round s (median) | upload p50 / p99 (s) | download p50 / p99 (s) | server peak RSS growth "
          "| vs clients x model | updates counted "
          "| rounds mismatched | 5xx | errors | CPU s: server / swarm | server CPU ms per upload |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    a.json.parent.mkdir(parents=True, exist_ok=True)  # the raw figures, beside the table
    a.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()},
                                   "runs": [{"threads": t, **s} for t, s in rows]}, indent=1, default=str))
    for threads, s in rows:
        print(f"| {threads} | {s['uploads_per_second']:.1f} | {s.get('training_uploads_per_second', 0):.1f} "
              f"| {s['round_uploads_per_second']:.1f} | {s.get('round_seconds', 0):.2f} "
              f"| {s['upload_p50']:.2f} / {s['upload_p99']:.2f} | {s['download_p50']:.2f} / "
              f"{s['download_p99']:.2f} | {s['server_peak_growth'] / 2**20:.1f} MiB "
              f"| {s['server_peak_growth'] / budget:.2f} | {s['counted']} of {s['accepted_uploads']} "
              f"| {s['mismatched']} of {s['rounds_done']} "
              f"| {s['server_5xx']} | {s['errors']} | {s['server_cpu']:.1f} / {s['swarm_cpu']:.1f} "
              f"| {s['cpu_ms_per_upload']:.1f} |")
    for threads, s in rows:
        if s.get("profile"):
            print(f"\nServer profile, {threads} threads (py-spy, busy threads' samples):\n")
            print("| function | inclusive | own |\n|---|---:|---:|")
            for function, inclusive, own in s["profile"]:
                print(f"| `{function}` | {inclusive:.1%} | {own:.1%} |")
    for threads, s in rows:
        calls = ", ".join(f"{k}: {v}" for k, v in s["statuses"].items())
        print(f"\nRequests the devices made, {threads} threads (call and status: count): {calls}")
    for threads, s in rows:
        for message in s["first_errors"]:
            print(f"\n{threads} threads: {message}", file=sys.stderr)
    ok = all(s["errors"] == 0 and s["server_5xx"] == 0 and s["mismatched"] == 0 for _, s in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
