"""Asynchronous mode (FedBuff) on a real server.py: hand-made updates through HTTP, the new
global models checked against a NumPy reference, stale updates refused, a SIGKILL survived."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
import uuid

import numpy as np
import pytest
import requests

from fedhub.engine import wire
from fedhub.engine.fedbuff import staleness_weight
from fedhub.simulation import slow_devices

from .conftest import ROOT, wait_until
from .rounds_by_hand import enroll

ASYNC = ("--mode", "async", "--auto-activate", "--start", "--rounds", "0", "--test-limit", "50",
         "--no-tensorboard")


def _model(server, token: str) -> tuple[int, dict[str, np.ndarray]]:
    r = server.get("/api/model", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    weights, meta = wire.decode(r.content)
    return meta.model_version, weights


def _body(weights, *, base: int, n: int) -> bytes:
    return wire.encode(weights, wire.Meta(round=base, model_version=base, num_examples=n,
                                          metrics={"loss": 1.0}))


def _upload(server, name: str, token: str, weights, *, base: int, n: int,
            key: str | None = None, body: bytes | None = None) -> requests.Response:
    """``body``: these exact bytes (a retry); safetensors' header order varies between encodings."""
    body = body or _body(weights, base=base, n=n)
    return requests.post(f"{server.url}/api/devices/{name}/updates/{base}", data=body, timeout=30,
                         headers={"Authorization": f"Bearer {token}",
                                  "Idempotency-Key": key or uuid.uuid4().hex,
                                  "Content-Type": "application/octet-stream"})


def _version(server, v: int) -> None:
    wait_until(lambda: server.get("/api/status").json()["model_version"] >= v, 60,
               f"model version {v}", interval=0.1)


def _nudged(weights, rng) -> dict[str, np.ndarray]:
    return {k: (a + rng.normal(0, 0.01, a.shape)).astype(a.dtype) for k, a in weights.items()}


def _reference(current, updates) -> dict[str, np.ndarray]:
    """FedBuff by hand: current + sum(n * (1 + staleness) ** -0.5 * (w - base)) / sum(n)."""
    total = sum(n for _, _, n, _ in updates)
    out = {}
    for k, a in current.items():
        step = sum(n * (1 + s) ** -0.5 * (w[k].astype(np.float64) - b[k].astype(np.float64))
                   for w, b, n, s in updates)
        out[k] = (a.astype(np.float64) + step / total).astype(a.dtype)
    return out


def _assert_model(server, token, expected) -> None:
    _, got = _model(server, token)
    for k in expected:
        np.testing.assert_allclose(got[k], expected[k], rtol=0, atol=1e-6, err_msg=k)


def test_staleness_weight_is_one_over_sqrt_one_plus_staleness():
    np.testing.assert_allclose(staleness_weight(np.arange(4)), 1 / np.sqrt(1 + np.arange(4)))
    assert staleness_weight(3, exponent=0) == 1.0 and staleness_weight(3, exponent=1) == 0.25
    with pytest.raises(ValueError):
        staleness_weight(-1)


@pytest.mark.parametrize(("args", "message"), [
    (("--mode", "async", "--strategy", "krum", "--strategy-arg", "num_malicious=2", "--buffer", "3"),
     "needs at least 7 updates a round; --buffer-size is 3"),
    (("--mode", "async", "--secure-aggregation"), "cannot use --secure-aggregation"),
    (("--mode", "async", "--buffer", "0"), "--buffer-size must be at least 1"),
    (("--mode", "async", "--max-staleness", "-1"), "--max-staleness must be"),
    (("--mode", "later"), "argument --mode: invalid choice"),
])
def test_async_settings_are_checked_at_start_up(args, message):
    """server.py's option parsing in-process (its real-process check: tests/test_cli_settings.py)."""
    from fedhub import serve as server
    from tests.cli_inprocess import assert_one_line_error, run_main

    assert_one_line_error(run_main(server.parse_args, list(args)), message)


