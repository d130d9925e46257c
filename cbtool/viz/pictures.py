"""Heatmap overlays and the picture grid, drawn with Pillow and a matplotlib colormap (imported lazily).

The grid is composed as one image rather than as matplotlib axes: drawing 50 panels then costs
milliseconds, so ``cbtool viz`` stays dominated by the forward passes.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from cbtool.errors import CbtoolError
from cbtool.viz.scales import ColourScale, decimals_for, number

LINE, TITLE_FONT = 13, 11  # pixels per title line, and the titles' font size in pixels
MARKER, MARKER_TICK = (0, 229, 255), (0, 160, 255)  # cyan stands out on every matplotlib sequential colormap
BAR_WIDTH, BAR_BLOCK, BAR_HEIGHT = 240, 272, 4 * LINE + 18  # a colour bar, its slot, and a row of them


@dataclass(frozen=True)
class Panel:
    """One cell of the grid: an RGB image in [0, 1] (H, W, 3) and, optionally, a heatmap to lay over it, coloured
    from ``low`` to ``high`` (both None: the heatmap's own min and max); ``marker`` (row, col, rows, cols) outlines
    one patch of a rows x cols grid, such as the ``--query`` patch."""

    title: str
    image: np.ndarray
    heat: np.ndarray | None = None
    low: float | None = None
    high: float | None = None
    marker: tuple[int, int, int, int] | None = None


def _colormap(name: str):
    try:
        import matplotlib
    except ImportError as error:
        raise CbtoolError("attention pictures need matplotlib: pip install 'cbtool[plot]'") from error
    try:
        return matplotlib.colormaps[name]
    except KeyError:
        raise CbtoolError(f"unknown colormap {name!r}: use a matplotlib colormap name such as inferno or jet") from None


def normalise(heat: np.ndarray, low: float | None = None, high: float | None = None) -> np.ndarray:
    """``heat`` scaled to [0, 1] between ``low`` and ``high`` (default: its own minimum and maximum; all zeros when
    they are equal); values outside are clipped."""
    heat = np.asarray(heat, dtype=np.float64)
    low = float(heat.min()) if low is None else float(low)
    high = float(heat.max()) if high is None else float(high)
    if high - low <= 1e-12 * max(abs(high), 1.0):
        return np.zeros_like(heat, dtype=np.float32)
    return np.clip((heat - low) / (high - low), 0.0, 1.0).astype(np.float32)


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
            smooth: bool = True, low: float | None = None, high: float | None = None) -> np.ndarray:
    """``image`` (H, W, 3) in [0, 1] with ``heat`` (rows, cols), coloured from ``low`` to ``high`` (default: its
    own min and max), laid over it."""
    heat = resize(normalise(heat, low, high), image.shape[:2], smooth=smooth)
    colours = _colormap(cmap)(np.clip(heat, 0, 1))[..., :3].astype(np.float32)
    return ((1 - alpha) * image.astype(np.float32) + alpha * colours).clip(0, 1)


def compose(rows: list[list[Panel]], *, panel: int = 160, pad: int = 4, cmap: str = "inferno",
            alpha: float | None = None, scales: Sequence[ColourScale] = ()):
    """One ``PIL.Image`` holding every panel in a grid, titled above (``\\n`` breaks lines); heatmaps overlaid;
    below the grid, one colour bar per entry of ``scales``.

    ``alpha`` (the heatmap's weight over the image) defaults to 1 when colour bars are drawn: a panel's colours
    are then the bar's colours, and the image's own brightness cannot pass for attention (a near-uniform map is
    one flat colour, not the object's shape); 0.6 otherwise."""
    if alpha is None:
        alpha = 1.0 if scales else 0.6
    from PIL import Image, ImageDraw, ImageFont

    columns = max(len(row) for row in rows)
    lines = max(cell.title.count("\n") + 1 for row in rows for cell in row)
    title = 4 + LINE * lines
    width = columns * (panel + pad) + pad
    if scales:
        width = max(width, pad + BAR_BLOCK)
    per_row = _bars_per_row(width, pad)
    bars = -(-len(scales) // per_row)
    grid_height = len(rows) * (panel + title + pad) + pad
    canvas = Image.new("RGB", (width, grid_height + bars * BAR_HEIGHT), "white")
    draw = ImageDraw.Draw(canvas)
    font = ImageFont.load_default(size=TITLE_FONT)
    for r, row in enumerate(rows):
        for c, cell in enumerate(row):
            x, y = pad + c * (panel + pad), pad + r * (panel + title + pad)
            picture = resize(cell.image, (panel, panel))
            if cell.heat is not None:
                picture = overlay(picture, cell.heat, alpha=alpha, cmap=cmap, low=cell.low, high=cell.high)
            canvas.paste(Image.fromarray((picture * 255).round().astype(np.uint8)), (x, y + title))
            if cell.marker is not None:
                row_index, col_index, grid_rows, grid_cols = cell.marker
                top, left = y + title + panel * row_index / grid_rows, x + panel * col_index / grid_cols
                box = [left, top, left + panel / grid_cols - 1, top + panel / grid_rows - 1]
                draw.rectangle(box, outline=MARKER, width=2)
            for line, text in enumerate(cell.title.split("\n")):
                draw.text((x, y + 1 + LINE * line), _fit(draw, text, font, panel), fill="black", font=font)
    for index, scale in enumerate(scales):
        x = pad + (index % per_row) * BAR_BLOCK
        y = grid_height + (index // per_row) * BAR_HEIGHT
        draw_colour_bar(draw, scale, (x, y), cmap=cmap, font=font)
    return canvas


def _fit(draw, text: str, font, width: int) -> str:
    """``text`` cut (ending in ``..``) to fit ``width`` pixels."""
    while text and draw.textlength(text, font=font) > width:
        text = text[:-3] + ".." if len(text) > 3 else ""
    return text


def _bars_per_row(width: int, pad: int) -> int:
    """How many colour bars fit side by side below a picture ``width`` pixels wide."""
    return max(1, (width - pad) // BAR_BLOCK)


def draw_colour_bar(draw, scale: ColourScale, at: tuple[int, int], *, cmap: str, font) -> None:
    """A horizontal colour bar at ``at``: the view's name, the bar, its end values and its marks (1/N uniform)."""
    x, y = at
    colours = (_colormap(cmap)(np.linspace(0, 1, BAR_WIDTH))[:, :3] * 255).round().astype(int)
    heading = scale.name + (" (each panel on its own scale)" if scale.per_panel else ", one scale for all panels")
    draw.text((x, y + 2), _fit(draw, heading, font, BAR_BLOCK - 8), fill="black", font=font)
    top = y + 2 + LINE + 2
    for i, colour in enumerate(colours):
        draw.line([(x + i, top), (x + i, top + 11)], fill=tuple(colour))
    draw.rectangle([x, top, x + BAR_WIDTH - 1, top + 11], outline=(90, 90, 90))
    decimals = decimals_for(scale.low, scale.high)
    left = scale.ends[0] or number(scale.low, decimals)
    right = scale.ends[1] or number(scale.high, decimals)
    left_end, right_start = x + draw.textlength(left, font=font), x + BAR_WIDTH - draw.textlength(right, font=font)
    draw.text((x, top + 14), left, fill="black", font=font)
    draw.text((right_start, top + 14), right, fill="black", font=font)
    for index, (value, label) in enumerate(scale.marks):
        at_x = x + round(scale.fraction(value) * (BAR_WIDTH - 1))
        draw.line([(at_x, top - 2), (at_x, top + 13)], fill=MARKER_TICK, width=2)
        if left_end + 2 < at_x < right_start - 2:  # down to its label, unless that would strike out an end's value
            draw.line([(at_x, top + 13), (at_x, top + 14 + LINE * (index + 1))], fill=MARKER_TICK, width=2)
        text_x = min(at_x + 3, x + BAR_WIDTH - draw.textlength(label, font=font))
        draw.text((text_x, top + 14 + LINE * (index + 1) - 1), label, fill="black", font=font)


def png_bytes(picture) -> bytes:
    """A ``PIL.Image`` as PNG bytes."""
    buffer = io.BytesIO()
    picture.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def save_png(picture, path: str | os.PathLike[str]) -> Path:
    """Write a ``PIL.Image`` as PNG to ``path``, atomically."""
    from cbtool.models.checkpoint import atomic_path

    path = Path(path)
    with atomic_path(path) as temporary:
        picture.save(temporary, format="PNG", compress_level=1)  # level 6 takes longer than the forwards
    return path
