"""Batched image operations behind the corruptions: per-sample random streams, blurs, resampling.

Images are float tensors (B, C, H, W) in [0, 1]. Each helper reproduces the numpy/OpenCV/scipy/PIL
operation that Hendrycks & Dietterich's reference code calls, including its border handling.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from functools import lru_cache

import torch
import torch.nn.functional as F

# ImageNet-C was made at 224 x 224; pixel-sized parameters scale with the input's size relative to it.
REFERENCE_SIZE = 224
# OpenCV's RGB2GRAY weights (snow uses cv2.cvtColor).
GRAY_WEIGHTS = (0.299, 0.587, 0.114)


def size_scale(height: int, width: int) -> float:
    """How much larger than 224 x 224 the image is, as a length ratio (geometric mean of the sides)."""
    return math.sqrt(height * width) / REFERENCE_SIZE


class SampleRNG:
    """One random stream per sample, seeded from its key, so draws never depend on batch position."""

    def __init__(self, keys: Sequence[int], tag: str, device: torch.device, seed: int = 0) -> None:
        self.device = device
        self.generators = []
        for key in keys:
            digest = hashlib.blake2b(f"{seed}/{tag}/{int(key)}".encode(), digest_size=8).digest()
            generator = torch.Generator(device=device)
            generator.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
            self.generators.append(generator)

    def __len__(self) -> int:
        return len(self.generators)

    def uniform(self, shape: Sequence[int], low: float = 0.0, high: float = 1.0) -> torch.Tensor:
        """(B, *shape) uniform draws in [low, high)."""
        draws = [torch.rand(tuple(shape), generator=g, device=self.device) for g in self.generators]
        return torch.stack(draws) * (high - low) + low

    def normal(self, shape: Sequence[int], mean: float = 0.0, std: float = 1.0) -> torch.Tensor:
        """(B, *shape) normal draws."""
        draws = [torch.randn(tuple(shape), generator=g, device=self.device) for g in self.generators]
        return torch.stack(draws) * std + mean

    def randint(self, shape: Sequence[int], low: int, high: int) -> torch.Tensor:
        """(B, *shape) int64 draws in [low, high), like numpy's randint."""
        draws = [torch.randint(low, high, tuple(shape), generator=g, device=self.device) for g in self.generators]
        return torch.stack(draws)

    def poisson(self, rates: torch.Tensor) -> torch.Tensor:
        """Poisson draws with the given (B, ...) rates."""
        return torch.stack([torch.poisson(rate, generator=g) for rate, g in zip(rates, self.generators)])


def _border_index(index: torch.Tensor, size: int, mode: str) -> torch.Tensor:
    """Map integer positions outside [0, size) back inside: 'nearest' (edge), 'reflect' (d c b a | a b c d,
    scipy's reflect, skimage's too) or 'reflect101' (d c b | a b c d, OpenCV's default)."""
    if mode == "nearest":
        return index.clamp(0, size - 1)
    if mode == "reflect":
        index = index.remainder(2 * size)
        return torch.where(index < size, index, 2 * size - 1 - index)
    if size == 1:
        return torch.zeros_like(index)
    index = index.remainder(2 * size - 2)
    return torch.where(index < size, index, 2 * size - 2 - index)


@lru_cache(maxsize=64)
def _filter_matrix(size: int, taps: tuple[float, ...], mode: str, device: torch.device) -> torch.Tensor:
    """(size, size) matrix applying a centred 1-D correlation with ``taps`` under the border ``mode``."""
    radius = len(taps) // 2
    rows = torch.arange(size).repeat_interleave(len(taps))
    cols = _border_index(torch.arange(size)[:, None] + torch.arange(-radius, radius + 1)[None, :], size, mode)
    weights = torch.tensor(taps, dtype=torch.float64).repeat(size)
    matrix = torch.zeros(size, size, dtype=torch.float64)
    matrix.index_put_((rows, cols.reshape(-1)), weights, accumulate=True)
    return matrix.to(device=device, dtype=torch.float32)


