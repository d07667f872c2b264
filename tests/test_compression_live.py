"""Compressed updates through the real server and real device processes, on small data.

The devices train the digits model with ``tests.seeded_digits``' deterministic trainer, so each
round's global model can be recomputed here in NumPy from the codec's definition: exactly for
top-k (with the residual each device carries into the next round), within one quantization step
for q8 and q4. A device killed between two rounds keeps its residual (its folder's
``residual.safetensors``). Hand-crafted hostile uploads are refused with 400 naming the field,
and change nothing.
"""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
import requests

from examples import digits
from fedhub.device.launcher import launch, stop
from fedhub.engine import compression as c
from fedhub.engine import wire
from tests.seeded_digits import SeededSoftmaxTrainer

from .conftest import ROOT, ServerProcess, wait_until
from .rounds_by_hand import enroll

DIGITS = ("--learning-rate", "0.5", "--epochs", "2", "--batch-size", "16", "--auto-activate",
          "--no-tensorboard", "--model-factory", "tests.seeded_digits:build_model")
CONFIG = {"epochs": 2, "batch_size": 16, "learning_rate": 0.5}


def digits_server(tmp_path, data_dir, *args: str) -> ServerProcess:
    return ServerProcess(tmp_path, data_dir, *DIGITS, "--test-data", str(tmp_path / "devices" / "test.npz"),
                         *args)


def devices(server: ServerProcess, root, names):
    return launch(server.url, names, devices_root=root, env={"FEDHUB_ENROLL_SECRET": server.enroll_secret},
                  extra_args=["--poll-wait", "2", "--retry-for", "120", "--trainer",
                              "tests.seeded_digits:SeededSoftmaxTrainer"], log_dir=root / "logs")


def checkpoint(server: ServerProcess, number: int) -> dict[str, np.ndarray]:
    return wire.decode((server.state_dir / "saved" / f"round_{number:05d}.safetensors").read_bytes())[0]


def finished(server: ServerProcess) -> bool:
    return server.get("/api/status").json()["status"] == "finished"


def delta(root, name: str, weights) -> tuple[dict[str, np.ndarray], int]:
    """What device ``name`` trains from ``weights`` (its trainer is deterministic), minus them."""
    result = SeededSoftmaxTrainer(root / name / "data").train(weights, CONFIG)
    return {k: result.weights[k] - weights[k] for k in weights}, result.num_examples


def top_k(d: dict[str, np.ndarray], fraction: float) -> dict[str, np.ndarray]:
    """NumPy reference of top-k: the ceil(fraction x size) largest magnitudes, the rest zero."""
    out = {}
    for k, a in d.items():
        flat = a.ravel()
        keep = np.argsort(-np.abs(flat), kind="stable")[: c.kept(flat.size, fraction)]
        sparse = np.zeros_like(flat)
        sparse[keep] = flat[keep]
        out[k] = sparse.reshape(a.shape)
    return out


