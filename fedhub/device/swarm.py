"""Many lightweight devices in one process, for the load test and the load benchmark.

    python -m fedhub.device.swarm --server http://127.0.0.1:4000 --clients 200 --rounds 5

Each simulated device is a real :class:`fedhub.device.client.Client` (the one implementation of
the protocol) in its own thread, with no TensorFlow: it enrolls over HTTP, then for each
round long-polls for its task, downloads the global model (ETag) and uploads random
float32 weights with the model's tensor names and shapes. Every update is drawn from a
seed that is kept instead of the weights, so 200 devices x 5 rounds cost a few kilobytes
here, and the exact weighted mean the server should have computed can still be rebuilt
offline (:meth:`SwarmResult.reference_mean`). Every loop is bounded in count and in time,
and only a loopback server is accepted: this is a load generator for your own machine.
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import numpy as np
import requests

from fedhub.engine import wire

from .client import Client, PooledClient

Seed = tuple[int, int, int]  # (swarm seed, client index, round): regenerates one update
Spec = Mapping[str, tuple[tuple[int, ...], str]]
# A device's own polls are bounded by the time limit; this bounds their count as well.
MAX_POLLS_PER_ROUND = 10_000
MAX_EXAMPLES = 5000  # each update claims 1..MAX_EXAMPLES training examples, at random


def require_loopback(url: str) -> str:
    """The URL if its host is a loopback address (or ``localhost``); a ValueError otherwise."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.scheme not in ("http", "https") or not host:
        raise ValueError(f"server must be an http(s) URL, got {url!r}")
    if host != "localhost":
        try:
            loopback = ipaddress.ip_address(host).is_loopback
        except ValueError:
            loopback = False
        if not loopback:
            raise ValueError(f"the swarm only targets loopback servers (127.0.0.1, ::1, localhost), "
                             f"not {host!r}")
    return url.rstrip("/")


def random_update(spec: Spec, seed: Seed) -> tuple[dict[str, np.ndarray], int]:
    """The update (weights shaped by ``spec``, and its example count) that ``seed`` stands for.

    Tensors are drawn in name order: a decoded model's dict order is not stable across versions.
    """
    rng = np.random.default_rng(seed)
    num_examples = int(rng.integers(1, MAX_EXAMPLES + 1))  # drawn first: see SwarmResult.num_examples
    weights = {name: rng.standard_normal(spec[name][0], dtype=np.float32).astype(spec[name][1], copy=False)
               for name in sorted(spec)}
    return weights, num_examples


def process_memory(pid: int, *, reset_peak: bool = False) -> dict[str, int]:
    """A local process's peak (VmHWM) and current (VmRSS) resident memory in bytes, from /proc.

    ``reset_peak`` first lowers the peak to the current size (Linux ``clear_refs``), so the
    next reading's peak is what came after, not the process's start-up.
    """
    if reset_peak:
        Path(f"/proc/{pid}/clear_refs").write_text("5")
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmHWM", "VmRSS"):
            out[key] = int(value.split()[0]) * 1024  # the kernel reports kB
    return out


