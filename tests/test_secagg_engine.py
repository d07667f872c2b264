"""Secure aggregation in the engine, over HTTP (Flask's test client) and a real SQLite file: a
server optimizer (FedAdam) steps from the unmasked weighted mean exactly as from a plain one,
the status shows the open stage, and robust strategies are refused at start-up."""

from __future__ import annotations

import numpy as np
import pytest

from fedhub.engine.config import FederationConfig
from fedhub.engine.devices import DeviceRegistry
from fedhub.engine.rounds import Coordinator
from fedhub.engine.secagg import DeviceRound, SecAggConfig
from fedhub.engine.storage import Storage
from fedhub.engine.strategies import make_strategy
from tests.conftest import wait_until
from tests.secagg_by_hand import answer
from tests.test_api import ENROLL, INITIAL, bearer, make_app

DELTAS = {"dev1": (0.01, 10), "dev2": (0.02, 20), "dev3": (-0.03, 30)}  # change everywhere, weight


def _finish(client, engine, step):
    """Step the devices until the round is done; the new global model and its history entry."""
    wait_until(step, 30, "the secure round", interval=0.05)
    _, got = engine.global_weights()
    [entry] = client.get("/api/history").get_json()["rounds"]
    return got, entry


def test_fedadam_steps_from_the_unmasked_mean(tmp_path):
    app, engine = make_app(tmp_path, strategy="fedadam", min_devices=3, rounds=1, auto_activate=True,
                           start=True, secagg=SecAggConfig())
    client = app.test_client()
    tokens = {}
    for name in DELTAS:
        r = client.post("/api/devices/register", json={"name": name}, headers={"X-Enroll-Secret": ENROLL})
        tokens[name] = r.get_json()["token"]
    rounds: dict[str, DeviceRound] = {}
    stages = set()
    try:
        def step() -> bool:
            for name, token in tokens.items():
                task = client.get(f"/api/devices/{name}/task", headers=bearer(token)).get_json()
                sent = answer(name, task, rounds, *DELTAS[name])
                if sent is not None:
                    # the stage cannot move on before this device answers: the status shows it now
                    current = client.get("/api/status").get_json()["round"] or {}
                    stages.add((current.get("secagg") or {}).get("stage"))
                    r = client.post(f"/api/devices/{name}/secagg/{task['round']}", data=sent[0],
                                    headers={**bearer(token), "Content-Type": sent[1]})
                    assert r.status_code == 200, r.get_json()
            return client.get("/api/status").get_json()["completed_rounds"] == 1

        got, entry = _finish(client, engine, step)
    finally:
        engine.stop()
    assert {"advertise", "share", "masked", "unmask"} <= stages, stages
    assert entry["secagg"]["survivors"] == 3 and entry["num_examples"] == 60
    mean = sum(d * w for d, w in DELTAS.values()) / sum(w for _, w in DELTAS.values())
    plain = make_strategy("fedadam").begin(INITIAL)
    plain.add("all", {k: v + mean for k, v in INITIAL.items()}, 60)
    want = plain.result().weights
    for k in INITIAL:
        np.testing.assert_allclose(got[k], want[k], atol=1e-4)
        assert np.abs(got[k]).min() > 1e-3  # the step was taken


def test_robust_strategies_are_refused_with_secure_aggregation(tmp_path):
    config = FederationConfig(strategy="fedmedian", min_devices=3, secagg=SecAggConfig())
    with pytest.raises(ValueError, match="strategy fedmedian cannot be used with secagg: it compares the "
                                         "devices' updates one by one"):
        config.validate()
    storage = Storage(tmp_path / "state")
    with pytest.raises(ValueError, match="secure aggregation needs at least 2 devices a round"):
        Coordinator(storage, DeviceRegistry(storage, enroll_secret=ENROLL), initial_weights=INITIAL,
                    config=FederationConfig(secagg=SecAggConfig()))