def gaussian_taps(sigma: float, truncate: float = 4.0) -> tuple[float, ...]:
    """scipy.ndimage's Gaussian kernel (radius ``int(truncate * sigma + 0.5)``), normalised."""
    radius = max(int(truncate * sigma + 0.5), 0)
    x = torch.arange(-radius, radius + 1, dtype=torch.float64)
    taps = torch.exp(-0.5 * (x / max(sigma, 1e-12)) ** 2)
    return tuple((taps / taps.sum()).tolist())


def separable(x: torch.Tensor, taps_h: Sequence[float], taps_w: Sequence[float], mode: str) -> torch.Tensor:
    """Correlate the last two dims with 1-D kernels; exact borders for any kernel size (as matrices)."""
    height, width = x.shape[-2:]
    rows = _filter_matrix(height, tuple(taps_h), mode, x.device).to(x.dtype)
    cols = _filter_matrix(width, tuple(taps_w), mode, x.device).to(x.dtype)
    return rows @ x @ cols.T


def gaussian(x: torch.Tensor, sigma: float, mode: str = "nearest", truncate: float = 4.0) -> torch.Tensor:
    """skimage.filters.gaussian over the last two dims (its default border is 'nearest')."""
    taps = gaussian_taps(sigma, truncate)
    return separable(x, taps, taps, mode)


