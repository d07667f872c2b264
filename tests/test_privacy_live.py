"""Differential privacy through the real server and real device processes, on small data.

The devices are NumPy softmax trainers on scikit-learn's digits (no TensorFlow on their side),
so each run takes seconds: central DP recording epsilon each round (in the history, the status,
the TensorBoard event files), surviving a SIGKILL of the server with its accountant; the budget
(--dp-max-epsilon) ending the run and saying why; local DP applied on the devices; epsilon in
both dashboards; the Python API; and the command line refusing bad settings with one line.
"""

from __future__ import annotations

import importlib
import math

import numpy as np
import pytest
from safetensors.numpy import load as st_load

from examples import digits
from fedhub.device.launcher import launch, stop
from fedhub.engine.privacy import PrivacyAccountant

from .conftest import ServerProcess, wait_until
from .test_strategies_live import run_cli
from .test_tensorboard import read_run

NAMES = ["digits1", "digits2"]
DIGITS = ("--model-factory", "tests.seeded_digits:build_model", "--learning-rate", "0.5", "--epochs", "2",
          "--batch-size", "16", "--min-devices", "2", "--quorum", "1", "--auto-activate", "--start")


def epsilons(rounds: int, noise_multiplier: float, sampling_rate: float = 1.0, delta: float = 1e-5
             ) -> list[float]:
    """The accountant's own figure after each of ``rounds`` rounds."""
    accountant = PrivacyAccountant(delta=delta)
    return [accountant.record_round(sampling_rate, noise_multiplier) for _ in range(rounds)]


def digits_server(tmp_path, data_dir, *args: str) -> ServerProcess:
    digits.split(tmp_path / "devices", 2, limit=200)
    return ServerProcess(tmp_path, data_dir, "--test-data", str(tmp_path / "devices" / "test.npz"),
                         *DIGITS, *args)


def devices(server: ServerProcess, root):
    return launch(server.url, NAMES, devices_root=root, env={"FEDHUB_ENROLL_SECRET": server.enroll_secret},
                  extra_args=["--poll-wait", "2", "--retry-for", "120", "--trainer",
                              "tests.seeded_digits:SeededSoftmaxTrainer"], log_dir=root / "logs")


def history(server: ServerProcess) -> list[dict]:
    return server.get("/api/history").json()["rounds"]


def status(server: ServerProcess) -> dict:
    return server.get("/api/status").json()


@pytest.mark.slow
def test_central_dp_records_epsilon_each_round_and_restores_it_after_a_kill(tmp_path, data_dir):
    server = digits_server(tmp_path, data_dir, "--rounds", "3", "--dp", "central-fixed",
                           "--dp-noise-multiplier", "1.5", "--dp-clip", "0.5",
                           "--runs-dir", str(tmp_path / "runs"), "--run-id", "dp")
    hold = tmp_path / "devices" / "digits2" / "data" / "hold"
    hold.write_text("2")  # digits2 trains rounds 1 and 2, then waits in round 3
    server.start()
    procs = devices(server, tmp_path / "devices")
    try:
        wait_until(lambda: len(history(server)) == 2
                   and (status(server)["round"] or {}).get("reported") == ["digits1"], 60,
                   "round 3 with digits1's update only")
        first = history(server)
        expected = epsilons(3, 1.5)
        for entry, eps in zip(first, expected, strict=False):
            p = entry["privacy"]
            assert p["epsilon"] == pytest.approx(eps, rel=1e-9)
            assert (p["mode"], p["delta"], p["noise_multiplier"], p["clipping_norm"]) == (
                "central-fixed", 1e-5, 1.5, 0.5)
            assert p["sampling_rate"] == 1.0 and p["noise_std"] == pytest.approx(1.5 * 0.5 / 2)
        assert entry["strategy"]["name"] == "dp-central-fixed(fedavg)"
        assert status(server)["privacy"]["epsilon"] == pytest.approx(expected[1], rel=1e-9)
        state = st_load((server.state_dir / "saved" / "round_00002.strategy.safetensors").read_bytes())
        np.testing.assert_array_equal(state["dp_accountant"], [[1.0, 1.5, 2]])

        # the round hooks run on their own thread: round 2's TensorBoard step is written by now
        wait_until(lambda: 2 in read_run(tmp_path / "runs" / "dp" / "global").get("dp_epsilon", {}), 30,
                   "round 2 in the TensorBoard event files")
        server.kill()  # mid-round, no clean shutdown: the accountant comes back from round 2's state
        server.start()
        assert "restored dp-central-fixed(fedavg)'s state from round 2" in server.log()
        assert status(server)["privacy"]["epsilon"] == pytest.approx(expected[1], rel=1e-9)
        hold.unlink()
        wait_until(lambda: status(server)["status"] == "finished", 60, "round 3 after the restart")
        after = history(server)
    finally:
        stop(procs)
        server.stop()
    assert after[:2] == first
    assert after[2]["privacy"]["epsilon"] == pytest.approx(expected[2], rel=1e-9)  # 3 rounds, not 1
    assert after[2]["privacy"]["rounds"] == 3

    logged = read_run(tmp_path / "runs" / "dp" / "global")["dp_epsilon"]  # TensorBoard, at step = round
    assert sorted(logged) == [1, 2, 3]
    for step, eps in logged.items():
        assert eps == pytest.approx(expected[step - 1], rel=1e-6)


