"""``GET /api/rounds/<n>/evaluation``: a round's global model on the server's own test set.

The engine evaluates each round's model once (the round's own evaluation when it closes is
kept), outside its lock, and never mixes up two models that share a round number across a
reset. The route on a real server answers what ``POST .../validate`` answers for the same
test images, and what the OpenAPI description says.
"""

from __future__ import annotations

import io
import json
import threading

import numpy as np
import pytest
import requests
from jsonschema import Draft202012Validator
from referencing import Registry
from referencing.jsonschema import DRAFT202012

from fedhub.api import build_app
from fedhub.engine.config import FederationConfig
from fedhub.engine.devices import DeviceRegistry
from fedhub.engine.errors import Conflict, NotFound
from fedhub.engine.rounds import Coordinator
from fedhub.engine.storage import Storage

from .conftest import ROOT, ServerProcess, wait_until
from .rounds_by_hand import enroll, train_rounds
from .test_api import ADMIN, ENROLL, INITIAL, register, update_body, upload, wait_task

TEST_IMAGES = 200


class CountingEvaluate:
    """An evaluation that says which model it saw (its bias) and can be held until released."""

    def __init__(self) -> None:
        self.seen: list[float] = []
        self.release = threading.Event()
        self.release.set()

    def __call__(self, weights):
        self.seen.append(float(weights["dense/bias"][0]))
        assert self.release.wait(30), "evaluation never released"
        bias = float(weights["dense/bias"][0])
        return {"loss": 1.0 - bias / 10, "accuracy": bias / 10, "confusion_matrix": [[int(bias)]]}


def engine_on(state, evaluate) -> Coordinator:
    config = FederationConfig(min_devices=1, rounds=0, auto_activate=True, start=True, round_timeout=30)
    storage = Storage(state)
    engine = Coordinator(storage, DeviceRegistry(storage, enroll_secret=ENROLL, auto_activate=True),
                         initial_weights=INITIAL, config=config, evaluate=evaluate)
    engine.start()
    return engine


def run_round(client, token, value: float) -> int:
    task = wait_task(client, "d1", token)
    n = task["round"]
    assert upload(client, "d1", token, n, update_body(value, n, task["model_version"], 10)).status_code == 200
    wait_until(lambda: client.get("/api/status").get_json()["completed_rounds"] >= n, 10, f"round {n}",
               interval=0.02)
    return n


def test_each_round_is_evaluated_once_outside_the_lock(tmp_path):
    evaluate = CountingEvaluate()
    engine = engine_on(tmp_path / "state", evaluate)
    try:
        client = build_app(engine, admin_token=ADMIN).test_client()
        token = register(client, "d1").get_json()["token"]
        assert [run_round(client, token, v) for v in (1.0, 2.0)] == [1, 2]
        assert evaluate.seen == [1.0, 2.0]  # each round's own evaluation, when it closed
        # kept: asking again evaluates nothing
        assert engine.test_evaluation() == (2, {"loss": 0.8, "accuracy": 0.2, "confusion_matrix": [[2]]})
        assert engine.test_evaluation(1)[1]["confusion_matrix"] == [[1]]
        assert evaluate.seen == [1.0, 2.0]
        # round 0 (the initial model) was never evaluated: once on its first request
        assert engine.test_evaluation(0)[1]["confusion_matrix"] == [[0]]
        assert engine.test_evaluation(0)[1]["confusion_matrix"] == [[0]]
        assert evaluate.seen == [1.0, 2.0, 0.0]
        with pytest.raises(Conflict, match="round 3 is not complete"):  # open, waiting for d1
            engine.test_evaluation(3)
        with pytest.raises(NotFound):
            engine.test_evaluation(9)
    finally:
        engine.stop()

    # after a restart nothing is kept: concurrent requests share one evaluation, and the
    # engine keeps answering meanwhile (the evaluation holds no lock requests wait on)
    evaluate = CountingEvaluate()
    evaluate.release.clear()
    engine = engine_on(tmp_path / "state", evaluate)
    try:
        answers: list = []
        threads = [threading.Thread(target=lambda: answers.append(engine.test_evaluation(1)))
                   for _ in range(6)]
        for t in threads:
            t.start()
        wait_until(lambda: evaluate.seen, 10, "the evaluation to start", interval=0.01)
        status = []
        reader = threading.Thread(target=lambda: status.append(engine.status()))
        reader.start()
        reader.join(5)
        assert status and status[0]["completed_rounds"] == 2, "status waited for the evaluation"
        evaluate.release.set()
        for t in threads:
            t.join(10)
        assert evaluate.seen == [1.0]
        assert answers == [(1, {"loss": 0.9, "accuracy": 0.1, "confusion_matrix": [[1]]})] * 6

        # a reset reuses round numbers for other models: round 1 is evaluated anew
        engine.reset()
        engine.start_training()
        client = build_app(engine, admin_token=ADMIN).test_client()
        assert run_round(client, token, 5.0) == 1  # the same device: enrollments outlive restarts
        assert engine.test_evaluation(1)[1]["confusion_matrix"] == [[5]]
        assert evaluate.seen == [1.0, 5.0]
    finally:
        engine.stop()


