"""A thousand registered devices: ``/api/devices`` pages and filters (validated), the Streamlit
dashboard (AppTest) and the live page (Chromium) draw a page of them, not every row, and the
charts draw the global model beside a chosen few devices.

One real server for the module: 1,000 devices written into its state directory through the
engine's own registry before it starts (enrolling them over HTTP would cost two fsyncs each),
left offline so that rounds select only the 12 lightweight devices of ``fedhub/device/swarm.py`` that
then train two real rounds over HTTP.
"""

from __future__ import annotations

import time

import pytest
from streamlit.testing.v1 import AppTest

from fedhub.device.swarm import Swarm
from fedhub.engine.devices import DeviceRegistry
from fedhub.engine.storage import Storage
from tests.chromium import wait_js
from tests.conftest import ROOT, ServerProcess
from tests.test_stats_page import browser, open_page  # noqa: F401 (browser: a fixture)

pytestmark = pytest.mark.slow
DASHBOARD = str(ROOT / "dashboard" / "index.py")
REGISTERED = 1000
SWARM = 12
INVALID = {"ok": False, "problems": ["labels must be in 0..9"], "num_examples": 0, "class_counts": []}


def register_offline(state_dir, enroll_secret: str) -> None:
    """device0000..device0999: every 10th inactive, every 100th with invalid data, all offline."""
    storage = Storage(state_dir)
    registry = DeviceRegistry(storage, enroll_secret=enroll_secret)
    with storage.transaction():
        for i in range(REGISTERED):
            name = f"device{i:04d}"
            registry.register(name, enroll_secret, num_examples=100, auto_activate=i % 10 != 0,
                              validation=INVALID if i % 100 == 5 else None)
            storage.update_device(name, last_seen=0.0)  # long gone: never selected
    storage.close()


@pytest.fixture(scope="module")
def server(tmp_path_factory, data_dir):
    tmp = tmp_path_factory.mktemp("many")
    s = ServerProcess(tmp, data_dir, "--rounds", "2", "--min-devices", str(SWARM), "--auto-activate",
                      "--start", "--test-limit", "200", "--no-tensorboard", "--threads", "8")
    s.state_dir.mkdir(parents=True)
    register_offline(s.state_dir, s.enroll_secret)
    s.start()
    result = Swarm(s.url, SWARM, 2, enroll_secret=s.enroll_secret, poll_wait=1.0, time_limit=120).run()
    assert result.errors == [] and result.server_5xx == 0, (result.errors[:3], s.log())
    yield s
    s.stop()


def devices(server, **params) -> dict:
    started = time.monotonic()
    reply = server.get("/api/devices", params=params)
    assert reply.status_code == 200, reply.text
    # generous (a shared machine); drawing every row of a thousand devices is what took long
    assert time.monotonic() - started < 5, "a page of devices should come at once"
    return reply.json()


def test_api_pages_and_filters(server):
    total = REGISTERED + SWARM
    page = devices(server, limit=25)
    assert (len(page["devices"]), page["total"], page["offset"], page["limit"]) == (25, total, 0, 25)
    assert [d["name"] for d in page["devices"]][:2] == ["device0000", "device0001"]
    last = devices(server, offset=total - 5, limit=25)
    assert [d["name"] for d in last["devices"]] == [f"swarm{i:04d}" for i in range(SWARM - 5, SWARM)]
    assert all(d["latest"]["round"] == 2 for d in last["devices"]), "their part in the latest round"
    assert devices(server, offset=total, limit=25)["devices"] == []
    assert len(devices(server)["devices"]) == total, "without paging: every device, as before"

    assert [d["name"] for d in devices(server, name="DEVICE0042")["devices"]] == ["device0042"]
    assert devices(server, name="swarm", limit=5)["total"] == SWARM
    invalid = devices(server, lifecycle="invalid")
    assert invalid["total"] == 10 and {d["lifecycle"] for d in invalid["devices"]} == {"invalid"}
    inactive = devices(server, active="false", limit=1000)
    assert inactive["total"] == 100 and not any(d["active"] for d in inactive["devices"])
    assert devices(server, active="true", lifecycle="invalid")["total"] == 10  # i % 100 == 5: active
    assert devices(server, active="false", name="device00")["total"] == 10
    counts = server.get("/api/status").json()["devices"]
    assert sum(counts.values()) == total and counts["inactive"] == 100

    for params, field in [({"limit": 0}, "limit"), ({"limit": 1001}, "limit"), ({"limit": "x"}, "limit"),
                          ({"offset": -1}, "offset"), ({"lifecycle": "asleep"}, "lifecycle"),
                          ({"active": "maybe"}, "active"), ({"name": "a/b"}, "name"),
                          ({"name": "d" * 65}, "name")]:
        reply = server.get("/api/devices", params=params)
        assert reply.status_code == 400, (params, reply.text)
        assert reply.json()["error"] and reply.json()["field"] == field, (params, reply.json())


