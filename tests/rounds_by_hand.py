"""Real rounds in seconds: a device that speaks the protocol by hand and sends the weights back
nudged (each round's model is different) instead of trained.

For tests of what a server shows about completed rounds (pages, dashboards, model routes),
where Keras training on the device side would only add time. The server is real: it
selects the device, counts its update, evaluates the global model on its test set and
records the round, as for any device.
"""

from __future__ import annotations

import numpy as np
import requests

from fedhub.engine import wire

from .conftest import ServerProcess, wait_until


def enroll(server: ServerProcess, name: str, *, active: bool = True,
           problems: tuple[str, ...] = ()) -> str:
    """Enroll ``name`` with a data validation report (invalid if ``problems``); its token."""
    report = {"ok": not problems, "problems": list(problems), "num_examples": 0 if problems else 100}
    r = requests.post(f"{server.url}/api/devices/register", timeout=30,
                      headers={"X-Enroll-Secret": server.enroll_secret},
                      json={"name": name, "auto_activate": active, "validation": report})
    assert r.status_code == 201, r.text
    return r.json()["token"]


def train_rounds(server: ServerProcess, name: str, token: str, rounds: int) -> int:
    """Run ``rounds`` more rounds with device ``name`` alone selected (the server needs
    ``--min-devices 1``) until the run is finished; the number of completed rounds at the end."""
    auth = {"Authorization": f"Bearer {token}"}
    done = server.get("/api/status").json()["completed_rounds"]
    r = server.admin("POST", "/api/training/start", json={"rounds": done + rounds})
    assert r.status_code == 200, r.text
    for n in range(done + 1, done + rounds + 1):
        def train_task():
            task = server.get(f"/api/devices/{name}/task?wait=1", headers=auth).json()
            return task if task["action"] == "train" else None

        task = wait_until(train_task, 60, f"a training task for round {n}", interval=0.1)
        weights, _ = wire.decode(server.get("/api/model", headers=auth).content)
        meta = wire.Meta(round=task["round"], model_version=task["model_version"], num_examples=100,
                         metrics={"accuracy": round(0.5 + 0.01 * n, 4), "loss": round(1.0 / n, 4)})
        r = requests.post(f"{server.url}/api/devices/{name}/updates/{task['round']}", timeout=30,
                          data=wire.encode({k: v + np.asarray(1e-3, v.dtype) for k, v in weights.items()},
                                           meta),
                          headers={**auth, "Content-Type": "application/octet-stream"})
        assert r.status_code == 200, r.text
        wait_until(lambda n=n: server.get("/api/status").json()["completed_rounds"] >= n, 60,
                   f"round {n} to complete", interval=0.1)
    # The run is over once the last round's hooks (evaluation, files) have run, a moment after
    # the round is counted: callers look at the finished run.
    wait_until(lambda: server.get("/api/status").json()["status"] == "finished", 60,
               "the run to finish", interval=0.1)
    return done + rounds
