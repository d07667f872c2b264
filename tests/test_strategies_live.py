"""Strategies through the real server and real device processes, on small data.

One run per strategy family: averaging (FedProx, with the proximal term in the devices'
Keras training), adaptive (FedAdam, killed mid-run and resumed with its moments exact) and
robust (Krum against a device that scales its update, where FedAvg collapses). Plus the
command line: --list-strategies, and one-line refusals of bad strategy or attack settings.
"""

from __future__ import annotations

import importlib
import sqlite3
import subprocess

import numpy as np
import pytest
from safetensors.numpy import load as st_load

from examples import digits
from fedhub.device.launcher import launch, stop
from fedhub.engine import wire
from fedhub.engine.strategies import STRATEGIES, describe_strategies

from .conftest import ROOT, ServerProcess, launch_devices, wait_until

DIGITS = ("--learning-rate", "0.5", "--epochs", "2", "--batch-size", "16", "--auto-activate", "--start",
          "--no-tensorboard")


def run_cli(script: str, *args: str) -> subprocess.CompletedProcess:
    """``server.py`` or ``device/device.py``'s option parsing, in this process (it exits before
    anything starts); tests/test_cli_settings.py keeps each command's real-process check."""
    from tests.cli_inprocess import run_main

    module = {"server.py": "fedhub.serve", "device/device.py": "fedhub.device.main"}[script]
    outcome = run_main(importlib.import_module(module).parse_args, args)
    return subprocess.CompletedProcess([script, *args], outcome.code, outcome.stdout, outcome.stderr)


def history(server: ServerProcess) -> list[dict]:
    return server.get("/api/history").json()["rounds"]


def finished(server: ServerProcess) -> bool:
    return server.get("/api/status").json()["status"] == "finished"


def digits_devices(server: ServerProcess, root, names, *extra: str):
    return launch(server.url, names, devices_root=root, env={"FEDHUB_ENROLL_SECRET": server.enroll_secret},
                  extra_args=["--poll-wait", "2", "--retry-for", "120", *extra], log_dir=root / "logs")


# the command line ------------------------------------------------------------------------------
def test_list_strategies_prints_each_with_its_parameters_and_defaults():
    out = run_cli("server.py", "--list-strategies")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    named = [line.split(":")[0] for line in lines if not line.startswith(" ")]
    assert named == list(STRATEGIES) == ["fedavg", "fedavgm", "fedprox", "fedadam", "fedyogi", "fedadagrad",
                                         "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan",
                                         "qfedavg"]
    blocks: dict[str, list[str]] = {}
    current: list[str] = []
    for line in lines:  # each strategy's line, then its parameters' lines, indented
        if line.startswith(" "):
            current.append(line.strip())
        else:
            current = blocks[line.split(":")[0]] = []
    assert blocks["fedavg"] == []
    assert blocks["fedprox"] == ["proximal_mu (float, default 0.01): weight of the proximal term in "
                                 "each device's loss (0 is FedAvg)"]
    assert blocks["krum"] == ["num_malicious (int, default 0): f: how many of a round's updates may be "
                              "malicious"]
    assert [p.split(" (")[0] for p in blocks["multikrum"]] == ["num_malicious", "num_to_keep"]
    assert [p.split(" (")[0] for p in blocks["fedadam"]] == ["eta", "eta_l", "beta_1", "beta_2", "tau"]
    assert blocks["fedadam"][1].startswith("eta_l (float or none, default none): ")
    for s in describe_strategies():
        assert [p.split(" (")[0] for p in blocks[s["name"]]] == [p["name"] for p in s["params"]]


@pytest.mark.parametrize("args, message", [
    (["--strategy", "krum", "--strategy-arg", "f=1"],
     "error: strategy krum: unknown key 'f' (allowed keys: num_malicious)"),
    (["--strategy", "krum", "--strategy-arg", "num_malicious=one"],
     "error: strategy krum: num_malicious must be an integer, got 'one' (allowed keys: num_malicious)"),
    (["--strategy", "fedtrimmedavg", "--strategy-arg", "beta=0.7", "--min-devices", "9"],
     "error: strategy fedtrimmedavg: beta must be in [0, 0.5), got 0.7 (allowed keys: beta)"),
    (["--strategy", "fedprox", "--strategy-arg", "proximal_mu"],
     "error: strategy fedprox: expected KEY=VALUE, got 'proximal_mu' (allowed keys: proximal_mu)"),
    (["--strategy", "fedavg", "--strategy-arg", "x=1"],
     "error: strategy fedavg: unknown key 'x' (strategy fedavg takes no parameters)"),
    (["--strategy", "krum", "--strategy-arg", "num_malicious=1", "--min-devices", "4"],
     "error: strategy krum with num_malicious=1 needs at least 5 updates a round; --min-devices is 4"),
    (["--strategy", "nope"], "error: argument --strategy: invalid choice: 'nope'"),
])
def test_bad_strategy_settings_are_one_line_errors(args, message):
    out = run_cli("server.py", *args)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()], "one line"
    assert out.stderr.startswith(message), out.stderr


