"""Virtual devices on a worker pool: the simulate command end to end, a worker SIGKILLed and
restarted, devices that raise without taking their worker down, and memory that does not grow
with the number of devices. Real server, real worker processes, real Keras training."""

import importlib
import json
import math
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from tests.cli_inprocess import assert_one_line_error, run_main
from tests.conftest import ROOT, wait_until

MODEL_BYTES = 101_770 * 4  # the basic network's float32 weights, the bulk of a download or upload


def run_simulate(*args: str, timeout: float = 600,
                 env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fedhub.simulate", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=timeout, env=None if env is None else {**os.environ, **env})


@pytest.mark.slow
def test_simulate_command_30_devices_2_workers(tmp_path, data_dir):
    """Also: --gpus-per-worker 0.5 puts both workers on the one GPU this process may use (here a
    GPU that is not there: the frameworks fall back to the CPU, and the workers say what they saw)."""
    out = run_simulate("--devices", "30", "--fraction", "0.2", "--workers", "2", "--rounds", "2",
                       "--limit", "40", "--test-limit", "300", "--data-dir", str(data_dir),
                       "--root", str(tmp_path / "sim"), "--history", str(tmp_path / "history.json"),
                       "--gpus-per-worker", "0.5", env={"CUDA_VISIBLE_DEVICES": "5"})
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    summary = json.loads(lines[-1])
    for key in ("rounds", "final_accuracy", "wall_s", "first_round_s", "peak_rss_mb", "bytes_up",
                "bytes_down"):
        assert key in summary, key
    history = json.loads((tmp_path / "history.json").read_text())
    assert summary["rounds"] == 2 == len(history)
    assert summary["final_accuracy"] == history[-1]["test_accuracy"]
    assert [f"round {e['round']}: global test accuracy {e['test_accuracy']:.4f}" for e in history] == \
        [line.split(" (loss")[0] for line in lines[:-1] if line.startswith("round ")]
    assert "round 1" in out.stderr and "device" in out.stderr  # the per-round progress bars
    assert 0 < summary["first_round_s"] <= summary["wall_s"]
    assert summary["peak_rss_mb"] > 300 and summary["workers"] == 2 and summary["restarts"] == 0
    assert summary["gpus_per_worker"] == 0.5 and summary["worker_gpus"] == ["5", "5"]

    # Each round: 20% of 30 devices selected, every one of them reported, counted once.
    examples = {name: info["examples"] for name, info in
                json.loads((tmp_path / "sim" / "devices" / "partition.json").read_text())["devices"].items()}
    assert len(examples) == 30
    for entry in history:
        assert entry["num_updates"] == len(entry["devices"]) == math.ceil(0.2 * 30)
        assert set(entry["devices"]) <= set(examples)
        assert entry["num_examples"] == sum(examples[name] for name in entry["devices"])
        assert all(d["num_examples"] == examples[name] for name, d in entry["devices"].items())
    # 12 updates went up as one float64 partial sum per worker and round (each worker is a relay
    # for its devices), not 12 of them; each worker downloaded each of the 2 versions once.
    assert 2 * 2 * 2 * MODEL_BYTES <= summary["bytes_up"] < 12 * MODEL_BYTES
    assert 2 * MODEL_BYTES <= summary["bytes_down"] < 6 * MODEL_BYTES


def test_simulate_command_refuses_bad_arguments():
    for args, message in ((["--devices", "0"], "--devices must be at least 1"),
                          (["--fraction", "1.5"], "--fraction must be more than 0 and at most 1, got 1.5"),
                          (["--workers", "0"], "--workers must be at least 1"),
                          (["--strategy", "krum", "--strategy-arg", "f=1"],
                           "strategy krum: unknown key 'f' (allowed keys: num_malicious)"),
                          (["--strategy", "bulyan", "--strategy-arg", "num_malicious=2"],
                           "needs at least 11 updates a round; --fraction x --devices is 10")):
        # in-process (the real-process check is in tests/test_cli_settings.py)
        assert_one_line_error(run_main(importlib.import_module("fedhub.simulate").parse_args, args), message)


@pytest.fixture
def basic_devices(tmp_path, data_dir):
    """``make(n, limit)``: n memory-mappable Fashion-MNIST device folders; their names."""
    from fedhub.split import split_to_devices

    def make(n: int, limit: int) -> list[str]:
        return list(split_to_devices(tmp_path / "devices", n, limit=limit, data_dir=data_dir, progress=False,
                                     memmap=True))

    return make


def enrolled(server, names) -> bool:
    states = {d["name"]: d["lifecycle"] for d in server.devices()}
    return all(states.get(name) not in (None, "validating") for name in names)


@pytest.mark.slow
def test_killed_worker_is_restarted_and_its_devices_carry_on(tmp_path, data_dir, basic_devices):
    import fedhub
    from fedhub.device.pool import DevicePool

    names = basic_devices(6, 40)
    with fedhub.Server("basic", rounds=3, start=False, min_devices=6, quorum=1.0, data_dir=data_dir,
                       test_limit=300, state_dir=tmp_path / "server") as server:
        pool = DevicePool(server.url, names, tmp_path / "devices", workers=2,
                          enroll_secret=server.enroll_secret, keepalive=5)
        with pool:
            wait_until(lambda: enrolled(server, names), 300, "six enrolled devices")
            server.start_training()
            # Killed while round 1 is open: rounds of six small devices take well under a
            # second, so waiting for round 1 to complete could leave the kill after round 3.
            wait_until(lambda: server.status()["round"] is not None, 300, "round 1 to open")
            os.kill(pool.pids()[0], signal.SIGKILL)
            wait_until(lambda: server.status()["status"] == "finished", 400, "the run to finish")
            assert pool.wait(timeout=120)
            stats = pool.stats()
        history = server.history()
        lifecycle = {d["name"]: d["lifecycle"] for d in server.devices()}
    assert stats["restarts"] == 1, (tmp_path / "devices" / "logs" / "worker-0.log").read_text()[-3000:]
    # Every round needed all six (fraction 1, quorum 1): the killed worker's devices
    # (device1, device3, device5) trained in the rounds after it died, round 3 at least.
    assert [e["round"] for e in history] == [1, 2, 3]
    for entry in history:
        assert sorted(entry["devices"]) == sorted(names) and entry["num_updates"] == 6
    assert {t["device"] for t in stats["tasks"] if t["round"] == 3} == set(names)
    assert set(lifecycle.values()) == {"finished"}


def digits_model():
    import keras

    model = keras.Sequential([keras.Input((64,), name="pixels"), keras.layers.Dense(10, name="logits")])
    model.compile(optimizer=keras.optimizers.SGD(0.5),
                  loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True), metrics=["accuracy"])
    return model