@pytest.mark.slow
def test_staleness_weighting_matches_numpy_and_too_stale_is_refused(server_factory):
    server = server_factory(*ASYNC, "--buffer", "2", "--max-staleness", "1").start()
    tokens = {name: enroll(server, name) for name in ("a", "b", "c")}
    rng = np.random.default_rng(0)
    _, w0 = _model(server, tokens["a"])

    # version 1: two fresh updates, weighted by examples only
    wa, wb = _nudged(w0, rng), _nudged(w0, rng)
    key, sent = uuid.uuid4().hex, _body(wa, base=0, n=100)
    r = _upload(server, "a", tokens["a"], wa, base=0, n=100, key=key, body=sent)
    assert r.status_code == 200 and r.json()["staleness"] == 0, r.text
    again = _upload(server, "a", tokens["a"], wa, base=0, n=100, key=key, body=sent)  # a retry: counted once
    assert again.status_code == 200 and again.json()["duplicate"] is True, again.text
    assert server.get("/api/status").json()["buffer"] == {"target": 1, "received": 1}
    assert _upload(server, "b", tokens["b"], wb, base=0, n=300).status_code == 200
    _version(server, 1)
    w1 = _reference(w0, [(wa, w0, 100, 0), (wb, w0, 300, 0)])
    _assert_model(server, tokens["a"], w1)

    # version 2: c trained from version 0 (one version stale), a from version 1
    wc, wa2 = _nudged(w0, rng), _nudged(w1, rng)
    r = _upload(server, "c", tokens["c"], wc, base=0, n=200)
    assert r.status_code == 200, r.text
    assert r.json()["staleness"] == 1 and abs(r.json()["weight"] - 2 ** -0.5) < 1e-12
    # two versions stale for version 3 is more than --max-staleness 1: refused, nothing changes
    before = server.get("/api/status").json()["buffer"]
    assert _upload(server, "a", tokens["a"], wa2, base=1, n=100).status_code == 200
    _version(server, 2)
    _assert_model(server, tokens["a"], _reference(w1, [(wc, w0, 200, 1), (wa2, w1, 100, 0)]))
    stale = _upload(server, "b", tokens["b"], _nudged(w0, rng), base=0, n=100)
    assert stale.status_code == 409, stale.text
    body = stale.json()
    assert body["field"] == "model_version" and "2 versions stale" in body["message"], body
    assert "--max-staleness" in body["message"]
    assert before == {"target": 2, "received": 1}
    assert server.get("/api/status").json()["buffer"] == {"target": 3, "received": 0}
    future = _upload(server, "b", tokens["b"], w1, base=7, n=100)
    assert future.status_code == 409 and future.json()["field"] == "model_version", future.text

    history = server.get("/api/history").json()["rounds"]
    assert [h["model_version"] for h in history] == [1, 2]
    assert [[u["staleness"] for u in h["updates"]] for h in history] == [[0, 0], [1, 0]]
    assert history[1]["devices"]["c"]["staleness"] == 1
    assert all(h["mode"] == "async" and h["test_accuracy"] is not None for h in history)


@pytest.mark.slow
def test_server_sigkill_keeps_buffered_updates_once(server_factory):
    """Acknowledged updates in an unfinished buffer survive a SIGKILL; a retry after the
    restart (same Idempotency-Key, same bytes) is not counted again."""
    server = server_factory(*ASYNC, "--buffer", "3", "--max-staleness", "2").start()
    tokens = {name: enroll(server, name) for name in ("a", "b", "c")}
    rng = np.random.default_rng(1)
    _, w0 = _model(server, tokens["a"])
    wa, wb, wc = (_nudged(w0, rng) for _ in range(3))
    key, sent = uuid.uuid4().hex, _body(wa, base=0, n=50)
    assert _upload(server, "a", tokens["a"], wa, base=0, n=50, key=key, body=sent).status_code == 200
    assert _upload(server, "b", tokens["b"], wb, base=0, n=150).status_code == 200
    server.kill()
    server.start()
    assert server.get("/api/status").json()["buffer"] == {"target": 1, "received": 2}
    again = _upload(server, "a", tokens["a"], wa, base=0, n=50, key=key, body=sent)
    assert again.status_code == 200 and again.json()["duplicate"] is True, again.text
    other = _upload(server, "a", tokens["a"], wb, base=0, n=50, key=key)
    assert other.status_code == 409 and other.json()["field"] == "Idempotency-Key", other.text
    assert _upload(server, "c", tokens["c"], wc, base=0, n=100).status_code == 200
    _version(server, 1)
    _assert_model(server, tokens["a"], _reference(w0, [(wa, w0, 50, 0), (wb, w0, 150, 0),
                                                       (wc, w0, 100, 0)]))
    history = server.get("/api/history").json()["rounds"]
    assert len(history) == 1 and history[0]["num_updates"] == 3
    assert sorted(u["device"] for u in history[0]["updates"]) == ["a", "b", "c"]
    # killed again after the version was made: it stays, and nothing is folded in twice
    server.kill()
    server.start()
    status = server.get("/api/status").json()
    assert status["model_version"] == 1 and status["buffer"] == {"target": 2, "received": 0}
    _assert_model(server, tokens["a"], _reference(w0, [(wa, w0, 50, 0), (wb, w0, 150, 0),
                                                       (wc, w0, 100, 0)]))


