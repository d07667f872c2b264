"""A new user's first hour, on real processes: one state directory for every command, a device
started before its server, a bare host:port, retry lines that say where and how long, progress
inside a round, quiet TensorFlow, and a ``.keras`` export that plain Keras gets right from raw
images.

The main run follows the README by hand: split the data into a fresh state directory, launch
the device (before the server exists), then start the server on that state directory from the
environment.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import math
import os
import signal
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import requests
from PIL import Image

from fedhub import state_dir as state
from fedhub.demo import wait_for_server
from fedhub.device.client import Client, server_url
from fedhub.server_process import free_port
from fedhub.split import load_fashion_mnist, write_device_data
from tests.conftest import ROOT, wait_until

pytestmark = pytest.mark.slow

EXAMPLES, EPOCHS, BATCH = 6000, 3, 8  # ~2,000 batches: long enough to watch the progress
TEST_LIMIT = 300
TF_CHATTER = ("oneDNN custom operations", "cpu_feature_guard", "absl::InitializeLog")


def clean_env(**extra: str) -> dict[str, str]:
    """This machine's environment without FedHub's secrets or state directory: a new user's."""
    drop = {"FEDHUB_ENROLL_SECRET", "FEDHUB_ADMIN_TOKEN", state.STATE_DIR_ENV}
    return {**{k: v for k, v in os.environ.items() if k not in drop}, **extra}


def run_cli(*args: str, env: dict[str, str] | None = None,
            timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout, env=env or clean_env())


def text(path: Path) -> str:
    return path.read_text(errors="replace") if path.exists() else ""


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def first_run(tmp_path_factory, data_dir):
    """One round of a run that lives in a fresh state directory, device started first."""
    tmp = tmp_path_factory.mktemp("first-hour")
    home = tmp / "run"
    out = run_cli("-m", "fedhub.split", "--devices", "1", "--limit", str(EXAMPLES),
                  "--data-dir", str(data_dir), "--state-dir", str(home), "--quiet")
    assert out.returncode == 0, out.stderr
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    device_log, server_log = tmp / "launcher.log", tmp / "server.log"
    with open(device_log, "wb") as log:  # the address without a scheme, as people type it
        launcher = subprocess.Popen(
            [sys.executable, "-m", "fedhub.device.launcher", "--server", f"127.0.0.1:{port}",
             "--devices", "1", "--state-dir", str(home), "--auto-activate"],
            cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=clean_env())
    server = None
    try:
        wait_until(lambda: f"server {url} unreachable" in text(device_log), 120,
                   f"the device retrying {url}:\n{text(device_log)}")
        with open(server_log, "wb") as log:  # the state directory from the environment
            server = subprocess.Popen(
                [sys.executable, "server.py", str(port), "--data-dir", str(data_dir), "--auto-activate",
                 "--start", "--rounds", "1", "--test-limit", str(TEST_LIMIT), "--epochs", str(EPOCHS),
                 "--batch-size", str(BATCH)],
                cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                env=clean_env(**{state.STATE_DIR_ENV: str(home)}))
        wait_for_server(url, server)
        progress = []  # what /api/status said about the device's local training, in order
        while launcher.poll() is None:
            r = requests.get(f"{url}/api/status", timeout=10).json()["round"] or {}
            if "device1" in r.get("progress", {}):
                progress.append(r["progress"]["device1"])
            with contextlib.suppress(subprocess.TimeoutExpired):
                launcher.wait(0.2)  # the status is read every 0.2 s until the device is done
        yield SimpleNamespace(url=url, home=home, code=launcher.returncode, progress=progress,
                              device_log=device_log, server_log=server_log,
                              admin_token=(home / "admin.token").read_text().strip())
    finally:
        stop(launcher)
        if server is not None:
            stop(server)


def test_device_started_before_its_server_on_a_fresh_state_directory(first_run):
    log = text(first_run.device_log)
    assert first_run.code == 0, log + text(first_run.server_log)
    # the retry lines named the address and the time left, and the secret was read once it existed
    retry = next(line for line in log.splitlines() if "unreachable" in line)
    assert f"server {first_run.url} unreachable" in retry and "giving up in" in retry, retry
    assert "enrolled, active" in log and "run finished" in log
    home = first_run.home
    # everything of the run is in the one state directory
    for secret in ("admin.token", "enroll.secret"):
        assert (home / secret).stat().st_mode & 0o077 == 0
    assert (home / "fedhub.sqlite3").is_file() and (home / "saved" / "round_00001.safetensors").is_file()
    assert (home / "eval" / "history.csv").read_text().count("\n") == 2  # header and round 1
    assert [p.name for p in (home / "runs").iterdir()]  # TensorBoard
    device = home / "devices" / "device1"
    assert (device / "token").is_file() and (device / "history.csv").is_file()
    assert (device / "saved" / "final.keras").is_file()


