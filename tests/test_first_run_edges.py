"""The first run's rough edges (issue 18): what a new user met on the dashboard, the live page
and the predict route, each checked on a real server.

The rounds here are made by hand (``tests/rounds_by_hand.py``): the server is real, the device
sends its weights back nudged instead of trained, so a round takes a moment, not a fit.
"""

from __future__ import annotations

import base64
import io
import signal
import subprocess
import sys

import numpy as np
import pytest
import requests
from PIL import Image, ImageDraw

from fedhub.engine import wire
from fedhub.frameworks.keras_model import image_to_array
from tests.chromium import chromium, wait_js
from tests.conftest import ROOT, wait_until
from tests.rounds_by_hand import enroll, train_rounds
from tests.test_dashboard import dashboard, texts

# The preprocessing tests import TensorFlow (model.py), the others start a server: all slow tier.
pytestmark = pytest.mark.slow


# --------------------------------------------------------------------------- predict's preprocessing


def jpeg(img: Image.Image) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def trouser_on_beige() -> Image.Image:
    """A small navy trouser, off-centre in a large beige photo (the issue's first photo)."""
    img = Image.new("RGB", (1200, 900), (222, 205, 170))
    draw = ImageDraw.Draw(img)
    draw.rectangle((760, 200, 840, 230), fill=(40, 50, 90))
    draw.polygon([(760, 230), (798, 230), (790, 420), (765, 420)], fill=(40, 50, 90))
    draw.polygon([(802, 230), (840, 230), (836, 420), (810, 420)], fill=(40, 50, 90))
    return img