@pytest.mark.slow
def test_max_epsilon_stops_the_run_and_says_why(tmp_path, data_dir):
    budget = (epsilons(3, 1.5)[1] + epsilons(3, 1.5)[2]) / 2  # room for two rounds, not three
    server = digits_server(tmp_path, data_dir, "--rounds", "10", "--no-tensorboard",
                           "--dp", "central-adaptive", "--dp-noise-multiplier", "1.5",
                           "--dp-clip", "0.05", "--dp-clipped-count-stddev", "1",
                           "--dp-max-epsilon", f"{budget}").start()
    procs = devices(server, tmp_path / "devices")
    try:
        wait_until(lambda: status(server)["status"] == "finished", 60, "the budget to run out")
        final, rounds = status(server), history(server)
        codes = [p.wait(30) for p in procs]
        server.kill()
        server.start()  # a finished run is kept as it ended, saying why; a restart starts a new run
        assert "run 1 'fedavg-dp-1' is finished: starting run 2" in server.log()
        kept = server.get("/api/runs/1").json()
        assert kept["status"] == "finished" and kept["completed_rounds"] == 2
        assert kept["history"][-1]["privacy"]["budget_spent"] == final["reason"]
    finally:
        stop(procs)
        server.stop()
    assert codes == [0, 0]  # the devices heard "finish"
    assert len(rounds) == 2 and final["completed_rounds"] == 2
    assert final["reason"].startswith("privacy budget spent: after 2 rounds epsilon is ")
    assert f"over the maximum of {budget:g}" in final["reason"]
    assert final["privacy"]["budget_spent"] == final["reason"]
    assert rounds[0]["privacy"]["budget_spent"] is None
    assert rounds[1]["privacy"]["budget_spent"].startswith("privacy budget spent: after 2 rounds")
    assert "the run is over: privacy budget spent" in server.log()
    # Adaptive clipping moved the bound (every update's change is far above 0.05 at first).
    norms = [r["privacy"]["clipping_norm"] for r in rounds]
    assert norms[0] == 0.05 and norms[1] == rounds[0]["privacy"]["next_clipping_norm"] != 0.05


@pytest.mark.slow
def test_local_dp_is_applied_on_the_devices(tmp_path, data_dir):
    server = digits_server(tmp_path, data_dir, "--rounds", "1", "--no-tensorboard", "--dp", "local",
                           "--dp-noise-multiplier", "2", "--dp-clip", "0.1").start()
    procs = devices(server, tmp_path / "devices")
    try:
        wait_until(lambda: status(server)["status"] == "finished", 60, "one round")
        [entry] = history(server)
        before = st_load((server.state_dir / "saved" / "round_00000.safetensors").read_bytes())
        after = st_load((server.state_dir / "saved" / "round_00001.safetensors").read_bytes())
    finally:
        stop(procs)
        server.stop()
    p = entry["privacy"]
    assert p["mode"] == "local" and p["epsilon"] == pytest.approx(epsilons(1, 1.0)[0], rel=1e-9)
    for name in NAMES:
        log = (tmp_path / "devices" / "logs" / f"{name}.log").read_text()
        assert "round 1: local DP: change clipped to L2 norm 0.1, Gaussian noise of std 0.2 added" in log
    # The mean of two noised changes: noise std 0.2 / sqrt(2) per coordinate, around a change of norm <= 0.1.
    change = np.concatenate([(after[k].astype(np.float64) - before[k]).ravel() for k in before])
    assert np.std(change) == pytest.approx(0.2 / math.sqrt(2), rel=0.15)


@pytest.mark.parametrize("args, message", [
    (["--dp-noise-multiplier", "1"], "error: --dp-noise-multiplier needs --dp"),
    (["--dp", "central"], "error: argument --dp: invalid choice: 'central'"),
    (["--dp", "local", "--dp-clip", "0"], "error: --dp-clipping-norm must be more than 0"),
    (["--dp", "central-fixed", "--dp-delta", "1"],
     "error: --dp-delta must be more than 0 and at most 0.5, got 1"),
    (["--dp", "central-fixed", "--dp-max-epsilon", "0"], "error: --dp-max-epsilon must be more than 0"),
    (["--dp", "local", "--dp-target-quantile", "0.7"],
     "error: --dp-target-quantile applies to --dp=central-adaptive only"),
    (["--dp", "central-adaptive", "--dp-noise-multiplier", "1"],
     "error: --dp-noise-multiplier 1.0 must be below 2 x --dp-clipped-count-stddev (0.1)"),
    (["--dp", "central-fixed", "--strategy", "krum", "--min-devices", "4"],
     "error: central DP wraps an averaging strategy"),
])
def test_bad_dp_settings_are_one_line_errors(args, message, capsys):
    """server.py's parser in this process (a real process below): one line, exit 2."""
    from fedhub import serve as server

    with pytest.raises(SystemExit) as exit_:
        server.parse_args(args)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith(message), err
    assert len(err.strip().splitlines()) == 1


