"""POST /api/predict on the real app (create_app: Keras model, SQLite, the round driver).

Rounds are driven over HTTP like a device does it, with the project's own KerasTrainer on
real Fashion-MNIST images, so the served model is a genuinely trained global model.
"""

from __future__ import annotations

import csv
import io
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fedhub.api import build_app
from fedhub.api.predictor import Predictor
from fedhub.device.trainer import KerasTrainer
from fedhub.engine import wire
from fedhub.engine.config import FederationConfig
from fedhub.frameworks.keras_model import CLASS_NAMES, Model, image_to_array
from fedhub.serve import ServerConfig, create_app
from fedhub.split import load_fashion_mnist
from tests.conftest import wait_until
from tests.test_api import make_app
from tests.test_tensorboard import read_run

ADMIN = "admin-predict-test"
ENROLL = "enroll-predict-test"
RUN_ID = "predict-run"
pytestmark = pytest.mark.slow  # the predictor serves the Keras model: TensorFlow in every test


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def encoded(img: Image.Image, fmt: str, **options) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **options)
    return buf.getvalue()


class Federation:
    """The app, one enrolled device with real data, and a way to run one more round."""

    def __init__(self, tmp, data_dir) -> None:
        (x_train, y_train), (x_test, y_test) = load_fashion_mnist(data_dir)
        self.x_test, self.y_test = x_test, y_test
        self.eval_dir, self.runs = tmp / "eval", tmp / "runs" / RUN_ID
        config = ServerConfig(state_dir=tmp / "state", eval_dir=self.eval_dir, data_dir=str(data_dir),
                              test_limit=300, admin_token=ADMIN, enroll_secret=ENROLL,
                              runs_dir=tmp / "runs", run_id=RUN_ID,
                              federation=FederationConfig(rounds=0, min_devices=1, auto_activate=True,
                                                          round_timeout=120))
        self.app = create_app(config)
        self.engine = self.app.extensions["fedhub"]
        self.client = self.app.test_client()
        r = self.client.post("/api/devices/register", json={"name": "d1"},
                             headers={"X-Enroll-Secret": ENROLL})
        self.device_token = r.get_json()["token"]
        self.trainer = KerasTrainer(x_train[:1500], y_train[:1500])

    def run_round(self) -> int:
        """One round as a device plays it; returns once /api/predict serves the new model."""
        c, headers = self.client, bearer(self.device_token)
        assert c.post("/api/training/resume", headers=bearer(ADMIN)).status_code == 200
        deadline = time.monotonic() + 60
        while (task := c.get("/api/devices/d1/task?wait=2", headers=headers).get_json())["action"] != "train":
            assert time.monotonic() < deadline, task
        weights, _ = wire.decode(c.get("/api/model", headers=headers).data)
        result = self.trainer.train(weights, task["config"])
        assert c.post("/api/training/pause", headers=bearer(ADMIN)).status_code == 200
        body = wire.encode(result.weights, wire.Meta(
            round=task["round"], model_version=task["model_version"],
            num_examples=result.num_examples, metrics=result.metrics))
        r = c.post(f"/api/devices/d1/updates/{task['round']}", data=body,
                   headers={**headers, "Content-Type": "application/octet-stream"})
        assert r.status_code == 200, r.get_json()
        wait_until(lambda: self.engine.global_model()[0] == task["round"], 60, "the round to complete",
                   interval=0.05)
        # At once, before the round hooks may have run (and after a reset, when the same round
        # number was served before): /api/predict answers with this round's weights.
        _, model = self.own_model()
        want = model.predict(self.x_test[:1])[0]
        r = self.predict(("probe.png", encoded(Image.fromarray(self.x_test[0]), "PNG")))
        assert r.status_code == 200, r.get_json()
        assert r.get_json()["model_version"] == task["round"], r.get_json()
        assert np.allclose(r.get_json()["probabilities"], want, atol=1e-6)
        return task["round"]

    @property
    def predictor(self) -> Predictor:
        return self.app.extensions["fedhub_predictor"]

    def trained(self) -> Federation:
        """A served model of round 1 or later, and the run paused, whatever an earlier test left."""
        version, _ = self.engine.global_model()
        if version == 0 or self.predictor.version != version:
            self.run_round()
        return self

    def own_model(self) -> tuple[int, Model]:
        """The global model as the engine holds it, in a Model of our own."""
        version, weights = self.engine.global_weights()
        model = Model("basic", seed=None)
        model.set_weights(weights)
        return version, model

    def predict(self, *files: tuple[str, bytes], field: str = "image", token: str = ADMIN):
        return self.client.post("/api/predict", headers=bearer(token),
                                data={field: [(io.BytesIO(data), name) for name, data in files]},
                                content_type="multipart/form-data")