def mean(updates: list[tuple[dict[str, np.ndarray], int]]) -> dict[str, np.ndarray]:
    total = sum(n for _, n in updates)
    return {k: sum(w[k].astype(np.float64) * n for w, n in updates) / total for k in updates[0][0]}


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["q8", "q4", "topk:0.25"])
def test_compressed_rounds_match_a_numpy_reference(tmp_path, data_dir, scheme):
    names = ["digits1", "digits2"]
    root = tmp_path / "devices"
    digits.split(root, 2, limit=200)
    server = digits_server(tmp_path, data_dir, "--rounds", "2", "--min-devices", "2", "--quorum", "1",
                           "--start", "--compression", scheme).start()
    procs = devices(server, root, names)
    try:
        wait_until(lambda: finished(server), 90, "the run to finish")
        codes = [p.wait(30) for p in procs]
    finally:
        stop(procs)
        server.stop()
    assert codes == [0, 0]
    s = c.parse(scheme)
    rounds = [checkpoint(server, n) for n in range(3)]
    residual = {name: {k: np.zeros_like(a) for k, a in rounds[0].items()} for name in names}
    for number in (1, 2):
        start, got = rounds[number - 1], rounds[number]
        trained = {name: delta(root, name, start) for name in names}
        if s.kind == "topk":  # exact: every device sends top-k of its delta plus its residual
            sent = []
            for name, (d, n) in trained.items():
                carried = {k: d[k] + residual[name][k] for k in d}
                kept = top_k(carried, s.fraction)
                residual[name] = {k: carried[k] - kept[k] for k in d}
                sent.append(({k: start[k] + kept[k] for k in d}, n))
            expected = mean(sent)
            for k in got:
                np.testing.assert_allclose(got[k], expected[k], atol=2e-6, err_msg=f"round {number}: {k}")
            without_feedback = mean([({k: start[k] + v for k, v in top_k(d, s.fraction).items()}, n)
                                     for d, n in trained.values()])
            if number == 2:  # the residual of round 1 went into round 2's update
                assert max(np.abs(got[k] - without_feedback[k]).max() for k in got) > 1e-4
        else:  # within one quantization step (per device, so per mean) of the uncompressed mean
            exact = mean([({k: start[k] + d[k] for k in d}, n) for d, n in trained.values()])
            step = max(np.abs(d[k]).max() / c.LEVELS[s.bits] for d, _ in trained.values() for k in d)
            for k in got:
                error = np.abs(got[k] - exact[k]).max()
                assert error <= step * 1.01, f"round {number}: {k} is {error} off, step {step}"
                assert error > 0, "the update went quantized"
    for name in names:
        saved = c.Residual(root / name / "residual.safetensors").load(s)
        if s.kind == "topk":
            for k in saved:
                np.testing.assert_allclose(saved[k], residual[name][k], atol=2e-6)
        else:
            assert saved == {}, "only top-k keeps a residual"


@pytest.mark.slow
def test_error_feedback_survives_a_device_restart(tmp_path, data_dir):
    root = tmp_path / "devices"
    digits.split(root, 1, limit=200)
    hold = root / "digits1" / "data" / "hold"
    hold.write_text("1")  # the device's second training call (round 2) waits
    server = digits_server(tmp_path, data_dir, "--rounds", "2", "--min-devices", "1", "--start",
                           "--compression", "topk:0.1").start()
    [proc] = devices(server, root, ["digits1"])
    residual_file = root / "digits1" / "residual.safetensors"
    try:
        wait_until(lambda: (server.get("/api/status").json()["round"] or {}).get("number") == 2
                   and residual_file.exists(), 60, "round 2 open, with the residual of round 1 saved")
        proc.kill()  # SIGKILL in round 2's training: nothing is left in memory
        proc.wait()
        hold.unlink()
        [proc] = devices(server, root, ["digits1"])
        wait_until(lambda: finished(server), 60, "the run to finish after the restart")
        assert proc.wait(30) == 0
    finally:
        stop([proc])
        server.stop()
    g0, g1, g2 = (checkpoint(server, n) for n in range(3))
    d1, _ = delta(root, "digits1", g0)
    kept1 = top_k(d1, 0.1)
    residual1 = {k: d1[k] - kept1[k] for k in d1}
    for k in g1:
        np.testing.assert_allclose(g1[k], g0[k] + kept1[k], atol=2e-6)
    d2, _ = delta(root, "digits1", g1)
    with_feedback = top_k({k: d2[k] + residual1[k] for k in d2}, 0.1)
    for k in g2:  # the restarted device sent round 2's delta plus round 1's residual, from its file
        np.testing.assert_allclose(g2[k], g1[k] + with_feedback[k], atol=2e-6)
    lost = top_k(d2, 0.1)
    assert max(np.abs(g2[k] - (g1[k] + lost[k])).max() for k in g2) > 1e-4