def test_no_test_set_is_a_conflict(tmp_path):
    storage = Storage(tmp_path / "state")
    engine = Coordinator(storage, DeviceRegistry(storage, enroll_secret=ENROLL), initial_weights=INITIAL,
                         config=FederationConfig())
    try:
        with pytest.raises(Conflict, match="no test set"):
            engine.test_evaluation()
    finally:
        engine.stop()


# --------------------------------------------------------------------------- the real server


def model_validation_schema() -> Draft202012Validator:
    spec = json.loads((ROOT / "fedhub" / "api" / "openapi.json").read_text())
    registry = Registry().with_resource("urn:fedhub", DRAFT202012.create_resource(spec))
    return Draft202012Validator({"$ref": "urn:fedhub#/components/schemas/ModelValidation"},
                                registry=registry)


@pytest.mark.slow
def test_the_route_on_a_real_server(tmp_path, data_dir, fashion):
    server = ServerProcess(tmp_path, data_dir, "--test-limit", str(TEST_IMAGES), "--min-devices", "1",
                           "--no-tensorboard").start()
    try:
        token = enroll(server, "d1")
        train_rounds(server, "d1", token, 2)
        latest = server.admin("GET", "/api/rounds/latest/evaluation")
        assert latest.status_code == 200, latest.text
        answer = latest.json()
        model_validation_schema().validate(answer)
        assert answer["round"] == 2 and answer["model"] == "basic" and answer["num_examples"] == TEST_IMAGES
        assert answer["class_names"][0] == "T-shirt/top" and len(answer["class_names"]) == 10
        # the round's own evaluation, as recorded in its history
        history = server.get("/api/history").json()["rounds"][-1]
        assert (answer["accuracy"], answer["loss"]) == pytest.approx(
            (history["test_accuracy"], history["test_loss"]))
        # the same as validating round 2's model on the server's test images
        _, (x_test, y_test) = fashion
        npz = io.BytesIO()
        np.savez(npz, x=x_test[:TEST_IMAGES], y=y_test[:TEST_IMAGES])
        validated = requests.post(f"{server.url}/api/rounds/2/validate", data=npz.getvalue(), timeout=60,
                                  headers={"Authorization": f"Bearer {server.admin_token}",
                                           "Content-Type": "application/octet-stream"}).json()
        assert validated["confusion_matrix"] == answer["confusion_matrix"]
        assert validated["per_class_accuracy"] == pytest.approx(answer["per_class_accuracy"])
        assert validated["accuracy"] == pytest.approx(answer["accuracy"])
        # an older round is its own model, and a device may ask too
        older = requests.get(f"{server.url}/api/rounds/1/evaluation", timeout=60,
                             headers={"Authorization": f"Bearer {token}"})
        assert older.status_code == 200 and older.json()["round"] == 1
        assert sum(map(sum, older.json()["confusion_matrix"])) == TEST_IMAGES

        for path, status, field in (("latest", 401, "Authorization"), ("x", 400, "round"),
                                    ("3", 404, "round"), ("9" * 40, 404, "round"), ("²", 400, "round")):
            headers = {} if status == 401 else {"Authorization": f"Bearer {server.admin_token}"}
            r = requests.get(f"{server.url}/api/rounds/{path}/evaluation", headers=headers, timeout=30)
            assert r.status_code == status and r.json()["field"] == field, (path, r.text)
    finally:
        server.stop()