@pytest.fixture(scope="module")
def federation(tmp_path_factory, data_dir):
    federation = Federation(tmp_path_factory.mktemp("predict"), data_dir)
    # Before any round: refused, with a message that says why.
    r = federation.predict(("x.png", encoded(Image.fromarray(federation.x_test[0]), "PNG")))
    assert r.status_code == 409, r.get_json()
    assert r.get_json()["field"] == "model" and "no trained global model" in r.get_json()["message"]
    yield federation
    federation.engine.stop()


@pytest.fixture
def fed(federation):
    """The module's app (built once: a Keras model and the test set), trained and paused for each test."""
    return federation.trained()


def test_refused_before_any_trained_model(tmp_path):
    """A server at round 0 (the untrained initial model) answers 409 with a message."""
    app, engine = make_app(tmp_path, min_devices=1)
    app = build_app(engine, admin_token="a", predictor=Predictor("basic"))
    try:
        picture = encoded(Image.new("L", (9, 9)), "PNG")
        r = app.test_client().post("/api/predict", headers=bearer("a"),
                                   data={"image": (io.BytesIO(picture), "a.png")})
        assert r.status_code == 409
        body = r.get_json()
        assert body["error"] == "conflict" and body["field"] == "model"
        assert "first training round has not completed" in body["message"]
    finally:
        engine.stop()


def test_png_and_jpeg_give_the_models_own_class(fed):
    version, model = fed.own_model()
    images = fed.x_test[:12]
    expected = model.predict(images)
    pngs = [(f"t{i}.png", encoded(Image.fromarray(a), "PNG")) for i, a in enumerate(images)]
    jpegs = [(f"t{i}.jpg", encoded(Image.fromarray(a), "JPEG", quality=100)) for i, a in enumerate(images)]

    r = fed.predict(*pngs)
    assert r.status_code == 200, r.get_json()
    answers = r.get_json()
    assert [a["filename"] for a in answers] == [name for name, _ in pngs]
    for answer, probs in zip(answers, expected, strict=True):
        assert answer["model_version"] == answer["round"] == version >= 1
        assert answer["class_index"] == int(np.argmax(probs))
        assert answer["class_name"] == CLASS_NAMES[answer["class_index"]]
        assert answer["class_names"] == list(CLASS_NAMES)
        np.testing.assert_allclose(answer["probabilities"], probs, atol=1e-5)  # PNG is lossless

    # the original tool's field name, one picture at a time: one JSON object each
    for (name, data), probs in zip(jpegs, expected, strict=True):
        r = fed.predict((name, data), field="imageFile")
        assert r.status_code == 200, r.get_json()
        assert r.get_json()["class_index"] == int(np.argmax(probs)), name


def test_other_formats_and_a_device_token(fed):
    _, model = fed.own_model()
    picture = Image.fromarray(fed.x_test[20])
    want = int(np.argmax(model.predict(fed.x_test[20:21])[0]))
    for fmt, options in [("BMP", {}), ("GIF", {}), ("WEBP", {"lossless": True})]:
        r = fed.predict((f"p.{fmt.lower()}", encoded(picture, fmt, **options)), token=fed.device_token)
        assert r.status_code == 200, (fmt, r.get_json())
        assert r.get_json()["class_index"] == want, fmt