@pytest.mark.slow
def test_compressed_downlink_sends_the_change_and_devices_follow(tmp_path, data_dir):
    names = ["digits1", "digits2"]
    root = tmp_path / "devices"
    digits.split(root, 2, limit=200)
    server = digits_server(tmp_path, data_dir, "--rounds", "3", "--min-devices", "2", "--quorum", "1",
                           "--start", "--compression", "q8", "--compress-downlink").start()
    procs = devices(server, root, names)
    try:
        wait_until(lambda: finished(server), 90, "the run to finish")
        assert [p.wait(30) for p in procs] == [0, 0]
        assert server.get("/api/status").json()["compression"] == {"uplink": "q8", "downlink": True}
        history = server.get("/api/history").json()["rounds"]
        assert [e["num_used"] for e in history] == [2, 2, 2]
        assert history[-1]["test_accuracy"] > 0.8

        def download(etag: str | None = None) -> requests.Response:
            return requests.get(f"{server.url}/api/model", timeout=30, headers={
                "Authorization": f"Bearer {server.admin_token}", **({"If-None-Match": etag} if etag else {})})

        whole = download()
        etag = whole.headers["ETag"].strip('"')
        version, epoch = etag[1:].split("-")
        change = download(f'"v{int(version) - 1}-{epoch}"')
        assert change.status_code == 200
        assert download(f'"{etag}"').status_code == 304
        assert download(f'"v{int(version) - 1}-00000000"').content == whole.content  # another server start
    finally:
        stop(procs)
        server.stop()
    meta = wire.header(change.content)["__metadata__"]
    assert meta["compression"] == "q8" and meta["base_version"] == str(int(version) - 1)
    assert len(change.content) < 0.3 * len(whole.content) + 600
    # the broadcast model is within one quantization step of the global model
    _, broadcast = c.decode_download(whole.content, None)
    g = checkpoint(server, int(version))
    g_before = checkpoint(server, int(version) - 1)
    for k in g:
        assert np.abs(broadcast[k] - g[k]).max() <= 2 * np.abs(g[k] - g_before[k]).max() / 127 + 1e-6