@pytest.mark.slow
def test_devices_that_raise_do_not_stop_their_worker(tmp_path):
    """A device whose data file breaks mid-run, one whose history file cannot be written and one
    refused for invalid labels: the others on the same worker train every round."""
    import fedhub
    from examples.digits import load_digits
    from fedhub.device.pool import DevicePool
    from fedhub.split import write_device_arrays

    x, y = load_digits()
    root = tmp_path / "devices"
    names = [f"d{i}" for i in range(1, 6)]
    for i, name in enumerate(names):
        labels = y[i * 200:(i + 1) * 200] + (10 if name == "d5" else 0)  # d5: labels out of range
        write_device_arrays(root, name, x[i * 200:(i + 1) * 200], labels)
    with fedhub.Server(digits_model(), test_data=(x[1400:], y[1400:]), rounds=2, start=False, min_devices=4,
                       quorum=0.5, epochs=1, batch_size=16, state_dir=tmp_path / "server") as server:
        pool = DevicePool(server.url, names, root, workers=1, model="server",
                          enroll_secret=server.enroll_secret, keepalive=5)
        with pool:
            wait_until(lambda: enrolled(server, names), 300, "five devices with their validation")
            (root / "d2" / "data" / "x.npy").write_bytes(b"\x93NUMPY broken")  # training will raise
            (root / "d3" / "history.csv").mkdir(parents=True)  # recording the round will raise
            server.start_training()
            wait_until(lambda: server.status()["status"] == "finished", 300, "the run to finish")
            assert pool.wait(timeout=120)
            stats = pool.stats()
        history = server.history()
        lifecycle = {d["name"]: (d["lifecycle"], d["lifecycle_reason"]) for d in server.devices()}
    assert stats["restarts"] == 0 and stats["workers"] == 1
    assert lifecycle["d5"][0] == "invalid" and "labels" in lifecycle["d5"][1]
    assert stats["exit_codes"] == {"d1": 0, "d2": 0, "d3": 0, "d4": 0, "d5": 1}
    assert [e["round"] for e in history] == [1, 2]
    for entry in history:
        devices = entry["devices"]
        assert "d5" not in devices
        assert devices["d1"].get("failed") is None and devices["d4"].get("failed") is None
        # d2's training raised: an ERROR for the round, no update.
        assert devices["d2"]["failed"] and "d2" not in {n for n, d in devices.items() if "num_examples" in d}
        # d3's update went up, then writing its history raised: marked failed, worker unharmed.
        assert devices["d3"]["failed"] and "IsADirectoryError" in devices["d3"]["error"]
        assert entry["num_updates"] == 3 and entry["num_examples"] == 600
    assert stats["failures"] == 2  # d3, once per round (d2's trainer error is the runner's to report)