def test_progress_is_reported_during_local_training(first_run):
    seen = first_run.progress
    total = EPOCHS * math.ceil(EXAMPLES / BATCH)
    assert seen, "no progress was ever shown in /api/status"
    assert {p["total"] for p in seen} == {total}
    done = [p["done"] for p in seen]
    assert done == sorted(done) and all(0 <= d <= total for d in done), done
    assert any(0 < d < total for d in done), done  # seen in the middle of the local training
    assert requests.get(f"{first_run.url}/api/status", timeout=10).json()["round"] is None


def test_no_tensorflow_start_up_lines_in_the_logs(first_run):
    for log in (first_run.device_log, first_run.server_log):
        chatter = [line for line in text(log).splitlines() if any(s in line for s in TF_CHATTER)]
        assert not chatter, f"{log.name}: {chatter}"


def test_exported_model_takes_raw_images_and_answers_probabilities(first_run, data_dir):
    import keras

    headers = {"Authorization": f"Bearer {first_run.admin_token}"}
    r = requests.get(f"{first_run.url}/api/rounds/latest/model.keras", headers=headers, timeout=60)
    assert r.status_code == 200, r.text
    path = first_run.home / "exported.keras"
    path.write_bytes(r.content)
    model = keras.saving.load_model(path)  # plain Keras, nothing of FedHub's
    _, (x_test, y_test) = load_fashion_mnist(data_dir)
    x, y = x_test[:TEST_LIMIT], y_test[:TEST_LIMIT]
    assert x.dtype == np.uint8 and x.shape[1:] == (28, 28)
    probabilities = model.predict(x, verbose=0)
    assert probabilities.shape == (TEST_LIMIT, 10) and (probabilities >= 0).all()
    np.testing.assert_allclose(probabilities.sum(axis=1), 1.0, atol=1e-5)
    # the same images the server tested round 1 on: the same accuracy, from raw uint8 pixels
    history = requests.get(f"{first_run.url}/api/history", timeout=10).json()["rounds"][-1]
    accuracy = float((probabilities.argmax(axis=1) == y).mean())
    assert accuracy == pytest.approx(history["test_accuracy"], abs=1e-9)
    assert model.evaluate(x, y, verbose=0, return_dict=True)["accuracy"] == pytest.approx(
        history["test_accuracy"], abs=1e-6)
    # and the same answers as the server's own predictions
    files = []
    for i in range(8):
        png = io.BytesIO()
        Image.fromarray(x[i]).save(png, format="PNG")
        files.append(("image", (f"test{i}.png", png.getvalue(), "image/png")))
    answers = requests.post(f"{first_run.url}/api/predict", files=files, headers=headers, timeout=60).json()
    for i, answer in enumerate(answers):
        assert answer["class_index"] == int(probabilities[i].argmax())
        np.testing.assert_allclose(answer["probabilities"], probabilities[i], atol=1e-5)


# --------------------------------------------------------------------------- the enrollment secret