@pytest.mark.parametrize("args, message", [
    (["--attack", "scale", "--attack-arg", "factr=3"],
     "error: attack scale: unknown key 'factr' (allowed keys: factor)"),
    (["--attack", "noise", "--attack-arg", "sigma=-1"],
     "error: attack noise: sigma must be positive, got -1.0 (allowed keys: sigma)"),
    (["--attack-arg", "factor=3"], "error: --attack-arg needs --attack KIND"),
    (["--attack", "label-flip", "--trainer", "examples.digits:SoftmaxTrainer"],
     "error: --attack label-flip changes the device's own labels"),
])
def test_bad_attack_settings_are_one_line_errors(args, message):
    out = run_cli("device/device.py", "4000", "device1", *args)
    assert out.returncode == 2, out.stderr
    assert out.stderr.strip().splitlines() == [out.stderr.strip()], "one line"
    assert out.stderr.startswith(message), out.stderr


# averaging: FedProx ------------------------------------------------------------------------------
@pytest.mark.slow
def test_fedprox_sends_the_proximal_term_to_keras_devices(server_factory, split_devices):
    root = split_devices(2, 200)
    server = server_factory("--rounds", "1", "--min-devices", "2", "--auto-activate", "--start",
                            "--test-limit", "300", "--no-tensorboard", "--strategy", "fedprox",
                            "--strategy-arg", "proximal_mu=0.5").start()
    assert server.get("/api/status").json()["strategy"] == {"name": "fedprox", "params": {"proximal_mu": 0.5}}
    procs = launch_devices(server, root, ["device1", "device2"])
    try:
        wait_until(lambda: finished(server), 240, "the run to finish")
        codes = [p.wait(60) for p in procs]
    finally:
        stop(procs)
    assert codes == [0, 0]
    [entry] = history(server)
    assert entry["strategy"] == {"name": "fedprox", "params": {"proximal_mu": 0.5}}
    assert entry["num_used"] == 2 and entry["test_accuracy"] > 0.3
    db = sqlite3.connect(server.state_dir / "fedhub.sqlite3")
    [(config,)] = db.execute("SELECT config FROM rounds WHERE number = 1").fetchall()
    assert '"proximal_mu": 0.5' in config
    for name in ("device1", "device2"):
        log = (root.parent / "logs" / f"{name}.log").read_text()
        assert "round 1: training 1 epoch(s) from model v0 with FedProx's proximal term (mu=0.5)" in log


# adaptive: FedAdam, killed mid-run -------------------------------------------------------------------
def fedadam_server(tmp_path, data_dir, name: str) -> ServerProcess:
    test_set = tmp_path / "devices_a" / "test.npz"
    (tmp_path / name).mkdir()
    return ServerProcess(tmp_path / name, data_dir, "--model-factory", "tests.seeded_digits:build_model",
                         "--test-data", str(test_set), "--strategy", "fedadam", "--rounds", "3",
                         "--min-devices", "2", "--quorum", "1", *DIGITS)


def saved_state(server: ServerProcess, number: int) -> dict[str, np.ndarray]:
    return st_load((server.state_dir / "saved" / f"round_{number:05d}.strategy.safetensors").read_bytes())


