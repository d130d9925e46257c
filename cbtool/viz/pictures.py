"""Heatmap overlays and the picture grid, drawn with Pillow and a matplotlib colormap (imported lazily).

The grid is composed as one image rather than as matplotlib axes: drawing 50 panels then costs
milliseconds, so ``cbtool viz`` stays dominated by the forward passes.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cbtool.errors import CbtoolError


@dataclass(frozen=True)
class Panel:
    """One cell of the grid: an RGB image in [0, 1] (H, W, 3) and, optionally, a heatmap to lay over it."""

    title: str
    image: np.ndarray
    heat: np.ndarray | None = None


def _colormap(name: str):
    try:
        import matplotlib
    except ImportError as error:
        raise CbtoolError("attention pictures need matplotlib: pip install 'cbtool[plot]'") from error
    try:
        return matplotlib.colormaps[name]
    except KeyError:
        raise CbtoolError(f"unknown colormap {name!r}: use a matplotlib colormap name such as inferno or jet") from None


def normalise(heat: np.ndarray) -> np.ndarray:
    """``heat`` scaled to [0, 1] by its own minimum and maximum (all zeros when it is constant)."""
    heat = np.asarray(heat, dtype=np.float64)
    low, high = float(heat.min()), float(heat.max())
    if high - low <= 1e-12 * max(abs(high), 1.0):
        return np.zeros_like(heat, dtype=np.float32)
    return ((heat - low) / (high - low)).astype(np.float32)


def resize(array: np.ndarray, size: tuple[int, int], *, smooth: bool = True) -> np.ndarray:
    """A 2-D float array or an (H, W, 3) image in [0, 1] resized to ``size`` (height, width)."""
    from PIL import Image

    resample = Image.Resampling.BILINEAR if smooth else Image.Resampling.NEAREST
    if array.ndim == 2:
        out = Image.fromarray(np.asarray(array, dtype=np.float32), mode="F").resize(size[::-1], resample)
        return np.asarray(out, dtype=np.float32)
    pixels = Image.fromarray((np.clip(array, 0, 1) * 255).round().astype(np.uint8))
    return np.asarray(pixels.resize(size[::-1], resample), dtype=np.float32) / 255.0


def overlay(image: np.ndarray, heat: np.ndarray, *, alpha: float = 0.6, cmap: str = "inferno",
            smooth: bool = True) -> np.ndarray:
    """``image`` (H, W, 3) in [0, 1] with ``heat`` (rows, cols), min-max normalised and coloured, laid over it."""
    heat = resize(normalise(heat), image.shape[:2], smooth=smooth)
    colours = _colormap(cmap)(np.clip(heat, 0, 1))[..., :3].astype(np.float32)
    return ((1 - alpha) * image.astype(np.float32) + alpha * colours).clip(0, 1)


def compose(rows: list[list[Panel]], *, panel: int = 160, pad: int = 4, cmap: str = "inferno", alpha: float = 0.6):
    """One ``PIL.Image`` holding every panel in a grid, titled above (``\\n`` breaks lines); heatmaps overlaid."""
    from PIL import Image, ImageDraw, ImageFont

    columns = max(len(row) for row in rows)
    lines = max(cell.title.count("\n") + 1 for row in rows for cell in row)
    title = 4 + 13 * lines
    width, height = columns * (panel + pad) + pad, len(rows) * (panel + title + pad) + pad
    canvas = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=11)
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            x, y = pad + c * (panel + pad), pad + r * (panel + title + pad)
            picture = resize(cell.image, (panel, panel))
            if cell.heat is not None:
                picture = overlay(picture, cell.heat, alpha=alpha, cmap=cmap)
            canvas.paste(Image.fromarray((picture * 255).round().astype(np.uint8)), (x, y + title))
            for line, text in enumerate(cell.title.split("\n")):
                while text and draw.textlength(text, font=font) > panel:
                    text = text[:-3] + ".." if len(text) > 3 else ""
                draw.text((x, y + 1 + 13 * line), text, fill="black", font=font)
    return canvas


def png_bytes(picture) -> bytes:
    """A ``PIL.Image`` as PNG bytes."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def save_png(picture, path: str | os.PathLike[str]) -> Path:
    """Write a ``PIL.Image`` as PNG to ``path``, atomically."""
    from cbtool.checkpoint import atomic_path

    path = Path(path)
    with atomic_path(path) as temporary:
        picture.save(temporary, format="PNG", compress_level=1)  # level 6 takes longer than the forwards
    return path
