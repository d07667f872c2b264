"""Device logs: the HTTP endpoints over the real engine and SQLite, the ERROR-fails-the-update rule,
and the device's RemoteLogHandler talking real HTTP to a served app."""

import logging
import threading
import time

import pytest
from waitress import create_server

from fedhub.device.client import Client, RemoteLogHandler
from fedhub.engine.device_logs import MAX_BATCH, MAX_MESSAGE_CHARS, DeviceLogs
from fedhub.engine.storage import Storage
from tests.test_api import ADMIN, ENROLL, bearer, make_app, register, update_body, upload, wait_task


@pytest.fixture
def served(tmp_path):
    app, engine = make_app(tmp_path, min_devices=2, rounds=1, auto_activate=True, start=True)
    yield app, engine
    engine.stop()


def post_logs(c, name, token, body):
    return c.post(f"/api/devices/{name}/logs", json=body, headers=bearer(token))


def get_logs(c, query=""):
    return c.get(f"/api/logs{query}", headers=bearer(ADMIN))


def test_logs_stored_and_filtered(served):
    app, _ = served
    c = app.test_client()
    tokens = {n: register(c, n).get_json()["token"] for n in ("d1", "d2")}
    r = post_logs(c, "d1", tokens["d1"], [
        {"level": "INFO", "message": "enrolled", "time": 100.0},
        {"level": "WARNING", "message": "slow disk", "round": 1},
        {"level": "INFO", "message": "round 2 done", "round": 2}])
    assert r.status_code == 200 and r.get_json()["stored"] == 3
    assert post_logs(c, "d2", tokens["d2"], [{"level": "INFO", "message": "hello"}]).status_code == 200
    logs = get_logs(c).get_json()["logs"]
    assert [(e["device"], e["message"]) for e in logs] == [
        ("d1", "enrolled"), ("d1", "slow disk"), ("d1", "round 2 done"), ("d2", "hello")]
    assert logs[0]["time"] == 100.0 and logs[0]["round"] is None
    assert [e["message"] for e in get_logs(c, "?device=d2").get_json()["logs"]] == ["hello"]
    assert [e["message"] for e in get_logs(c, "?level=WARNING").get_json()["logs"]] == ["slow disk"]
    assert [e["message"] for e in get_logs(c, "?device=d1&round=2").get_json()["logs"]] == ["round 2 done"]
    page = get_logs(c, "?limit=2").get_json()
    assert len(page["logs"]) == 2
    rest = get_logs(c, f"?after={page['next_after']}").get_json()["logs"]
    assert [e["message"] for e in rest] == ["round 2 done", "hello"]
    body = get_logs(c).get_data(as_text=True)
    assert tokens["d1"] not in body and tokens["d2"] not in body


def test_log_refusals_change_nothing(served):
    app, _ = served
    c = app.test_client()
    tokens = {n: register(c, n).get_json()["token"] for n in ("d1", "d2")}
    good = {"level": "INFO", "message": "ok"}
    cases = [
        ({"level": "INFO"}, "body"),
        ([], "body"),
        ([good] * (MAX_BATCH + 1), "body"),
        ([good, {"level": "DEBUG", "message": "x"}], "logs[1].level"),
        ([{"level": "INFO", "message": "x" * (MAX_MESSAGE_CHARS + 1)}], "logs[0].message"),
        ([{"level": "INFO", "message": "  "}], "logs[0].message"),
        ([{**good, "token": "x"}], "logs[0].token"),
        ([{**good, "time": "yesterday"}], "logs[0].time"),
        ([{**good, "round": -1}], "logs[0].round"),
        ([{**good, "round": 1.5}], "logs[0].round"),
        (["just text"], "logs[0]"),
    ]
    for body, field in cases:
        r = post_logs(c, "d1", tokens["d1"], body)
        assert r.status_code == 400 and r.get_json()["field"] == field, (body, r.get_json())
    r = c.post("/api/devices/d1/logs", data="INFO hi", headers=bearer(tokens["d1"]))
    assert r.status_code == 400 and r.get_json()["field"] == "Content-Type"
    assert post_logs(c, "d1", None, [good]).status_code == 401
    assert post_logs(c, "d1", tokens["d2"], [good]).status_code == 403
    assert get_logs(c).get_json()["logs"] == []  # nothing stored by any refusal
    # reading needs the admin token; bad filters are named
    assert c.get("/api/logs").status_code == 401
    assert c.get("/api/logs", headers=bearer(tokens["d1"])).status_code == 403
    for query, field in [("?level=DEBUG", "level"), ("?round=x", "round"), ("?limit=0", "limit"),
                         ("?after=-1", "after")]:
        r = get_logs(c, query)
        assert r.status_code == 400 and r.get_json()["field"] == field, query


