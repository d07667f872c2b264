"""Settings and command lines (issue 18, defects 5 and 6, first-run edges 1-3 and 9).

* Every number of the run's settings declares its range beside its default, and one check
  (``fedhub.engine.params.check_numbers``) refuses a non-finite or out-of-range number for
  ``server.py``, ``fedhub.Server`` and ``fedhub.simulate`` alike, before anything loads.
* Every command refuses bad input with one ``error: ...`` line and exit 2: checked in-process
  (``main(argv)``/``parse_args(argv)``) for a table of refusals across every command, and once
  per command in a real process.
* A port in use, a state database that is not one, the data lookup, a split over fewer
  devices, the demo's own folder, the simulate progress bar, and TensorFlow's chatter.
"""

from __future__ import annotations

import importlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fedhub import serve as server
from fedhub import split as format_dataset
from fedhub.engine import params
from fedhub.engine.config import FederationConfig, TrainingConfig
from fedhub.engine.privacy import DPConfig
from fedhub.engine.secagg import SecAggConfig
from fedhub.engine.storage import Storage, StorageError

from .cli_inprocess import assert_one_line_error, run_main
from .conftest import ROOT
from .test_format_dataset import write_fake_dataset


def entry(module: str, name: str = "main"):
    """A command's entry point, imported when the test runs (bench/async.py is ``bench.async``)."""
    return lambda argv: getattr(importlib.import_module(module), name)(argv)


# --------------------------------------------------------------------------- the one range check


@pytest.mark.parametrize("cls", [FederationConfig, TrainingConfig, DPConfig, SecAggConfig,
                                 server.ServerConfig])
def test_every_number_of_the_run_settings_declares_its_range(cls):
    assert params.unbounded(cls) == []


def test_check_numbers_refuses_non_finite_and_out_of_range_numbers_by_name():
    with pytest.raises(ValueError, match=r"^round_timeout must be a finite number, got nan$"):
        FederationConfig(round_timeout=float("nan")).validate()
    with pytest.raises(ValueError, match=r"^device_timeout must be a finite number"):
        FederationConfig(device_timeout=float("inf")).validate()
    with pytest.raises(ValueError, match=r"^learning_rate must be more than 0"):
        FederationConfig(training=TrainingConfig(learning_rate=0.0)).validate()
    with pytest.raises(ValueError,
                       match=r"^dp.noise_multiplier must be at least 0 and at most 100, got 1e\+300$"):
        FederationConfig(dp={"noise_multiplier": 1e300}).validate()
    with pytest.raises(ValueError, match=r"^threads must be at least 1 and at most 1024, got 0$"):
        server.ServerConfig(threads=0).validate()
    with pytest.raises(ValueError, match=r"^max_upload_mb must be at least 0.0625 .* got -1$"):
        server.ServerConfig(max_upload_mb=-1).validate()
    with pytest.raises(ValueError, match=r"^seed must be at least 0"):  # no float overflow
        FederationConfig(seed=10**400).validate()
    FederationConfig().validate()  # the defaults pass
    server.ServerConfig(port=0, test_limit=None).validate()  # 0: any free port; None: no limit


@pytest.mark.parametrize("kwargs, message", [
    ({"threads": 0}, "threads must be at least 1"),
    ({"round_timeout": float("nan")}, "round_timeout must be a finite number"),
    ({"device_timeout": -1.0}, "device_timeout must be more than 0"),
    ({"dp": {"noise_multiplier": 1e300}}, "dp.noise_multiplier must be at least 0 and at most 100"),
    ({"port": 70000}, "port must be at least 0 and at most 65535"),
    ({"max_stalenes": 3}, "unknown setting max_stalenes (did you mean max_staleness?)"),
    ({"buffer_size": "3"}, "buffer_size must be an integer, got '3'"),
])
def test_fedhub_server_refuses_an_unusable_setting_when_made(tmp_path, kwargs, message):
    import fedhub

    with pytest.raises(ValueError) as refused:
        fedhub.Server("basic", state_dir=tmp_path / "state", **kwargs)
    assert message in str(refused.value)
    assert not (tmp_path / "state").exists()  # refused before anything was made


def test_fedhub_simulate_refuses_an_unusable_server_setting_before_it_starts(tmp_path):
    import fedhub

    x, y = np.zeros((4, 28, 28), np.uint8), np.arange(4, dtype=np.uint8)
    with pytest.raises(ValueError, match=r"round_timeout must be a finite number"):
        fedhub.simulate("basic", [(x, y)], rounds=1, root=tmp_path, round_timeout=float("nan"))
    assert not (tmp_path / "server").exists()


# --------------------------------------------------------------------------- one line, every command

