"""Relays through real processes: the real server, real ``fedhub relay`` processes and real
device processes on loopback (a two-level deployment), and a pool's workers as relays.

The devices train ``tests.seeded_digits``' deterministic softmax regression, so each test can
train every device's update again from the same global model and check what the server made of
them: the relay's partial sums give the weighted mean the server's own sum gives, within
float32 rounding of the new model; a robust strategy gets each update through the relay; secure
aggregation's key exchange passes through and the masked updates are summed at the relay; a relay
SIGKILLed mid-round loses nothing it acknowledged and counts nothing twice.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import requests

from examples import digits
from fedhub.checkout import ROOT
from fedhub.device.launcher import stop
from fedhub.engine import partials, wire
from fedhub.engine.secagg.params import levels_for
from fedhub.server_process import free_port
from tests.seeded_digits import SeededSoftmaxTrainer

from .conftest import ServerProcess, launch_devices, wait_until

pytestmark = pytest.mark.slow  # every test starts a real server
TRAINING = {"learning_rate": 0.5, "epochs": 1, "batch_size": 16}
TRAINER = ("--trainer", "tests.seeded_digits:SeededSoftmaxTrainer")
TENSOR = object()  # a refusal naming one of the model's tensors


class RelayProcess:
    """``fedhub relay`` in a child process, its log kept for failure messages."""

    def __init__(self, server: ServerProcess, tmp: Path, name: str = "edge-1", *args: str,
                 port: int | None = None) -> None:
        self.server, self.name, self.args = server, name, args
        self.port = port or free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.folder = tmp / f"relay-{name}"
        self.log_path = tmp / f"relay-{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self) -> RelayProcess:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "fedhub.cli", "relay", "--server", self.server.url, "--port",
                 str(self.port), "--name", self.name, "--relay-dir", str(self.folder), *self.args],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                env={**os.environ, "FEDHUB_ENROLL_SECRET": self.server.enroll_secret})

        def up() -> bool:
            assert self.proc.poll() is None, self.log_path.read_text()
            try:
                return requests.get(f"{self.url}/relay/status", timeout=1).ok
            except requests.ConnectionError:
                return False
        wait_until(up, 60, "the relay to listen", interval=0.2)
        return self

    def status(self) -> dict:
        return requests.get(f"{self.url}/relay/status", timeout=5).json()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.kill()


def digits_server(tmp_path, data_dir, root, devices: int, *args: str) -> ServerProcess:
    return ServerProcess(
        tmp_path, data_dir, "--model-factory", "tests.seeded_digits:build_model",
        "--test-data", str(root / "test.npz"), "--min-devices", str(devices), "--quorum", "1",
        "--learning-rate", str(TRAINING["learning_rate"]), "--epochs", str(TRAINING["epochs"]),
        "--batch-size", str(TRAINING["batch_size"]), "--auto-activate", "--start", "--no-tensorboard",
        "--round-timeout", "60", *args)


def checkpoint(server: ServerProcess, number: int) -> dict[str, np.ndarray]:
    weights, _ = wire.decode((server.state_dir / "saved" / f"round_{number:05d}.safetensors").read_bytes())
    return weights


def updates(root: Path, names, start) -> list[tuple[dict[str, np.ndarray], int]]:
    """Each device's update from ``start``, trained again here (the trainer is deterministic)."""
    out = []
    for name in names:
        result = SeededSoftmaxTrainer(root / name / "data").train(start, TRAINING)
        out.append((result.weights, result.num_examples))
    return out


def weighted_mean(parts) -> dict[str, np.ndarray]:
    total = sum(n for _, n in parts)
    return {k: sum(w[k].astype(np.float64) * n for w, n in parts) / total for k in parts[0][0]}


def history(server: ServerProcess) -> list[dict]:
    return server.get("/api/history").json()["rounds"]


def finished(server: ServerProcess) -> bool:
    return server.get("/api/status").json()["status"] == "finished"