def sneaker_on_white() -> Image.Image:
    """A red sneaker, low and small in a white photo (the issue's second photo)."""
    img = Image.new("RGB", (800, 600), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.polygon([(120, 470), (220, 440), (300, 490), (300, 520), (120, 520)], fill=(200, 30, 30))
    draw.rectangle((120, 520, 300, 530), fill=(240, 240, 240))  # a white sole: part of the shoe
    return img


@pytest.mark.parametrize("photo", [trouser_on_beige, sneaker_on_white])
def test_a_photo_becomes_a_fashion_mnist_picture(photo) -> None:
    """Cropped to the item, centred, filling the frame, bright on a black background: as the
    dataset's pictures are. Before, the item shrank to a few pixels and beige turned dark grey."""
    out = image_to_array(jpeg(photo()))
    assert out.shape == (28, 28) and out.dtype == np.uint8
    item = out > 64
    rows, cols = np.flatnonzero(item.any(axis=1)), np.flatnonzero(item.any(axis=0))
    height, width = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    assert max(height, width) >= 26, (height, width)  # the item fills the frame's longer side
    assert abs((rows[0] + rows[-1]) / 2 - 13.5) <= 1.5 and abs((cols[0] + cols[-1]) / 2 - 13.5) <= 1.5
    background = out[~item]
    assert np.percentile(background, 90) <= 8, np.percentile(background, 90)  # black, not grey
    assert out.max() == 255 and np.median(out[item]) > 150  # the item is bright


def test_a_fashion_mnist_picture_is_left_as_it_is(fashion) -> None:
    """What training sees is unchanged: a 28x28 picture goes to the network as it is."""
    _, (x_test, _) = fashion
    for image in x_test[:50]:
        buffer = io.BytesIO()
        Image.fromarray(image, mode="L").save(buffer, "PNG")
        assert np.array_equal(image_to_array(buffer.getvalue()), image)


# --------------------------------------------------------------------------- the dashboard


@pytest.fixture
def server(server_factory, monkeypatch):
    """A real server that opens a round with one device (the default --min-devices 1)."""
    server = server_factory("--test-limit", "200", "--no-tensorboard", "--round-timeout", "120").start()
    monkeypatch.setenv("FEDHUB_SERVER", server.url)
    monkeypatch.setenv("FEDHUB_ADMIN_TOKEN", server.admin_token)
    return server




def test_the_page_starts_where_a_first_run_starts(server) -> None:
    """Tabs in the order of a first run, the launcher first in the first one; the hints name
    the server that is set, not port 4000; Start says who it will train with."""
    at = dashboard()
    assert [t.label for t in at.tabs] == ["Run", "Results", "Runs", "Predict", "Robustness and logs"]
    run = at.tabs[0]
    headings = [h.value for h in run.subheader]
    assert headings[:3] == ["Local devices (demo)", "Training", "Devices (0)"], headings
    hints = " ".join(texts(at.info) + texts(at.caption))
    assert f"python device/device.py {server.port} device1" in hints
    assert "device.py 4000" not in hints or server.port == 4000
    assert any("No active device is online yet" in w for w in texts(run.warning)), texts(run.warning)

    enroll(server, "hand1")
    enroll(server, "hand2")
    at.run()
    assert not [w for w in texts(at.warning) if "No active device" in w]
    assert any("Start trains with the 2 active devices online now" in c for c in texts(at.caption))

    # the server is stopped: the banner says how to start this one, on its own port
    server.stop()
    at.run()
    banner = " ".join(texts(at.error))
    assert f"python server.py {server.port}" in banner and "cannot be reached" in banner


def test_round_bar_interrupt_buttons_and_the_started_banner(server) -> None:
    """The round bar counts the devices' training, not only their uploads; Interrupt is a
    secondary button; "training started" goes once the run is over."""
    tokens = {name: enroll(server, name) for name in ("hand1", "hand2")}
    at = dashboard()
    at.number_input(key="rounds").set_value(1).run()
    at.button(key="start").click().run()
    assert any("training started (1 round)" in s for s in texts(at.success)), texts(at.error)

    def auth(name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {tokens[name]}"}

    def task(name: str):
        answer = server.get(f"/api/devices/{name}/task?wait=1", headers=auth(name)).json()
        return answer if answer["action"] == "train" else None

    tasks = {name: wait_until(lambda n=name: task(n), 60, f"{name}'s task", interval=0.2) for name in tokens}
    for name, t in tasks.items():
        r = requests.post(f"{server.url}/api/devices/{name}/progress", headers=auth(name), timeout=30,
                          json={"round": t["round"], "done": 99, "total": 100})
        assert r.status_code == 200, r.text
    at.run()
    (bar,) = at.get("progress")
    assert bar.proto.value >= 90, bar.proto.value  # 0 of 2 uploaded, both at 99 %: nearly done
    assert "0 of 2 selected devices reported · training 99%, 99%" in bar.proto.text, bar.proto.text
    interrupts = [b for b in at.button if (b.key or "").startswith("interrupt-")]
    assert len(interrupts) == 2 and {b.proto.type for b in interrupts} == {"secondary"}
    assert at.button(key="start").proto.type == "primary"
    assert any("training started" in s for s in texts(at.success))  # still true while it runs

    # the hand device finishes the round for both; the run is over
    server.admin("POST", "/api/devices/hand2/deactivate")

    weights, _ = wire.decode(server.get("/api/model", headers=auth("hand1")).content)
    meta = wire.Meta(round=tasks["hand1"]["round"], model_version=tasks["hand1"]["model_version"],
                     num_examples=100, metrics={"accuracy": 0.5, "loss": 1.0})
    r = requests.post(f"{server.url}/api/devices/hand1/updates/{tasks['hand1']['round']}", timeout=30,
                      data=wire.encode(weights, meta),
                      headers={**auth("hand1"), "Content-Type": "application/octet-stream"})
    assert r.status_code == 200, r.text
    wait_until(lambda: server.get("/api/status").json()["status"] == "finished", 120, "the run to finish")
    at.run()
    assert not [s for s in texts(at.success) if "training started" in s], texts(at.success)
    assert any("The run is over" in i for i in texts(at.info))


def test_a_doubtful_prediction_is_not_a_success_and_shows_what_the_model_saw(server) -> None:
    """A model one nudged round from its random start is unsure of anything: the page says
    "not sure" (no green box) and shows the 28x28 picture the server classified."""
    train_rounds(server, "hand1", enroll(server, "hand1"), 1)
    data = jpeg(sneaker_on_white())
    answer = wait_until(lambda: (r := server.admin("POST", "/api/predict", files={"image": ("s.jpg", data)}))
                        .ok and r.json(), 60, "a prediction")
    seen = np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["input_png"]))))
    assert np.array_equal(seen, image_to_array(data))  # the picture the network was given
    assert max(answer["probabilities"]) < 0.6, answer["probabilities"]

    at = dashboard()
    at.file_uploader(key="picture").set_value(("sneaker.jpg", data, "image/jpeg")).run()
    assert not at.exception and not at.error, texts(at.error)
    assert not [s for s in texts(at.success) if "Predicted" in s]
    assert any(w.startswith(f"Not sure: perhaps **{answer['class_name']}**") for w in texts(at.warning))
    captions = [c for img in at.get("image") for c in img.captions]
    assert captions == ["sneaker.jpg", "what the model saw (28x28)"], captions