def test_dashboard_pages_and_filters(server, monkeypatch):
    monkeypatch.setenv("FEDHUB_SERVER", server.url)
    monkeypatch.setenv("FEDHUB_ADMIN_TOKEN", server.admin_token)
    at = AppTest.from_file(DASHBOARD, default_timeout=60).run()
    assert not at.exception, at.exception

    def shown() -> list[str]:
        return list(next(t.value for t in at.dataframe if "lifecycle" in t.value.columns)["device"])

    assert shown() == [f"device{i:04d}" for i in range(25)]
    toggles = [b.key for b in at.button if b.key and b.key.startswith("toggle-")]
    assert len(toggles) == 25, "buttons for the page's devices only"
    assert f"Devices ({REGISTERED + SWARM})" in [h.value for h in at.subheader]
    at.number_input(key="devices_page").set_value(3).run()
    assert shown() == [f"device{i:04d}" for i in range(50, 75)]
    at.text_input(key="devices_name").set_value("swarm").run()
    assert shown() == [f"swarm{i:04d}" for i in range(SWARM)], "the filter goes back to its last page"
    at.text_input(key="devices_name").set_value("").run()
    at.selectbox(key="devices_lifecycle").set_value("invalid").run()
    assert shown() == [f"device{i:04d}" for i in range(5, 1000, 100)]
    at.selectbox(key="devices_active").set_value("inactive").run()
    assert "No device matches these filters." in [i.value for i in at.info]
    assert not at.exception

    # the charts: the global model and the first five devices, until others are chosen
    chart_devices = at.multiselect(key="chart_devices")
    assert chart_devices.value == [f"swarm{i:04d}" for i in range(5)]
    assert len(chart_devices.options) == SWARM
    chart_devices.set_value(["swarm0007"]).run()
    assert not at.exception and at.multiselect(key="chart_devices").value == ["swarm0007"]


CHART_LABELS = "Chart.getChart('accuracy-chart').data.datasets.map((d) => d.label)"
ROWS = "[...document.querySelectorAll('#devices tr')].map((tr) => tr.cells[0].textContent)"


def test_live_page_pages_filters_and_picks(server, browser):  # noqa: F811
    total = REGISTERED + SWARM
    page, problems = open_page(browser, f"{server.url}/stats/")
    wait_js(page, f"document.getElementById('devices-range').textContent === '1–25 of {total}'")
    assert page.evaluate(ROWS) == [f"device{i:04d}" for i in range(25)]
    assert page.is_disabled("#devices-prev") and page.is_enabled("#devices-next")
    page.click("#devices-next")
    wait_js(page, f"document.getElementById('devices-range').textContent === '26–50 of {total}'")
    assert page.evaluate(ROWS) == [f"device{i:04d}" for i in range(25, 50)]

    page.fill("#device-filter", "swarm000")
    wait_js(page, "document.getElementById('devices-range').textContent === '1–10 of 10'")
    assert page.evaluate(ROWS) == [f"swarm{i:04d}" for i in range(10)]
    page.fill("#device-filter", "nobody")
    wait_js(page, "document.getElementById('devices-range').textContent === 'no device matches'")
    assert page.locator("#devices tr").count() == 0

    # the charts: the global model and a handful of devices, then the ones picked
    wait_js(page, f"{CHART_LABELS}.length === 6")
    assert page.evaluate(CHART_LABELS)[1:] == [f"swarm{i:04d}" for i in range(5)]
    assert page.locator("#chart-devices input[type=checkbox]").count() == SWARM
    # toggle chips, one tap each (a phone has no Ctrl-click): four of the five off, one more on
    for name in ("swarm0000", "swarm0001", "swarm0002", "swarm0004", "swarm0011"):
        page.locator("#chart-devices label", has_text=name).click()
    wait_js(page, f"{CHART_LABELS}.length === 3")
    assert page.evaluate(CHART_LABELS)[1:] == ["swarm0003", "swarm0011"]
    polled = page.text_content("#connection")  # "... updated <time>": the next poll keeps the choice
    wait_js(page, "(before) => document.getElementById('connection').textContent !== before", polled)
    assert page.evaluate(CHART_LABELS)[1:] == ["swarm0003", "swarm0011"]
    assert problems == []
