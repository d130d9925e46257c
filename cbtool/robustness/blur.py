"""Blurs: defocus, glass, motion, zoom and Gaussian blur (Hendrycks & Dietterich's parameters).

Radii, sigmas and pixel displacements are multiplied by ``scale`` (image side / 224); zoom factors
are relative and stay as they are.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from cbtool.robustness import _ops
from cbtool.robustness._ops import SampleRNG


def _disk(radius: float, alias_blur: float) -> torch.Tensor:
    """The reference's anti-aliased disk kernel: a normalised disk, then cv2.GaussianBlur of it."""
    half = 8 if radius <= 8 else math.ceil(radius)
    grid = torch.arange(-half, half + 1, dtype=torch.float64)
    disk = ((grid[:, None] ** 2 + grid[None, :] ** 2) <= radius**2).to(torch.float64)
    disk /= disk.sum()
    size = 3 if radius <= 8 else 5
    offsets = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    taps = torch.exp(-(offsets**2) / (2 * alias_blur**2))
    taps = tuple((taps / taps.sum()).tolist())
    return _ops.separable(disk, taps, taps, "reflect101").float()


def defocus_blur(x: torch.Tensor, severity: int, rng: SampleRNG, scale: float) -> torch.Tensor:
    """Convolution with an anti-aliased disk (a lens out of focus)."""
    radius, alias_blur = ((3, 0.1), (4, 0.5), (6, 0.5), (8, 0.5), (10, 0.5))[severity - 1]
    return _ops.conv2d_same(x, _disk(radius * scale, alias_blur * scale))


def gaussian_blur(x: torch.Tensor, severity: int, rng: SampleRNG, scale: float) -> torch.Tensor:
    """skimage Gaussian blur."""
    sigma = (1, 2, 3, 4, 6)[severity - 1]
    return _ops.gaussian(x, sigma * scale)


def _glass_sources(height: int, width: int, delta: int, offsets: torch.Tensor) -> torch.Tensor:
    """(B, H * W) flat index of the pixel each pixel holds after the reference's local "swaps".

    The reference visits pixels from the bottom right to the top left and writes each with a pixel up
    to ``delta`` away (``offsets``: (B, iterations, visits, 2) as (dx, dy)). It swaps numpy views
    (``x[h, w], x[h', w'] = x[h', w'], x[h, w]``), which copies x[h', w'] into x[h, w] and leaves
    x[h', w'] as it was; ImageNet-C was made that way, so this copies too. A visited pixel gets the
    final value of its source when that source was visited earlier (a larger flat index), else the
    source's value before the pass: chains that pointer jumping resolves in a few batched gathers.
    """
    batch, device = offsets.shape[0], offsets.device
    rows = torch.arange(height - delta, delta, -1, device=device)
    cols = torch.arange(width - delta, delta, -1, device=device)
    visited = (rows[:, None] * width + cols[None, :]).reshape(-1)
    identity = torch.arange(height * width, device=device).expand(batch, -1)
    in_region = torch.zeros(height * width, dtype=torch.bool, device=device)
    in_region[visited] = True
    sources = identity
    for step in range(offsets.shape[1]):
        source = visited + offsets[:, step, :, 1] * width + offsets[:, step, :, 0]
        target = identity.clone()
        target[:, visited] = source
        jump = identity.clone()
        jump[:, visited] = torch.where(in_region[source] & (source > visited), source, visited)
        while not torch.equal(following := jump.gather(1, jump), jump):
            jump = following
        sources = sources.gather(1, target.gather(1, jump))
    return sources


def glass_blur(x: torch.Tensor, severity: int, rng: SampleRNG, scale: float) -> torch.Tensor:
    """Blur, scramble pixels locally (frosted glass), blur again."""
    sigma, delta, iterations = ((0.7, 1, 2), (0.9, 2, 1), (1, 2, 3), (1.1, 3, 2), (1.5, 4, 2))[severity - 1]
    sigma, delta = sigma * scale, max(1, round(delta * scale))
    batch, channels, height, width = x.shape
    x = torch.floor(_ops.gaussian(x, sigma).clamp(0, 1) * 255) / 255  # np.uint8(... * 255)
    visits = max(height - 2 * delta, 0) * max(width - 2 * delta, 0)
    sources = _glass_sources(height, width, delta, rng.randint((iterations, visits, 2), -delta, delta))
    index = sources[:, None].expand(batch, channels, -1)
    x = x.reshape(batch, channels, -1).gather(2, index).reshape(batch, channels, height, width)
    return _ops.gaussian(x, sigma)


def motion_blur(x: torch.Tensor, severity: int, rng: SampleRNG, scale: float) -> torch.Tensor:
    """A Gaussian motion trail at a random angle in [-45, 45) degrees."""
    radius, sigma = ((10, 3), (15, 5), (15, 8), (15, 12), (20, 15))[severity - 1]
    angles = rng.uniform((), -45, 45)
    return _ops.motion_blur(x, max(1, round(radius * scale)), sigma * scale, angles)


def zoom_blur(x: torch.Tensor, severity: int, rng: SampleRNG, scale: float) -> torch.Tensor:
    """The mean of the image and its zooms about the centre (moving towards the camera)."""
    start, stop, step = ((1, 1.11, 0.01), (1, 1.16, 0.01), (1, 1.21, 0.02), (1, 1.26, 0.02), (1, 1.31, 0.03))[
        severity - 1
    ]
    factors = np.arange(start, stop, step)  # numpy's arange, for the reference's exact factors
    out = x.clone()
    for factor in factors:
        out += _ops.clipped_zoom(x, float(factor))
    return out / (len(factors) + 1)