@pytest.mark.slow
def test_fedadam_killed_mid_run_resumes_its_moments_exactly(tmp_path, data_dir):
    names = ["digits1", "digits2"]
    for root in ("devices_a", "devices_b"):  # the same split twice (seeded), one per run
        digits.split(tmp_path / root, 2, limit=200)
    trainer = ("--trainer", "tests.seeded_digits:SeededSoftmaxTrainer")

    # A: three rounds without interruption
    a = fedadam_server(tmp_path, data_dir, "a").start()
    procs = digits_devices(a, tmp_path / "devices_a", names, *trainer)
    try:
        wait_until(lambda: finished(a), 180, "run A")
    finally:
        stop(procs)
        a.stop()

    # B: the same run, its server SIGKILLed with round 3 half reported
    (tmp_path / "devices_b" / "digits2" / "data" / "hold").write_text("2")  # digits2 waits in round 3
    b = fedadam_server(tmp_path, data_dir, "b").start()
    procs = digits_devices(b, tmp_path / "devices_b", names, *trainer)
    try:
        wait_until(lambda: (b.get("/api/status").json()["round"] or {}).get("reported") == ["digits1"]
                   and len(history(b)) == 2, 120, "round 3 with digits1's update only")
        before = history(b)
        b.kill()
        b.start()
        (tmp_path / "devices_b" / "digits2" / "data" / "hold").unlink()
        wait_until(lambda: finished(b), 180, "run B after the restart")
        after = history(b)
    finally:
        stop(procs)
        b.stop()
    assert "restored fedadam's state from round 2" in b.log()
    assert after[:2] == before, "completed rounds are neither lost nor changed"

    for number in (1, 2, 3):
        state_a, state_b = saved_state(a, number), saved_state(b, number)
        assert state_a.keys() == state_b.keys() == {
            "step", f"m/{digits.KERNEL}", f"m/{digits.BIAS}", f"v/{digits.KERNEL}", f"v/{digits.BIAS}"}
        for key in state_a:
            np.testing.assert_array_equal(state_a[key], state_b[key], err_msg=f"round {number}: {key}")
    assert saved_state(b, 3)["step"] == 3, "the moments went on from round 2's, not from scratch"
    weights_a, _ = wire.decode((a.state_dir / "saved" / "round_00003.safetensors").read_bytes())
    weights_b, _ = wire.decode((b.state_dir / "saved" / "round_00003.safetensors").read_bytes())
    for name in weights_a:
        np.testing.assert_array_equal(weights_a[name], weights_b[name])


# robust: Krum against a scaling attacker -----------------------------------------------------------
def streamlit_view(url: str, monkeypatch) -> tuple[list[str], dict, list, set[int], str]:
    """What the Streamlit dashboard shows: its captions, the devices table as {device: row}, the
    kept-rejected-or-clipped table's rows, which of them are highlighted, and its summary line."""
    from streamlit.testing.v1 import AppTest

    from tests.test_dashboard import highlighted_rows

    monkeypatch.setenv("FEDHUB_SERVER", url)
    at = AppTest.from_file(str(ROOT / "dashboard" / "index.py"), default_timeout=30).run()
    assert not at.exception, at.exception
    tables = {tuple(t.value.columns): t.value for t in at.dataframe}
    devices = next(v for cols, v in tables.items() if "attack (declared)" in cols)
    screened = next(t for t in at.dataframe if "outcome" in t.value.columns)
    summary = next(m.value for m in at.markdown if m.value.startswith("Round "))
    return ([c.value for c in at.caption], devices.set_index("device").to_dict("index"),
            screened.value.to_dict("records"), highlighted_rows(screened), summary)


def stats_view(url: str) -> dict:
    """What the live page (/stats) shows, in Chromium, once it has drawn the history."""
    from tests.chromium import chromium, wait_js

    with chromium() as browser:
        page = browser.new_page()
        page.goto(f"{url}/stats/")
        wait_js(page, "document.querySelectorAll('#screened tr').length > 0", timeout=30)
        return page.evaluate("""() => ({
          strategy: document.getElementById('strategy').textContent,
          compression: document.getElementById('compression').textContent,
          screened: [...document.querySelectorAll('#screened tr')].map(
            (tr) => [tr.className, ...[...tr.cells].map((td) => td.textContent)]),
          devices: Object.fromEntries([...document.querySelectorAll('#devices tr')].map(
            (tr) => [tr.cells[0].textContent, [tr.className, tr.cells[7].textContent,
                                               tr.cells[0].dataset.attack || ""]])),
          rounds: [...document.querySelectorAll('#rounds tr')].map((tr) => tr.cells[3].textContent),
        })""")