@dataclass
class SwarmResult:
    """What the devices saw: accepted updates (as seeds), latencies, HTTP statuses, errors."""

    clients: int
    rounds: int
    spec: dict[str, tuple[tuple[int, ...], str]] = field(default_factory=dict)
    accepted: dict[int, dict[str, Seed]] = field(default_factory=dict)  # round -> device -> seed
    duplicates: int = 0  # uploads the server recognised as retries (counted once)
    upload_seconds: list[float] = field(default_factory=list)
    download_seconds: list[float] = field(default_factory=list)
    upload_spans: dict[int, list[float]] = field(default_factory=dict)  # round -> [first start, last end]
    statuses: Counter[str] = field(default_factory=Counter)  # "upload 200", "task 200", ...
    errors: list[str] = field(default_factory=list)
    seconds: float = 0.0
    memory_before: dict[str, int] = field(default_factory=dict)  # the server's, when a pid was given
    memory_after: dict[str, int] = field(default_factory=dict)

    def update(self, round_number: int, device: str) -> tuple[dict[str, np.ndarray], int]:
        """The weights and example count ``device`` had accepted in ``round_number``."""
        return random_update(self.spec, self.accepted[round_number][device])

    def num_examples(self, round_number: int, device: str) -> int:
        """The example count ``device`` sent in ``round_number`` (without drawing its weights)."""
        return int(np.random.default_rng(self.accepted[round_number][device]).integers(1, MAX_EXAMPLES + 1))

    def reference_mean(self, round_number: int) -> dict[str, np.ndarray]:
        """The float64 sample-weighted mean of the round's accepted updates, rebuilt from seeds.

        Computed here, not with ``fedhub.engine.aggregation``: an oracle must not share code with
        what it checks.
        """
        sums = {name: np.zeros(shape, dtype=np.float64) for name, (shape, _) in self.spec.items()}
        total = 0
        for device in self.accepted.get(round_number, {}):
            weights, n = self.update(round_number, device)
            for name, a in weights.items():
                sums[name] += n * a.astype(np.float64)
            total += n
        if not total:
            raise ValueError(f"no accepted update in round {round_number}")
        return {name: s / total for name, s in sums.items()}

    @property
    def peak_growth(self) -> int:
        """How far the server's peak resident memory rose above its size when the swarm began."""
        return self.memory_after["VmHWM"] - self.memory_before["VmRSS"]

    @property
    def server_5xx(self) -> int:
        return sum(n for key, n in self.statuses.items() if key.split()[-1].startswith("5"))

    def summary(self) -> dict[str, Any]:
        """Throughput and latency figures, for people and benchmarks."""
        uploads = sum(len(d) for d in self.accepted.values())
        per_round = [len(self.accepted.get(r, {})) / (end - start)
                     for r, (start, end) in self.upload_spans.items() if end > start]

        def pct(values: list[float], q: float) -> float | None:
            return float(np.percentile(values, q)) if values else None

        memory = {}
        if self.memory_before and self.memory_after:
            memory = {"server_rss_before": self.memory_before["VmRSS"],
                      "server_peak_growth": self.peak_growth}
        return {
            "clients": self.clients, "rounds": self.rounds, "accepted_uploads": uploads,
            "duplicates": self.duplicates, "seconds": self.seconds,
            # Sustained: polls, downloads and the server's round closes all count.
            "uploads_per_second": uploads / self.seconds if self.seconds else None,
            # Within a round: from its first upload's start to its last upload's end (median round).
            "round_uploads_per_second": pct(per_round, 50),
            "upload_p50": pct(self.upload_seconds, 50), "upload_p99": pct(self.upload_seconds, 99),
            "download_p50": pct(self.download_seconds, 50),
            "download_p99": pct(self.download_seconds, 99),
            "statuses": dict(sorted(self.statuses.items())), "server_5xx": self.server_5xx,
            "errors": len(self.errors), **memory,
        }


def _call(request: requests.PreparedRequest) -> str:
    path = request.path_url.split("?")[0]
    if path.endswith("/register"):
        return "register"
    if path.endswith("/task"):
        return "task"
    if path == "/api/model":
        return "model"
    if "/updates/" in path:
        return "upload"
    return path.rsplit("/", 1)[-1] or path