def each_counted_once(server: ServerProcess, root: Path, names, entry: dict) -> None:
    """Round 1 took each device's update once: its count, and the weighted mean of the updates."""
    assert entry["num_updates"] == len(names) and sorted(entry["devices"]) == names
    parts = updates(root, names, checkpoint(server, 0))
    assert entry["num_examples"] == sum(n for _, n in parts), "each device counted once"
    end, want = checkpoint(server, 1), weighted_mean(parts)
    for k in end:
        np.testing.assert_allclose(end[k], want[k], rtol=0, atol=1e-6)


def run_to_the_end(server: ServerProcess, relay: RelayProcess, procs, timeout: float = 90):
    """The run's history and the relay's status once the run is over; every process stopped after."""
    try:
        wait_until(lambda: finished(server), timeout, "the run to finish")
        return history(server), relay.status()
    finally:
        stop(procs)
        relay.stop()
        server.stop()


def test_two_level_deployment_sums_at_the_relay_as_the_server_would(tmp_path, data_dir):
    """Three device processes behind a relay, one straight to the server, two rounds: each round's
    model is the weighted mean of the four updates within float32 rounding, the history names the
    relay for its devices, and the relay sent one sum a round."""
    root = tmp_path / "devices"
    names = [f"digits{i}" for i in range(1, 5)]
    digits.split(root, 4, limit=120)
    server = digits_server(tmp_path, data_dir, root, 4, "--rounds", "2").start()
    relay = RelayProcess(server, tmp_path, "edge-1", "--flush-after", "60").start()
    procs = launch_devices(server, root, names[3:], *TRAINER)
    procs += _behind(relay, server, root, names[:3])
    rounds, seen = run_to_the_end(server, relay, procs)
    assert [r["round"] for r in rounds] == [1, 2]
    for entry in rounds:
        assert entry["num_updates"] == 4, entry
        relays = {d: info["aggregation"].get("relay") for d, info in entry["devices"].items()}
        assert relays == {"digits1": "edge-1", "digits2": "edge-1", "digits3": "edge-1", "digits4": None}
        start, end = checkpoint(server, entry["round"] - 1), checkpoint(server, entry["round"])
        parts = updates(root, names, start)
        assert entry["num_examples"] == sum(n for _, n in parts)
        want = weighted_mean(parts)
        for k in start:
            np.testing.assert_allclose(end[k], want[k], rtol=0, atol=1e-6)
            assert np.abs(end[k] - start[k]).max() > 1e-3, "the round changed the model"
    # The relay learns its devices as they ask for tasks: round 1's sum may go in parts; round
    # 2's goes once, when its three devices are in.
    assert seen["sent_devices"] == 6 and seen["sent_sums"] <= 3, seen


def _behind(relay: RelayProcess, server: ServerProcess, root: Path, names) -> list[subprocess.Popen]:
    """Real device processes that know only the relay's address."""
    from fedhub.device.launcher import launch

    return launch(relay.url, names, devices_root=root, env={"FEDHUB_ENROLL_SECRET": server.enroll_secret},
                  extra_args=["--poll-wait", "2", "--retry-for", "120", *TRAINER],
                  log_dir=root.parent / "logs")