@pytest.mark.slow
def test_krum_holds_against_a_scaling_device_where_fedavg_collapses(tmp_path, data_dir, monkeypatch):
    names = [f"digits{i}" for i in range(1, 6)]
    runs = {"clean": ("fedavg", False), "fedavg": ("fedavg", True), "krum": ("krum", True)}
    servers, procs = {}, []
    try:
        for run, (strategy, attacked) in runs.items():
            root = tmp_path / run / "devices"
            digits.split(root, 5)
            args = ["--strategy", strategy, "--rounds", "2", "--min-devices", "5", "--quorum", "1"]
            if strategy == "krum":
                args += ["--strategy-arg", "num_malicious=1"]
            servers[run] = ServerProcess(tmp_path / run, data_dir, "--model-factory",
                                         "tests.seeded_digits:build_model", "--test-data",
                                         str(root / "test.npz"), *args, *DIGITS).start()
            honest, attacker = (names[:4], names[4:]) if attacked else (names, [])
            trainer = ("--trainer", "examples.digits:SoftmaxTrainer")
            procs += digits_devices(servers[run], root, honest, *trainer)
            procs += digits_devices(servers[run], root, attacker, *trainer,
                                    "--attack", "scale", "--attack-arg", "factor=100")
        for run, server in servers.items():
            wait_until(lambda s=server: finished(s), 240, f"the {run} run")
        results = {run: history(s) for run, s in servers.items()}
        devices = {d["name"]: d for d in servers["krum"].get("/api/devices").json()["devices"]}
        captions, shown_devices, shown_screened, highlighted, summary = streamlit_view(
            servers["krum"].url, monkeypatch)
        page = stats_view(servers["krum"].url)
    finally:
        stop(procs)
        for server in servers.values():
            server.stop()
    accuracy = {run: entries[-1]["test_accuracy"] for run, entries in results.items()}
    assert accuracy["clean"] > 0.8, accuracy
    assert accuracy["krum"] >= accuracy["clean"] - 0.05, accuracy
    assert accuracy["fedavg"] < accuracy["clean"] - 0.3, accuracy

    # what both dashboards read: the attacker declared itself, and Krum rejected its update
    assert devices["digits5"]["attack"] == {"kind": "scale", "params": {"factor": 100.0}}
    assert all(devices[n]["attack"] is None for n in names[:4])
    for entry in results["krum"]:
        assert entry["strategy"] == {"name": "krum", "params": {"num_malicious": 1}}
        outcome = entry["devices"]["digits5"]["aggregation"]
        assert outcome["status"] == "rejected" and "Krum score" in outcome["reason"]
        assert entry["num_used"] == 1

    # both dashboards show it: the strategy, the declared attack, the rejected updates
    shown = [c.replace("\\", "") for c in captions]  # Markdown escapes off
    assert any(c.startswith("Aggregation: **krum (num_malicious=1)**") for c in shown), captions
    assert any(c.startswith("Updates travel: **uncompressed**") for c in shown), captions
    assert shown_devices["digits5"]["attack (declared)"] == "scale (factor=100.0)"
    assert shown_devices["digits1"]["attack (declared)"] == ""
    rejected = [r for r in shown_screened if r["device"] == "digits5"]
    assert [r["round"] for r in rejected] == [2, 1]
    assert all(r["outcome"] == "rejected" and "Krum score" in r["why"] for r in rejected)
    assert all(r["declared attack"] == "▲ scale (factor=100.0)" for r in rejected)
    # every update of each round is listed: Krum kept one honest update and rejected the rest;
    # only the attacker's rows and the kept ones are coloured, not a wall of red
    for number in (1, 2):
        rows = [r for r in shown_screened if r["round"] == number]
        assert sorted(r["device"] for r in rows) == names
        assert [r["outcome"] for r in rows].count("kept") == 1
        kept = next(r["device"] for r in rows if r["outcome"] == "kept")
        assert kept != "digits5" and all(r["Krum score"] is not None for r in rows)
        attacker = next(r for r in rows if r["device"] == "digits5")
        assert attacker["Krum score"] > max(r["Krum score"] for r in rows if r is not attacker)
    coloured = {i for i, r in enumerate(shown_screened) if r["device"] == "digits5" or r["outcome"] == "kept"}
    assert highlighted == coloured
    assert summary.startswith("Round 2: 5 updates received, 1 used (digits")
    assert page["strategy"] == "krum (num_malicious=1)"
    assert page["compression"] == "uncompressed"
    assert page["devices"]["digits5"] == ["attacker", "scale (factor=100)", "scale (factor=100)"]
    assert page["devices"]["digits1"] == ["", "–", ""]
    attacker_rows = [row for row in page["screened"] if row[2] == "digits5"]
    assert [(row[0], row[1], row[3]) for row in attacker_rows] == [
        ("outcome-rejected attacker", "2", "rejected"), ("outcome-rejected attacker", "1", "rejected")]
    assert len(page["screened"]) == 10  # every update of both rounds, the kept ones too
    assert sorted(row[0] for row in page["screened"] if row[1] == "1") == [
        "outcome-kept", "outcome-rejected", "outcome-rejected", "outcome-rejected",
        "outcome-rejected attacker"]
    assert page["rounds"] == ["5 devices, 1 update used"] * 2
