"""Decoding image files into RGB ``PIL`` images, the way timm's readers do, and the error for one that fails."""

from __future__ import annotations

import io
from typing import Any

import numpy as np

BAD_IMAGE_HINT = "fix or remove it, or pass --skip-bad-images to leave such images out"


class BadImage(Exception):
    """An image that cannot be decoded; the message says why."""


def open_rgb(data: bytes | str | Any):
    """Decode an image (bytes, a path or a file object) into an RGB ``PIL.Image``.

    Grayscale, palette, CMYK and RGBA images are converted the way timm's readers do
    (``Image.convert('RGB')``: alpha is dropped).
    """
    from PIL import Image

    source = io.BytesIO(data) if isinstance(data, (bytes, bytearray)) else data
    try:
        with Image.open(source) as img:
            if img.mode == "P" and "transparency" in img.info:
                img = img.convert("RGBA")  # avoids PIL's warning about palette transparency
            if img.mode.startswith("I") or img.mode == "F":
                img = _to_8_bits(img)
            return img.convert("RGB")
    except Exception as error:  # PIL raises many types for broken files; all mean "cannot decode"
        raise BadImage(f"{type(error).__name__}: {error}") from error


def _to_8_bits(img):
    """A grayscale ``L`` image from a 16-bit, 32-bit integer or float one, scaled rather than clipped.

    PIL's ``convert`` clips such values at 255, turning a 16-bit image nearly white. 16-bit modes are
    divided by 257 (65535 -> 255); ``I`` and ``F`` images are read by their range: values up to 1 as
    fractions (floats only), up to 255 as 8-bit values, up to 65535 as 16-bit values, larger as 32-bit.
    """
    from PIL import Image

    values = np.asarray(img, dtype=np.float64)
    if img.mode.startswith("I;16"):
        scale = 65535.0
    else:
        top = float(values.max()) if values.size else 0.0
        if img.mode == "F" and top <= 1.0:
            scale = 1.0
        else:
            scale = next(limit for limit in (255.0, 65535.0, 4294967295.0, float("inf")) if top <= limit)
            scale = top if scale == float("inf") else scale
    scaled = np.clip(np.nan_to_num(values) * (255.0 / scale), 0, 255)
    return Image.fromarray(np.rint(scaled).astype(np.uint8))  # 2-D uint8: mode L
