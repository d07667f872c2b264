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

        wait_until(step, 30, "the secure round", interval=0.05)
        _, got = engine.global_weights()
        [entry] = client.get("/api/history").get_json()["rounds"]
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
