"""The Streamlit dashboard, driven by Streamlit's own AppTest against a real running server.

AppTest runs ``dashboard/index.py`` in this process exactly as ``streamlit run`` would,
including its file uploader; the server and the device it launches are real processes.
"""

from __future__ import annotations

import io
import json
import re
import subprocess

import numpy as np
import pytest
import requests
from PIL import Image
from streamlit.testing.v1 import AppTest

from fedhub.device.launcher import launch, stop
from fedhub.split import load_device_data, split_to_devices, write_device_data
from tests.conftest import ROOT, ServerProcess, wait_until
from tests.slow_trainer import batches_done

pytestmark = pytest.mark.slow
DASHBOARD = str(ROOT / "dashboard" / "index.py")


class Federation:
    """One real server for the module's tests (starting it costs seconds); each test sets up
    the state it needs with :meth:`fresh_run` or :meth:`ensure_trained`, whatever ran before."""

    def __init__(self, tmp, data_dir) -> None:
        self.devices_root = tmp / "devices"
        split_to_devices(self.devices_root, 2, data_dir=data_dir, limit=300, progress=False)
        # batches of 8: a device with a lot of data trains long enough to be interrupted
        self.server = ServerProcess(tmp, data_dir, "--test-limit", "300", "--min-devices", "1",
                                    "--rounds", "1", "--round-timeout", "120", "--batch-size", "8").start()
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen] = {}

    def env(self) -> dict[str, str]:
        """What the dashboard reads, and what the devices it launches inherit."""
        return {"FEDHUB_SERVER": self.server.url, "FEDHUB_ADMIN_TOKEN": self.server.admin_token,
                "FEDHUB_ENROLL_SECRET": self.server.enroll_secret}

    def launch(self, name: str, *extra: str) -> subprocess.Popen:
        """A device process of our own (again, if an earlier one has finished)."""
        proc = self.procs.get(name)
        if proc is None or proc.poll() is not None:
            proc = self.procs[name] = launch(self.server.url, [name], devices_root=self.devices_root,
                                             extra_args=["--poll-wait", "2", *extra], env=self.env(),
                                             log_dir=self.tmp)[0]
        return proc

    def devices(self) -> dict[str, dict]:
        return {d["name"]: d for d in self.server.get("/api/devices").json()["devices"]}

    def fresh_run(self) -> None:
        """The server up, no device active, every round forgotten: status idle."""
        if self.server.proc is None or self.server.proc.poll() is not None:
            self.server.start()
        for name, d in self.devices().items():
            if d["active"]:
                assert self.server.admin("POST", f"/api/devices/{name}/deactivate").ok
        assert self.server.admin("POST", "/api/training/reset").json()["status"] == "idle"

    def ensure_trained(self) -> int:
        """A completed round (a device of our own trains one if need be) whose model the server
        predicts with; returns that round."""
        done = self.server.get("/api/status").json()["completed_rounds"]
        if done < 1:
            self.fresh_run()
            self.launch("device2")
            wait_until(lambda: "device2" in self.devices(), 240, "device2 to enroll")
            assert self.server.admin("POST", "/api/devices/device2/activate").ok
            assert self.server.admin("POST", "/api/training/start", json={"rounds": 1}).ok
            wait_until(lambda: self.server.get("/api/status").json()["completed_rounds"] >= 1, 240, "round 1")
            done = 1
        # the predictor swaps the new model in just after the round is recorded
        picture = io.BytesIO()
        Image.new("L", (28, 28)).save(picture, "PNG")

        def predicts() -> bool:
            r = self.server.admin("POST", "/api/predict", files={"image": ("x.png", picture.getvalue())})
            return r.ok and r.json()["round"] == done
        wait_until(predicts, 60, f"the server to predict with round {done}'s model")
        return done


@pytest.fixture(scope="module")
def federation(tmp_path_factory, data_dir):
    federation = Federation(tmp_path_factory.mktemp("dashboard"), data_dir)
    try:
        yield federation
    finally:
        stop(federation.procs.values())
        federation.server.stop()


@pytest.fixture
def fed(federation, monkeypatch):
    for key, value in federation.env().items():
        monkeypatch.setenv(key, value)
    return federation


def dashboard() -> AppTest:
    at = AppTest.from_file(DASHBOARD, default_timeout=30).run()
    assert not at.exception, at.exception
    return at


def texts(elements) -> list[str]:
    return [e.value for e in elements]


def metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def devices_table(at: AppTest):
    """The devices table (the Run tab also holds the table of devices launched from the page)."""
    (table,) = [t for t in at.dataframe if "lifecycle" in t.value.columns]
    return table


def logs_table(at: AppTest):
    tables = [t for t in at.dataframe if "message" in t.value.columns]
    assert len(tables) == 1, [list(t.value.columns) for t in at.dataframe]
    return tables[0]


def highlighted_rows(table) -> set[int]:
    """Rows the dashboard's Styler gave a background colour (its CSS names cells ``_rowN_colM``)."""
    rows = set()
    for selectors, body in re.findall(r"([^{}]+)\{([^}]*)\}", table.proto.arrow_data.styler.styles):
        if "background-color" in body:
            rows |= {int(n) for n in re.findall(r"_row(\d+)_col\d+", selectors)}
    return rows


def test_launch_activate_and_train_from_the_dashboard(fed):
    fed.fresh_run()
    at = dashboard()
    assert metrics(at)["Status"] == "idle" and not at.error
    # launch one local device that enrolls inactive
    at.text_input(key="devices_root").set_value(str(fed.devices_root))
    at.number_input(key="launch_count").set_value(1)
    at.checkbox(key="launch_auto").uncheck().run()
    at.button(key="launch").click().run()
    assert not at.exception and "started device1" in texts(at.success), texts(at.error)
    try:
        wait_until(lambda: fed.devices().get("device1", {}).get("state") == "inactive", 240,
                   "device1 to enroll, inactive")
        at.run()
        toggle = at.button(key="toggle-device1")
        assert toggle.label == "Activate device1"
        toggle.click().run()
        assert "device1 activated" in texts(at.success)
        device1 = fed.devices()["device1"]
        assert device1["active"] is True and device1["state"] != "inactive"
        assert at.button(key="toggle-device1").label == "Deactivate device1"
        assert devices_table(at).value.set_index("device").loc["device1", "state"] != "inactive"

        # start a one-round run; the device trains it; the page shows it
        at.number_input(key="rounds").set_value(1).run()
        at.button(key="start").click().run()
        assert "training started (1 round)" in texts(at.success), texts(at.error)
        wait_until(lambda: fed.server.get("/api/status").json()["status"] == "finished", 120, "the run")
        at.run()
        assert metrics(at)["Status"] == "finished"
        assert metrics(at)["Completed rounds"] == "1 / 1"
        charts = [json.loads(c.proto.spec)["title"] for c in at.get("vega_lite_chart")]
        assert any(t.startswith("accuracy") for t in charts) and any(t.startswith("loss") for t in charts)
        (launched,) = [t.value for t in at.dataframe if "process" in t.value.columns]
        assert list(launched["device"]) == ["device1"]
    finally:
        at.run()
        if not at.button(key="stop_local").disabled:
            at.button(key="stop_local").click().run()


def test_upload_shows_a_prediction(fed):
    latest = fed.ensure_trained()
    x, _ = load_device_data(fed.devices_root / "device1")
    buf = io.BytesIO()
    Image.fromarray(x[0]).resize((280, 280)).save(buf, "PNG")
    picture = buf.getvalue()
    direct = requests.post(f"{fed.server.url}/api/predict", files={"image": ("item.png", picture)},
                           headers={"Authorization": f"Bearer {fed.server.admin_token}"}, timeout=30).json()

    at = dashboard()
    at.file_uploader(key="picture").set_value(("item.png", picture, "image/png")).run()
    assert not at.exception and not at.error, texts(at.error)
    # a confident answer is a success; one under the page's threshold a warning that still names
    # the class (a one-round model of 300 images may be either, by its training's shuffle)
    shown = " ".join(texts(at.success) + texts(at.warning))
    name = direct["class_name"]
    assert f"Predicted: **{name}**" in shown or f"perhaps **{name}**" in shown, shown
    assert f"round {latest}" in shown, shown
    # the picture, and the 28x28 one the model saw
    assert [c for img in at.get("image") for c in img.captions] == ["item.png", "what the model saw (28x28)"]
    bars = [c for c in at.get("vega_lite_chart") if "probability of each class" in c.proto.spec]
    assert len(bars) == 1

    # not a picture: the server's explanation, not a traceback
    at.file_uploader(key="picture").set_value(("notes.png", b"not a picture", "image/png")).run()
    assert not at.exception
    assert any("not a recognised image" in e for e in texts(at.error))
    assert not at.get("image")