REFUSALS = [
    # server.py: defects 5 and 6
    ("fedhub.serve", ["--threads", "0"], "--threads must be at least 1 and at most 1024, got 0"),
    ("fedhub.serve", ["--round-timeout", "nan"],
     "argument --round-timeout: must be a finite number, got 'nan'"),
    ("fedhub.serve", ["--device-timeout", "nan"], "argument --device-timeout: must be a finite number"),
    ("fedhub.serve", ["--round-timeout", "0"], "--round-timeout must be more than 0"),
    ("fedhub.serve", ["--max-upload-mb", "-1"], "--max-upload-mb must be at least 0.0625"),
    ("fedhub.serve", ["--max-upload-mb", "nan"], "argument --max-upload-mb: must be a finite number"),
    ("fedhub.serve", ["--max-image-mb", "inf"],
     "argument --max-image-mb: must be a finite number, got 'inf'"),
    ("fedhub.serve", ["--log-level", "BOGUS"], "argument --log-level: invalid choice: 'BOGUS'"),
    ("fedhub.serve", ["--dp", "central-fixed", "--dp-noise-multiplier", "1e300"],
     "--dp-noise-multiplier must be at least 0 and at most 100, got 1e+300"),
    ("fedhub.serve", ["--quorum", "1.5"], "--quorum must be more than 0 and at most 1, got 1.5"),
    ("fedhub.serve", ["--strategy-memory-mb", "1e300"], "--strategy-memory-mb must be at least 0"),
    ("fedhub.serve", ["--tensorboard-devices", "-1"], "--tensorboard-devices must be"),
    ("fedhub.serve", ["--epochs", "0"], "--epochs must be at least 1"),
    ("fedhub.serve", ["--port", "x"], "argument --port: invalid int value: 'x'"),
    # python -m fedhub.simulate: no usage block, no traceback
    ("fedhub.simulate", ["--devices", "0"], "--devices must be at least 1"),
    ("fedhub.simulate", ["--fraction", "2"], "--fraction must be more than 0 and at most 1, got 2"),
    ("fedhub.simulate", ["--workers", "0"], "--workers must be at least 1"),
    ("fedhub.simulate", ["--mode", "async", "--compression", "q8", "--compress-downlink"],
     "asynchronous mode (--mode=async) cannot use --compress-downlink"),
    ("fedhub.simulate", ["--learning-rate", "nan"], "argument --learning-rate: must be a finite number"),
    ("fedhub.simulate", ["--max-staleness", "-1"], "--max-staleness must be"),
    ("fedhub.simulate", ["--dp", "local", "--dp-clip", "-1"], "--dp-clipping-norm must be more than 0"),
    ("fedhub.simulate", ["--dp", "local", "--dp-clipping-norm", "1e300"],
     "--dp-clipping-norm must be more than 0 and at most"),
    ("fedhub.simulate", ["--devices", "x"], "argument --devices: invalid int value: 'x'"),
    # device/device.py (argument parsing)
    ("fedhub.device.main", ["4000", "device1", "--poll-wait", "nan"],
     "argument --poll-wait: must be a finite"),
    ("fedhub.device.main", ["4000", "device1", "--retry-for", "-1"], "--retry-for from 0 to"),
    ("fedhub.device.main", ["x", "device1"], "PORT must be a number, got 'x'"),
    ("fedhub.device.launcher", ["--devices", "0"], "--devices must be at least 1"),
    ("fedhub.device.launcher", ["--devices", "x"], "argument --devices: invalid int value: 'x'"),
    # the utilities
    ("fedhub.split", ["--devices", "x"], "argument --devices: invalid int value: 'x'"),
    ("fedhub.split", ["--devices", "2", "--alpha", "nan"],
     "argument --alpha: must be a finite number"),
    ("fedhub.cleaner", ["--bogus"], "unrecognized arguments: --bogus"),
    ("fedhub.demo", ["--devices", "0"], "--devices must be from 1 to 100"),
    ("fedhub.demo", ["--timeout", "inf"], "argument --timeout: must be a finite number"),
    ("examples.python_api", ["--devices", "0"], "--devices must be from 1 to 100"),
    ("examples.digits", ["--devices", "x"], "argument --devices: invalid int value: 'x'"),
    # the benchmarks' argument errors
    ("bench.async", ["--devices", "0"], "--devices, --buffer, --rounds and --versions must be at least 1"),
    ("bench.compression", ["--rounds", "0"], "--rounds must be at least 1"),
    ("bench.load", ["--clients", "0"], "--clients must be between 1 and 2000"),
    ("bench.privacy", [], "give --run and/or --report"),
    ("bench.round_overhead", ["--devices", "0"], "--devices and --per-device must be at least 1"),
    ("bench.secagg", ["--dropout", "nan"], "argument --dropout: must be a finite number"),
    ("bench.simulation", ["--workers", "0"], "--devices, --workers and the --rounds-* options"),
    ("bench.strategies", [], "give --part a|b|c and/or --report"),
]
# Entry points that stop after checking the options, so a case that were accepted would not
# start a server or a simulation inside the test process.
CHECK_ONLY = {"fedhub.serve": "parse_args", "fedhub.simulate": "parse_args",
              "fedhub.device.main": "parse_args",
              "fedhub.demo": "parse_args"}


