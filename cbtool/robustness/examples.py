"""Pictures of what each corruption does: one PNG grid per corruption (``cbtool eval --save-examples``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np

from cbtool.robustness.registry import SEVERITIES

GAP = 2  # white pixels between the tiles


def example_grid(images, keys: Sequence[int], corruption: str, mean: Sequence[float], std: Sequence[float],
                 severities: Sequence[int] = SEVERITIES, seed: int = 0) -> np.ndarray:
    """An RGB uint8 grid: one row per image, the clean image then ``severities`` across.

    ``images`` are normalised ``(B, 3, H, W)`` batches as the eval loader gives them; the pixels are those the
    models see in the evaluation (same keys, same seed).
    """
    import torch

    from cbtool.robustness.corruptions import corrupt_normalized

    mean_t = torch.as_tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    std_t = torch.as_tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    columns = [images] + [corrupt_normalized(images, corruption, s, list(keys), mean, std, seed=seed) for s in severities]
    tiles = [((column * std_t + mean_t).clamp(0, 1) * 255).round().to(torch.uint8) for column in columns]
    batch, _, height, width = images.shape
    grid = np.full((batch * (height + GAP) - GAP, len(tiles) * (width + GAP) - GAP, 3), 255, dtype=np.uint8)
    for col, tile in enumerate(tiles):
        for row in range(batch):
            y, x = row * (height + GAP), col * (width + GAP)
            grid[y:y + height, x:x + width] = tile[row].permute(1, 2, 0).numpy()
    return grid


def save_examples(folder: str | os.PathLike[str], images, keys: Sequence[int], corruptions: Sequence[str],
                  mean: Sequence[float], std: Sequence[float], seed: int = 0) -> list[Path]:
    """Write ``folder/<corruption>.png`` for each corruption (clean, then severities 1-5 across; ``images`` down),
    each atomically; returns the paths."""
    from PIL import Image

    from cbtool.files import atomic_path

    folder = Path(folder)
    images = images.detach().cpu().float()
    written = []
    for name in corruptions:
        grid = example_grid(images, keys, name, mean, std, seed=seed)
        path = folder / f"{name}.png"
        with atomic_path(path) as temporary:
            Image.fromarray(grid).save(temporary, format="PNG")
        written.append(path)
    return written
