"""Secure aggregation through the real server and real device processes, on small digits data.

The devices train ``tests.seeded_digits``' deterministic softmax regression, so the test can
train each one's update again from the same global model and check what the server made of
the masked uploads: the weighted mean of the clipped updates, within one quantization step.
"""

from __future__ import annotations

import re
import sqlite3

import numpy as np
import pytest

from examples import digits
from fedhub.device.launcher import stop
from fedhub.engine import wire
from fedhub.engine.secagg.params import levels_for
from tests.secagg_by_hand import answer
from tests.seeded_digits import SeededSoftmaxTrainer

from .conftest import ServerProcess, launch_devices, wait_until

TRAINING = {"learning_rate": 0.5, "epochs": 1, "batch_size": 16}
CLIP = 0.05  # small enough that digits' updates are clipped: the check covers the clipping too
MAX_WEIGHT = 1000
NAMES = ["digits1", "digits2", "digits3", "digits4"]
pytestmark = pytest.mark.slow  # every test starts a real server


def secagg_server(tmp_path, data_dir, root, *args: str) -> ServerProcess:
    return ServerProcess(
        tmp_path, data_dir, "--model-factory", "tests.seeded_digits:build_model",
        "--test-data", str(root / "test.npz"), "--min-devices", str(len(NAMES)), "--quorum", "1",
        "--learning-rate", str(TRAINING["learning_rate"]), "--epochs", str(TRAINING["epochs"]),
        "--batch-size", str(TRAINING["batch_size"]), "--auto-activate", "--start", "--no-tensorboard",
        "--round-timeout", "20", "--secure-aggregation", "--secagg-clip", str(CLIP),
        "--secagg-max-weight", str(MAX_WEIGHT), *args)


def checkpoint(server: ServerProcess, number: int) -> dict[str, np.ndarray]:
    weights, _ = wire.decode((server.state_dir / "saved" / f"round_{number:05d}.safetensors").read_bytes())
    return weights


def history(server: ServerProcess) -> list[dict]:
    return server.get("/api/history").json()["rounds"]


def finished(server: ServerProcess) -> bool:
    return server.get("/api/status").json()["status"] == "finished"