# hostile uploads ------------------------------------------------------------------------------
def hostile_cases(scheme: str, tensors, plain: bytes, meta) -> dict[str, bytes]:
    """Bodies each wrong in one field (the key; a trailing space keeps keys apart)."""
    kernel, bias = digits.KERNEL, digits.BIAS

    def hostile(change, extra=None) -> bytes:
        t = {k: v.copy() for k, v in tensors.items()}
        change(t)
        return wire.encode(t, meta, {"compression": scheme, **(extra or {})})

    def put(name, index, value):
        return lambda t: t[name].__setitem__(index, value)

    cases = {
        "compression": hostile(lambda t: None, {"compression": "q4"}),
        "compression ": plain,  # plain weights where deltas were announced
        f"{kernel} ": hostile(lambda t: t.__setitem__(kernel, t[kernel].astype(np.float64))),
    }
    if scheme.startswith("topk"):
        index = f"{kernel}::indices"
        return {**cases,
                index: hostile(put(index, -1, 64 * 10)),  # out of range
                index + " ": hostile(lambda t: t[index].__setitem__(1, t[index][0])),  # repeated
                kernel: hostile(lambda t: t.__setitem__(kernel, t[kernel][:-1])),  # sparsity
                "compression  ": hostile(lambda t: None, {"compression": "topk:0.2"})}
    return {**cases,
            f"{kernel}::scales": hostile(lambda t: t.__setitem__(f"{kernel}::scales",
                                                                 np.ones(3, np.float32))),  # shape
            f"{bias}::scales": hostile(put(f"{bias}::scales", 0, -1.0)),
            f"{bias}::scales ": hostile(put(f"{bias}::scales", 0, np.nan)),
            bias: hostile(put(bias, 0, -128)),  # below the levels
            "body": hostile(lambda t: None)[:-7]}  # truncated


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["topk:0.1", "q8"])
def test_hostile_compressed_uploads_are_refused_naming_the_field(tmp_path, data_dir, scheme):
    root = tmp_path / "devices"
    digits.split(root, 1, limit=50)
    server = digits_server(tmp_path, data_dir, "--rounds", "1", "--min-devices", "1",
                           "--compression", scheme).start()
    try:
        token = enroll(server, "mallory")
        auth = {"Authorization": f"Bearer {token}"}
        assert server.admin("POST", "/api/training/start").status_code == 200

        def train_task():
            task = server.get("/api/devices/mallory/task?wait=1", headers=auth).json()
            return task if task["action"] == "train" else None

        task = wait_until(train_task, 60, "a training task")
        assert task["config"]["compression"] == scheme
        g = wire.decode(server.get("/api/model", headers=auth).content)[0]
        meta = wire.Meta(round=task["round"], model_version=task["model_version"], num_examples=50)
        shift = {k: v + np.float32(0.01) * np.arange(v.size, dtype=np.float32).reshape(v.shape) / v.size
                 for k, v in g.items()}
        good, _ = c.encode_update(shift, g, c.parse(scheme), meta)
        tensors = {k: v.copy() for k, v in wire.decode(good)[0].items()}
        url = f"{server.url}/api/devices/mallory/updates/{task['round']}"

        def send(body: bytes) -> requests.Response:
            return requests.post(url, data=body, timeout=30,
                                 headers={**auth, "Content-Type": "application/octet-stream"})

        for field, body in hostile_cases(scheme, tensors, wire.encode(shift, meta), meta).items():
            r = send(body)
            assert r.status_code == 400, (field, r.text)
            error = r.json()
            assert error["field"] == field.strip() and error["error"] == "invalid_input", error
            assert error["message"]
        status = server.get("/api/status").json()["round"]
        assert status["reported"] == [], "a refused update changes nothing"
        r = send(good)
        assert r.status_code == 200, r.text
        wait_until(lambda: finished(server), 60, "the round to close")
    finally:
        server.stop()
    g1 = checkpoint(server, 1)
    sent, _ = c.decode_update(good, wire.spec_of(g), c.parse(scheme))
    for k in g1:  # the one update, as its sender made it, is the new model
        np.testing.assert_array_equal(g1[k], c.apply(g, sent)[k])
    if scheme.startswith("topk"):  # and top-k kept what a NumPy reference keeps
        for k, v in top_k({k: shift[k] - g[k] for k in g}, 0.1).items():
            np.testing.assert_allclose(sent[k], v, atol=1e-7)


def test_bad_compression_options_are_one_line_errors():
    from fedhub import serve as server
    from tests.cli_inprocess import assert_one_line_error, run_main

    for args, message in ((["--compression", "q3"], "unknown compression 'q3'"),
                          (["--compression", "topk:1.5"], "between 0 and 1"),
                          (["--compress-downlink"], "--compress-downlink needs a --compression other")):
        # in-process (server.py's real-process check is in tests/test_cli_settings.py)
        assert_one_line_error(run_main(server.parse_args, args), message)


@pytest.mark.slow
def test_simulation_counts_the_compressed_bytes(tmp_path, data_dir):
    """``fedhub.simulate --compression q4 --compress-downlink``: a worker of virtual devices
    follows the announced scheme, and its byte counts are the compressed sizes."""
    out = subprocess.run(
        [sys.executable, "-m", "fedhub.simulate", "--devices", "4", "--fraction", "1", "--workers", "1",
         "--rounds", "2", "--limit", "40", "--test-limit", "300", "--data-dir", str(data_dir), "--quiet",
         "--root", str(tmp_path), "--compression", "q4", "--compress-downlink"],
        cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["rounds"] == 2 and summary["failed_steps"] == 0 and summary["compression"] == "q4"
    model = (tmp_path / "server" / "saved" / "round_00000.safetensors").stat().st_size
    # 8 updates of 4 bits a value (plus scales, tasks, logs), where float32 would be 8 models
    assert summary["bytes_up"] < 0.25 * 8 * model, summary
    # the worker's one copy: version 0 whole, version 1 as its change (plain would be 2 models)
    assert summary["bytes_down"] < 1.5 * model, summary
