"""The PyTorch / CIFAR-10 surfaces under hostile and careless input (issue 19).

Pictures: 16-bit, 32-bit and float pictures go through the colour path with their levels scaled
(Pillow's own conversion clipped a mid-grey 16-bit scan to white) and a float picture holding NaN
is refused, not classified as garbage; decompression bombs, truncated files and non-images are an
``ImageError``. ``--model-factory``: a factory that raises, exits, needs arguments, is not callable,
names a module or returns a module with nothing to train stops the server with one ``error:``
line and exit 2 (it was a traceback and exit 1, or exit 0 for ``sys.exit``). Live: a torch CIFAR-10
server answers grey arrays, NaN, wrong dtypes and a header declaring 10^10 examples on the
validation route, Keras-named and mis-typed tensors on the update route, and bad pictures, with a
4xx JSON naming the field, and its round 0 model is the same afterwards.
"""

from __future__ import annotations

import io
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from fedhub.frameworks.images import ImageError, colour_image_to_array, image_to_array

from .conftest import CIFAR_DIR, ONE_THREAD, ROOT, ServerProcess, free_port


def _encode(img: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    img.save(buffer, fmt)
    return buffer.getvalue()


def _png_header(width: int, height: int) -> bytes:
    """A PNG whose header claims ``width`` x ``height`` (a decompression bomb's first bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 100))
            + chunk(b"IEND", b""))


def test_deep_grey_pictures_keep_their_levels_in_colour():
    """A 16-bit grey PNG at level 40000 of 65535 is mid-grey (40000 >> 8 = 156), in colour as in
    grey; before, the colour path answered 255 (white) for every such picture."""
    sixteen = _encode(Image.fromarray(np.full((20, 20), 40000, dtype=np.uint16)), "PNG")
    colour = colour_image_to_array(sixteen)
    assert colour.shape == (32, 32, 3) and colour.dtype == np.uint8
    assert np.all(colour == 156), np.unique(colour)
    floats = _encode(Image.fromarray(np.full((8, 8), 0.5, dtype=np.float32)), "TIFF")  # 0..1 floats
    assert np.all(colour_image_to_array(floats) == 128)


@pytest.mark.parametrize("convert", [image_to_array, colour_image_to_array])
def test_a_float_picture_holding_nan_is_refused(convert):
    nan = _encode(Image.fromarray(np.full((8, 8), np.nan, dtype=np.float32)), "TIFF")
    with pytest.raises(ImageError, match="NaN"):
        convert(nan)


@pytest.mark.parametrize("data, message", [
    (_png_header(100000, 100000), "too large to decode safely"),
    (_png_header(2**31 - 1, 1), "too large to decode safely"),
    (_encode(Image.new("RGB", (40, 40), (1, 2, 3)), "PNG")[:80], "truncated or corrupt"),
    (b"hello, not a picture", "not a recognised image format"),
])
def test_bombs_truncated_files_and_non_images_are_image_errors_in_colour(data, message):
    with pytest.raises(ImageError, match=message):
        colour_image_to_array(data)


def test_odd_but_real_pictures_become_colour_inputs():
    """Tiny, animated, CMYK, palette and alpha pictures all give a (32, 32, 3) uint8 input."""
    rgb = Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 50, 3), dtype=np.uint8))
    frames = [Image.new("P", (30, 30), i) for i in range(3)]
    gif = io.BytesIO()
    frames[0].save(gif, "GIF", save_all=True, append_images=frames[1:])
    for data in (_encode(Image.new("RGB", (1, 1), (9, 9, 9)), "PNG"), gif.getvalue(),
                 _encode(rgb.convert("CMYK"), "JPEG"), _encode(rgb.convert("P"), "PNG"),
                 _encode(rgb.convert("RGBA"), "PNG"), _encode(rgb.convert("LA"), "PNG")):
        out = colour_image_to_array(data)
        assert out.shape == (32, 32, 3) and out.dtype == np.uint8


FACTORIES = [
    ("tests.hostile_factories:raises", "failed: RuntimeError: the user's factory is broken"),
    ("tests.hostile_factories:needs_arguments", "failed: TypeError: needs_arguments() missing"),
    ("tests.hostile_factories:exits", "failed: SystemExit: 0"),
    ("tests.hostile_factories:NOT_CALLABLE", "is not callable (it is of type int)"),
    ("tests.hostile_factories:", "is not callable (it is of type module)"),
    ("tests.hostile_factories:no_parameters", "a module with no trainable parameters"),
    ("tests.no_such_module:build", "cannot be loaded: ModuleNotFoundError: No module named"),
]


@pytest.mark.slow
@pytest.mark.parametrize("spec, message", FACTORIES)
def test_a_broken_factory_is_one_value_error(spec, message, torch_one_thread):
    from fedhub import frameworks

    with pytest.raises(ValueError) as caught:
        frameworks.get("torch").from_factory(spec, dataset="cifar-10")
    assert message in str(caught.value) and "\n" not in str(caught.value)


@pytest.mark.slow
@pytest.mark.parametrize("spec, message", FACTORIES[:3] + FACTORIES[5:6])
def test_the_server_says_one_error_line_and_exits_2_for_a_broken_factory(tmp_path, spec, message):
    env = {**os.environ, **ONE_THREAD, "FEDHUB_ADMIN_TOKEN": "admin-test-token-0123456789",
           "FEDHUB_ENROLL_SECRET": "enroll-test-secret-0123456789", "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "server.py", str(free_port()), "--framework", "torch", "--dataset", "cifar-10",
         "--data-dir", str(CIFAR_DIR), "--state-dir", str(tmp_path / "state"),
         "--eval-dir", str(tmp_path / "eval"), "--model-factory", spec],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=180)
    lines = (done.stdout + done.stderr).strip().splitlines()
    assert done.returncode == 2, lines
    assert len(lines) == 1 and lines[0].startswith(f"error: --model-factory {spec!r} "), lines
    assert message in lines[0] and "Traceback" not in done.stderr
    assert not (tmp_path / "state").exists() or not any((tmp_path / "state").rglob("*.safetensors"))


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _declaring(examples: int) -> bytes:
    """An .npz whose x header declares ``examples`` CIFAR-10 images and holds none."""
    import zipfile

    header = f"{{'descr': '|u1', 'fortran_order': False, 'shape': ({examples}, 32, 32, 3), }}"
    header += " " * (117 - len(header)) + "\n"
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("x.npy", b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode())
        archive.writestr("y.npy", b"")
    return buffer.getvalue()


@pytest.mark.slow
def test_a_torch_cifar_server_refuses_hostile_input_with_the_field_and_changes_nothing(tmp_path):
    import requests

    from fedhub.device.client import Client, ServerError

    srv = ServerProcess(tmp_path, CIFAR_DIR, "--framework", "torch", "--dataset", "cifar-10",
                        env=ONE_THREAD).start()
    try:
        auth = {"Authorization": f"Bearer {srv.admin_token}"}
        before = requests.get(f"{srv.url}/api/rounds/0/model.keras", headers=auth, timeout=60)
        assert before.status_code == 200
        assert before.headers["Content-Disposition"] == 'attachment; filename="fedhub_round_00000.pt2"'
        network = requests.get(f"{srv.url}/api/status", headers=auth, timeout=10).json()["network"]
        assert (network["framework"], network["dataset"], network["image_shape"]) == ("torch", "cifar-10",
                                                                                      [32, 32, 3])
        u8 = np.zeros((4, 32, 32, 3), np.uint8)
        labels = np.arange(4)
        bodies = [
            (_npz(x=np.zeros((4, 28, 28), np.uint8), y=labels), "x"),  # grey on a colour server
            (_npz(x=np.zeros((4, 3, 32, 32), np.uint8), y=labels), "x"),  # channels first
            (_npz(x=np.full(u8.shape, np.nan, np.float32), y=labels), "x"),
            (_npz(x=u8.astype(np.complex64), y=labels), "x"),
            (_npz(x=np.full(u8.shape, 2**40, np.int64), y=labels), "x"),
            (_npz(x=u8, y=labels.astype(np.float64)), "y"),
            (_npz(x=u8, y=labels + 10), "y"),
            (_declaring(10**10), "x"),
            (b"PK\x03\x04 not a zip", "body"),
        ]
        for body, field in bodies:
            r = requests.post(f"{srv.url}/api/rounds/latest/validate", data=body, timeout=60,
                              headers={**auth, "Content-Type": "application/octet-stream"})
            assert r.status_code == 400 and r.json()["field"] == field, r.text
        r = requests.post(f"{srv.url}/api/rounds/latest/validate", data=_npz(x=u8, y=labels),
                          headers={**auth, "Content-Type": "text/plain"}, timeout=60)
        assert r.status_code == 400 and r.json()["field"] == "Content-Type"
        for picture, field in ((_png_header(100000, 100000), "image"), (b"not an image", "image")):
            r = requests.post(f"{srv.url}/api/predict", headers=auth, files={"image": ("p.png", picture)},
                              timeout=60)
            assert r.status_code in (400, 409) and r.json()["field"] in (field, "model"), r.text

        device = Client(srv.url, "hostile1")
        device.register(srv.enroll_secret, num_examples=10)
        assert requests.post(f"{srv.url}/api/devices/hostile1/activate", headers=auth, timeout=10).ok
        assert requests.post(f"{srv.url}/api/training/start", headers=auth, json={}, timeout=10).ok
        from fedhub import frameworks

        weights = frameworks.get("torch").build("cifar").get_weights()
        first = next(iter(weights))
        keras_named = {f"conv2d_{i}/kernel": v for i, v in enumerate(weights.values())}
        for bad, field in ((keras_named, "conv2d_0/kernel"),
                           ({k: v.astype(np.float16) for k, v in weights.items()}, first),
                           ({k: np.full_like(v, np.nan) for k, v in weights.items()}, first)):
            with pytest.raises(ServerError) as refused:
                device.upload(1, bad, num_examples=10, model_version=0)
            assert refused.value.status == 400 and refused.value.body["field"] == field
        after = requests.get(f"{srv.url}/api/rounds/0/model.keras", headers=auth, timeout=60)
        assert after.content == before.content
        status = requests.get(f"{srv.url}/api/status", headers=auth, timeout=10).json()
        assert status["round"]["reported"] == [] and status["model_version"] == 0
    finally:
        srv.stop()
