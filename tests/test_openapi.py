"""The OpenAPI description (``fedhub/api/openapi.json``, served at ``/openapi.json``) kept true.

Two ways: the description names exactly the routes and methods the app serves (and is a
valid OpenAPI 3.1 document); and Schemathesis fuzzes a real ``server.py`` process on
loopback, with a real enrolled device, a completed round and the admin token, checking that
no answer is a 5xx and every answer (status, content type, headers, body) is described.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys

import numpy as np
import pytest
import requests
from openapi_spec_validator import validate
from PIL import Image

from fedhub.engine import wire

from .conftest import ROOT, ServerProcess, wait_until
from .test_api import ADMIN, ENROLL, bearer, make_app, register, update_body, upload, wait_task

SPEC = json.loads((ROOT / "fedhub" / "api" / "openapi.json").read_text())
METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}
# Flask answers these for every rule by itself (HEAD as GET without a body, OPTIONS with Allow).
AUTOMATIC = {"HEAD", "OPTIONS"}
DEVICE = "probe"


def described() -> set[tuple[str, str]]:
    return {(method.upper(), path) for path, item in SPEC["paths"].items() for method in item
            if method in METHODS}


def served(app) -> set[tuple[str, str]]:
    """(method, path) of every rule, with Werkzeug's ``<int:round_number>`` written ``{round_number}``."""
    out = set()
    for rule in app.url_map.iter_rules():
        if rule.endpoint == "static":  # Flask's own static folder: FedHub has none
            continue
        path = re.sub(r"<(?:[^<>:]+:)?([^<>]+)>", r"{\1}", rule.rule)
        out |= {(method, path) for method in rule.methods - AUTOMATIC}
    return out


@pytest.fixture
def app(tmp_path):
    app, engine = make_app(tmp_path)
    yield app
    engine.stop()


def test_description_is_valid_openapi():
    validate(SPEC)
    assert SPEC["openapi"].startswith("3.1")


def test_every_route_is_described_and_every_description_is_served(app):
    missing = served(app) - described()
    assert not missing, f"routes the description lacks: {sorted(missing)}"
    extra = described() - served(app)
    assert not extra, f"described but not served: {sorted(extra)}"


def test_path_parameters_and_auth_answers_match_the_routes():
    shared = SPEC["components"]["parameters"]
    for path, item in SPEC["paths"].items():
        for method, op in item.items():
            params = [shared[p["$ref"].rsplit("/", 1)[1]] if "$ref" in p else p
                      for p in op.get("parameters", [])]
            declared = {p["name"] for p in params if p["in"] == "path"}
            assert declared == set(re.findall(r"{([^}]+)}", path)), (method, path)
            # A call that needs a token or secret says 401 when it has none; the others never do.
            assert ("401" in op["responses"]) == bool(op.get("security")), (method, path)


def test_served_description_is_the_file(app):
    r = app.test_client().get("/openapi.json")
    assert r.status_code == 200 and r.mimetype == "application/json"
    assert r.get_json() == SPEC


def test_other_methods_answer_405_with_allow(app):
    r = app.test_client().delete("/api/devices/register")
    assert r.status_code == 405 and r.is_json
    assert set(r.headers["Allow"].split(", ")) == {"POST", "OPTIONS"}