def test_error_log_fails_the_update_and_drops_the_device(served):
    app, _ = served
    c = app.test_client()
    tokens = {n: register(c, n).get_json()["token"] for n in ("d1", "d2")}
    for name, token in tokens.items():
        wait_task(c, name, token)
    assert c.get("/api/status").get_json()["round"]["selected"] == ["d1", "d2"]
    r = post_logs(c, "d2", tokens["d2"], [{"level": "ERROR", "message": "out of memory", "round": 1}])
    assert r.get_json() == {"stored": 1, "dropped_from_rounds": [1]}
    assert c.get("/api/status").get_json()["round"]["selected"] == ["d1"]  # the round goes on
    d2 = next(d for d in c.get("/api/devices").get_json()["devices"] if d["name"] == "d2")
    assert d2["lifecycle"] == "waiting" and "round 1 failed: out of memory" in d2["lifecycle_reason"]
    assert upload(c, "d2", tokens["d2"], 1, update_body(1.0, 1, 0, 5)).status_code == 409
    assert upload(c, "d1", tokens["d1"], 1, update_body(2.0, 1, 0, 5)).status_code == 200
    deadline = time.monotonic() + 10
    while not c.get("/api/history").get_json()["rounds"]:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    devices = c.get("/api/history").get_json()["rounds"][0]["devices"]
    assert devices["d2"] == {"failed": True, "error": "out of memory"}
    assert devices["d1"]["num_examples"] == 5 and "failed" not in devices["d1"]
    # an ERROR about a round already reported only marks it failed in the history
    post_logs(c, "d1", tokens["d1"], [{"level": "ERROR", "message": "disk full after upload", "round": 1}])
    devices = c.get("/api/history").get_json()["rounds"][0]["devices"]
    assert devices["d1"]["failed"] is True and devices["d1"]["num_examples"] == 5


def test_each_device_keeps_a_bounded_number_of_lines(tmp_path):
    logs = DeviceLogs(Storage(tmp_path / "state"), keep=5)
    for i in range(4):
        logs.add("d1", [{"level": "INFO", "message": f"line {i}.{j}"} for j in range(3)])
    logs.add("d2", [{"level": "INFO", "message": "other"}])
    kept = [e["message"] for e in logs.query(device="d1")]
    assert kept == ["line 2.1", "line 2.2", "line 3.0", "line 3.1", "line 3.2"]
    assert [e["message"] for e in logs.query(device="d2")] == ["other"]


def test_remote_log_handler_over_real_http(tmp_path):
    """A device's logging calls reach the server's SQLite through the real HTTP stack."""
    app, engine = make_app(tmp_path, min_devices=1, rounds=1)
    server = create_server(app, host="127.0.0.1", port=0, threads=4)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    try:
        client = Client(f"http://127.0.0.1:{server.effective_port}", "dev1", retry_for=5)
        handler = RemoteLogHandler(client, interval=0.2)
        logger = logging.getLogger("fedhub.test.remote")
        logger.propagate = False
        logger.setLevel(logging.DEBUG)
        logger.addHandler(handler)
        logger.info("before enrolling")  # kept until the device has a token
        client.register(ENROLL)
        logger.debug("not sent")
        logger.warning("slow round", extra={"round": 3})
        logger.critical("crashed", extra={"round": 4})
        logger.removeHandler(handler)
        handler.close()
        rows = engine.query_logs(device="dev1")["logs"]
        assert [(e["level"], e["message"], e["round"]) for e in rows] == [
            ("INFO", "before enrolling", None), ("WARNING", "slow round", 3), ("ERROR", "crashed", 4)]
    finally:
        server.close()
        engine.stop()