def test_a_refused_secret_file_is_read_again_then_explained(server_factory, tmp_path, fashion):
    server = server_factory("--test-limit", "10", "--no-tensorboard").start()
    (x, y), _ = fashion
    write_device_data(tmp_path / "devices", "late", x[:50], y[:50])
    write_device_data(tmp_path / "devices", "lost", x[:50], y[:50])
    elsewhere = tmp_path / "elsewhere"  # a state directory the server never wrote to
    wrong = tmp_path / "wrong"  # one with another server's secret
    wrong.mkdir()
    (wrong / "enroll.secret").write_text("not-the-secret\n")

    def device(name: str, home: Path, retry_for: str) -> subprocess.Popen:
        with open(tmp_path / f"{name}.log", "wb") as out:
            return subprocess.Popen(
                [sys.executable, "device/device.py", "--server", server.url, "--name", name,
                 "--state-dir", str(home), "--devices-root", str(tmp_path / "devices"),
                 "--retry-for", retry_for, "--poll-wait", "2"],
                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=clean_env())

    late = device("late", elsewhere, "300")
    lost = device("lost", wrong, "2")
    try:
        wait_until(lambda: "refused the enrollment secret" in text(tmp_path / "late.log"), 120,
                   "the refusal to be retried")
        line = next(s for s in text(tmp_path / "late.log").splitlines() if "refused the enrollment" in s)
        assert str(elsewhere / "enroll.secret") in line and "reading it again in" in line
        assert "giving up in" in line and server.url in line
        # the secret file appears (the right server's secret): the device enrolls without a restart
        elsewhere.mkdir()
        fd = os.open(elsewhere / "enroll.secret", os.O_WRONLY | os.O_CREAT, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(server.enroll_secret + "\n")
        wait_until(lambda: "enrolled" in text(tmp_path / "late.log"), 60, "the device to enroll")
        # with a wrong secret, when the retry time is spent: one clear explanation, exit 1
        assert lost.wait(120) == 1
    finally:
        stop(late)
        stop(lost)
    assert late.returncode == 0
    said = text(tmp_path / "lost.log")
    assert "Traceback" not in said, said
    last = said.strip().splitlines()[-1]
    assert f"the secret in {wrong / 'enroll.secret'} is not this server's" in last, last
    assert "--state-dir" in last and "FEDHUB_STATE_DIR" in last and "--enroll-secret" in last
    names = {d["name"] for d in server.get("/api/devices").json()["devices"]}
    assert names == {"late"}


# --------------------------------------------------------------------------- addresses


def test_server_addresses_with_or_without_a_scheme():
    assert server_url("127.0.0.1:4002") == "http://127.0.0.1:4002"
    assert server_url(" localhost:4002/ ") == "http://localhost:4002"
    assert server_url("https://fedhub.example.org") == "https://fedhub.example.org"
    assert server_url("http://[::1]:4000") == "http://[::1]:4000"
    assert Client("127.0.0.1:4002", "d").server == "http://127.0.0.1:4002"
    for bad in ("4002", "ftp://host:21", "127.0.0.1:port", "127.0.0.1:99999", "http://", "a b:1", "h:1?x=1"):
        with pytest.raises(ValueError):
            server_url(bad)


@pytest.mark.parametrize("module, argv", [
    ("fedhub.device.main", ["--server", "ftp://127.0.0.1:4002", "--name", "d1"]),
    ("fedhub.device.main", ["--server", "127.0.0.1:port", "--name", "d1"]),
    ("fedhub.device.main", ["--server", "4002", "--name", "d1"]),
    ("fedhub.device.launcher", ["--server", "http://", "--devices", "1"]),
])
def test_a_bad_server_address_is_one_line_and_exit_2(module, argv):
    """In-process: the option parsing refuses before anything starts (each command's real-process
    check is in tests/test_cli_settings.py)."""
    from tests.cli_inprocess import assert_one_line_error, run_main

    entry = {"fedhub.device.main": "parse_args", "fedhub.device.launcher": "main"}[module]
    assert_one_line_error(run_main(getattr(importlib.import_module(module), entry), argv), "error: --server:")


# --------------------------------------------------------------------------- the state directory


def test_one_state_directory_for_every_command(tmp_path, monkeypatch):
    home = tmp_path / "run"
    monkeypatch.delenv(state.STATE_DIR_ENV, raising=False)
    default = state.resolve()
    assert default.server_dir == ROOT / "server_training" and default.eval_dir == ROOT / "eval"
    assert default.devices_root == ROOT / "devices" and default.runs_dir == ROOT / "runs"
    given = state.StateDir(home, home / "eval", home / "devices", home / "runs")
    assert state.resolve(home) == given and given.admin_token_file == home / "admin.token"
    monkeypatch.setenv(state.STATE_DIR_ENV, str(home))
    assert state.resolve() == given
    assert state.resolve(tmp_path / "flag").server_dir == tmp_path / "flag"  # the flag wins
    monkeypatch.chdir(tmp_path)
    assert state.resolve("relative").server_dir == tmp_path / "relative"  # absolute, for children
    # every command has the option, with the same words
    for argv in (["server.py"], ["device/device.py"], ["-m", "fedhub.device.launcher"],
                 ["-m", "fedhub.split"], ["-m", "fedhub.cleaner"]):
        out = run_cli(*argv, "--help")
        assert out.returncode == 0, out.stderr
        assert "--state-dir DIR" in out.stdout and "FEDHUB_STATE_DIR" in out.stdout, argv


def test_the_cleaner_keeps_the_run_data_in_a_state_directory(tmp_path):
    home = tmp_path / "run"
    files = {
        "fedhub.sqlite3": "db", "saved/round_00001.safetensors": "w", "admin.token": "a",
        "enroll.secret": "e", "eval/history.csv": "h", "runs/r1/events": "tb",
        "devices/device1/data/train.npz": "x", "devices/device1/token": "t",
        "devices/device1/history.csv": "h", "devices/partition.json": "{}",
    }
    for name, content in files.items():
        (home / name).parent.mkdir(parents=True, exist_ok=True)
        (home / name).write_text(content)
    out = run_cli("-m", "fedhub.cleaner", env=clean_env(**{state.STATE_DIR_ENV: str(home)}))
    assert out.returncode == 0, out.stderr
    left = {str(p.relative_to(home)) for p in home.rglob("*") if p.is_file()}
    assert left == {"admin.token", "enroll.secret", "runs/r1/events", "devices/device1/data/train.npz",
                    "devices/partition.json"}