def test_a_relays_masked_sum_counts_each_device_and_hostile_ones_change_nothing(tmp_path):
    """Over HTTP: a relay sums two devices' masked updates (the third sends its own); hostile
    sums are refused with a 4xx naming the field, the masked stage untouched; the same sum again
    is a duplicate; the round unmasks the same weighted mean."""
    import json

    from safetensors.numpy import save as st_save

    from fedhub.engine.secagg import MaskedInput, MaskedSum, masks

    app, engine = make_app(tmp_path, strategy="fedavg", min_devices=3, rounds=1, auto_activate=True,
                           start=True, secagg=SecAggConfig())
    client = app.test_client()
    tokens = {name: client.post("/api/devices/register", json={"name": name},
                                headers={"X-Enroll-Secret": ENROLL}).get_json()["token"] for name in DELTAS}
    relay = client.post("/api/relays/register", json={"name": "edge"}, headers={"X-Enroll-Secret": ENROLL})
    relay_auth = bearer(relay.get_json()["token"])
    rounds: dict[str, DeviceRound] = {}
    held: dict[str, bytes] = {}  # the devices' masked updates
    behind = ("dev1", "dev2")
    try:
        def step() -> bool:
            for name, token in tokens.items():
                if name in held:
                    continue
                task = client.get(f"/api/devices/{name}/task", headers=bearer(token)).get_json()
                sent = answer(name, task, rounds, *DELTAS[name])
                if sent is not None and task["action"] == "train":  # dev3's own goes after the sums
                    held[name] = sent[0]
                elif sent is not None:
                    r = client.post(f"/api/devices/{name}/secagg/{task['round']}", data=sent[0],
                                    headers={**bearer(token), "Content-Type": sent[1]})
                    assert r.status_code == 200, r.get_json()
            return len(held) == len(tokens)

        wait_until(step, 30, "the masked stage", interval=0.05)
        params = rounds["dev1"].params
        number = params.round
        total = np.zeros(params.length + 1, dtype=np.uint64)
        for name in behind:
            masks.add(total, MaskedInput.from_bytes(held[name], params).vector, 1, params)
        inputs = tuple((name, ()) for name in behind)
        good = MaskedSum(number, inputs, total, tuple(tokens[n] for n in behind)).to_bytes(params)
        url = f"/api/relays/edge/secagg/{number}"
        octet = {"Content-Type": "application/octet-stream"}

        def variant(**devices_or_meta):
            entries = [{"name": n, "refused": [], "token": tokens[n]} for n in behind]
            meta = {"format": "fedhub-secagg/1", "stage": "masked_sum", "round": str(number),
                    "devices": json.dumps(devices_or_meta.pop("devices", entries)), **devices_or_meta}
            return st_save({"masked": total.astype("<u4")}, metadata=meta)

        hostile = [
            ({}, good, 401, "Authorization"),
            ({**relay_auth}, good, 400, "Content-Type"),
            ({**relay_auth, **octet}, b"\x00" * 7, 400, None),
            ({**relay_auth, **octet}, variant(format="x"), 400, "format"),
            ({**relay_auth, **octet}, variant(devices=[]), 400, "devices"),
            ({**relay_auth, **octet}, variant(devices=[dict(name="dev1", refused=[], token=tokens["dev3"])]),
             403, "devices[0].token"),
            ({**relay_auth, **octet}, variant(devices=[{"name": "dev1", "refused": [], "token": "nope"}]),
             401, "devices[0].token"),
            ({**relay_auth, **octet}, variant(devices=[{"name": "dev1", "refused": []}]), 400, "devices[0]"),
            ({**relay_auth, **octet}, variant(extra="1"), 400, "extra"),
            ({**relay_auth, **octet}, variant(round=str(number + 1)), 409, "round"),
        ]
        expected = client.get("/api/status").get_json()["round"]["secagg"]["expected"]
        for headers, body, status, field in hostile:
            r = client.post(url, data=body, headers=headers)
            assert r.status_code == status, (field, r.get_json())
            assert field is None or r.get_json()["field"] == field, r.get_json()
        r = client.post(f"/api/relays/edge/secagg/{number + 5}", data=good, headers={**relay_auth, **octet})
        assert r.status_code == 409 and r.get_json()["field"] == "round"
        assert client.get("/api/status").get_json()["round"]["secagg"]["expected"] == expected
        first = client.post(url, data=good, headers={**relay_auth, **octet})
        assert first.status_code == 200 and first.get_json()["duplicate"] is False, first.get_json()
        again = client.post(url, data=good, headers={**relay_auth, **octet})
        assert again.status_code == 200 and again.get_json()["duplicate"] is True
        one = MaskedSum(number, (("dev1", ()),), MaskedInput.from_bytes(held["dev1"], params).vector,
                        (tokens["dev1"],)).to_bytes(params)
        overlap = client.post(url, data=one, headers={**relay_auth, **octet})
        assert overlap.status_code == 409 and "dev1" in overlap.get_json()["message"]
        own = client.post(f"/api/devices/dev3/secagg/{number}", data=held["dev3"],
                          headers={**bearer(tokens["dev3"]), **octet})
        assert own.status_code == 200, own.get_json()

        def unmasked() -> bool:  # dev3 and, through the relay, its devices answer the unmask stage
            for name, token in tokens.items():
                task = client.get(f"/api/devices/{name}/task", headers=bearer(token)).get_json()
                if task["action"] == "secagg":
                    sent = answer(name, task, rounds, *DELTAS[name])
                    client.post(f"/api/devices/{name}/secagg/{task['round']}", data=sent[0],
                                headers={**bearer(token), "Content-Type": sent[1]})
            return client.get("/api/status").get_json()["completed_rounds"] == 1

        got, entry = _finish(client, engine, unmasked)
    finally:
        engine.stop()
    assert entry["secagg"]["survivors"] == 3 and entry["num_examples"] == 60
    mean = sum(d * w for d, w in DELTAS.values()) / sum(w for _, w in DELTAS.values())
    for k in INITIAL:
        np.testing.assert_allclose(got[k], INITIAL[k] + mean, atol=1e-4)