def test_numbers_too_large_to_store_are_refused_and_change_nothing(tmp_path):
    """Integers past SQLite's range reached the database and answered 500.

    Schemathesis found it in register, interrupted and logs; the other cases are the same bug,
    found by looking for it by hand.
    """
    app, engine = make_app(tmp_path, min_devices=1, rounds=2, auto_activate=True, start=True)
    try:
        c = app.test_client()
        huge = 2**63
        r = c.post("/api/devices/register", json={"name": "d1", "num_examples": huge},
                   headers={"X-Enroll-Secret": ENROLL})
        assert r.status_code == 400 and r.get_json()["field"] == "num_examples"
        token = register(c, "d1").get_json()["token"]
        task = wait_task(c, "d1", token)
        r = c.post("/api/devices/d1/interrupted", json={"round": huge}, headers=bearer(token))
        assert r.status_code == 400 and r.get_json()["field"] == "round"
        for line, field in (({"round": huge}, "logs[0].round"), ({"time": 10**400}, "logs[0].time")):
            r = c.post("/api/devices/d1/logs", json=[{"level": "INFO", "message": "x", **line}],
                       headers=bearer(token))
            assert r.status_code == 400 and r.get_json()["field"] == field, r.get_json()
        r = c.post("/api/training/start", json={"rounds": huge}, headers=bearer(ADMIN))
        assert r.status_code == 400 and r.get_json()["field"] == "rounds"
        # With an Idempotency-Key the round number was looked up in SQLite before anything else.
        r = upload(c, "d1", token, huge, update_body(1.0, 1, 0, 10), key="k")
        assert r.status_code == 409 and r.get_json()["field"] == "round"
        # An update claiming more examples than SQLite holds was folded into the round's sum
        # before its row failed to write: now it is refused first, and the round is untouched.
        r = upload(c, "d1", token, task["round"], update_body(1.0, task["round"], 0, huge))
        assert r.status_code == 400 and r.get_json()["field"] == "num_examples"
        assert c.get("/api/status").get_json()["round"]["reported"] == []
        good = update_body(1.0, task["round"], 0, 10)
        assert upload(c, "d1", token, task["round"], good).status_code == 200
        assert c.get("/api/logs", headers=bearer(ADMIN)).get_json()["logs"] == []
    finally:
        engine.stop()


# --- Schemathesis against the live server -------------------------------------------------------


def _png() -> bytes:
    out = io.BytesIO()
    Image.fromarray(np.full((28, 28), 200, np.uint8)).save(out, format="PNG")
    return out.getvalue()


