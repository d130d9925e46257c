"""Weather: snow, frost and fog (Hendrycks & Dietterich's parameters).

Snow flakes and their motion trails are sized in pixels and scale with the image; frost textures are
resized by the same factor (at 224 px by 1.1, as in imagecorruptions); the fog fractal spans the next
power of two above the image side, as in the reference, so it scales by construction.
"""

from __future__ import annotations

import math
from functools import lru_cache
from importlib import resources

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from cbtool.robustness import _ops
from cbtool.robustness._ops import SampleRNG

# The reference draws np.random.randint(5) over [frost1.png, frost2.png, frost3.png, frost4.jpg,
# frost5.jpg, frost6.jpg]: frost6 is never used, and frost3 has the pixels of frost2.
FROST_FILES = ("frost1.jpg", "frost2.jpg", "frost2.jpg", "frost4.jpg", "frost5.jpg")


def snow(x: torch.Tensor, severity: int, rng: SampleRNG, scale: float) -> torch.Tensor:
    """Falling snow: zoomed, thresholded noise streaked by motion blur, over a whitened image."""
    mean, std, zoom, threshold, radius, sigma, keep = (
        (0.1, 0.3, 3, 0.5, 10, 4, 0.8),
        (0.2, 0.3, 2, 0.5, 12, 4, 0.7),
        (0.55, 0.3, 4, 0.9, 12, 8, 0.7),
        (0.55, 0.3, 4.5, 0.85, 12, 8, 0.65),
        (0.55, 0.3, 2.5, 0.85, 12, 12, 0.55),
    )[severity - 1]
    height, width = x.shape[-2:]
    flakes = _ops.clipped_zoom(rng.normal((1, height, width), mean, std), max(zoom * scale, 1.0), crop=False)
    flakes = torch.where(flakes < threshold, torch.zeros_like(flakes), flakes).clamp(0, 1)
    angles = rng.uniform((), -135, -45)
    flakes = _ops.motion_blur(flakes, max(1, round(radius * scale)), sigma * scale, angles)
    flakes = _ops.quantize(flakes[..., :height, :width])  # imagecorruptions streaks, then cuts to size
    x = keep * x + (1 - keep) * torch.maximum(x, _ops.gray(x) * 1.5 + 0.5)
    return x + flakes + flakes.flip(-2, -1)


@lru_cache(maxsize=8)
def _frost_texture(name: str) -> torch.Tensor:
    """(3, h, w) float frost texture in [0, 1] from the package assets."""
    with resources.files("cbtool.robustness").joinpath("assets", "frost", name).open("rb") as handle:
        image = np.asarray(Image.open(handle).convert("RGB"))
    return torch.from_numpy(image.copy()).permute(2, 0, 1).float() / 255


@lru_cache(maxsize=16)
def _frost_resized(name: str, height: int, width: int, scale: float, device: torch.device) -> torch.Tensor:
    """The texture enlarged 1.1x beyond whichever is larger: the image's scale or covering it."""
    texture = _frost_texture(name)
    factor = 1.1 * max(scale, height / texture.shape[1], width / texture.shape[2])
    size = (math.ceil(texture.shape[1] * factor), math.ceil(texture.shape[2] * factor))
    # cv2 INTER_CUBIC when enlarging (always, at 224 px); anti-aliased when a small input shrinks it.
    resized = F.interpolate(texture[None], size=size, mode="bicubic", align_corners=False, antialias=factor < 1)[0]
    return _ops.quantize(resized).to(device)


def frost(x: torch.Tensor, severity: int, rng: SampleRNG, scale: float) -> torch.Tensor:
    """A random crop of one of five frost textures blended over the image."""
    keep, amount = ((1, 0.4), (0.8, 0.6), (0.7, 0.7), (0.65, 0.7), (0.6, 0.75))[severity - 1]
    height, width = x.shape[-2:]
    draws = rng.uniform((3,)).cpu().tolist()
    crops = []
    for which, across, down in draws:
        texture = _frost_resized(FROST_FILES[int(which * 5)], height, width, scale, x.device)
        top = int(across * (texture.shape[1] - height))
        left = int(down * (texture.shape[2] - width))
        crops.append(texture[:, top : top + height, left : left + width])
    return keep * x + amount * torch.stack(crops).to(x.dtype)


def plasma_fractal(rng: SampleRNG, size: int, decay: float) -> torch.Tensor:
    """(B, size, size) diamond-square height maps in [0, 1]; ``size`` a power of two."""
    batch, device = len(rng), rng.device
    height_map = torch.zeros(batch, size, size, device=device)
    step, wibble = size, 100.0
    while step >= 2:
        half = step // 2
        corners = height_map[:, 0:size:step, 0:size:step]
        squares = corners + corners.roll(-1, dims=1)
        squares = squares + squares.roll(-1, dims=2)
        height_map[:, half:size:step, half:size:step] = squares / 4 + wibble * rng.uniform(
            squares.shape[1:], -wibble, wibble
        )
        centres = height_map[:, half:size:step, half:size:step]
        corners = height_map[:, 0:size:step, 0:size:step]
        left = centres + centres.roll(1, dims=1) + corners + corners.roll(-1, dims=2)
        height_map[:, 0:size:step, half:size:step] = left / 4 + wibble * rng.uniform(left.shape[1:], -wibble, wibble)
        top = centres + centres.roll(1, dims=2) + corners + corners.roll(-1, dims=1)
        height_map[:, half:size:step, 0:size:step] = top / 4 + wibble * rng.uniform(top.shape[1:], -wibble, wibble)
        step, wibble = half, wibble / decay
    low = height_map.amin(dim=(1, 2), keepdim=True)
    height_map = height_map - low
    return height_map / height_map.amax(dim=(1, 2), keepdim=True)


def fog(x: torch.Tensor, severity: int, rng: SampleRNG, scale: float) -> torch.Tensor:
    """A plasma-fractal haze added to the image, then the contrast squeezed back."""
    amount, decay = ((1.5, 2), (2.0, 2), (2.5, 1.7), (2.5, 1.5), (3.0, 1.4))[severity - 1]
    height, width = x.shape[-2:]
    size = 1 << (max(height, width) - 1).bit_length()
    haze = plasma_fractal(rng, size, decay)[:, None, :height, :width]
    peak = x.amax(dim=(1, 2, 3), keepdim=True)
    return (x + amount * haze) * peak / (peak + amount)