class Swarm:
    """``Swarm(server, clients, rounds, enroll_secret=...).run()`` -> :class:`SwarmResult`.

    With ``between_rounds``, every device stops after receiving its next task (the
    previous round is closed, the next one open) until ``between_rounds(model_version)``
    has run once in one of them: the global model then holds still, so a test can read
    it. Without it the devices run freely, as a benchmark wants.

    With ``workers``, the devices are scheduled as a device pool's workers do (see
    ``fedhub/device/virtual.py``), for runs where the server selects only some of them per round
    (``--fraction``): every device enrolls, then each of ``workers`` threads reads
    ``GET /api/status`` (when it has nothing to do, a long poll of up to ``status_interval``
    seconds for the run to move on) and has its devices that the open round selected take
    their task (``concurrency`` at a time over all workers); the others
    ask for a task without waiting every ``keepalive`` seconds, to stay online. Each device
    trains in the rounds it is selected for until the run is finished; ``rounds`` is then
    the run's number of rounds. As in a pool, each worker downloads each global model
    version once, for all its devices (the others are answered 304, ETag).
    """

    def __init__(self, server: str, clients: int, rounds: int, *, enroll_secret: str | None,
                 poll_wait: float = 2.0, seed: int = 0, time_limit: float = 600.0,
                 prefix: str = "swarm", timeout: float = 30.0, server_pid: int | None = None,
                 between_rounds: Callable[[int], None] | None = None, workers: int = 0,
                 concurrency: int = 32, status_interval: float = 0.5, keepalive: float = 20.0) -> None:
        if clients < 1 or rounds < 1:
            raise ValueError("clients and rounds must be at least 1")
        if workers and between_rounds is not None:
            raise ValueError("between_rounds needs every device in every round (no workers)")
        if workers < 0 or concurrency < 1 or status_interval <= 0 or keepalive <= 0:
            raise ValueError("workers must be 0 or more; concurrency, status_interval and keepalive positive")
        if poll_wait <= 0 or time_limit <= 0:
            raise ValueError("poll_wait and time_limit must be positive")
        self.server = require_loopback(server)
        self.clients = clients
        self.rounds = rounds
        self.enroll_secret = enroll_secret
        self.poll_wait = poll_wait
        self.seed = seed
        self.time_limit = time_limit
        self.prefix = prefix
        self.timeout = timeout
        self.server_pid = server_pid
        self._between = between_rounds
        self.workers = workers
        self.concurrency = concurrency
        self.status_interval = status_interval
        self.keepalive = keepalive
        self._lock = threading.Lock()
        self._barrier: threading.Barrier | None = None
        self._versions: set[int] = set()
        self._deadline = 0.0
        self.result = SwarmResult(clients=clients, rounds=rounds)

    def run(self) -> SwarmResult:
        """Run every device to the end (or the time limit) and return what they saw."""
        result = self.result
        if self.server_pid is not None:
            result.memory_before = process_memory(self.server_pid, reset_peak=True)
        if self._between is not None:
            self._barrier = threading.Barrier(self.clients, action=self._sync_action)
        started = time.monotonic()
        self._deadline = started + self.time_limit
        if self.workers:
            clients = self._enroll_all()
            threads = [threading.Thread(target=self._worker, args=(clients[w::self.workers],),
                                        name=f"swarm-worker-{w}", daemon=True)
                       for w in range(self.workers)]
        else:
            threads = [threading.Thread(target=self._device, args=(i,), name=f"swarm-{i}", daemon=True)
                       for i in range(self.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(max(0.0, self._deadline - time.monotonic()) + 2 * self.timeout)
        result.seconds = time.monotonic() - started
        stuck = sum(t.is_alive() for t in threads)
        if stuck:
            self._error(f"{stuck} device thread(s) still running after the time limit")
        if self.server_pid is not None:
            result.memory_after = process_memory(self.server_pid)
        return result

    # one device ---------------------------------------------------------
    def _device(self, index: int) -> None:
        name = f"{self.prefix}{index:04d}"
        client = Client(self.server, name, timeout=self.timeout,
                        retry_for=min(60.0, self.time_limit))
        client.session.hooks["response"].append(self._record_status)
        try:
            client.register(self.enroll_secret)
            task = self._next_task(client)
            for _ in range(self.rounds):
                if task["action"] != "train":
                    raise RuntimeError(f"the run ended early: {task}")
                self._sync(task["model_version"])
                self._train(client, index, task)
                task = self._next_task(client)
            self._sync(task["model_version"])
            if task["action"] == "train":  # more rounds than ours: stop being waited for
                client.leave()
        except threading.BrokenBarrierError:
            pass  # another device failed and said why
        except Exception as exc:
            self._error(f"{name}: {type(exc).__name__}: {exc}")
            if self._barrier is not None:
                self._barrier.abort()
        finally:
            client.session.close()

    # scheduled as a pool's workers --------------------------------------
    def _enroll_all(self) -> list[tuple[int, Client]]:
        session = requests.Session()
        session.hooks["response"].append(self._record_status)
        adapter = requests.adapters.HTTPAdapter(pool_maxsize=self.concurrency)
        session.mount("http://", adapter)
        session.mount("https://", adapter)
        models = []  # each worker's one copy of the global model, as a pool worker has
        for _ in range(max(1, self.workers)):
            model_client = Client(self.server, "models", timeout=self.timeout,
                                  retry_for=min(60.0, self.time_limit))
            model_client.session.hooks["response"].append(self._record_status)
            models.append(model_client)
        clients = []
        for index in range(self.clients):
            # one connection pool for all devices, as a worker has
            client = PooledClient(self.server, f"{self.prefix}{index:04d}", session=session,
                                  models=models[index % len(models)], timeout=self.timeout,
                                  retry_for=min(60.0, self.time_limit))
            clients.append((index, client))
        with ThreadPoolExecutor(self.concurrency) as pool:
            list(pool.map(lambda c: c[1].register(self.enroll_secret), clients))
        return clients

    def _worker(self, devices: list[tuple[int, Client]]) -> None:
        """One pool worker's loop (fedhub.device.virtual's): status, selected devices' steps, keepalives."""
        status_client = devices[0][1]
        mine = dict((c.name, (i, c)) for i, c in devices)
        seen = dict.fromkeys(mine, time.monotonic())
        attempted: set[tuple[int, str]] = set()
        revision = None  # after a pass with nothing to do: wait for the run to move on
        try:
            with ThreadPoolExecutor(max(1, self.concurrency // self.workers)) as pool:
                while self._remaining():
                    status = status_client.status(self.status_interval, since=revision)
                    if status["status"] == "finished":
                        return
                    current = status.get("round") or {}
                    number, reported = current.get("number"), set(current.get("reported", ()))
                    todo = [n for n in current.get("selected", ())
                            if n in mine and n not in reported and (number, n) not in attempted]
                    attempted.update((number, n) for n in todo)
                    horizon = time.monotonic() - self.keepalive
                    due = [n for n in mine if seen[n] <= horizon and n not in todo][:32]
                    for future in [pool.submit(self._step, *mine[n]) for n in todo + due]:
                        future.result()
                    now = time.monotonic()
                    seen.update(dict.fromkeys(todo + due, now))
                    revision = None if todo else status.get("revision")
                    if not todo and revision is None:  # a server without long polls on its status
                        time.sleep(self.status_interval)
        except Exception as exc:
            self._error(f"worker of {status_client.name}...: {type(exc).__name__}: {exc}")

    def _step(self, index: int, client: Client) -> None:
        task = client.task(wait=0)
        if task["action"] == "train":
            self._train(client, index, task)

    def _remaining(self) -> float:
        remaining = self._deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"time limit of {self.time_limit:g}s reached")
        return remaining

    def _next_task(self, client: Client) -> dict[str, Any]:
        """Long-poll until the server has something other than "wait" for this device."""
        for _ in range(MAX_POLLS_PER_ROUND):
            # A busy server answers at once with "retry_in"; the client then waits on its side.
            task = client.task(wait=round(min(self.poll_wait, self._remaining()), 2))
            if task["action"] != "wait":
                return task
        raise TimeoutError(f"no task after {MAX_POLLS_PER_ROUND} polls")

    def _sync(self, version: int) -> None:
        if self._barrier is None:
            return
        with self._lock:
            self._versions.add(version)
        self._barrier.wait(self._remaining())

    def _sync_action(self) -> None:
        with self._lock:
            versions, self._versions = self._versions, set()
        if len(versions) != 1:
            raise RuntimeError(f"devices disagree on the model version: {sorted(versions)}")
        self._between(versions.pop())

    def _train(self, client: Client, index: int, task: dict[str, Any]) -> None:
        number = task["round"]
        t0 = time.monotonic()
        version, global_weights = client.model(task["model_version"])
        t1 = time.monotonic()
        if version != task["model_version"]:
            raise RuntimeError(f"round {number}: task says model v{task['model_version']}, "
                               f"downloaded v{version}")
        spec = wire.spec_of(global_weights)
        with self._lock:
            self.result.download_seconds.append(t1 - t0)
            if not self.result.spec:
                self.result.spec = spec
            elif spec != self.result.spec:
                raise RuntimeError(f"round {number}: the model's tensors changed")
        seed = (self.seed, index, number)
        weights, num_examples = random_update(spec, seed)
        t2 = time.monotonic()
        reply = client.upload(number, weights, num_examples=num_examples, model_version=version)
        t3 = time.monotonic()
        with self._lock:
            self.result.upload_seconds.append(t3 - t2)
            span = self.result.upload_spans.setdefault(number, [t2, t3])
            span[0], span[1] = min(span[0], t2), max(span[1], t3)
            if reply.get("accepted"):
                self.result.accepted.setdefault(number, {})[client.name] = seed
                self.result.duplicates += bool(reply.get("duplicate"))

    def _record_status(self, response: requests.Response, *args: Any, **kwargs: Any) -> None:
        with self._lock:
            self.result.statuses[f"{_call(response.request)} {response.status_code}"] += 1

    def _error(self, message: str) -> None:
        with self._lock:
            self.result.errors.append(message)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m fedhub.device.swarm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--server", required=True, help="the server's loopback URL")
    p.add_argument("--clients", type=int, default=200, help="simulated devices (threads)")
    p.add_argument("--rounds", type=int, default=5, help="rounds each device takes part in")
    p.add_argument("--enroll-secret", default=os.environ.get("FEDHUB_ENROLL_SECRET"),
                   help="enrollment secret (default $FEDHUB_ENROLL_SECRET)")
    p.add_argument("--poll-wait", type=float, default=2.0,
                   help="seconds per long poll (each one holds a server thread)")
    p.add_argument("--time-limit", type=float, default=600.0, help="seconds before the swarm gives up")
    p.add_argument("--seed", type=int, default=0, help="seed of the random updates")
    p.add_argument("--prefix", default="swarm", help="device names are PREFIX0000, PREFIX0001, ...")
    p.add_argument("--server-pid", type=int, default=None,
                   help="the local server's process id: report its peak memory growth")
    a = p.parse_args(argv)
    if not 1 <= a.clients <= 2000:
        p.error("--clients must be between 1 and 2000")
    try:
        swarm = Swarm(a.server, a.clients, a.rounds, enroll_secret=a.enroll_secret,
                      poll_wait=a.poll_wait, seed=a.seed, time_limit=a.time_limit, prefix=a.prefix,
                      server_pid=a.server_pid)
    except ValueError as exc:
        p.error(str(exc))
    result = swarm.run()
    for key, value in result.summary().items():
        print(f"{key}: {value:.4g}" if isinstance(value, float) else f"{key}: {value}")
    for message in result.errors[:20]:
        print(f"error: {message}", file=sys.stderr)
    return 1 if result.errors or result.server_5xx else 0


if __name__ == "__main__":
    sys.exit(main())
