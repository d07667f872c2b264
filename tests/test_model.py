"""Tests for fedhub.frameworks.keras_model (model.py re-exports it): shared preprocessing, picture
conversion and the Model wrapper."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageDraw

from fedhub.frameworks.keras_model import (
    CLASS_NAMES,
    MODEL_NAMES,
    NUM_CLASSES,
    ImageError,
    Model,
    image_to_array,
    preprocess,
)

pytestmark = pytest.mark.slow  # the Keras side: importing it imports TensorFlow


@pytest.fixture(scope="module")
def trained(fashion) -> Model:
    (x_train, y_train), _ = fashion
    model = Model("basic", seed=0)
    model.train(x_train[:3000], y_train[:3000], epochs=1, batch_size=32)
    return model


def png_bytes(img: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt)
    return buf.getvalue()


# --------------------------------------------------------------------------- preprocess


def test_constants() -> None:
    assert len(CLASS_NAMES) == NUM_CLASSES == 10
    assert CLASS_NAMES[0] == "T-shirt/top" and CLASS_NAMES[9] == "Ankle boot"
    assert MODEL_NAMES == ("basic", "cnn")


@pytest.mark.parametrize(
    ("shape", "expected"),
    [((28, 28), (1, 28, 28, 1)), ((5, 28, 28), (5, 28, 28, 1)), ((5, 28, 28, 1), (5, 28, 28, 1))],
)
def test_preprocess_shapes(shape: tuple[int, ...], expected: tuple[int, ...]) -> None:
    images = np.random.default_rng(0).integers(0, 256, shape, dtype=np.uint8)
    out = preprocess(images)
    assert out.shape == expected and out.dtype == np.float32
    assert out.min() >= 0.0 and out.max() <= 1.0
    assert np.allclose(out.reshape(-1), images.reshape(-1) / 255.0)


def test_preprocess_scaling() -> None:
    ones = preprocess(np.full((2, 28, 28), 255, np.uint8))
    assert np.all(ones == 1.0)
    floats = np.random.default_rng(0).random((3, 28, 28))
    assert np.allclose(preprocess(floats)[..., 0], floats)  # floats in 0..1 are kept as is
    assert preprocess(np.zeros((0, 28, 28), np.uint8)).shape == (0, 28, 28, 1)


@pytest.mark.parametrize(
    ("images", "message"),
    [
        (np.zeros((28, 27), np.uint8), "shape"),
        (np.zeros((2, 28, 28, 3), np.uint8), r"\(2, 28, 28, 3\)"),
        (np.zeros((784,), np.uint8), "shape"),
        (np.full((28, 28), 200.0), "0..1"),
        (np.full((28, 28), -1, np.int32), "0-255"),
        (np.full((28, 28), 300, np.int32), "0-255"),
        (np.full((28, 28), np.nan), "NaN"),
        (np.full((28, 28), "a"), "dtype|integer"),
    ],
)
def test_preprocess_errors(images: np.ndarray, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        preprocess(images)


# --------------------------------------------------------------------------- image_to_array


def test_png_round_trip_is_exact(fashion) -> None:
    _, (x_test, _) = fashion
    for image in x_test[:100]:
        data = png_bytes(Image.fromarray(image, mode="L"))
        out = image_to_array(data)
        assert out.dtype == np.uint8 and out.shape == (28, 28)
        assert np.array_equal(out, image)
    # the same through a file object and an already-open PIL image
    image = x_test[0]
    assert np.array_equal(image_to_array(io.BytesIO(png_bytes(Image.fromarray(image)))), image)
    assert np.array_equal(image_to_array(Image.fromarray(image)), image)


def test_photo_on_white_background_is_inverted() -> None:
    photo = Image.new("RGB", (600, 400), (255, 255, 255))
    ImageDraw.Draw(photo).ellipse([200, 100, 400, 300], fill=(90, 20, 30))
    out = image_to_array(png_bytes(photo, "JPEG"))
    assert out.shape == (28, 28) and out.dtype == np.uint8
    corners = np.array([out[0, 0], out[0, -1], out[-1, 0], out[-1, -1]])
    assert corners.max() <= 3  # white (JPEG: nearly white) background becomes black
    assert out[14, 14] > 180  # the dark garment becomes light
    # 600x400 with a 200x200 garment: cropped to the garment, which touches all four sides
    assert min(out[0].max(), out[-1].max(), out[:, 0].max(), out[:, -1].max()) > 128
    lossless = image_to_array(png_bytes(Image.new("RGB", (600, 400), (255, 255, 255))))
    assert np.all(lossless == 0)  # nothing but a white background: all black


def test_small_image_is_upscaled_and_centred() -> None:
    img = Image.new("L", (7, 14), 0)
    ImageDraw.Draw(img).rectangle([2, 2, 4, 11], fill=255)
    out = image_to_array(png_bytes(img))
    assert out.shape == (28, 28)
    assert np.all(out[:, :7] == 0) and np.all(out[:, -7:] == 0)  # 14x28 centred: 7 px pads
    assert out[14, 14] > 200


def test_transparent_and_palette_images() -> None:
    rgba = Image.new("RGBA", (40, 40), (0, 0, 0, 0))  # transparent = background
    ImageDraw.Draw(rgba).ellipse([10, 10, 30, 30], fill=(30, 30, 30, 255))
    out = image_to_array(png_bytes(rgba))
    assert out[0, 0] == 0 and out[14, 14] > 200
    palette = Image.new("RGB", (28, 28), "white")
    ImageDraw.Draw(palette).rectangle([8, 8, 20, 20], fill="black")
    out = image_to_array(png_bytes(palette.convert("P")))
    assert out[0, 0] == 0 and out[14, 14] == 255


def test_not_an_image_raises() -> None:
    with pytest.raises(ImageError, match="not a recognised image"):
        image_to_array(b"definitely not a picture")
    with pytest.raises(ImageError):
        image_to_array(b"")
    assert issubclass(ImageError, ValueError)
    with pytest.raises(TypeError):
        image_to_array("picture.png")  # type: ignore[arg-type]


def test_truncated_png_raises() -> None:
    noise = np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)
    data = png_bytes(Image.fromarray(noise))
    with pytest.raises(ImageError, match=r"truncated|corrupt"):
        image_to_array(data[: len(data) // 2])


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
def test_decompression_bomb_raises(monkeypatch: pytest.MonkeyPatch) -> None:
    data = png_bytes(Image.new("L", (100, 100)))
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    with pytest.raises(ImageError, match="pixel limit"):
        image_to_array(data)  # above 2x the limit: Pillow's own DecompressionBombError
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 6000)
    with pytest.raises(ImageError, match="pixel limit"):
        image_to_array(data)  # between 1x and 2x: only a warning in Pillow, refused here


# --------------------------------------------------------------------------- Model


def weights_equal(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return list(a) == list(b) and all(np.array_equal(a[k], b[k]) for k in a)


def test_same_seed_same_weights() -> None:
    a, b, c = Model("basic", seed=7), Model("basic", seed=7), Model("basic", seed=8)
    assert weights_equal(a.get_weights(), b.get_weights())
    assert not weights_equal(a.get_weights(), c.get_weights())


def test_weight_names_are_stable() -> None:
    first = Model("basic")
    Model("cnn")
    Model("basic")
    second = Model("basic")
    names = list(first.get_weights())
    assert names == [
        "fedhub_basic/hidden/kernel",
        "fedhub_basic/hidden/bias",
        "fedhub_basic/logits/kernel",
        "fedhub_basic/logits/bias",
    ]
    assert list(second.get_weights()) == names
    cnn = Model("cnn")
    assert next(iter(cnn.get_weights())) == "fedhub_cnn/conv1/kernel"
    assert first.weight_spec()["fedhub_basic/hidden/kernel"] == ((784, 128), "float32")
    assert first.num_parameters() == 784 * 128 + 128 + 128 * 10 + 10
    assert cnn.num_parameters() == sum(int(np.prod(s)) for s, _ in cnn.weight_spec().values())


def test_unknown_model_name() -> None:
    with pytest.raises(ValueError, match="basic, cnn"):
        Model("resnet")


def test_get_set_round_trip() -> None:
    model = Model("basic", seed=0)
    weights = model.get_weights()
    assert all(w.dtype == np.float32 for w in weights.values())
    weights["fedhub_basic/hidden/kernel"][:] = 0.0  # a copy: the model is unchanged
    assert np.any(model.get_weights()["fedhub_basic/hidden/kernel"] != 0.0)
    new = {k: np.full(v.shape, 0.01, np.float64) for k, v in model.get_weights().items()}
    model.set_weights(new)
    got = model.get_weights()
    assert list(got) == list(new)
    assert all(v.dtype == np.float32 and np.allclose(v, 0.01) for v in got.values())


def test_set_weights_refusals() -> None:
    model = Model("basic", seed=0)
    before = model.get_weights()
    missing = dict(before)
    del missing["fedhub_basic/logits/bias"]
    with pytest.raises(ValueError, match=r"missing.*fedhub_basic/logits/bias"):
        model.set_weights(missing)
    with pytest.raises(ValueError, match=r"unexpected.*extra"):
        model.set_weights({**before, "extra": np.zeros(1)})
    bad_shape = {**before, "fedhub_basic/hidden/bias": np.zeros(127, np.float32)}
    with pytest.raises(ValueError, match=r"fedhub_basic/hidden/bias.*\(127,\).*\(128,\)"):
        model.set_weights(bad_shape)
    not_finite = {**before, "fedhub_basic/logits/bias": np.full(10, np.nan, np.float32)}
    with pytest.raises(ValueError, match="NaN"):
        model.set_weights(not_finite)
    with pytest.raises(ValueError, match="missing"):
        model.set_weights(Model("cnn").get_weights())
    assert weights_equal(model.get_weights(), before)  # refused updates change nothing


def test_predict_shapes(fashion) -> None:
    _, (x_test, _) = fashion
    model = Model("cnn", seed=0)
    probs = model.predict(x_test[:5])
    assert probs.shape == (5, NUM_CLASSES) and probs.dtype == np.float32
    assert np.allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    single = model.predict(x_test[0])
    assert single.shape == (1, NUM_CLASSES)
    assert np.allclose(single[0], probs[0], atol=1e-6)


def test_training_reaches_accuracy(trained: Model, fashion) -> None:
    _, (x_test, y_test) = fashion
    result = trained.evaluate(x_test[:1000], y_test[:1000])
    assert set(result) == {"loss", "accuracy"}
    assert result["accuracy"] > 0.6, result
    predicted = trained.predict(x_test[:1000]).argmax(axis=1)
    assert np.isclose(np.mean(predicted == y_test[:1000]), result["accuracy"], atol=0.01)


def test_train_sets_learning_rate(fashion) -> None:
    (x_train, y_train), _ = fashion
    model = Model("basic", seed=0, learning_rate=1e-3)
    result = model.train(x_train[:64], y_train[:64], learning_rate=0.01, batch_size=64)
    assert set(result) == {"loss", "accuracy"} and np.isfinite(result["loss"])
    lr = float(np.asarray(model.keras_model.optimizer.learning_rate))
    assert np.isclose(lr, 0.01)
    with pytest.raises(ValueError, match="labels"):
        model.train(x_train[:10], y_train[:9])


def test_save_load_round_trip(trained: Model, fashion, tmp_path: Path) -> None:
    _, (x_test, _) = fashion
    path = tmp_path / "models" / "global.keras"
    trained.save(path)
    assert [p.name for p in path.parent.iterdir()] == ["global.keras"]  # no temp files left
    loaded = Model.load(path)
    assert loaded.name == "basic"
    assert list(loaded.get_weights()) == list(trained.get_weights())
    assert weights_equal(loaded.get_weights(), trained.get_weights())
    assert np.allclose(loaded.predict(x_test[:200]), trained.predict(x_test[:200]), atol=1e-6)
    with pytest.raises(ValueError, match=r"\.keras"):
        trained.save(tmp_path / "model.h5")
    with pytest.raises(FileNotFoundError):
        Model.load(tmp_path / "absent.keras")