def test_banner_while_the_server_is_down_then_retry(fed):
    at = dashboard()
    assert not at.error and "Status" in metrics(at)
    fed.server.stop()
    try:
        at.run()
        assert not at.exception
        banner = " ".join(texts(at.error))
        assert "cannot be reached" in banner and fed.server.url in banner
        assert "Status" not in metrics(at)
        at.button(key="retry").click().run()  # still down: still the banner, still no traceback
        assert not at.exception and "cannot be reached" in " ".join(texts(at.error))
        # pages that use the server say so too, without a traceback
        junk = np.zeros(4, np.uint8).tobytes()
        at.file_uploader(key="picture").set_value(("a.png", junk, "image/png")).run()
        assert not at.exception and "cannot be reached" in " ".join(texts(at.error))
        at.file_uploader(key="picture").clear()
    finally:
        fed.server.start()
    at.button(key="retry").click().run()
    assert not at.exception and not at.error and "Status" in metrics(at)


def test_https_server_with_a_private_ca(server_factory, tmp_path, monkeypatch):
    import trustme

    ca = trustme.CA(organization_name="FedHub dashboard test CA")
    cert = ca.issue_cert("127.0.0.1")
    ca.cert_pem.write_to_path(str(tmp_path / "ca.pem"))
    cert.cert_chain_pems[0].write_to_path(str(tmp_path / "server.pem"))
    cert.private_key_pem.write_to_path(str(tmp_path / "server.key"))
    server = server_factory("--certfile", str(tmp_path / "server.pem"),
                            "--keyfile", str(tmp_path / "server.key"), "--test-limit", "200",
                            verify=str(tmp_path / "ca.pem")).start()
    monkeypatch.setenv("FEDHUB_SERVER", server.url)
    monkeypatch.setenv("FEDHUB_ADMIN_TOKEN", server.admin_token)
    monkeypatch.delenv("FEDHUB_CA", raising=False)
    at = dashboard()  # the system CAs do not know this one: a banner that says why
    banner = " ".join(texts(at.error))
    assert "cannot be reached" in banner and "CERTIFICATE_VERIFY_FAILED" in banner
    at.text_input(key="ca").set_value(str(tmp_path / "ca.pem")).run()
    assert not at.exception and not at.error
    assert metrics(at)["Status"] == "idle"