@pytest.mark.slow
def test_real_devices_train_continuously_through_a_server_sigkill(server_factory, split_devices):
    """Real device processes in asynchronous mode; the server is SIGKILLed mid-run and restarted:
    the run finishes, the devices leave by themselves, every version holds exactly K updates, and
    the updates the devices saw acknowledged are exactly those in the versions: none lost, none
    counted twice."""
    from fedhub.device.launcher import stop

    from .conftest import launch_devices

    root = split_devices(2, 120)
    server = server_factory("--mode", "async", "--buffer", "2", "--max-staleness", "3", "--rounds", "4",
                            "--auto-activate", "--start", "--test-limit", "200", "--no-tensorboard").start()
    procs = launch_devices(server, root, ["device1", "device2"])
    try:
        _version(server, 1)
        server.kill()
        server.start()
        wait_until(lambda: server.get("/api/status").json()["status"] == "finished", 180,
                   "the run to finish after the restart")
        # Each device is told "finish" at its next poll and leaves by itself, its last
        # acknowledgement recorded; stopping them at once could cut that record short.
        assert [p.wait(60) for p in procs] == [0, 0]
    finally:
        stop(procs)
    history = server.get("/api/history").json()["rounds"]
    assert [h["model_version"] for h in history] == [1, 2, 3, 4]
    assert all(h["num_updates"] == 2 and len(h["updates"]) == 2 for h in history)
    assert all(u["staleness"] <= 3 and u["base_version"] < h["model_version"]
               for h in history for u in h["updates"])
    accepted = 0  # each device's own record of its uploads the server acknowledged
    for name in ("device1", "device2"):
        path = root / name / "history.csv"
        if path.exists():
            with path.open() as f:
                accepted += sum(row["accepted"] == "True" for row in csv.DictReader(f))
    assert accepted == 8, "every acknowledged update is in exactly one version"


@pytest.mark.slow
def test_both_dashboards_show_model_versions(server_factory, monkeypatch):
    """Streamlit's dashboard (AppTest) and the live page (Chromium) in asynchronous mode: the
    model version and the buffer instead of rounds, points labelled by version and time."""
    from tests.chromium import chromium, wait_js
    from tests.test_dashboard import dashboard, metrics
    from tests.test_stats_page import open_page

    server = server_factory(*ASYNC, "--buffer", "1", "--max-staleness", "2").start()
    token = enroll(server, "a")
    rng = np.random.default_rng(2)
    for v in (1, 2):
        _, w = _model(server, token)
        assert _upload(server, "a", token, _nudged(w, rng), base=v - 1, n=100).status_code == 200
        _version(server, v)

    monkeypatch.setenv("FEDHUB_SERVER", server.url)
    monkeypatch.setenv("FEDHUB_ADMIN_TOKEN", server.admin_token)
    at = dashboard()
    shown = metrics(at)
    assert shown["Model version"] == "2 / ∞" and shown["Next version"] == "v3", shown
    assert shown["Updates buffered"] == "0 / 1" and "Completed rounds" not in shown
    assert "Accuracy and loss over time, by model version" in [h.value for h in at.subheader]

    with chromium() as browser:
        page, problems = open_page(browser, f"{server.url}/stats")
        wait_js(page, "document.getElementById('completed').textContent === '2'")
        assert page.text_content("#rounds-title") == "Model versions"
        assert page.evaluate("document.getElementById('completed').previousElementSibling.textContent") \
            == "Model version"
        assert page.text_content("#reported") == "0 of 1"
        labels = page.evaluate("Chart.getChart('accuracy-chart').data.labels")
        assert [label.split(" · ")[0] for label in labels] == ["v1", "v2"], labels
        assert page.evaluate("Chart.getChart('accuracy-chart').options.scales.x.title.text") \
            == "model version (time made)"
        assert problems == []