def test_a_relay_killed_mid_round_loses_and_counts_nothing_twice(tmp_path, data_dir):
    """SIGKILL the relay while it holds two acknowledged updates and the third device trains; a
    new relay process on the same folder sends all three once."""
    root = tmp_path / "devices"
    names = ["digits1", "digits2", "digits3"]
    digits.split(root, 3, limit=120)
    (root / "digits3" / "data" / "hold").write_text("0")  # digits3 trains only once released
    server = digits_server(tmp_path, data_dir, root, 3, "--rounds", "1").start()
    relay = RelayProcess(server, tmp_path, "edge-1", "--flush-after", "300").start()
    procs = _behind(relay, server, root, names)
    try:
        wait_until(lambda: relay.status()["pending"] == {"1": 2}, 60, "two updates held at the relay")
        assert server.get("/api/status").json()["round"]["reported"] == []
        relay.kill()
        assert sorted(p.name for p in (relay.folder / "sums").glob("pending-*")) == ["pending-r1.safetensors"]
        relay = RelayProcess(server, tmp_path, "edge-1", "--flush-after", "300", port=relay.port).start()
        (root / "digits3" / "data" / "hold").unlink()
        wait_until(lambda: finished(server), 60, "the round")
        entry = history(server)[0]
        seen = relay.status()
    finally:
        stop(procs)
        relay.stop()
        server.stop()
    each_counted_once(server, root, names, entry)
    # the new process sent the two updates the old one had acknowledged, and the third
    assert seen["sent_devices"] == 3 and seen["outbox"] == 0 and seen["pending"] == {}, seen
    assert not list((relay.folder / "sums").glob("*.safetensors")), "nothing left to send"


def test_a_server_killed_while_a_relay_holds_updates_counts_each_device_once(tmp_path, data_dir):
    """SIGKILL the server while the relay holds two updates of round 1: the restarted server runs
    round 1 again, the relay drops what it held for the attempt that is gone, and the devices'
    new updates make the round, each counted once."""
    root = tmp_path / "devices"
    names = ["digits1", "digits2", "digits3"]
    digits.split(root, 3, limit=120)
    (root / "digits3" / "data" / "hold").write_text("0")
    server = digits_server(tmp_path, data_dir, root, 3, "--rounds", "1").start()
    relay = RelayProcess(server, tmp_path, "edge-1", "--flush-after", "300").start()
    procs = _behind(relay, server, root, names)
    try:
        wait_until(lambda: relay.status()["pending"] == {"1": 2}, 60, "two updates held at the relay")
        server.kill()
        server = digits_server(tmp_path, data_dir, root, 3, "--rounds", "1")
        server.port, server.url = relay.server.port, relay.server.url  # the same address and state
        server.start()
        (root / "digits3" / "data" / "hold").unlink()
    except BaseException:
        stop(procs)
        relay.stop()
        server.stop()
        raise
    (entry,), seen = run_to_the_end(server, relay, procs)
    each_counted_once(server, root, names, entry)
    assert seen["pending"] == {} and seen["outbox"] == 0, seen


def test_a_robust_strategy_gets_each_update_through_the_relay(tmp_path, data_dir):
    root = tmp_path / "devices"
    names = ["digits1", "digits2", "digits3"]
    digits.split(root, 3, limit=120)
    server = digits_server(tmp_path, data_dir, root, 3, "--rounds", "1", "--strategy", "fedmedian").start()
    relay = RelayProcess(server, tmp_path).start()
    procs = _behind(relay, server, root, names)
    takes_sums = server.get("/api/status").json()["partial_sums"]
    (entry,), seen = run_to_the_end(server, relay, procs)
    assert takes_sums is False and entry["num_updates"] == 3
    assert all("relay" not in info["aggregation"] for info in entry["devices"].values())
    assert seen["sent_sums"] == 0 and not seen["accepting"]
    parts = updates(root, names, checkpoint(server, 0))
    end = checkpoint(server, 1)
    for k in end:
        np.testing.assert_allclose(end[k], np.median([w[k] for w, _ in parts], axis=0), rtol=0, atol=1e-6)