def test_invalid_device_and_device_logs(fed):
    fed.ensure_trained()  # a real device has trained round 1, and logged it
    write_device_data(fed.devices_root, "broken", np.zeros((0, 28, 28), np.uint8), np.zeros(0, np.uint8))
    broken = fed.launch("broken", "--auto-activate")
    assert broken.wait(60) == 1  # refused: it exits 1 once its logs are sent

    at = dashboard()
    table = devices_table(at)
    devices = table.value
    broken_row = devices.index[devices["device"] == "broken"][0]
    assert devices.loc[broken_row, "lifecycle"] == "invalid"
    assert devices.loc[broken_row, "why"] == "invalid data: no examples"
    flagged = devices["lifecycle"].isin(["invalid", "interrupted"])
    assert broken_row in highlighted_rows(table) == set(devices.index[flagged])
    assert any("broken" in w and "no examples" in w for w in texts(at.warning)), texts(at.warning)

    # the devices' own log lines, newest first, ERROR lines highlighted
    logs = logs_table(at).value
    assert list(logs.columns) == ["time", "device", "level", "round", "message"]
    assert "local data is invalid: no examples" in set(logs[logs["device"] == "broken"]["message"])
    assert {"INFO", "ERROR"} <= set(logs["level"])
    assert highlighted_rows(logs_table(at)) == set(logs.index[logs["level"] != "INFO"])

    at.selectbox(key="log_level").set_value("ERROR").run()
    errors = logs_table(at).value
    assert set(errors["level"]) == {"ERROR"} and "broken" in set(errors["device"])
    assert highlighted_rows(logs_table(at)) == set(errors.index)
    at.selectbox(key="log_level").set_value("INFO").run()
    infos = logs_table(at).value
    assert set(infos["level"]) == {"INFO"}
    assert set(infos["message"]) >= set(logs[logs["level"] == "INFO"]["message"])
    assert not highlighted_rows(logs_table(at))
    at.number_input(key="log_round").set_value(1).run()
    round_1 = logs_table(at).value
    assert set(round_1["round"]) == {1} and any(m.startswith("round 1: training") for m in round_1["message"])
    at.selectbox(key="log_level").set_value("all")
    at.number_input(key="log_round").set_value(None)
    at.selectbox(key="log_device").set_value("broken").run()
    assert set(logs_table(at).value["device"]) == {"broken"} and not at.exception

    # an ERROR naming a round marks that device's update failed: the dashboard shows where
    trained = next(iter(fed.server.get("/api/history").json()["rounds"][0]["devices"]))
    token = (fed.devices_root / trained / "token").read_text()
    r = requests.post(f"{fed.server.url}/api/devices/{trained}/logs", timeout=30,
                      json=[{"level": "ERROR", "message": "disk full: update not kept", "round": 1}],
                      headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    at.run()
    devices = devices_table(at).value.set_index("device")
    assert devices.loc[trained, "latest update"] == "round 1 failed: disk full: update not kept"
    failed = [t.value for t in at.dataframe if list(t.value.columns) == ["round", "device", "error"]]
    assert len(failed) == 1 and failed[0].to_dict("records") == [
        {"round": 1, "device": trained, "error": "disk full: update not kept"}]

    # no admin token: the read-only views still work, the logs say what they need
    at.text_input(key="admin_token").set_value("").run()
    assert not at.exception and not at.error
    assert devices_table(at).value.set_index("device").loc["broken", "lifecycle"] == "invalid"
    assert any("need the admin token" in i for i in texts(at.info))
    assert not [t for t in at.dataframe if "message" in t.value.columns]


def test_interrupt_a_training_device_from_the_dashboard(fed, fashion):
    (x, y), _ = fashion
    # 2,000 examples in batches of 8: 250 batches, each slow (tests/slow_trainer.py) until interrupted
    write_device_data(fed.devices_root, "big", x[:2_000], y[:2_000])
    # the next round is big's alone: the earlier tests' devices (done, maybe gone) sit it out
    fed.fresh_run()
    assert fed.server.admin("POST", "/api/training/start", json={"rounds": 1}).ok
    fed.launch("big", "--auto-activate", "--trainer", "tests.slow_trainer:from_folder")
    wait_until(lambda: "big" in fed.devices(), 240, "big to enroll")
    assert fed.server.admin("POST", "/api/devices/big/activate").ok  # whatever an earlier run left
    wait_until(lambda: fed.devices().get("big", {}).get("lifecycle") == "training", 240, "big to train",
               interval=0.1)
    number = fed.devices()["big"]["lifecycle_round"]
    # its "training" line is logged just before fit() starts
    wait_until(lambda: fed.server.admin("GET", f"/api/logs?device=big&round={number}").json()["logs"], 30,
               "big's log line about training")

    at = dashboard()
    # pause first, so that no new round picks big again once the interrupt drops it from this one
    at.button(key="pause").click().run()
    assert at.button(key="interrupt-big").label == "Interrupt big"
    assert not [b for b in at.button if b.key and b.key.startswith("interrupt-") and b.key != "interrupt-big"]
    sent_at = batches_done(fed.devices_root / "big")  # the click's callback sends it at once
    at.button(key="interrupt-big").click().run()
    assert any(t.startswith("big interrupted") for t in texts(at.success)), texts(at.error)
    row = fed.devices()["big"]
    assert row["lifecycle"] == "interrupted" and row["lifecycle_round"] == number, row
    assert "big" not in ((fed.server.get("/api/status").json()["round"] or {}).get("selected") or [])

    # the device stops within a batch of the signal, says so, and the dashboard shows it
    def confirmed():
        row = fed.devices()["big"]
        return row if "stopped after" in row["lifecycle_reason"] else None
    row = wait_until(confirmed, 60, "big to confirm the interrupt")
    stopped = re.search(r"stopped after (\d+) of (\d+) batches", row["lifecycle_reason"])
    batches, total = map(int, stopped.groups())
    assert total == 250 and sent_at <= batches <= sent_at + 2, f"interrupt sent after batch {sent_at}; {row}"
    wait_until(lambda: fed.server.admin("GET", "/api/logs?device=big&level=WARNING").json()["logs"], 30,
               "big's WARNING line")
    at.run()
    table = devices_table(at)
    devices = table.value.set_index("device")
    assert devices.loc["big", "lifecycle"] == "interrupted"
    assert devices.loc["big", "why"] == row["lifecycle_reason"]
    assert list(devices.index).index("big") in highlighted_rows(table)
    assert "interrupt-big" not in [b.key for b in at.button]
    at.selectbox(key="log_level").set_value("WARNING").run()
    warnings = logs_table(at).value
    assert any(d == "big" and f"round {number}: interrupted by the server" in m
               for d, m in zip(warnings["device"], warnings["message"], strict=True)), warnings