def _complete_one_round(server: ServerProcess) -> None:
    """Round 1 for real (the device sends the global weights back), so the model routes have a model.

    Whatever the server went through before (Schemathesis pauses it, deactivates and re-enrolls
    ``probe``, sends it invalid validation reports, enrolls devices of its own, resets the run),
    this gets it back to: ``probe`` enrolled, valid and active, and a completed round 1.
    """
    if server.get("/api/history").json()["rounds"]:
        return
    for d in server.get("/api/devices").json()["devices"]:
        if d["active"] and d["name"] != DEVICE:  # nobody else is waited for
            assert server.admin("POST", f"/api/devices/{d['name']}/deactivate").ok
    # Enrolling again replaces the token (with the admin token beside the secret, as re-enrolling
    # an existing name may require); a good validation report makes an "invalid" probe valid again.
    r = requests.post(f"{server.url}/api/devices/register", timeout=30,
                      headers={"X-Enroll-Secret": server.enroll_secret,
                               "Authorization": f"Bearer {server.admin_token}"},
                      json={"name": DEVICE, "auto_activate": True,
                            "validation": {"ok": True, "problems": [], "num_examples": 10}})
    assert r.status_code == 201, r.text
    server.env["FEDHUB_PROBE_TOKEN"] = r.json()["token"]  # for Schemathesis (see CONFIG)
    auth = {"Authorization": f"Bearer {r.json()['token']}"}
    assert server.admin("POST", f"/api/devices/{DEVICE}/activate").ok
    r = server.admin("POST", "/api/training/start", json={"rounds": 1})
    assert r.status_code == 200, r.text

    def train_task():
        task = server.get(f"/api/devices/{DEVICE}/task?wait=1", headers=auth).json()
        return task if task["action"] == "train" else None

    task = wait_until(train_task, 60, "a training task")
    weights, _ = wire.decode(server.get("/api/model", headers=auth).content)
    body = wire.encode(weights, wire.Meta(round=task["round"], model_version=task["model_version"],
                                          num_examples=10, metrics={"accuracy": 0.1}))
    r = requests.post(f"{server.url}/api/devices/{DEVICE}/updates/{task['round']}", data=body, timeout=30,
                      headers={**auth, "Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    # The predictor swaps the new model in after the round's row is written: wait for it to answer.
    wait_until(lambda: server.admin("POST", "/api/predict", files={"image": ("x.png", _png())}).ok,
               60, "the trained model to predict")


@pytest.fixture(scope="module")
def live_server(tmp_path_factory, data_dir):
    """A real server, shared by this module's live tests (each gets it ready with ``live``).

    ``--max-wait 1`` bounds the long polls (``GET .../task?wait=S``) Schemathesis asks for.
    """
    # Schemathesis sends wrong credentials on purpose, hundreds of them: no failure limit here
    # (tests/test_hostile_input.py tests it).
    server = ServerProcess(tmp_path_factory.mktemp("openapi"), data_dir, "--test-limit", "100",
                           "--rounds", "1", "--min-devices", "1", "--round-timeout", "5",
                           "--max-wait", "1", "--no-tensorboard", "--auth-failures-per-minute", "0")
    server.start()
    try:
        yield server
    finally:
        server.stop()
    assert "Traceback" not in server.log_path.read_text(errors="replace"), server.log()


@pytest.fixture
def live(live_server):
    """The live server with device ``probe`` enrolled and round 1 complete, whatever ran before."""
    _complete_one_round(live_server)
    return live_server


# Every security scheme gets its real credential (from the environment, not the command line), so
# every operation is reached past auth. Device routes need the token's own name to get past 403
# (other names are still tried by the negative cases, and by tests/test_api.py). Re-enrolling
# "probe" needs its token or the admin's, which the register operation is never sent, so the
# token the ``live`` fixture got last stays valid for the whole Schemathesis run.
CONFIG = """
request-timeout = 30
[generation]
database = "none"
[parameters]
"path.name" = "probe"
[auth.openapi.deviceToken]
bearer = "${FEDHUB_PROBE_TOKEN}"
[auth.openapi.adminToken]
bearer = "${FEDHUB_ADMIN_TOKEN}"
[auth.openapi.enrollSecret]
api_key = "${FEDHUB_ENROLL_SECRET}"
"""
# No 5xx; status, content type, headers and body as described; 405 with Allow for other methods;
# 401 without the declared credentials. Not positive_data_acceptance / negative_data_rejection:
# JSON Schema cannot say what the server must also refuse (a body that is not safetensors or
# .npz, ``wait`` beyond --max-wait, 3.0 for an integer), so they would flag the description's
# necessary looseness rather than the server.
CHECKS = ("not_a_server_error,status_code_conformance,content_type_conformance,"
          "response_headers_conformance,response_schema_conformance,unsupported_method,"
          "missing_required_header,ignored_auth")


def schemathesis_run(server: ServerProcess, tmp_path, *filters: str) -> None:
    """``schemathesis run`` on the live server's own /openapi.json; fails with its report."""
    config = tmp_path / "schemathesis.toml"
    config.write_text(CONFIG)
    cmd = [sys.executable, "-m", "schemathesis.cli", "--config-file", str(config), "--no-color", "run",
           f"{server.url}/openapi.json", "--checks", CHECKS, "--phases", "examples,coverage,fuzzing",
           "--max-examples", "40", "--workers", "1", "--generation-deterministic",
           "--suppress-health-check", "all", *filters]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=server.env, cwd=tmp_path)
    assert out.returncode == 0, out.stdout[-20000:] + out.stderr[-3000:]


@pytest.mark.slow
def test_live_round_numbers_in_urls_are_refused_not_500(live):
    """'²' passed str.isdigit() and then failed int(); huge numbers overflowed SQLite (both were 500)."""
    auth = {"Authorization": f"Bearer {live.admin_token}", "Content-Type": "application/octet-stream"}
    for text, status in (("²", 400), ("9007199254740992", 404), ("9" * 40, 404), ("1", 200)):
        r = requests.get(f"{live.url}/api/rounds/{text}/model.keras", headers=auth, timeout=30)
        assert r.status_code == status, (text, r.text[:200])
        if status != 200:
            r = requests.post(f"{live.url}/api/rounds/{text}/validate", data=b"x", headers=auth, timeout=30)
            assert r.status_code == status and r.json()["field"] == "round", (text, r.text)


@pytest.mark.slow
def test_live_server_answers_as_described(live, tmp_path):
    # POST /api/training/reset forgets every round, so the model routes would answer only "no
    # trained model yet" for the rest of the run: it is fuzzed on its own, after everything else.
    schemathesis_run(live, tmp_path, "--exclude-path", "/api/training/reset")
    schemathesis_run(live, tmp_path, "--include-path", "/api/training/reset")