# --------------------------------------------------------------------------- the live page


def test_stats_page_before_round_one_and_its_device_chips_on_a_phone(server) -> None:
    """Before round 1: a whole sentence and no empty chart with a made-up axis. After: one
    chip per device, which a tap (no Ctrl-click) takes off the charts and puts back."""
    with chromium() as browser:
        context = browser.new_context(viewport={"width": 390, "height": 844}, has_touch=True,
                                      is_mobile=True, device_scale_factor=2)
        page = context.new_page()
        page.goto(f"{server.url}/stats/")
        wait_js(page, "document.getElementById('connection').textContent.startsWith('connected')")
        note = page.text_content("#chart-devices-note")
        assert note.startswith("No round has completed yet"), note
        assert not page.locator(".chart-box").first.is_visible()
        assert page.locator(".chart-empty").first.is_visible()

        train_rounds(server, "hand1", enroll(server, "hand1"), 1)
        labels = "() => Chart.getChart('accuracy-chart').data.datasets.map((d) => d.label)"
        wait_js(page, f"({labels})().length === 2", what="the global model and hand1 in the chart")
        assert page.locator(".chart-box").first.is_visible()
        assert not page.locator(".chart-empty").first.is_visible()
        assert page.text_content("#chart-devices-note").startswith("1 of 1 devices drawn")
        chip = page.locator("#chart-devices label", has_text="hand1")
        chip.tap()
        wait_js(page, f"({labels})().length === 1", what="hand1 taken off the chart")
        assert not chip.locator("input").is_checked()
        chip.tap()
        wait_js(page, f"({labels})().length === 2", what="hand1 back on the chart")
        context.close()


# --------------------------------------------------------------------------- the device's goodbye


def test_a_device_stopped_after_the_run_says_it_finished(server_factory, split_devices, tmp_path) -> None:
    """The demo stops its devices once the last round is in: the device says the run is over,
    not "interrupted". Before, every such goodbye read "interrupted: leaving the federation"."""
    root = split_devices(1, 200)
    server = server_factory("--test-limit", "200", "--no-tensorboard", "--rounds", "1",
                            "--start").start()
    token = enroll(server, "hand1")
    train_rounds(server, "hand1", token, 1)  # the run is over (1 round)
    # an inactive device is told to wait, even in a finished run: it is still there for the signal
    log = tmp_path / "device1.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen([sys.executable, "device/device.py", "--server", server.url, "device1",
                                 "--devices-root", str(root), "--poll-wait", "1"],
                                cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, env=server.env)
    try:
        wait_until(lambda: "waiting: inactive" in log.read_text(errors="replace"), 120, "device1 to wait")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = log.read_text(errors="replace")
    assert "[device1] the run is over: leaving the federation" in text, text
    assert "interrupted" not in text, text