def test_secure_aggregation_runs_through_a_relay(tmp_path, data_dir):
    """The relay passes the key exchange on and sums its devices' masked updates into one masked
    sum; the server unmasks the weighted mean, each device counted once."""
    clip, max_weight = 0.05, 1000
    root = tmp_path / "devices"
    names = ["digits1", "digits2", "digits3"]
    digits.split(root, 3, limit=120)
    server = digits_server(tmp_path, data_dir, root, 3, "--rounds", "1", "--secure-aggregation",
                           "--secagg-clip", str(clip), "--secagg-max-weight", str(max_weight)).start()
    relay = RelayProcess(server, tmp_path).start()
    procs = _behind(relay, server, root, names)
    takes_sums = server.get("/api/status").json()["partial_sums"]
    (entry,), seen = run_to_the_end(server, relay, procs)
    assert takes_sums is False  # no sums of plain updates: the masked stage's sum instead
    assert seen["sent_sums"] == 1 and seen["sent_devices"] == 3, seen
    assert entry["secagg"]["enabled"] and entry["secagg"]["survivors"] == 3
    assert entry["num_updates"] == 3 and sorted(entry["devices"]) == names
    start, end = checkpoint(server, 0), checkpoint(server, 1)
    parts = [({k: np.clip(w[k].astype(np.float64) - start[k], -clip, clip) for k in start},
              min(n, max_weight)) for w, n in updates(root, names, start)]
    want = weighted_mean(parts)
    step = clip / levels_for(32, 3, max_weight)
    for k in start:
        np.testing.assert_allclose(end[k].astype(np.float64) - start[k], want[k], rtol=0, atol=step + 1e-6)