@pytest.mark.slow
def test_simulate_async_with_a_slow_device(tmp_path, data_dir):
    """``python -m fedhub.simulate --mode async`` with half the fleet 3x slower (its updates held
    by the pool's worker while the other device trains): the run makes its versions."""
    out = subprocess.run(
        [sys.executable, "-m", "fedhub.simulate", "--devices", "2", "--workers", "1", "--rounds", "3",
         "--mode", "async", "--buffer", "2", "--max-staleness", "5", "--slow-devices", "0.5",
         "--slowdown", "3", "--limit", "100", "--test-limit", "200", "--data-dir", str(data_dir),
         "--quiet", "--history", str(tmp_path / "history.json"), "--timeout", "300"],
        cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["mode"] == "async" and summary["rounds"] == 3
    assert "model version 3: global test accuracy" in out.stdout
    history = json.loads((tmp_path / "history.json").read_text())
    updates = [u for h in history for u in h["updates"]]
    assert len(updates) == 6 and all(u["staleness"] <= 5 for u in updates)
    # The slowness shows: device2 (the half picked with seed 0, see fedhub.simulation.slow_devices)
    # holds each update for twice its training time while device1 trains on, so device1 sends
    # more of the six updates and device2's arrive after the model has moved on.
    assert slow_devices(["device1", "device2"], 0.5, 3.0, seed=0) == {"device2": 3.0}
    sent = {name: [u for u in updates if u["device"] == name] for name in ("device1", "device2")}
    assert len(sent["device1"]) > len(sent["device2"]) >= 1, sent
    assert max(u["staleness"] for u in sent["device2"]) >= 1, sent


@pytest.mark.slow
def test_compressed_updates_enter_the_buffer_as_their_change(server_factory):
    """``--mode async --compression q8``: each upload is its change from the version it trained
    from, quantized; the new version is FedBuff's formula over the changes the server decodes,
    stale ones weighted down, and a restart is not needed to trust it."""
    from fedhub.engine import compression

    scheme = compression.parse("q8")
    server = server_factory(*ASYNC, "--buffer", "2", "--compression", "q8").start()
    assert server.get("/api/status").json()["compression"] == {"uplink": "q8", "downlink": False}
    tokens = {name: enroll(server, name) for name in ("a", "b", "c")}
    rng = np.random.default_rng(1)
    _, w0 = _model(server, tokens["a"])

    def send(name: str, weights, base_weights, base: int, n: int) -> dict[str, np.ndarray]:
        body, _ = compression.encode_update(weights, base_weights, scheme, wire.Meta(
            round=base, model_version=base, num_examples=n, metrics={"loss": 1.0}))
        r = requests.post(f"{server.url}/api/devices/{name}/updates/{base}", data=body, timeout=30,
                          headers={"Authorization": f"Bearer {tokens[name]}",
                                   "Content-Type": "application/octet-stream"})
        assert r.status_code == 200, r.text
        delta, _ = compression.decode_update(body, wire.spec_of(w0), scheme)
        return compression.apply(base_weights, delta)  # what the server takes the update to be

    got_a = send("a", _nudged(w0, rng), w0, 0, 100)
    got_b = send("b", _nudged(w0, rng), w0, 0, 300)
    _version(server, 1)
    w1 = _reference(w0, [(got_a, w0, 100, 0), (got_b, w0, 300, 0)])
    _assert_model(server, tokens["a"], w1)
    got_c = send("c", _nudged(w0, rng), w0, 0, 200)  # one version stale
    got_a2 = send("a", _nudged(w1, rng), w1, 1, 100)
    _version(server, 2)
    _assert_model(server, tokens["a"], _reference(w1, [(got_c, w0, 200, 1), (got_a2, w1, 100, 0)]))
    # a plain (uncompressed) upload is refused: the server announced q8
    plain = _upload(server, "b", tokens["b"], w1, base=1, n=10)
    assert plain.status_code == 400 and plain.json()["field"] == "compression", plain.text


@pytest.mark.slow
def test_simulate_async_with_top_k_compression(tmp_path, data_dir):
    """Real devices on a pool worker, asynchronous, sending top-k changes with error feedback."""
    out = subprocess.run(
        [sys.executable, "-m", "fedhub.simulate", "--devices", "2", "--workers", "1", "--rounds", "3",
         "--mode", "async", "--buffer", "2", "--compression", "topk:0.1", "--limit", "100",
         "--test-limit", "200", "--data-dir", str(data_dir), "--quiet", "--timeout", "300"],
        cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["mode"] == "async" and summary["rounds"] == 3, summary
    assert "model version 3: global test accuracy" in out.stdout


@pytest.mark.slow
@pytest.mark.parametrize("compression, dp", [("q8", "central-fixed"), ("none", "local")])
def test_simulate_async_with_differential_privacy(tmp_path, data_dir, compression, dp):
    """The README's async DP runs: every model version is counted by the accountant (central DP
    clips and noises the buffer's changes; local DP's devices do it before they upload)."""
    out = subprocess.run(
        [sys.executable, "-m", "fedhub.simulate", "--devices", "3", "--workers", "1", "--rounds", "3",
         "--mode", "async", "--buffer", "3", "--compression", compression, "--dp", dp,
         "--dp-noise-multiplier", "0.3", "--dp-clip", "2.0", "--limit", "100", "--test-limit", "200",
         "--data-dir", str(data_dir), "--quiet", "--history", str(tmp_path / "history.json"),
         "--timeout", "300"],
        cwd=ROOT, capture_output=True, text=True, timeout=400)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["mode"] == "async" and summary["rounds"] == 3 and summary["compression"] == compression
    history = json.loads((tmp_path / "history.json").read_text())
    privacy = [h["privacy"] for h in history]
    assert [p["rounds"] for p in privacy] == [1, 2, 3] and {p["mode"] for p in privacy} == {dp}
    epsilons = [p["epsilon"] for p in privacy]
    assert 0 < epsilons[0] < epsilons[1] < epsilons[2] == pytest.approx(summary["epsilon"])
    # one update per device in each version: the noise covers one change per device
    for h in history:
        devices = [u["device"] for u in h["updates"]]
        assert len(devices) == len(set(devices)) == 3, h["updates"]


@pytest.mark.slow
def test_a_robust_strategy_screens_the_buffers_changes(server_factory):
    """``--mode async --strategy fedmedian``: the version is the coordinate-wise median of the
    buffer's staleness-weighted changes, so one wild update moves nothing."""
    server = server_factory(*ASYNC, "--buffer", "3", "--strategy", "fedmedian").start()
    tokens = {name: enroll(server, name) for name in ("a", "b", "c")}
    rng = np.random.default_rng(2)
    _, w0 = _model(server, tokens["a"])
    sent = {name: _nudged(w0, rng) for name in ("a", "b")}
    sent["c"] = {k: (a + 1000).astype(a.dtype) for k, a in w0.items()}  # an attacker's update
    for name, weights in sent.items():
        assert _upload(server, name, tokens[name], weights, base=0, n=100).status_code == 200
    _version(server, 1)
    expected = {k: (a.astype(np.float64) + np.median(
        [sent[n][k].astype(np.float64) - a for n in sent], axis=0)).astype(a.dtype) for k, a in w0.items()}
    _assert_model(server, tokens["a"], expected)
    entry = server.get("/api/history").json()["rounds"][-1]
    assert entry["strategy"]["name"] == "fedmedian" and entry["num_used"] == 3
    assert [u["status"] for u in entry["updates"]] == ["used"] * 3
    assert entry["devices"]["c"]["aggregation"]["status"] == "used"
