"""Uploaded pictures turned into the raw images FedHub's networks take, for every framework.

Grey 28x28 (Fashion-MNIST-like, :func:`image_to_array`) or colour 32x32 (CIFAR-10-like,
:func:`colour_image_to_array`). NumPy and Pillow only: a PyTorch server predicts without
importing TensorFlow. ``fedhub.frameworks.keras_model`` re-exports the grey path under its old names.
"""

from __future__ import annotations

import io
from typing import Any, BinaryIO

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

IMAGE_SIZE = 28
COLOUR_SIZE = 32
# Integer images are grey levels 0..MAX_GREY.
MAX_GREY = 255


class ImageError(ValueError):
    """Uploaded data is not a usable picture (not an image, truncated, or too large)."""


# Decoding is where a picture costs memory: width x height x 4 bytes for anything but greyscale
# (Pillow keeps RGB in 4 bytes a pixel, and palette or 16-bit pictures are widened on conversion).
# Pillow's pixel limit alone let a 9000x9000 RGBA picture cost 1.5 GiB; this bounds the decode.
MAX_DECODED_BYTES = 64 * 1024 * 1024
# Larger pictures are first box-reduced to about this side, so the colour conversions work on
# megabytes rather than hundreds of them; a 28x28 classifier loses nothing.
WORKING_SIDE = 2048


def _decoded_bytes(img: Image.Image) -> int:
    return img.size[0] * img.size[1] * (1 if img.mode in ("1", "L") else 4)