@pytest.mark.parametrize("module, argv, message", REFUSALS,
                         ids=[f"{m}:{' '.join(a)}" for m, a, _ in REFUSALS])
def test_every_command_refuses_with_one_error_line_and_exit_2(module, argv, message):
    outcome = run_main(entry(module, CHECK_ONLY.get(module, "main")), argv)
    assert_one_line_error(outcome, message)
    assert outcome.stdout == ""


def test_format_dataset_refuses_a_split_it_cannot_make_with_one_line(tmp_path, data_dir):
    outcome = run_main(format_dataset.main, ["--devices", "0", "--data-dir", str(data_dir),
                                             "--out", str(tmp_path / "out"), "--quiet"])
    assert_one_line_error(outcome, "n_devices must be at least 1")


# One real process per command: the same single line reaches the terminal, exit 2, no traceback.
REAL = [
    (["server.py", "--max-upload-mb", "nan"], "argument --max-upload-mb: must be a finite number"),
    (["device/device.py", "4000", "device1", "--poll-wait", "nan"], "argument --poll-wait: must be a finite"),
    (["-m", "fedhub.simulate", "--mode", "async", "--compression", "q8", "--compress-downlink"],
     "asynchronous mode (--mode=async) cannot use --compress-downlink"),
    (["-m", "fedhub.device.launcher", "--devices", "x"], "argument --devices: invalid int value: 'x'"),
    (["-m", "fedhub.split", "--devices", "x"], "argument --devices: invalid int value: 'x'"),
    (["-m", "fedhub.cleaner", "--bogus"], "unrecognized arguments: --bogus"),
    (["-m", "fedhub.demo", "--devices", "0"], "--devices must be from 1 to 100"),
    (["-m", "examples.python_api", "--devices", "0"], "--devices must be from 1 to 100"),
    (["bench/secagg.py", "--dropout", "nan"], "argument --dropout: must be a finite number"),
]


@pytest.mark.slow
@pytest.mark.parametrize("argv, message", REAL, ids=[" ".join(a) for a, _ in REAL])
def test_each_command_in_a_real_process_prints_the_one_line(tmp_path, argv, message):
    out = subprocess.run([sys.executable, *argv], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         env={**os.environ, "FEDHUB_STATE_DIR": str(tmp_path / "state")})
    assert out.returncode == 2, out
    assert out.stderr.splitlines() == [out.stderr.strip()] and out.stderr.startswith("error: "), out.stderr
    assert message in out.stderr, out.stderr
    assert not (tmp_path / "state").exists()


# --------------------------------------------------------------------------- port and state database


class StubModel:
    """Stands in for the Keras side: the state database is opened before it is asked for anything."""

    builtin = False

    def evaluate(self, weights):  # pragma: no cover - never reached
        raise AssertionError("the engine was built on a broken state database")

    def initial_weights(self):
        raise AssertionError("the engine was built on a broken state database")


def test_a_port_in_use_is_said_before_anything_loads(tmp_path, monkeypatch):
    def loaded(config):
        raise AssertionError("the model was loaded before the port was checked")

    monkeypatch.setattr(server, "load_global_model", loaded)
    with socket.socket() as other:  # another server on the port
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        outcome = run_main(server.main, [str(port), "--state-dir", str(tmp_path / "state"),
                                         "--no-tensorboard"])
    assert outcome.code == 2, outcome
    assert outcome.stderr == f"error: port {port} is in use (another FedHub server?)\n"
    assert not (tmp_path / "state").exists()  # nothing loaded, no state or TensorBoard folder made


@pytest.mark.parametrize("make_bad, message", [
    (lambda db: db.write_bytes(b"this is not a database" * 100), "file is not a database"),
    (lambda db: db.mkdir(), "unable to open database file"),  # cannot be created: a folder has its name
])
def test_a_state_database_that_cannot_be_used_is_one_line(tmp_path, monkeypatch, make_bad, message):
    state = tmp_path / "state"
    state.mkdir()
    make_bad(state / "fedhub.sqlite3")
    with pytest.raises(StorageError, match=rf"cannot use {state / 'fedhub.sqlite3'} as the state database: "
                                           rf"{message}"):
        Storage(state)
    monkeypatch.setattr(server, "load_global_model", lambda config: StubModel())
    outcome = run_main(server.main, ["0", "--state-dir", str(state), "--no-tensorboard"])
    assert outcome.code == 2, outcome
    assert outcome.stderr == (f"error: cannot use {state / 'fedhub.sqlite3'} as the state database: "
                              f"{message}\n")