def expected_mean(root, names, start: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The example-weighted mean of the named devices' clipped updates from ``start``."""
    total, weight = None, 0
    for name in names:
        result = SeededSoftmaxTrainer(root / name / "data").train(start, TRAINING)
        w = min(result.num_examples, MAX_WEIGHT)
        clipped = {k: np.clip(result.weights[k].astype(np.float64) - start[k], -CLIP, CLIP) * w
                   for k in start}
        total = clipped if total is None else {k: total[k] + clipped[k] for k in total}
        weight += w
    return {k: v / weight for k, v in total.items()}


def test_masked_rounds_give_the_weighted_mean_and_recover_a_dropout(tmp_path, data_dir):
    root = tmp_path / "devices"
    digits.split(root, len(NAMES), limit=120)
    server = secagg_server(tmp_path, data_dir, root, "--rounds", "2").start()
    trainer = ("--trainer", "tests.seeded_digits:SeededSoftmaxTrainer")
    procs = launch_devices(server, root, NAMES[:3], *trainer)
    procs += launch_devices(server, root, NAMES[3:], *trainer, "--secagg-dropout", "1")
    try:
        assert server.get("/api/status").json()["secure_aggregation"]["clip_range"] == CLIP
        wait_until(lambda: finished(server), 50, "two secure rounds")
        rounds = history(server)
    finally:
        stop(procs)
        server.stop()
    assert [r["round"] for r in rounds] == [1, 2]
    levels = levels_for(32, len(NAMES), MAX_WEIGHT)
    for entry in rounds:
        secagg = entry["secagg"]
        assert secagg["enabled"] and secagg["threshold"] == 3 and secagg["shares"] == 4
        assert secagg["survivors"] == 3 and secagg["recovered"] == ["digits4"], secagg
        assert entry["num_updates"] == 3
        start, end = checkpoint(server, entry["round"] - 1), checkpoint(server, entry["round"])
        want = expected_mean(root, NAMES[:3], start)
        for k in start:
            got = end[k].astype(np.float64) - start[k]
            # one quantization step, plus float32 rounding of the new global model
            np.testing.assert_allclose(got, want[k], rtol=0, atol=CLIP / levels + 1e-6)
            assert np.abs(want[k]).max() > 10 * CLIP / levels, "the check is not trivially met"

    # Nothing the server keeps holds one device's update: not its database, checkpoints or log.
    start = checkpoint(server, 0)
    update = SeededSoftmaxTrainer(root / "digits1" / "data").train(start, TRAINING).weights
    kept = b"".join(p.read_bytes() for p in server.state_dir.rglob("*") if p.is_file())
    kept += server.log_path.read_bytes()
    for k, a in update.items():
        delta = a.astype(np.float64) - start[k]
        at = min(int(np.abs(delta).argmax()), delta.size - 8)  # 8 values around its largest change
        for form in (a, delta, delta.astype(np.float32), np.clip(delta, -CLIP, CLIP)):
            window = form.ravel()[at:at + 8]
            assert np.count_nonzero(window) > 4 and window.tobytes() not in kept, \
                f"{k} of digits1's update is stored"
    db = sqlite3.connect(server.state_dir / "fedhub.sqlite3")
    assert db.execute("SELECT COUNT(*) FROM updates").fetchone() == (0,)
    assert re.search(r"round 2: secure aggregation stage 'unmask'", server.log())


# devices that speak the protocol by hand: lying ones, and a server killed mid-round -------------
class HandDevice:
    """A device that speaks the secure-aggregation protocol over HTTP by hand and uploads a known
    change (``delta`` everywhere, weighted by ``weight``) instead of training."""

    def __init__(self, server: ServerProcess, name: str, delta: float, weight: int) -> None:
        import requests

        from fedhub.engine.secagg import DeviceRound

        self.server, self.name, self.delta, self.weight = server, name, delta, weight
        self.rounds: dict[str, DeviceRound] = {}
        self.lied = -1  # the round whose shares it forged
        self.sent: dict[tuple[int, str], bytes] = {}  # (round, stage) -> the body sent
        self.session = requests.Session()
        r = self.session.post(f"{server.url}/api/devices/register", timeout=30,
                              headers={"X-Enroll-Secret": server.enroll_secret},
                              json={"name": name, "auto_activate": True,
                                    "validation": {"ok": True, "problems": [], "num_examples": weight}})
        assert r.status_code == 201, r.text
        self.session.headers["Authorization"] = f"Bearer {r.json()['token']}"

    def task(self) -> dict:
        return self.session.get(f"{self.server.url}/api/devices/{self.name}/task?wait=0", timeout=30).json()

    def post(self, number: int, body: bytes, masked: bool = False):
        ctype = "application/octet-stream" if masked else "application/json"
        return self.session.post(f"{self.server.url}/api/devices/{self.name}/secagg/{number}", data=body,
                                 headers={"Content-Type": ctype}, timeout=30)

    def answer(self, task: dict) -> bytes | None:
        """This device's honest answer to ``task`` (None when there is nothing to answer)."""
        if task.get("stage") == "share" and self.lied == task["round"]:
            return None  # its forged shares are in
        sent = answer(self.name, task, self.rounds, self.delta, self.weight)
        return None if sent is None else sent[0]

    def step(self, task: dict) -> str | None:
        """Answer ``task``, if it asks for anything; the stage answered."""
        body = self.answer(task)
        if body is None:
            return None
        stage = task.get("stage", "masked")
        r = self.post(task["round"], body, masked=stage == "masked")
        assert r.status_code == 200, (self.name, stage, r.text)
        self.sent[task["round"], stage] = body
        return stage


def hand_server(tmp_path, data_dir, *args: str) -> ServerProcess:
    root = tmp_path / "devices"
    digits.split(root, 1, limit=20)  # only its test set: the hand devices do not train
    return ServerProcess(tmp_path, data_dir, "--model-factory", "tests.seeded_digits:build_model",
                         "--test-data", str(root / "test.npz"), "--min-devices", "4", "--quorum", "1",
                         "--auto-activate", "--start", "--no-tensorboard", "--round-timeout", "20",
                         "--secure-aggregation", "--secagg-clip", "0.5", *args)


def run_round(server: ServerProcess, devices: list[HandDevice], number: int, before=None) -> None:
    """Step every device until round ``number`` is complete; ``before(device, task)`` may act on
    each task first."""
    def done() -> bool:
        for d in devices:
            task = d.task()
            if before is not None:
                before(d, task)
            d.step(task)
        return server.get("/api/status").json()["completed_rounds"] >= number

    wait_until(done, 40, f"round {number}", interval=0.05)


def mean_change(server: ServerProcess, number: int) -> np.ndarray:
    start, end = checkpoint(server, number - 1), checkpoint(server, number)
    return np.concatenate([(end[k].astype(np.float64) - start[k]).ravel() for k in sorted(start)])


def test_lying_devices_are_refused_and_the_round_goes_on(tmp_path, data_dir):
    from fedhub.engine.secagg import AdvertiseKeys, KeyDirectory, ShareKeys

    server = hand_server(tmp_path, data_dir, "--rounds", "2").start()
    try:
        honest = [HandDevice(server, f"hand{i}", 0.01 * i, 100 * i) for i in (1, 2, 3)]
        liar = HandDevice(server, "liar", -0.02, 50)
        devices = [*honest, liar]
        refusals: list[tuple[int, dict]] = []
        keys_seen: dict[str, tuple[bytes, bytes]] = {}

        def lie(device: HandDevice, task: dict) -> None:
            if device is not liar or task["action"] != "secagg":
                return
            number = task["round"]
            if task["stage"] == "advertise":
                # in another device's name
                fake = AdvertiseKeys(round=number, device="hand1", cipher_key=b"\x09" * 32,
                                     mask_key=b"\x0a" * 32)
                r = device.post(number, fake.to_bytes())
                refusals.append((r.status_code, r.json()))
                if keys_seen:  # round 2: hand1's keys of round 1
                    cipher, mask = keys_seen["hand1"]
                    stolen = AdvertiseKeys(round=number, device="liar", cipher_key=cipher, mask_key=mask)
                    r = device.post(number, stolen.to_bytes())
                    refusals.append((r.status_code, r.json()))
            if task["stage"] == "share":
                keys_seen.update(KeyDirectory.from_dict(task["message"]).keys)
                r = device.post(number, device.sent[number, "advertise"])  # replayed
                refusals.append((r.status_code, r.json()))
                # a wrong share for hand1: the honest message with hand1's ciphertexts corrupted
                honest_shares = device.answer(task)
                message = ShareKeys.from_bytes(honest_shares)
                seed, key = message.shares["hand1"]
                shares = {**message.shares, "hand1": (seed[:-1] + bytes([seed[-1] ^ 1]), key)}
                forged = ShareKeys(round=number, device="liar", commitment=message.commitment, shares=shares)
                r = device.post(number, forged.to_bytes())
                assert r.status_code == 200, r.text
                device.lied = number

        run_round(server, devices, 1, lie)
        run_round(server, devices, 2, lie)
        rounds = history(server)
    finally:
        server.stop()

    codes = [(status, body["field"]) for status, body in refusals]
    assert codes == [(400, "device"), (409, "stage"), (400, "device"), (400, "cipher_key"), (409, "stage")], \
        refusals
    assert "in the name of device 'hand1'" in refusals[0][1]["message"]
    assert "advertises a key from an earlier round" in refusals[3][1]["message"]
    weights = {"hand1": 100, "hand2": 200, "hand3": 300, "liar": 50}
    deltas = {"hand1": 0.01, "hand2": 0.02, "hand3": 0.03, "liar": -0.02}
    want = sum(weights[n] * deltas[n] for n in weights) / sum(weights.values())
    levels = levels_for(32, 4, 10_000)
    for entry in rounds:
        assert entry["secagg"]["survivors"] == 4
        assert entry["secagg"]["complaints"] == {"hand1": ["liar"]}, entry["secagg"]
        np.testing.assert_allclose(mean_change(server, entry["round"]), want, atol=0.5 / levels + 1e-6)


def test_too_few_survivors_fail_the_round_which_runs_again(tmp_path, data_dir):
    server = hand_server(tmp_path, data_dir, "--rounds", "1").start()
    try:
        devices = [HandDevice(server, f"hand{i}", 0.01 * i, 100) for i in (1, 2, 3, 4)]
        quitting = {"hand3", "hand4"}  # drop out of the first attempt after dealing their shares
        wait_until(lambda: (server.get("/api/status").json()["round"] or {}).get("secagg"), 30, "round 1")
        hostile = [(b"{not json", "application/json"), (b'{"stage": "nope", "round": 1}', "application/json"),
                   (b'{"stage": "advertise", "round": 1, "device": "hand1"}', "application/json"),
                   (b"\x00" * 100, "application/octet-stream"), (b"{}", "text/plain"),
                   (b"x" * (17 * 2**20), "application/json")]
        answers = [devices[0].session.post(f"{server.url}/api/devices/hand1/secagg/1", data=body, timeout=30,
                                           headers={"Content-Type": ctype}) for body, ctype in hostile]
        assert [(r.status_code, r.json()["field"]) for r in answers] == [
            (400, "body"), (400, "stage"), (400, "cipher_key"), (400, "body"), (400, "Content-Type"),
            (413, "body")], [r.text for r in answers]
        assert devices[0].post(2, b"{}").status_code == 409

        def drop(device: HandDevice, task: dict) -> None:
            if device.name in quitting and task["action"] == "train":
                r = device.session.post(f"{server.url}/api/devices/{device.name}/interrupted",
                                        json={"round": task["round"], "detail": "gone"}, timeout=30)
                assert r.status_code == 200, r.text
                quitting.discard(device.name)
                task["action"] = "gone"

        run_round(server, devices, 1, drop)
        body = server.get("/api/history").json()
    finally:
        server.stop()
    [failure] = body["failures"]
    assert failure["round"] == 1
    assert "2 devices sent masked inputs, at least the threshold of 3 needed" in failure["reason"], failure
    [entry] = body["rounds"]
    assert entry["secagg"]["survivors"] == 4 and entry["secagg"]["recovered"] == []


def test_server_killed_mid_protocol_runs_the_round_again(tmp_path, data_dir):
    server = hand_server(tmp_path, data_dir, "--rounds", "1").start()
    try:
        devices = [HandDevice(server, f"hand{i}", 0.01 * i, 100) for i in (1, 2, 3, 4)]

        def stage() -> str | None:
            for d in devices:
                d.step(d.task())
            return (server.get("/api/status").json()["round"] or {}).get("secagg", {}).get("stage")

        wait_until(lambda: stage() == "masked", 30, "the masked stage", interval=0.05)
        server.kill()
        server.start()
        assert "discarded unfinished round(s) [1]" in server.log()
        stale = devices[0].post(1, devices[0].sent[1, "share"])
        assert stale.status_code == 409, stale.text
        run_round(server, devices, 1)
        [entry] = server.get("/api/history").json()["rounds"]
    finally:
        server.stop()
    assert entry["secagg"]["survivors"] == 4
    np.testing.assert_allclose(mean_change(server, 1), 0.025, atol=0.5 / levels_for(32, 4, 10_000) + 1e-6)


def test_dashboards_show_secure_aggregation_and_the_dropout_recovered(tmp_path, data_dir, monkeypatch):
    from streamlit.testing.v1 import AppTest

    from tests.chromium import chromium

    from .conftest import ROOT

    server = hand_server(tmp_path, data_dir, "--rounds", "1").start()
    try:
        devices = [HandDevice(server, f"hand{i}", 0.01 * i, 100) for i in (1, 2, 3, 4)]

        def drop(device: HandDevice, task: dict) -> None:  # hand4 leaves after dealing its shares
            if device.name == "hand4" and task["action"] == "train":
                r = device.session.post(f"{server.url}/api/devices/hand4/leave", timeout=30)
                assert r.status_code == 200, r.text
                task["action"] = "gone"

        run_round(server, devices, 1, drop)
        [entry] = history(server)
        assert entry["secagg"]["recovered"] == ["hand4"] and entry["secagg"]["survivors"] == 3
        np.testing.assert_allclose(mean_change(server, 1), 0.02, atol=0.5 / levels_for(32, 4, 10_000) + 1e-6)

        monkeypatch.setenv("FEDHUB_SERVER", server.url)
        at = AppTest.from_file(str(ROOT / "dashboard" / "index.py"), default_timeout=30).run()
        assert not at.exception, at.exception
        assert any(c.value.startswith("**On** (SecAgg+)") for c in at.caption), [c.value for c in at.caption]
        [secure] = [t.value for t in at.dataframe if "dropouts recovered" in t.value.columns]
        assert secure.to_dict("records") == [{
            "round": 1, "masked updates summed": 3, "threshold": 3, "dropouts recovered": 1,
            "recovered devices": "hand4", "refused": "–"}]

        with chromium() as browser:
            page = browser.new_page()
            page.goto(f"{server.url}/stats/")
            wait_until(lambda: page.evaluate("document.querySelectorAll('#rounds tr').length") == 1, 30,
                       "the rounds table")
            shown = page.evaluate("""() => [document.getElementById('secagg').textContent,
                [...document.querySelector('#rounds tr').cells].map((td) => td.textContent)]""")
    finally:
        server.stop()
    assert shown[0].startswith("on (SecAgg+: 11 shares, threshold a strict majority, clip ±0.5)"), shown
    assert shown[1][-1] == "3 summed (threshold 3), 1 dropout(s) recovered", shown


# the simulation: pooled virtual devices --------------------------------------------------------
def test_simulate_with_secure_aggregation_and_dropouts_on_a_pool(tmp_path):
    """fedhub.simulate(secagg=True, dropout=P): the pool's virtual devices step through
    each stage; a device that drops after dealing its shares is recovered."""
    import fedhub
    from examples.digits import load_digits
    from tests.test_simulation_pool import digits_model

    x, y = load_digits()
    partitions = [(x[i * 100:(i + 1) * 100], y[i * 100:(i + 1) * 100]) for i in range(5)]
    history = fedhub.simulate(digits_model, partitions, rounds=2, workers=1, batch_size=16, learning_rate=0.5,
                              test_data=(x[1400:], y[1400:]), root=tmp_path, timeout=300,
                              secagg=True, dropout=0.2)
    logs = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
    # Each device draws its dropouts from a generator seeded with its name (fedhub/device/secure.py):
    # with P = 0.2, device2 drops out of round 1 (its first draw is 0.056) and nobody out of round 2.
    assert [entry["secagg"]["recovered"] for entry in history] == [["device2"], []]
    for entry in history:
        secagg = entry["secagg"]
        assert secagg["threshold"] == 3 and secagg["shares"] == 5
        assert secagg["survivors"] == entry["num_updates"] == 5 - len(secagg["recovered"]) >= 3
        for name in secagg["recovered"]:
            assert f"[{name}] round {entry['round']}: dropping out after sharing keys (simulated)" in logs
    assert history[-1]["test_accuracy"] > 0.4  # chance is 0.1; FedAvg without masks reaches about 0.65
    with pytest.raises(ValueError, match="dropout must be from 0 to 1, and goes with secagg"):
        fedhub.simulate(digits_model, partitions, dropout=0.5)


def test_pool_devices_answer_a_secure_round_that_opens_again(tmp_path):
    """A reset mid-round opens round 1 again under the same number: the pool's virtual devices
    answer the new attempt's stages at once (each attempt has its own ``started_at``), not
    after their keepalive, which is longer here than a stage's deadline."""
    import fedhub
    from examples.digits import load_digits
    from fedhub.device.pool import DevicePool
    from fedhub.engine.secagg import SecAggConfig
    from fedhub.split import write_device_arrays
    from tests.test_simulation_pool import digits_model, enrolled

    x, y = load_digits()
    root = tmp_path / "devices"
    names = [f"d{i}" for i in range(1, 6)]
    for i, name in enumerate(names):
        write_device_arrays(root, name, x[i * 100:(i + 1) * 100], y[i * 100:(i + 1) * 100])
    with fedhub.Server(digits_model(), test_data=(x[1400:], y[1400:]), rounds=2, start=False, min_devices=5,
                       quorum=1.0, batch_size=16, secagg=SecAggConfig(), round_timeout=60,
                       state_dir=tmp_path / "server") as server:
        pool = DevicePool(server.url, names, root, workers=1, model="server",
                          enroll_secret=server.enroll_secret, keepalive=600)
        with pool:
            wait_until(lambda: enrolled(server, names), 300, "five devices with their validation")
            server.start_training()

            def past_advertise() -> bool:
                status = server.status()
                stage = ((status["round"] or {}).get("secagg") or {}).get("stage")
                return status["completed_rounds"] > 0 or stage not in (None, "advertise")

            wait_until(past_advertise, 120, "round 1 past its key advertisement", interval=0.02)
            server.engine.reset()
            server.start_training()
            wait_until(lambda: server.status()["status"] == "finished", 150, "the run to finish")
            assert pool.wait(timeout=120)
        history = server.history()
    assert [e["round"] for e in history] == [1, 2]
    assert all(e["secagg"]["survivors"] == 5 for e in history)
    assert not server.engine.round_failures()  # every stage of the new attempt was answered in time
