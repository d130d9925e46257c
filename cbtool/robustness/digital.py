"""Digital and colour corruptions: contrast, brightness, saturate, elastic transform, pixelate and
JPEG compression (Hendrycks & Dietterich's parameters). Elastic displacements are the same fraction of
the image at every size, as are pixelate's cells; colour changes are per pixel, and
JPEG works on 8 x 8 pixel blocks at every size (so it is milder on larger inputs).
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from cbtool.robustness import _ops
from cbtool.robustness._ops import SampleRNG


def contrast(x: torch.Tensor, severity: int, rng: SampleRNG, scale: float) -> torch.Tensor:
    """Pull every channel towards its mean."""
    factor = (0.4, 0.3, 0.2, 0.1, 0.05)[severity - 1]
    means = x.mean(dim=(2, 3), keepdim=True)
    return (x - means) * factor + means


def _hsv_parts(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Value, saturation and each channel's hue position t, so that ``x = v * (1 - s * t)``."""
    value = x.amax(dim=1, keepdim=True)
    spread = value - x.amin(dim=1, keepdim=True)
    saturation = torch.where(value > 0, spread / value.clamp(min=1e-12), torch.zeros_like(value))
    # skimage gives grey pixels hue 0 (red): t = (0, 1, 1).
    grey_t = torch.tensor([0.0, 1.0, 1.0], device=x.device, dtype=x.dtype)[None, :, None, None]
    position = torch.where(spread > 0, (value - x) / spread.clamp(min=1e-12), grey_t)
    return value, saturation, position


def brightness(x: torch.Tensor, severity: int, rng: SampleRNG, scale: float) -> torch.Tensor:
    """Raise the HSV value channel (skimage rgb2hsv / hsv2rgb, computed without the round trip)."""
    shift = (0.1, 0.2, 0.3, 0.4, 0.5)[severity - 1]
    value, saturation, position = _hsv_parts(x)
    return (value + shift).clamp(0, 1) * (1 - saturation * position)


def saturate(x: torch.Tensor, severity: int, rng: SampleRNG, scale: float) -> torch.Tensor:
    """Scale and shift the HSV saturation channel."""
    factor, shift = ((0.3, 0), (0.1, 0), (2, 0), (5, 0.1), (20, 0.2))[severity - 1]
    value, saturation, position = _hsv_parts(x)
    return value * (1 - (saturation * factor + shift).clamp(0, 1) * position)


def _affine_inverse(source: np.ndarray, target: np.ndarray) -> np.ndarray:
    """The 2 x 3 map from target to source points (cv2.warpAffine samples through the inverse)."""
    design = np.hstack([target, np.ones((3, 1))])
    return np.linalg.solve(design, source).T


def elastic_transform(x: torch.Tensor, severity: int, rng: SampleRNG, scale: float) -> torch.Tensor:
    """A random affine warp, then smooth random displacements (ImageNet-C's make_imagenet_c.py; the
    reference's 244 is its own, for 224 px images).

    Both parts move pixels by the same fraction of the image at every size: the affine jitter scales with the
    side, and the smooth field is drawn and smoothed on the image's 224 px grid, resampled to the image and
    scaled to its pixels. (Scaling alpha and sigma with the side instead would keep the displacement a fixed
    number of pixels: smoothing divides the noise by about sigma.) At 224 x 224 this is the reference's field.
    """
    alpha, sigma, jitter = (
        (244 * 2, 244 * 0.7, 244 * 0.1),
        (244 * 2, 244 * 0.08, 244 * 0.2),
        (244 * 0.05, 244 * 0.01, 244 * 0.02),
        (244 * 0.07, 244 * 0.01, 244 * 0.02),
        (244 * 0.12, 244 * 0.01, 244 * 0.02),
    )[severity - 1]
    jitter = jitter * scale
    batch, _, height, width = x.shape
    center, square = np.array([height // 2, width // 2], dtype=np.float64), min(height, width) // 3
    points = np.stack([center + square, [center[0] + square, center[1] - square], center - square])
    moves = rng.uniform((3, 2), -jitter, jitter).cpu().double().numpy()
    maps = np.stack([_affine_inverse(points, points + move) for move in moves])
    maps = torch.tensor(maps, dtype=torch.float32, device=x.device)[..., None, None]  # (B, 2, 3, 1, 1)
    cols = torch.arange(width, device=x.device, dtype=torch.float32)[None, :]
    rows = torch.arange(height, device=x.device, dtype=torch.float32)[:, None]
    source_cols = maps[:, 0, 0] * cols + maps[:, 0, 1] * rows + maps[:, 0, 2]
    source_rows = maps[:, 1, 0] * cols + maps[:, 1, 1] * rows + maps[:, 1, 2]
    x = _ops.sample_bilinear(x, source_rows, source_cols, "reflect101")
    grid = (max(1, round(height / scale)), max(1, round(width / scale)))  # the image's side in 224 px units
    shifts = _ops.gaussian(rng.uniform((2, *grid), -1, 1), sigma, mode="reflect", truncate=3) * alpha
    if grid != (height, width):  # point-sample the field (no antialiasing): the displacements keep their sizes
        shifts = F.interpolate(shifts, size=(height, width), mode="bilinear", align_corners=False) * scale
    return _ops.sample_bilinear(x, rows + shifts[:, 1], cols + shifts[:, 0], "reflect")


def pixelate(x: torch.Tensor, severity: int, rng: SampleRNG, scale: float) -> torch.Tensor:
    """Shrink with PIL's BOX filter and enlarge back (make_imagenet_c.py enlarges with BOX too). The
    cells are as large a part of the image at every size: int(224 * factor) across at 224 x 224."""
    factor = (0.6, 0.5, 0.4, 0.3, 0.25)[severity - 1] / scale
    height, width = x.shape[-2:]
    small = _ops.box_resize(x, max(1, int(height * factor)), max(1, int(width * factor)))
    return _ops.box_resize(small, height, width)


def jpeg_compression(x: torch.Tensor, severity: int, rng: SampleRNG, scale: float) -> torch.Tensor:
    """Encode as JPEG at a low quality with PIL (as the reference) and decode; runs on the CPU."""
    quality = (25, 18, 15, 10, 7)[severity - 1]
    pixels = torch.round(x.clamp(0, 1) * 255).to(torch.uint8)
    return _ops.jpeg_round_trip(pixels, quality).to(x.dtype)