def test_partial_sums_refuse_hostile_input_and_change_nothing(tmp_path, data_dir):
    """The partial-sum route and relay enrollment against a real server, as an attacker would try
    them: each refusal a 4xx naming the field, the open round untouched."""
    root = tmp_path / "devices"
    digits.split(root, 2, limit=60)
    server = digits_server(tmp_path, data_dir, root, 2, "--rounds", "1", "--max-upload-mb", "1").start()
    url = server.url
    try:
        secret = {"X-Enroll-Secret": server.enroll_secret}
        edge = requests.post(f"{url}/api/relays/register", json={"name": "edge"}, headers=secret, timeout=10)
        assert edge.status_code == 201
        token = edge.json()["token"]
        other = requests.post(f"{url}/api/relays/register", json={"name": "other"}, headers=secret,
                              timeout=10).json()["token"]
        again = requests.post(f"{url}/api/relays/register", json={"name": "edge"}, headers=secret, timeout=10)
        assert again.status_code == 409 and again.json()["field"] == "name"
        wrong = requests.post(f"{url}/api/relays/register", json={"name": "x"},
                              headers={"X-Enroll-Secret": "nope"}, timeout=10)
        assert wrong.status_code == 401
        bad_name = requests.post(f"{url}/api/relays/register", json={"name": "../x"}, headers=secret,
                                 timeout=10)
        assert bad_name.status_code == 400 and bad_name.json()["field"] == "name"

        device_tokens = {}
        for name in ("digits1", "digits2"):  # two enrolled devices, so round 1 opens
            answer = requests.post(f"{url}/api/devices/register", json={"name": name, "num_examples": 60},
                                   headers=secret, timeout=10)
            answer.raise_for_status()
            device_tokens[name] = answer.json()["token"]
        wait_until(lambda: (server.get("/api/status").json().get("round") or {}).get("number") == 1, 30,
                   "round 1 to open")
        model = wire.spec_of(checkpoint(server, 0))

        def body(devices=None, dtype=np.float64, fill=1.0, round_number=1, version=0, drop=None,
                 extra=None) -> bytes:
            tensors = {k: np.full(shape, fill, dtype=dtype) for k, (shape, _) in model.items() if k != drop}
            if devices is None:
                devices = [{"name": "digits1", "num_examples": 60, "metrics": {}}]
            # each device's own token unless the case says otherwise (unknown names: a made-up one)
            devices = [{"token": device_tokens.get(d.get("name"), "made-up"), **d} if isinstance(d, dict)
                       else d for d in devices]
            meta = {"format": partials.FORMAT, "round": str(round_number), "model_version": str(version),
                    "devices": json.dumps(devices), **(extra or {})}
            from safetensors.numpy import save
            return save(tensors, metadata=meta)

        def post(data: bytes, *, as_token: str | None = token, relay: str = "edge", key: str | None = "k1",
                 round_number: int = 1) -> requests.Response:
            headers = {"Content-Type": "application/octet-stream"}
            if as_token:
                headers["Authorization"] = f"Bearer {as_token}"
            if key is not None:
                headers["Idempotency-Key"] = key
            return requests.post(f"{url}/api/relays/{relay}/partials/{round_number}", data=data,
                                 headers=headers, timeout=30)

        first = (server.get("/api/status").json(), history(server))
        name = next(iter(model))
        cases = [
            (post(body(), as_token=None), 401, "Authorization"),
            (post(body(), as_token="forged"), 401, "Authorization"),
            (post(body(), as_token=other), 403, "Authorization"),
            (post(body(), key=None), 400, "Idempotency-Key"),
            (post(body(), key="k" * 201), 400, "Idempotency-Key"),
            (post(b"not safetensors"), 400, "body"),
            (post(body(dtype=np.float32)), 400, TENSOR),
            (post(body(fill=np.nan)), 400, TENSOR),
            (post(body(drop=name)), 400, name),
            (post(body(devices=[])), 400, "devices"),
            (post(body(devices=[{"name": "digits1", "num_examples": 0}])), 400, "devices[0].num_examples"),
            (post(body(devices=[{"name": "digits1", "num_examples": True}])), 400, "devices[0].num_examples"),
            (post(body(devices=[{"name": "digits1", "num_examples": 2**60}])), 400,
             "devices[0].num_examples"),
            (post(body(devices=[{"name": "a/../b", "num_examples": 5}])), 400, "devices[0].name"),
            (post(body(devices=[{"name": "digits1", "num_examples": 5}] * 2)), 400, "devices[1].name"),
            (post(body(devices=[{"name": "digits1", "num_examples": 5, "metrics": {"x": "y"}}])), 400,
             "metrics"),
            (post(body(devices=[{"name": "digits1", "num_examples": 5, "evil": 1}])), 400, "devices[0]"),
            (post(body(devices=[{"name": f"d{i}", "num_examples": 1} for i in range(257)])), 400, "devices"),
            (post(body(extra={"format": "pickle"})), 400, "format"),
            (post(body(extra={"clipping_norm": "x", "unclipped": "0"})), 400, "clipping_norm"),
            (post(body(extra={"clipping_norm": "1.0", "unclipped": "9"})), 400, "unclipped"),
            # clipped changes, where the round (FedAvg, no DP) sums num_examples x weights
            (post(body(extra={"clipping_norm": "1.0", "unclipped": "1"})), 409, "clipping_norm"),
            (post(body(round_number=2)), 400, "round"),
            (post(body(round_number=2), round_number=2), 409, "round"),
            (post(body(version=7)), 409, "model_version"),
            # a relay speaks for a device only with the device's own token
            (post(body(devices=[{"name": "ghost", "num_examples": 5}])), 401, "devices[0].token"),
            (post(body(devices=[{"name": "digits1", "num_examples": 5},
                                {"name": "ghost", "num_examples": 5}])), 401, "devices[1].token"),
            (post(body(devices=[{"name": "digits1", "num_examples": 5, "token": device_tokens["digits2"]}])),
             403, "devices[0].token"),
            (post(body(devices=[{"name": "digits1", "num_examples": 5, "token": None}])), 400,
             "devices[0].token"),
            (post(b"\0" * (10 * 2**20)), 413, "body"),  # 2 x --max-upload-mb + the header's room
        ]
        for i, (answer, status, field) in enumerate(cases):
            assert answer.status_code == status, (i, answer.text)
            assert answer.json()["field"] in (model if field is TENSOR else (field,)), (i, answer.json())
        status, rounds = server.get("/api/status").json(), history(server)
        assert status["round"]["reported"] == first[0]["round"]["reported"] == [] and rounds == first[1]

        # the devices' tasks and reports (evaluations, log lines), each device with its own token
        def as_relay(path: str, payload=None, *, as_token: str | None = token, raw: bytes | None = None):
            headers = {"Content-Type": "application/json"}
            if as_token:
                headers["Authorization"] = f"Bearer {as_token}"
            data = raw if raw is not None else json.dumps(payload).encode()
            return requests.post(f"{url}/api/relays/edge/{path}", data=data, headers=headers, timeout=30)

        def report(payload=None, **kw):
            return as_relay("reports", payload, **kw)

        d1, d2 = ({"name": n, "token": device_tokens[n]} for n in ("digits1", "digits2"))
        line = {"level": "INFO", "message": "round 1: hello", "round": 1}
        ev = {"round": 1, "global": {"loss": 0.5, "accuracy": 0.5, "num_examples": 6}}
        one = {"devices": [{**d1, "logs": [line]}]}
        many_lines = [{"name": f"digits{i}", "token": "t", "logs": [line] * 200} for i in range(6)]
        reports = [
            (report(one, as_token=None), 401, "Authorization"),
            (report(one, as_token=device_tokens["digits1"]), 401, "Authorization"),  # a device is no relay
            (report(one, as_token=other), 403, "Authorization"),
            (report(raw=b"{not json"), 400, "body"),
            (report([line]), 400, "body"),
            (report({**one, "extra": 1}), 400, "body"),
            (report({"devices": []}), 400, "devices"),
            (report({"devices": [d1]}), 400, "devices[0]"),
            (report({"devices": [{"name": "digits1", "logs": [line]}]}), 400, "devices[0]"),
            (report({"devices": [{**d1, "token": 7, "logs": [line]}]}), 400, "devices[0].token"),
            (report({"devices": [{**d1, "name": "../x", "logs": [line]}]}), 400, "devices[0].name"),
            (report({"devices": [{**d1, "logs": []}]}), 400, "devices[0].logs"),
            (report({"devices": [{**d1, "logs": [{**line, "level": "EVIL"}]}]}), 400,
             "devices[0].logs[0].level"),
            (report({"devices": [{**d1, "evaluation": {**ev, "global": {**ev["global"], "accuracy": 2}}}]}),
             400, "devices[0].evaluation.global.accuracy"),
            (report({"devices": [{**d1, "evaluation": [ev]}]}), 400, "devices[0].evaluation"),
            (report({"devices": [one["devices"][0], {**d1, "evaluation": ev}]}), 400, "devices[1].name"),
            (report({"devices": [{"name": f"d{i}", "token": "t", "logs": [line]} for i in range(257)]}), 400,
             "devices"),
            (report({"devices": many_lines}), 400, "devices[5].logs"),
            # a relay speaks for a device only with that device's token
            (report({"devices": [one["devices"][0], {**d1, "name": "digits2", "logs": [line]}]}), 403,
             "devices[1].token"),
            (report({"devices": [{**d2, "token": "forged", "logs": [line]}]}), 401, "devices[0].token"),
            (report({"devices": [{"name": "ghost", "token": device_tokens["digits1"], "logs": [line]}]}), 403,
             "devices[0].token"),
            (report(raw=b'{"devices": [' + b" " * (14 * 2**20) + b"]}"), 413, "body"),
            (as_relay("tasks", {"devices": [d1]}, as_token=other), 403, "Authorization"),
            (as_relay("tasks", {"devices": [d1] * 2}), 400, "devices[1].name"),
            (as_relay("tasks", {"devices": [{**d1, "evil": 1}]}), 400, "devices[0]"),
            (as_relay("tasks", {"devices": [{"name": f"d{i}", "token": "t"} for i in range(257)]}), 400,
             "devices"),
            (as_relay("tasks", raw=b'{"devices": [' + b" " * 2**20 + b"]}"), 413, "body"),
        ]
        for i, (answer, status, field) in enumerate(reports):
            assert answer.status_code == status, (i, answer.text)
            assert answer.json()["field"] == field, (i, answer.json())
        assert server.admin("GET", "/api/logs?device=digits1").json()["logs"] == []
        # the tasks: each device's own, or the refusal its own request would get
        tasks = as_relay("tasks", {"devices": [d1, {**d2, "token": device_tokens["digits1"]}]})
        assert tasks.status_code == 200, tasks.text
        first_task, refused = tasks.json()["tasks"]
        assert first_task["name"] == "digits1" and first_task["task"]["action"] == "train"
        assert first_task["task"]["round"] == 1 and first_task["task"]["config"]["evaluate"] is True
        assert refused == {"name": "digits2", "error": {"error": "forbidden", "field": "devices[1].token",
                                                        "message": refused["error"]["message"]}}
        # a good report: each part kept as the device's own request would have been
        both = report({"devices": [{**d1, "evaluation": ev, "logs": [line]},
                                   {**d2, "evaluation": {**ev, "round": 2}}]})
        assert both.status_code == 200, both.text
        kept = {d["name"]: d for d in both.json()["devices"]}
        assert kept["digits1"]["evaluation"]["accepted"] is True and kept["digits1"]["logs"]["stored"] == 1
        assert kept["digits2"]["evaluation"]["accepted"] is False, kept  # round 2 asked no evaluation
        assert "round 2" in kept["digits2"]["evaluation"]["message"] and "logs" not in kept["digits2"]
        stored = server.admin("GET", "/api/logs?device=digits1").json()["logs"]
        assert [(e["message"], e["round"]) for e in stored] == [("round 1: hello", 1)]
        assert server.get("/api/status").json()["round"]["reported"] == []

        # a good one is counted once: the same key and bytes again is a retry, other bytes a conflict
        good = body()  # (safetensors writes its metadata in no fixed order: the same bytes are kept)
        ok = post(good)
        assert ok.status_code == 200 and ok.json()["duplicate"] is False, ok.text
        retry = post(good)
        assert retry.status_code == 200 and retry.json()["duplicate"] is True, retry.text
        assert post(body(fill=2.0)).status_code == 409
        taken = post(good, key="k2")
        assert taken.status_code == 409 and taken.json()["field"] == "devices[0].name"
        assert server.get("/api/status").json()["round"]["reported"] == ["digits1"]

        # the same spirit at a relay: an update is checked before it is folded, nothing held
        relay = RelayProcess(server, tmp_path, "edge-2", "--flush-after", "300").start()
        try:
            wait_until(lambda: relay.status()["accepting"], 30, "the relay to see round 1")
            update = wire.encode({k: np.full(shape, 0.5, np.float32) for k, (shape, _) in model.items()},
                                 wire.Meta(round=1, model_version=0, num_examples=60))
            nan = wire.encode({k: np.full(shape, np.nan, np.float32) for k, (shape, _) in model.items()},
                              wire.Meta(round=1, model_version=0, num_examples=60))

            def via_relay(data: bytes, token: str | None = device_tokens["digits2"], **headers):
                auth = {"Authorization": f"Bearer {token}"} if token else {}
                return requests.post(f"{relay.url}/api/devices/digits2/updates/1", data=data, timeout=30,
                                     headers={"Content-Type": "application/octet-stream", **auth, **headers})

            for answer, status, field in [
                (via_relay(update, token=None), 401, "Authorization"),
                (via_relay(update, token="forged"), 401, "Authorization"),
                (via_relay(update, token=device_tokens["digits1"]), 403, "Authorization"),
                (via_relay(nan), 400, TENSOR),
                (via_relay(b"junk"), 400, "body"),
                (via_relay(update, **{"Idempotency-Key": "k" * 201}), 400, "Idempotency-Key"),
            ]:
                assert answer.status_code == status, answer.text
                assert answer.json()["field"] in (model if field is TENSOR else (field,)), answer.json()
            assert relay.status()["pending"] == {}
            held = via_relay(update, **{"Idempotency-Key": "u1"})
            assert held.status_code == 200 and held.json()["relay"] == "edge-2", held.text
            assert via_relay(update, **{"Idempotency-Key": "u1"}).json()["duplicate"] is True
        finally:
            relay.stop()
        # stopped cleanly, the relay sent what it held: digits2 is in, the round complete
        wait_until(lambda: server.get("/api/status").json()["completed_rounds"] == 1, 30, "round 1")
    finally:
        server.stop()