def conv2d_same(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """cv2.filter2D: same-size 2-D correlation of every channel, border reflect101."""
    batch, channels, height, width = x.shape
    radius_h, radius_w = kernel.shape[0] // 2, kernel.shape[1] // 2
    flat = x.reshape(batch * channels, 1, height, width)
    if radius_h < height and radius_w < width:
        flat = F.pad(flat, (radius_w, radius_w, radius_h, radius_h), mode="reflect")
    else:
        rows = _border_index(torch.arange(-radius_h, height + radius_h, device=x.device), height, "reflect101")
        cols = _border_index(torch.arange(-radius_w, width + radius_w, device=x.device), width, "reflect101")
        flat = flat[:, :, rows][:, :, :, cols]
    out = F.conv2d(flat, kernel.to(x)[None, None])
    return out.reshape(batch, channels, height, width)


@lru_cache(maxsize=64)
def box_resize_matrix(in_size: int, out_size: int, device: torch.device) -> torch.Tensor:
    """(out, in) weights of PIL's BOX resampling (Image.resize(..., Image.BOX))."""
    scale = in_size / out_size
    filter_scale = max(scale, 1.0)
    support = 0.5 * filter_scale
    matrix = torch.zeros(out_size, in_size, dtype=torch.float64)
    for out in range(out_size):
        center = (out + 0.5) * scale
        low, high = max(int(center - support + 0.5), 0), min(int(center + support + 0.5), in_size)
        for src in range(low, high):
            position = (src - center + 0.5) / filter_scale
            matrix[out, src] = 1.0 if -0.5 < position <= 0.5 else 0.0
        matrix[out] /= matrix[out].sum()
    return matrix.to(device=device, dtype=torch.float32)


def box_resize(x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Resize the last two dims with PIL's BOX filter as PIL does on 8-bit images: the horizontal pass,
    rounding to 8 bits (halves up, as its fixed-point arithmetic does), the vertical pass, rounding again."""
    rows = box_resize_matrix(x.shape[-2], height, x.device)
    cols = box_resize_matrix(x.shape[-1], width, x.device)

    def to_8_bits(values: torch.Tensor) -> torch.Tensor:
        # Box weights are 1/n: results lie on multiples of 1/n, so 1e-4 only settles exact halves.
        return torch.floor(values.clamp(0, 1) * 255 + 0.5 + 1e-4) / 255

    return to_8_bits(rows @ to_8_bits(x @ cols.T))


def clipped_zoom(x: torch.Tensor, factor: float, crop: bool = True) -> torch.Tensor:
    """Zoom (B, C, H, W) about the centre by ``factor`` >= 1: the reference's clipped_zoom (a centre crop
    of ceil(side / factor), scipy zoom order 1), cut to the top-left H x W unless ``crop`` is False (the
    zoom can come out a pixel larger)."""
    height, width = x.shape[-2:]
    crop_h, crop_w = math.ceil(height / factor), math.ceil(width / factor)
    top, left = (height - crop_h) // 2, (width - crop_w) // 2
    centre = x[..., top : top + crop_h, left : left + crop_w]
    size = (round(crop_h * factor), round(crop_w * factor))  # scipy's output shape
    zoomed = F.interpolate(centre, size=size, mode="bilinear", align_corners=True)  # scipy's grid_mode=False
    return zoomed[..., :height, :width] if crop else zoomed


def motion_blur(x: torch.Tensor, radius: int, sigma: float, angles: torch.Tensor) -> torch.Tensor:
    """imagecorruptions' _motion_blur (its stand-in for ImageMagick's): a one-sided Gaussian trail of
    ``2 * radius + 1`` shifted copies along each sample's angle (degrees), edges replicated. One
    batched gather per copy, so the kernel count does not grow with the batch."""
    batch, channels, height, width = x.shape
    taps = 2 * radius + 1
    steps = torch.arange(taps, dtype=torch.float64)
    kernel = torch.exp(-(steps**2) / (2 * sigma**2))
    radians = torch.deg2rad(angles.detach().to("cpu", torch.float64))[:, None]
    dy = (-torch.ceil(steps * torch.sin(radians) - 0.5)).long()  # (B, taps), the reference's rounding
    dx = (-torch.ceil(steps * torch.cos(radians) - 0.5)).long()
    inside = ((dy.abs() < height) & (dx.abs() < width)).cumprod(dim=1)  # the reference stops at the first exit
    weights = (kernel / kernel.sum() * inside).to(x.device, x.dtype)
    rows = (torch.arange(height) - dy[..., None]).clamp(0, height - 1).to(x.device)  # (B, taps, H)
    cols = (torch.arange(width) - dx[..., None]).clamp(0, width - 1).to(x.device)  # (B, taps, W)
    out = torch.zeros_like(x)
    for tap in range(taps):
        shifted = x.gather(2, rows[:, tap, None, :, None].expand(batch, channels, height, width))
        shifted = shifted.gather(3, cols[:, tap, None, None, :].expand(batch, channels, height, width))
        out += weights[:, tap, None, None, None] * shifted
    return out


def sample_bilinear(x: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, mode: str) -> torch.Tensor:
    """Bilinear lookup of (B, C, H, W) at per-sample (B, H', W') coordinates, border ``mode``."""
    batch, channels, height, width = x.shape
    row0, col0 = rows.floor(), cols.floor()
    frac_r, frac_c = (rows - row0)[:, None], (cols - col0)[:, None]
    row0, col0 = row0.long(), col0.long()
    flat = x.reshape(batch, channels, height * width)

    def at(r: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        index = _border_index(r, height, mode) * width + _border_index(c, width, mode)
        index = index.reshape(batch, 1, -1).expand(batch, channels, -1)
        return flat.gather(2, index).reshape(batch, channels, *rows.shape[1:])

    top = at(row0, col0) * (1 - frac_c) + at(row0, col0 + 1) * frac_c
    bottom = at(row0 + 1, col0) * (1 - frac_c) + at(row0 + 1, col0 + 1) * frac_c
    return top * (1 - frac_r) + bottom * frac_r


def gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luma with OpenCV's RGB2GRAY weights."""
    weights = torch.tensor(GRAY_WEIGHTS, device=x.device, dtype=x.dtype)
    return (x * weights[None, :, None, None]).sum(dim=1, keepdim=True)


def quantize(x: torch.Tensor) -> torch.Tensor:
    """Round to the 256 levels of an 8-bit image (values stay floats in [0, 1])."""
    return torch.round(x.clamp(0, 1) * 255) / 255


def jpeg_round_trip(pixels: torch.Tensor, quality: int, *, optimize: bool = False) -> torch.Tensor:
    """Encode 8-bit ``pixels`` (B, 3, H, W) as JPEG at ``quality`` with PIL, decode, and return floats in [0, 1] on
    their device (PIL's default 4:2:0 chroma subsampling, as ImageNet-C's files and imagecorruptions have)."""
    import io

    import numpy as np
    from PIL import Image

    out = []
    for image in pixels.permute(0, 2, 3, 1).cpu().numpy():
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, "JPEG", quality=quality, optimize=optimize)
        out.append(np.asarray(Image.open(buffer).convert("RGB")))
    return torch.from_numpy(np.stack(out)).to(pixels.device).permute(0, 3, 1, 2).float() / 255