@pytest.mark.slow
def test_worker_memory_does_not_grow_with_the_number_of_devices(tmp_path, data_dir):
    """200 devices of 300 images cost a worker what 20 do: only the devices training are read.
    (The worker's peak is measured after its start-up, whose TensorFlow peak would hide it.)"""
    import fedhub
    from fedhub.split import split_to_devices

    peaks = {}
    for count, fraction in ((20, 0.5), (200, 0.05)):  # 10 devices train in either run
        root = tmp_path / f"run{count}"
        split_to_devices(root / "devices", count, limit=300, data_dir=data_dir, progress=False, memmap=True,
                         holdout=0.0)  # 200 shares of 300: nothing beyond the 300 to hold out
        history = fedhub.simulate("basic", root / "devices", rounds=1, workers=1, fraction=fraction,
                                  data_dir=data_dir, test_limit=300, root=root, timeout=600)
        assert history[0]["num_updates"] == 10 and history[0]["num_examples"] == 3000
        (peak,) = history.stats["worker_peak_rss_mb"]
        peaks[count] = peak
    # Held in memory, 180 more devices' images would be 180 * 300 * 784 bytes = 40 MiB more.
    assert peaks[200] - peaks[20] < 20, peaks


@pytest.mark.slow
def test_launcher_hosts_devices_on_workers(server_factory, split_devices, tmp_path):
    """``python -m fedhub.device.launcher --workers``: train.npz folders, a server process of its own."""
    root = split_devices(4, 30)
    server = server_factory("--rounds", "1", "--min-devices", "4", "--auto-activate", "--start",
                            "--test-limit", "200").start()
    env = {**os.environ, "FEDHUB_ENROLL_SECRET": server.enroll_secret}
    out = subprocess.run([sys.executable, "-m", "fedhub.device.launcher", "--server", server.url,
                          "--devices", "4",
                          "--workers", "1", "--devices-root", str(root)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stdout + out.stderr + (root / "logs" / "worker-0.log").read_text()[-3000:]
    assert "4 devices on 1 workers" in out.stdout
    (entry,) = server.get("/api/history").json()["rounds"]
    assert sorted(entry["devices"]) == ["device1", "device2", "device3", "device4"]
    assert entry["num_examples"] == 120
    for name in entry["devices"]:  # each virtual device keeps its own token and history
        assert (root / name / "token").is_file()
        assert (root / name / "history.csv").read_text().splitlines()[1].startswith("1,")


@pytest.mark.slow
def test_simulate_any_keras_model_on_workers(tmp_path):
    """The Python API's pool: any compiled Keras model, arrays in memory; workers fetch the model."""
    import fedhub
    from examples.digits import load_digits

    x, y = load_digits()
    partitions = [(x[i * 150:(i + 1) * 150], y[i * 150:(i + 1) * 150]) for i in range(6)]
    seen = []
    history = fedhub.simulate(digits_model, partitions, rounds=2, workers=2, fraction=0.5,
                              test_data=(x[1400:], y[1400:]), batch_size=16, root=tmp_path, timeout=400,
                              on_round=lambda entry: seen.append(entry["round"]))
    assert seen == [1, 2] == [entry["round"] for entry in history]
    for entry in history:
        assert entry["num_updates"] == len(entry["devices"]) == 3 and entry["num_examples"] == 450
    tasks = history.stats["tasks"]
    assert sorted((t["round"], t["device"]) for t in tasks) == \
        sorted((entry["round"], name) for entry in history for name in entry["devices"])
    assert history.stats["workers"] == 2 and history.stats["restarts"] == 0
    assert fedhub.evaluate(history.model, x[1400:], y[1400:])["accuracy"] == \
        pytest.approx(history[-1]["test_accuracy"], abs=1e-6)
    for name in ("device1", "device6"):  # the arrays went to memory-mappable files in each device's folder
        assert (tmp_path / "devices" / name / "data" / "x.npy").is_file()


def children(pid: int) -> set[int]:
    """Process ids whose parent is ``pid`` (from /proc)."""
    out = set()
    for stat in os.listdir("/proc"):
        if stat.isdigit():
            try:
                fields = Path(f"/proc/{stat}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if int(fields[1]) == pid:
                out.add(int(stat))
    return out


def alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"


@pytest.mark.slow
def test_workers_exit_when_the_simulation_is_killed(tmp_path, data_dir):
    """SIGKILL the simulate command (no chance to stop its workers): they notice and exit,
    instead of retrying a server that is gone."""
    proc = subprocess.Popen([sys.executable, "-m", "fedhub.simulate", "--devices", "20", "--workers", "2",
                             "--rounds", "200", "--limit", "40", "--test-limit", "200", "--quiet",
                             "--data-dir", str(data_dir), "--root", str(tmp_path / "sim")],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: len(children(proc.pid)) >= 2, 120, "two worker processes")
        wait_until(lambda: (tmp_path / "sim" / "logs" / "worker-1.log").exists(), 120, "the workers' logs")
        workers = children(proc.pid)
    finally:
        proc.kill()
        proc.wait(30)
    wait_until(lambda: not any(alive(w) for w in workers), 40, "the orphaned workers to exit")
