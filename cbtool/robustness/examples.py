"""Pictures of what each corruption does: one labelled PNG grid per corruption (``cbtool eval --save-examples``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from cbtool.robustness.registry import JPEG_QUALITY, SEVERITIES

GAP = 2  # white pixels between the tiles
MIN_TILE = 96  # small inputs are enlarged (nearest neighbour, whole multiples) so that labels fit over each tile
LINE = 14  # pixels per line of text


def _tiles(images, keys: Sequence[int], corruption: str, mean: Sequence[float], std: Sequence[float],
           severities: Sequence[int], seed: int, jpeg_quality: int | None) -> list[np.ndarray]:
    """Uint8 (B, H, W, 3) columns: the clean images, then each severity: the pixels the models see in the eval."""
    import torch

    from cbtool.robustness.corruptions import corrupt_normalized

    mean_t = torch.as_tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    columns = [images] + [corrupt_normalized(images, corruption, s, list(keys), mean, std, seed=seed,
                                             jpeg_quality=jpeg_quality) for s in severities]
    return [((c * std_t + mean_t).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            for c in columns]


def example_grid(images, keys: Sequence[int], corruption: str, mean: Sequence[float], std: Sequence[float],
                 severities: Sequence[int] = SEVERITIES, seed: int = 0,
                 jpeg_quality: int | None = JPEG_QUALITY) -> np.ndarray:
    """An RGB uint8 picture: the corruption's name on top, then one row per image, the clean image then each of
    ``severities`` across, every column labelled ("clean", "severity 3").

    ``images`` are normalised ``(B, 3, H, W)`` batches as the eval loader gives them; the pixels are those the
    models see in the evaluation (same keys, seed and JPEG re-encoding), enlarged by a whole factor when small.
    """
    from PIL import Image, ImageDraw, ImageFont

    columns = _tiles(images, keys, corruption, mean, std, severities, seed, jpeg_quality)
    batch, height, width, _ = columns[0].shape
    zoom = max(1, -(-MIN_TILE // min(height, width)))  # ceil: a 32 px input is drawn at 96 px
    tile_h, tile_w = height * zoom, width * zoom
    header = 2 * LINE + 6
    canvas = Image.new("RGB", (len(columns) * (tile_w + GAP) - GAP, header + batch * (tile_h + GAP) - GAP), "white")
    draw, font = ImageDraw.Draw(canvas), ImageFont.load_default(size=11)
    jpeg = f"JPEG q{jpeg_quality} after corrupting" if jpeg_quality is not None else "no JPEG re-encoding"
    draw.text((2, 2), f"{corruption} ({jpeg})", fill="black", font=font)
    for col, (tiles, name) in enumerate(zip(columns, ["clean", *[f"severity {s}" for s in severities]])):
        x = col * (tile_w + GAP)
        draw.text((x + 2, 2 + LINE + 2), name, fill="black", font=font)
        for row in range(batch):
            tile = Image.fromarray(tiles[row]).resize((tile_w, tile_h), Image.Resampling.NEAREST)
            canvas.paste(tile, (x, header + row * (tile_h + GAP)))
    return np.asarray(canvas)


def save_examples(folder: str | os.PathLike[str], images, keys: Sequence[int], corruptions: Sequence[str],
                  mean: Sequence[float], std: Sequence[float], seed: int = 0, *,
                  severities: Sequence[int] = SEVERITIES, jpeg_quality: int | None = JPEG_QUALITY) -> list[Path]:
    """Write ``folder/<corruption>.png`` (:func:`example_grid`) for each corruption, each atomically, creating
    ``folder`` and its parents when missing; returns the paths."""
    from PIL import Image

    from cbtool.files import atomic_path

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    images = images.detach().cpu().float()
    written = []
    for name in corruptions:
        grid = example_grid(images, keys, name, mean, std, severities=severities, seed=seed, jpeg_quality=jpeg_quality)
        path = folder / f"{name}.png"
        with atomic_path(path) as temporary:
            Image.fromarray(grid).save(temporary, format="PNG")
        written.append(path)
    return written