def test_large_colour_picture_on_white(fed):
    """A 2400x1800 photo-like picture: dark trousers on a white background."""
    img = Image.new("RGB", (2400, 1800), (255, 255, 255))
    draw = ImageDraw.Draw(img)
    draw.rectangle((900, 200, 1500, 420), fill=(30, 40, 110))
    draw.polygon([(900, 420), (1180, 420), (1120, 1650), (930, 1650)], fill=(30, 40, 110))
    draw.polygon([(1220, 420), (1500, 420), (1470, 1650), (1280, 1650)], fill=(30, 40, 110))
    data = encoded(img, "JPEG", quality=90)
    _, model = fed.own_model()
    r = fed.predict(("trousers.jpg", data))
    assert r.status_code == 200, r.get_json()
    answer = r.get_json()
    assert len(answer["probabilities"]) == 10
    assert abs(sum(answer["probabilities"]) - 1.0) < 1e-4
    # the server used the shared preprocessing: the same answer as the model on image_to_array
    own = model.predict(image_to_array(data))[0]
    assert answer["class_index"] == int(np.argmax(own))
    np.testing.assert_allclose(answer["probabilities"], own, atol=1e-5)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_refusals(fed):
    c = fed.client
    png = encoded(Image.fromarray(fed.x_test[0]), "PNG")
    jpeg = encoded(Image.fromarray(fed.x_test[0]), "JPEG")

    def check(response, status, field, words):
        body = response.get_json()
        assert response.status_code == status, body
        assert body["field"] == field and words in body["message"], body

    # no file: a form without one, and a body that is not a form at all
    check(c.post("/api/predict", headers=bearer(ADMIN), data={"note": "hi"},
                 content_type="multipart/form-data"), 400, "image", "no picture")
    check(c.post("/api/predict", headers=bearer(ADMIN), json={"image": "x"}), 400, "image", "multipart")
    check(fed.predict(("empty.png", b"")), 400, "image", "empty file")
    check(fed.predict(("notes.txt", b"these are not the pixels you are looking for")),
          400, "image", "not a recognised image")
    check(fed.predict(("cut.png", png[: len(png) // 2])), 400, "image", "truncated")
    check(fed.predict(("cut.jpg", jpeg[: len(jpeg) // 2]), field="imageFile"), 400, "imageFile", "truncated")
    check(fed.predict(*[(f"{i}.png", png) for i in range(33)]), 400, "image", "at most 32")
    # one bad picture among good ones refuses the whole request, naming it
    check(fed.predict(("good.png", png), ("bad.png", b"\x89PNG junk")), 400, "image", "picture 2 (bad.png)")
    # decompression bombs: above Pillow's pixel limit, and above twice it (Pillow's own error)
    for size in [(10_000, 9_000), (20_000, 10_000)]:
        bomb = encoded(Image.new("1", size), "PNG")
        assert len(bomb) < 200_000
        check(fed.predict(("bomb.png", bomb)), 400, "image", "pixel limit")
    # a body over the pictures' limit
    limit = fed.app.config["FEDHUB_MAX_IMAGE_BYTES"]
    check(fed.predict(("huge.png", png + b"\0" * limit)), 413, "body", "--max-image-mb")
    # credentials
    r = c.post("/api/predict", data={"image": (io.BytesIO(png), "a.png")}, content_type="multipart/form-data")
    assert r.status_code == 401
    assert fed.predict(("a.png", png), token="forged").status_code == 401
    # and after all that, it still answers
    assert fed.predict(("a.png", png)).status_code == 200


def test_next_round_is_swapped_in_while_requests_keep_being_answered(fed):
    before, _ = fed.own_model()
    png = encoded(Image.fromarray(fed.x_test[5]), "PNG")
    stop = threading.Event()
    seen: list[list[tuple[int, int]]] = [[], []]

    def hammer(out: list[tuple[int, int]]) -> None:
        client = fed.app.test_client()
        while not stop.is_set():
            r = client.post("/api/predict", headers=bearer(ADMIN),
                            data={"image": (io.BytesIO(png), "a.png")}, content_type="multipart/form-data")
            out.append((r.status_code, r.get_json().get("model_version", -1)))

    threads = [threading.Thread(target=hammer, args=(out,)) for out in seen]
    for t in threads:
        t.start()
    try:
        new = fed.run_round()
        wait_until(lambda: all(out and out[-1][1] == new for out in seen), 30,
                   "both threads to be answered by the new model", interval=0.05)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    assert new == before + 1
    for out in seen:
        assert out and all(status == 200 for status, _ in out), out[:5]
        versions = [v for _, v in out]
        assert versions == sorted(versions) and set(versions) <= {before, new}
        assert versions[-1] == new
    _, model = fed.own_model()
    r = fed.predict(("a.png", png)).get_json()
    assert r["model_version"] == new
    np.testing.assert_allclose(r["probabilities"], model.predict(fed.x_test[5:6])[0], atol=1e-5)


def test_reset_stops_serving_the_forgotten_model(fed):
    png = encoded(Image.fromarray(fed.x_test[0]), "PNG")
    assert fed.client.post("/api/training/reset", headers=bearer(ADMIN)).status_code == 200
    r = fed.predict(("a.png", png))
    assert r.status_code == 409 and "no trained global model" in r.get_json()["message"]
    assert fed.run_round() == 1
    assert fed.predict(("a.png", png)).get_json()["model_version"] == 1


def test_round_hooks_of_the_real_factory(fed):
    """What create_app hooks to each completed round: the predictor swaps the new model in,
    eval/history.csv and the TensorBoard event files hold the figures /api/history shows."""
    number = fed.run_round()  # returns once the predictor serves it
    history = fed.client.get("/api/history").get_json()["rounds"]
    assert history[-1]["round"] == number and history[-1]["devices"]["d1"]["num_examples"] == 1500
    png = encoded(Image.fromarray(fed.x_test[3]), "PNG")
    _, model = fed.own_model()
    answer = fed.predict(("a.png", png)).get_json()
    assert answer["model_version"] == number
    np.testing.assert_allclose(answer["probabilities"], model.predict(fed.x_test[3:4])[0], atol=1e-5)

    with (fed.eval_dir / "history.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["round"]) for r in rows] == [h["round"] for h in history]
    for row, h in zip(rows, history, strict=True):
        assert int(row["num_updates"]) == h["num_updates"] and int(row["num_examples"]) == h["num_examples"]
        for column in ("closed_at", "test_loss", "test_accuracy"):
            assert float(row[column]) == h[column], (column, row, h)

    # the TensorBoard hook runs after the predictor's: wait for its step, in the current run's
    # folder (a reset earlier in this module started a run, with a folder of its own): the one
    # whose global events were written last
    def current() -> Path:
        return max(fed.runs.parent.glob("*/global/events.*"), key=lambda p: p.stat().st_mtime).parent.parent

    wait_until(lambda: number in read_run(current() / "global").get("test_accuracy", {}), 30,
               f"round {number} in the TensorBoard event files")
    scalars, device = read_run(current() / "global"), read_run(current() / "d1")
    for h in history:
        assert scalars["test_accuracy"][h["round"]] == pytest.approx(h["test_accuracy"], rel=1e-6)
        assert scalars["test_loss"][h["round"]] == pytest.approx(h["test_loss"], rel=1e-6)
        assert scalars["num_updates"][h["round"]] == h["num_updates"] == 1
        assert device["accuracy"][h["round"]] == pytest.approx(h["devices"]["d1"]["accuracy"], rel=1e-6)
        assert device["num_examples"][h["round"]] == 1500



def test_the_predictor_builds_ahead_only_while_predictions_are_asked_for():
    """A run nobody predicts from builds no network per round; once asked, the next round's is
    built ahead on the hook, and an answer always comes from the engine's current weights."""
    first, second = Model("basic", seed=1).get_weights(), Model("basic", seed=2).get_weights()
    predictor = Predictor("basic")
    predictor.on_round({"round": 1}, first)
    predictor.on_round({"round": 2}, second)
    assert predictor.version is None  # nothing built: nobody asked
    images = np.zeros((1, 28, 28), np.uint8)
    version, probabilities = predictor.predict(images, 2, second)  # built now, on demand
    assert version == 2 and predictor.version == 2
    reference = Model("basic", seed=None)
    reference.set_weights(first)
    predictor.on_round({"round": 3}, first)  # asked since the last build: built ahead
    assert predictor.version == 3
    version, probabilities = predictor.predict(images, 3, first)
    np.testing.assert_allclose(probabilities, reference.predict(images), atol=1e-6)
    predictor.on_round({"round": 4}, second)  # asked since: built ahead
    assert predictor.version == 4
    predictor.on_round({"round": 5}, first)  # not asked since the last build: not built
    assert predictor.version == 4