def test_pool_workers_are_relays_with_the_same_result_as_each_update(tmp_path, data_dir):
    """fedhub.simulate's workers send one sum a round for their devices; the same seeds give the
    same accuracy in every round as each update on its own."""
    import fedhub

    root = tmp_path / "devices"
    out = subprocess.run([sys.executable, "-m", "fedhub.split", "--devices", "12", "--limit", "80",
                          "--data-dir", str(data_dir), "--out", str(root), "--quiet"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    runs, private = {}, {}
    for relay in (True, False):
        started = time.monotonic()
        runs[relay] = list(fedhub.simulate("basic", root, rounds=2, framework="torch", workers=2,
                                           fraction=0.5, relay=relay, root=tmp_path / f"run-{relay}"))
        # under central DP the workers clip each change to the round's norm and sum those
        private[relay] = list(fedhub.simulate(
            "basic", root, rounds=2, framework="torch", workers=2, fraction=0.5, relay=relay,
            root=tmp_path / f"dp-{relay}", dp={"mode": "central-fixed", "noise_multiplier": 0.0,
                                               "clipping_norm": 0.05}))
        assert time.monotonic() - started < 400
    for with_relay, without in zip(private[True], private[False], strict=True):
        assert with_relay["test_accuracy"] == pytest.approx(without["test_accuracy"], abs=1e-3)
        assert {info["aggregation"]["relay"][:6] for info in with_relay["devices"].values()} == {"pool-w"}
        assert with_relay["privacy"]["clipping_norm"] == 0.05
    for with_relay, without in zip(runs[True], runs[False], strict=True):
        assert with_relay["test_accuracy"] == without["test_accuracy"], (with_relay, without)
        assert with_relay["num_updates"] == without["num_updates"] == 6
        assert {info["aggregation"]["relay"][:6] for info in with_relay["devices"].values()} == {"pool-w"}
        assert all("relay" not in info["aggregation"] for info in without["devices"].values())
        # the devices' evaluations and round lines went in the workers' one request a pass
        assert with_relay["federated_evaluation"] == without["federated_evaluation"]
        assert len(with_relay["federated_evaluation"]["devices"]) == 6
    for relay in (True, False):
        db = sqlite3.connect(tmp_path / f"run-{relay}" / "server" / "fedhub.sqlite3")
        lines = db.execute("SELECT device, round, message FROM device_logs WHERE round > 0").fetchall()
        db.close()
        for entry in runs[relay]:
            for name in entry["devices"]:
                said = [m for d, r, m in lines if d == name and r == entry["round"]]
                assert len(said) == 2 and said[1].startswith(f"round {entry['round']}: loss"), said
                assert ("in relay pool-w" in said[1]) is relay, said


@pytest.mark.parametrize(("args", "says"), [
    (["--port", "70000"], "--port must be from 0 to 65535"),
    (["--flush-after", "0"], "--flush-after must be positive"),
    (["--name", "../x"], "device name must be"),
    (["--max-devices", "1000"], "--max-devices must be from 1 to 256"),
    (["--flush-after", "nan"], "must be a finite number"),
])
def test_relay_command_refuses_bad_options_in_one_line(args, says):
    out = subprocess.run([sys.executable, "-m", "fedhub.relay", "--server", "http://127.0.0.1:9", *args],
                         cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and out.stdout == ""
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and says in lines[0], out.stderr