def test_a_bad_dp_setting_stops_the_real_server_with_one_line():
    out = run_cli("server.py", "--dp", "central-adaptive", "--dp-noise-multiplier", "1")
    assert out.returncode == 2 and out.stderr == (
        "error: --dp-noise-multiplier 1.0 must be below 2 x --dp-clipped-count-stddev (0.1): raise "
        "--dp-clipped-count-stddev (above 0.5) or the devices per round\n")


@pytest.mark.slow
def test_epsilon_shows_in_both_dashboards(tmp_path, data_dir, monkeypatch):
    """A real server under central DP, two rounds by hand: the Streamlit dashboard's caption and
    chart, and the live page's card and rounds table, show the epsilon the history holds."""
    from streamlit.testing.v1 import AppTest

    from .chromium import chromium, wait_js
    from .rounds_by_hand import enroll, train_rounds
    from .test_dashboard_first_hour import DASHBOARD, chart_data

    server = ServerProcess(tmp_path, data_dir, "--test-limit", "200", "--min-devices", "1",
                           "--no-tensorboard", "--dp", "central-fixed", "--dp-noise-multiplier", "2",
                           "--dp-clip", "0.1", "--dp-max-epsilon", "50").start()
    try:
        train_rounds(server, "d1", enroll(server, "d1"), 2)
        spent = [e["privacy"]["epsilon"] for e in history(server)]
        assert spent == pytest.approx(epsilons(2, 2.0), rel=1e-9)

        monkeypatch.setenv("FEDHUB_SERVER", server.url)
        monkeypatch.setenv("FEDHUB_ADMIN_TOKEN", server.admin_token)
        at = AppTest.from_file(DASHBOARD, default_timeout=60).run()
        assert not at.exception, at.exception
        caption = next(c.value for c in at.caption if c.value.startswith("Differential privacy"))
        assert caption == (f"Differential privacy (central-fixed, noise multiplier 2, clipping bound 0.1): "
                           f"**ε = {spent[1]:.3g}** at δ = 1e-05 of a budget of 50 after 2 rounds "
                           "(server option --dp)")
        chart = chart_data(at, "privacy spent")
        assert chart["round"].tolist() == [1, 2] and chart["epsilon"].tolist() == pytest.approx(spent)

        with chromium() as browser:
            page = browser.new_page()
            page.goto(f"{server.url}/stats/")
            wait_js(page, "document.querySelectorAll('#rounds tr').length === 2", timeout=30)
            card = page.text_content("#epsilon")
            column = page.eval_on_selector_all("#rounds tr",
                                               "rows => rows.map((r) => r.cells[5].textContent)")
    finally:
        server.stop()
    assert card == f"ε {spent[1]:.2f} at δ 1e-5 (max 50)"
    assert column == [f"{spent[1]:.3f}", f"{spent[0]:.3f}"]  # newest first


@pytest.mark.slow
def test_python_api_and_simulate_take_the_same_settings():
    import fedhub

    server = fedhub.Server("basic", dp={"mode": "central-adaptive", "noise_multiplier": 0.5,
                                        "clipped_count_stddev": 1.0, "max_epsilon": 4})
    strategy = server.federation.make_strategy()
    assert strategy.name == "dp-central-adaptive(fedavg)" and strategy.max_epsilon == 4
    assert fedhub.Server("basic", dp=fedhub.DPConfig(mode="local")).federation.dp.mode == "local"
    with pytest.warns(DeprecationWarning, match="privacy= is now dp="):  # the older name
        assert fedhub.Server("basic", privacy={"mode": "local"}).federation.dp.mode == "local"
    with pytest.raises(ValueError, match=r"unknown setting dp\.noise"):
        fedhub.Server("basic", dp={"noise": 1.0})
    with pytest.raises(ValueError, match="central DP wraps an averaging strategy"):
        fedhub.Server("basic", strategy="fedmedian", dp={"mode": "central-fixed"})
    from tests.cli_inprocess import assert_one_line_error, run_main

    simulate_command = importlib.import_module("fedhub.simulate")  # the module, not fedhub.simulate()
    assert_one_line_error(run_main(simulate_command.parse_args, ["--dp", "local", "--dp-clip", "-1"]),
                          "--dp-clipping-norm must be more than 0")