# --------------------------------------------------------------------------- data and splits


def test_every_command_finds_the_shared_data_folder_beside_the_checkout(tmp_path, monkeypatch):
    from fedhub import datasets

    assert ROOT.parent / "shared" / "data" == datasets.SHARED_DATA_ROOT
    shared = tmp_path / "shared" / "fashion-mnist"
    write_fake_dataset(shared)
    monkeypatch.delenv(format_dataset.DATA_DIR_ENV, raising=False)
    monkeypatch.setattr(datasets, "SHARED_DATA_ROOT", shared.parent)

    def offline(spec):
        raise AssertionError("went to Keras' download although the shared folder is there")

    monkeypatch.setattr(datasets, "_download", offline)
    out = tmp_path / "devices"
    outcome = run_main(format_dataset.main, ["--devices", "3", "--out", str(out), "--quiet"])
    assert outcome.code == 0, outcome
    assert json.loads((out / "partition.json").read_text())["source"] == str(shared)
    # the option, then the environment, still come first
    other = tmp_path / "env"
    write_fake_dataset(other, n_train=40)
    monkeypatch.setenv(format_dataset.DATA_DIR_ENV, str(other))
    assert len(format_dataset.load_fashion_mnist()[0][1]) == 40
    assert len(format_dataset.load_fashion_mnist(shared)[0][1]) == 30


def test_a_split_over_fewer_devices_replaces_the_previous_one(tmp_path):
    data, root = tmp_path / "data", tmp_path / "devices"
    write_fake_dataset(data, n_train=60)
    format_dataset.split_to_devices(root, 4, data_dir=data, progress=False)
    assert sorted(p.name for p in root.iterdir()) == ["device1", "device2", "device3", "device4",
                                                      "partition.json"]
    format_dataset.split_to_devices(root, 2, data_dir=data, progress=False)
    assert sorted(p.name for p in root.iterdir()) == ["device1", "device2", "partition.json"]
    assert list(json.loads((root / "partition.json").read_text())["devices"]) == ["device1", "device2"]
    # the two devices hold the whole training set between them, without overlap
    ys = [format_dataset.load_device_data(root / name)[1] for name in ("device1", "device2")]
    held = [format_dataset.read_device_holdout(root / name)[1] for name in ("device1", "device2")]
    assert sum(len(y) for y in ys) == 54 and sum(len(y) for y in held) == 6  # 10 % held out


def test_a_device_folder_no_split_made_is_refused_and_left_alone(tmp_path):
    data, root = tmp_path / "data", tmp_path / "devices"
    write_fake_dataset(data, n_train=60)
    format_dataset.split_to_devices(root, 2, data_dir=data, progress=False)
    x, y = np.zeros((3, 28, 28), np.uint8), np.zeros(3, np.uint8)
    format_dataset.write_device_data(root, "device7", x, y)  # someone's own device
    before = (root / "partition.json").read_text()
    outcome = run_main(format_dataset.main, ["--devices", "3", "--data-dir", str(data), "--out", str(root),
                                             "--quiet"])
    assert_one_line_error(outcome, "device7")
    assert "--out" in outcome.stderr
    assert (root / "device7" / "data").is_dir() and not (root / "device3").exists()
    assert (root / "partition.json").read_text() == before  # nothing changed


def test_the_demo_splits_into_its_own_folder_not_the_users_devices():
    from fedhub import demo

    a = demo.parse_args([])
    assert a.devices_root == a.state_dir / "devices"
    assert a.devices_root != ROOT / "devices"
    assert demo.parse_args(["--devices-root", "/tmp/x"]).devices_root == Path("/tmp/x")


# --------------------------------------------------------------------------- polish


def test_the_simulate_progress_bar_counts_devices_not_a_rate(capsys):
    from fedhub.simulate import RoundBars

    bars = RoundBars()
    bars.progress({"round": {"number": 1, "selected": ["a", "b", "c", "d"], "reported": []}})
    bars.progress({"round": {"number": 1, "selected": ["a", "b", "c", "d"], "reported": ["a", "b"]}})
    bars._close()
    err = capsys.readouterr().err
    assert "2/4 devices" in err, err
    assert "/s" not in err and "device/s" not in err, err


@pytest.mark.slow
def test_import_fedhub_silences_tensorflow_before_it_loads():
    env = {k: v for k, v in os.environ.items() if k not in ("TF_CPP_MIN_LOG_LEVEL", "TF_ENABLE_ONEDNN_OPTS")}
    out = subprocess.run([sys.executable, "-c", "import fedhub, os, sys; "
                          "print(os.environ['TF_CPP_MIN_LOG_LEVEL'], os.environ['TF_ENABLE_ONEDNN_OPTS'], "
                          "'tensorflow' in sys.modules)"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["2", "0", "False"]