def _shrink(img: Image.Image) -> Image.Image:
    """A decoded picture reduced by a whole factor to a side of at most ``WORKING_SIDE``."""
    factor = -(-max(img.size) // WORKING_SIDE)
    if factor <= 1:
        return img
    try:
        return img.reduce(factor)
    except ValueError:  # a mode reduce() does not take (palette, 1-bit): converted later as it is
        return img


def _bomb_message(pixels: int | None = None) -> str:
    limit = Image.MAX_IMAGE_PIXELS
    got = f" ({pixels} pixels)" if pixels is not None else ""
    return (
        f"image is too large to decode safely{got}: it exceeds the pixel limit of "
        f"{limit} pixels (Pillow's decompression-bomb limit, PIL.Image.MAX_IMAGE_PIXELS)"
    )


def _open_image(source: bytes | BinaryIO | Image.Image) -> Image.Image:
    """Open and fully decode ``source``; every decoding failure becomes :class:`ImageError`."""
    if isinstance(source, Image.Image):
        img, from_data = source, False
    elif isinstance(source, bytes | bytearray | memoryview):
        img, from_data = None, True
        stream: Any = io.BytesIO(bytes(source))
    elif hasattr(source, "read"):
        img, from_data = None, True
        stream = source
    else:
        raise TypeError(
            "image_to_array() takes bytes, a binary file object or a PIL image, "
            f"not {type(source).__name__} (to read a path, open it with open(path, 'rb'))"
        )
    try:
        if img is None:
            img = Image.open(stream)
            # Pillow only refuses images above 2x the limit; anything above the limit is
            # still far too big for a 28x28 classifier fed by uploads, so refuse it here.
            limit = Image.MAX_IMAGE_PIXELS
            pixels = img.size[0] * img.size[1]
            if limit is not None and pixels > limit:
                raise ImageError(_bomb_message(pixels))
            if _decoded_bytes(img) > MAX_DECODED_BYTES and img.format == "JPEG":
                img.draft(img.mode, (WORKING_SIDE, WORKING_SIDE))  # decoded at 1/2 to 1/8 scale
            if _decoded_bytes(img) > MAX_DECODED_BYTES:
                raise ImageError(
                    f"image of {img.size[0]}x{img.size[1]} pixels ({img.mode}) would take "
                    f"{_decoded_bytes(img) // 2**20} MiB to decode; at most "
                    f"{MAX_DECODED_BYTES // 2**20} MiB (a smaller or greyscale picture works)")
        img.load()  # decode now so truncated or corrupt data fails here, not later
    except Image.DecompressionBombError as exc:
        raise ImageError(_bomb_message()) from exc
    except UnidentifiedImageError as exc:
        raise ImageError("data is not a recognised image format") from exc
    except ImageError:
        raise
    except (OSError, SyntaxError, EOFError, ValueError) as exc:
        what = "image data is truncated or corrupt" if from_data else "image cannot be decoded"
        raise ImageError(f"{what}: {exc}") from exc
    return img


def _to_greyscale(img: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit greyscale ``L``.

    Transparent pixels are composited onto white: transparency means "background", and a
    white background is then detected and inverted like any photo on a light backdrop.
    """
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    elif img.mode in ("L", "RGB") and "transparency" in img.info:
        img = img.convert("RGBA")
    if img.mode in ("LA", "La", "PA", "RGBA", "RGBa"):
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba).convert("RGB")
    if img.mode == "L":
        return img
    if img.mode.startswith("I;16"):
        arr16 = np.asarray(img).astype(np.uint32)
        return Image.fromarray((arr16 >> 8).astype(np.uint8), mode="L")
    if img.mode in ("I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        if not np.isfinite(arr).all():
            raise ImageError("image holds NaN or infinite pixel values")
        lo, hi = float(arr.min()), float(arr.max())
        if img.mode == "F" and lo >= 0.0 and hi <= 1.0:
            arr = arr * 255.0
        elif lo >= 0.0 and hi <= 65535.0 and hi > 255.0:
            arr = arr / 257.0
        elif lo < 0.0 or hi > 255.0:
            arr = (arr - lo) * (255.0 / (hi - lo)) if hi > lo else np.zeros_like(arr)
        return Image.fromarray(np.clip(np.rint(arr), 0, 255).astype(np.uint8), mode="L")
    try:
        return img.convert("L")
    except ValueError:  # modes such as LAB/HSV have no direct conversion to L
        return img.convert("RGB").convert("L")


def image_to_array(source: bytes | BinaryIO | Image.Image) -> np.ndarray:
    """Turn any real picture into a Fashion-MNIST-like uint8 ``(28, 28)`` array.

    Fashion-MNIST items are light garments on a pure black background, trimmed to the item,
    its longer side scaled to 28 pixels and centred. Photos are the opposite (a dark item
    somewhere on a light, often tinted backdrop, small in a large frame), and a network fed
    a photo merely shrunk and inverted sees a few grey pixels on dark grey and answers
    "Bag". So this function makes a photo look like the data the network learned from:

    * decodes the data (fully, so truncated files fail early), applies the EXIF orientation,
      composites transparency onto white and converts to greyscale;
    * takes the background's grey level from the picture's border (the median, which ignores
      an item that touches the edge);
    * keeps, as the item, the pixels that differ from it by more than the background's own
      noise (:func:`_item_levels`): the background becomes 0, lighter or darker items alike
      become bright;
    * crops to the item, scales its longer side to 28 (LANCZOS, aspect kept), centres it on
      black, and stretches its brightest pixel to 255, as in the dataset.

    A picture that is already 28x28 is taken as a Fashion-MNIST-style image and only inverted
    when its background is light (mean of the border > 127): a genuine Fashion-MNIST image
    comes back unchanged, so prediction sees exactly what training saw.

    Raises :class:`ImageError` for data that is not an image, is truncated or corrupt, is
    larger than Pillow's decompression-bomb pixel limit, or would take more than
    ``MAX_DECODED_BYTES`` to decode. Pictures wider or taller than ``WORKING_SIDE`` are first
    reduced by a whole factor (box filter), which bounds the memory the conversions take.
    """
    img = _open_image(source)
    try:
        if img.getexif().get(0x0112, 1) != 1:  # 0x0112 = EXIF Orientation
            img = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError):
        pass  # unreadable EXIF is not a reason to reject the picture itself
    img = _shrink(img)
    grey = _to_greyscale(img)

    width, height = grey.size
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels (size {width}x{height})")
    original = np.asarray(grey, dtype=np.uint8)
    border = np.concatenate([original[0, :], original[-1, :], original[:, 0], original[:, -1]])
    if (width, height) == (IMAGE_SIZE, IMAGE_SIZE):  # already in the dataset's form
        return 255 - original if float(border.mean()) > 127.0 else original.copy()

    levels = _item_levels(original, border)
    rows = np.flatnonzero(levels.any(axis=1))
    if rows.size == 0:  # nothing but background: a black picture, as the dataset's background
        return np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.uint8)
    cols = np.flatnonzero(levels.any(axis=0))
    item = levels[rows[0] : rows[-1] + 1, cols[0] : cols[-1] + 1]

    h, w = item.shape
    scale = IMAGE_SIZE / max(w, h)
    new_size = (max(1, min(IMAGE_SIZE, round(w * scale))), max(1, min(IMAGE_SIZE, round(h * scale))))
    resized = np.asarray(Image.fromarray(item, mode="F").resize(new_size, Image.Resampling.LANCZOS))
    out = np.zeros((IMAGE_SIZE, IMAGE_SIZE), dtype=np.float32)
    h, w = resized.shape
    top, left = (IMAGE_SIZE - h) // 2, (IMAGE_SIZE - w) // 2
    out[top : top + h, left : left + w] = np.clip(resized, 0.0, None)  # LANCZOS rings below 0
    brightest = float(out.max())
    if brightest > 0.0:
        out *= MAX_GREY / brightest
    return np.clip(np.rint(out), 0, MAX_GREY).astype(np.uint8)


# A pixel is part of the item when it differs from the background's grey level by more than
# this many levels, or by more than the background's own spread (JPEG noise, a textured
# backdrop, uneven light) times BACKGROUND_SPREAD_FACTOR, whichever is larger.
MIN_ITEM_CONTRAST = 24
BACKGROUND_SPREAD_FACTOR = 1.5
# The item's bounding box ignores this share of its pixels on each side: stray specks of dust
# or noise far from the item must not stretch the crop.
STRAY_SHARE = 0.002


def _item_levels(grey: np.ndarray, border: np.ndarray) -> np.ndarray:
    """How far each pixel is from the background (float32, 0 for background), with the specks
    outside the item's robust bounding box cleared, so that its non-zero pixels are the item."""
    background = float(np.median(border))
    spread = float(np.percentile(np.abs(border.astype(np.float32) - background), 95))
    threshold = max(MIN_ITEM_CONTRAST, BACKGROUND_SPREAD_FACTOR * spread)
    levels = np.abs(grey.astype(np.float32) - np.float32(background))
    levels[levels <= threshold] = 0.0
    ys, xs = np.nonzero(levels)
    if ys.size == 0:
        return levels
    y0, y1 = np.quantile(ys, [STRAY_SHARE, 1 - STRAY_SHARE])
    x0, x1 = np.quantile(xs, [STRAY_SHARE, 1 - STRAY_SHARE])
    kept = np.zeros_like(levels)
    y0, y1, x0, x1 = int(np.floor(y0)), int(np.ceil(y1)) + 1, int(np.floor(x0)), int(np.ceil(x1)) + 1
    kept[y0:y1, x0:x1] = levels[y0:y1, x0:x1]
    return kept


def colour_image_to_array(source: bytes | BinaryIO | Image.Image, size: int = COLOUR_SIZE) -> np.ndarray:
    """Turn any real picture into a CIFAR-10-like uint8 ``(size, size, 3)`` RGB array.

    CIFAR-10 images are whole scenes with the object roughly centred, so the picture is only
    decoded (with the same limits as :func:`image_to_array`), turned upright by its EXIF
    orientation, composited onto white where transparent, centre-cropped to a square and
    scaled down (LANCZOS). A picture already ``size`` x ``size`` comes back pixel for pixel,
    so predicting a CIFAR-10 image gives exactly what the network saw in training.
    """
    img = _open_image(source)
    try:
        if img.getexif().get(0x0112, 1) != 1:  # 0x0112 = EXIF Orientation
            img = ImageOps.exif_transpose(img)
    except (OSError, SyntaxError, ValueError):
        pass
    img = _shrink(img)
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in img.info:
        rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img = Image.alpha_composite(white, rgba)
    if img.mode.startswith("I") or img.mode == "F":
        # 16-bit, 32-bit integer and float pictures: Pillow's convert("RGB") clips their levels
        # at 255 (a mid-grey 16-bit scan comes out white); the grey path scales them properly.
        img = _to_greyscale(img)
    if img.mode != "RGB":
        try:
            img = img.convert("RGB")
        except ValueError:
            img = _to_greyscale(img).convert("RGB")
    width, height = img.size
    if width < 1 or height < 1:
        raise ImageError(f"image has no pixels (size {width}x{height})")
    side = min(width, height)
    left, top = (width - side) // 2, (height - side) // 2
    img = img.crop((left, top, left + side, top + side))
    if side != size:
        img = img.resize((size, size), Image.Resampling.LANCZOS)
    return np.asarray(img, dtype=np.uint8).copy()
