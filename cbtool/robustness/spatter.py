"""Spatter: water drops (severities 1-3) or mud (4-5) on the lens, with Hendrycks & Dietterich's
parameters. The water drops' rims follow the reference's OpenCV chain (Canny edges, a distance
transform truncated at 20 px, histogram equalisation and an emboss filter), rebuilt in torch; the
blob sigmas (with the noise they smooth) and the 20 px truncation scale with the image, the 3 x 3
filters do not.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from cbtool.robustness import _ops
from cbtool.robustness._ops import SampleRNG

_BOX3 = torch.full((3, 3), 1 / 9)
_EMBOSS = torch.tensor([[-2.0, -1.0, 0.0], [-1.0, 1.0, 1.0], [0.0, 1.0, 2.0]])
_SOBEL_X = torch.tensor([[-1.0, 0.0, 1.0], [-2.0, 0.0, 2.0], [-1.0, 0.0, 1.0]])
_TAN_22_5 = math.tan(math.radians(22.5))


def canny(image: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """cv2.Canny(image, low, high) on (B, 1, H, W) 8-bit values: L1 gradient magnitude, non-maximum
    suppression in four directions, hysteresis with 8-connectivity. Returns a bool edge map."""
    padded = F.pad(image, (1, 1, 1, 1), mode="replicate")
    gx = F.conv2d(padded, _SOBEL_X.to(image)[None, None])
    gy = F.conv2d(padded, _SOBEL_X.T.to(image)[None, None])
    magnitude = gx.abs() + gy.abs()
    around = F.pad(magnitude, (1, 1, 1, 1))  # zero outside, as OpenCV's magnitude buffer

    def neighbour(dy: int, dx: int) -> torch.Tensor:
        height, width = magnitude.shape[-2:]
        return around[..., 1 + dy : 1 + dy + height, 1 + dx : 1 + dx + width]

    tg22 = gx.abs() * _TAN_22_5
    horizontal = gy.abs() < tg22
    vertical = ~horizontal & (gy.abs() > tg22 + 2 * gx.abs())
    same_sign = (gx * gy) >= 0  # OpenCV: s = (dx ^ dy) < 0 ? -1 : 1
    diagonal_a = torch.where(same_sign, neighbour(-1, -1), neighbour(-1, 1))
    diagonal_b = torch.where(same_sign, neighbour(1, 1), neighbour(1, -1))
    peak = torch.where(
        horizontal,
        (magnitude > neighbour(0, -1)) & (magnitude >= neighbour(0, 1)),
        torch.where(
            vertical,
            (magnitude > neighbour(-1, 0)) & (magnitude >= neighbour(1, 0)),
            (magnitude > diagonal_a) & (magnitude > diagonal_b),
        ),
    )
    weak = peak & (magnitude > low)
    edges = weak & (magnitude > high)
    while True:
        grown = weak & (F.max_pool2d(edges.float(), 3, stride=1, padding=1) > 0)
        if torch.equal(grown, edges):
            return edges
        edges = grown


def distance_to(edges: torch.Tensor, limit: float) -> torch.Tensor:
    """Euclidean distance of every pixel to the nearest edge pixel, exact up to ``limit`` and
    truncated there (cv2.distanceTransform, then cv2.threshold(..., THRESH_TRUNC))."""
    height, width = edges.shape[-2:]
    rows = torch.arange(height, device=edges.device, dtype=torch.float32)[:, None].expand(height, width)
    far = torch.tensor(float(4 * (height + width)), device=edges.device)
    above = torch.where(edges, rows, -far).cummax(dim=-2).values
    below = torch.where(edges, rows, 2 * far).flip(-2).cummin(dim=-2).values.flip(-2)
    vertical = torch.minimum(rows - above, below - rows)
    reach = math.ceil(limit)
    padded = F.pad(vertical, (reach, reach), value=float(far))
    squared = torch.full_like(vertical, float(far) ** 2)
    for shift in range(-reach, reach + 1):
        column = padded[..., reach + shift : reach + shift + width]
        squared = torch.minimum(squared, column**2 + shift**2)
    return squared.sqrt().clamp(max=limit)


def equalize_hist(image: torch.Tensor) -> torch.Tensor:
    """cv2.equalizeHist for each (1, H, W) image of 8-bit values in a batch."""
    out = []
    for single in image:
        levels = single.long().reshape(-1)
        counts = torch.bincount(levels, minlength=256).float()  # exact below 2**24 pixels
        first = int(torch.nonzero(counts)[0])
        if counts[first] == levels.numel():
            out.append(torch.full_like(single, float(first)))
            continue
        cumulative = counts.cumsum(0) - counts.cumsum(0)[first]
        lut = torch.round(cumulative * 255 / (levels.numel() - counts[first])).clamp(0, 255)
        out.append(lut.to(single.dtype)[levels].reshape(single.shape))
    return torch.stack(out)


def _water(x: torch.Tensor, liquid: torch.Tensor, strength: float, scale: float) -> torch.Tensor:
    """Pale turquoise drops whose rims are lit by an emboss of the distance to their edges."""
    liquid = torch.floor(liquid * 255).clamp(0, 255)  # (liquid * 255).astype(np.uint8)
    dist = distance_to(canny(liquid, 50, 150), 20 * scale)
    dist = torch.floor(_ops.conv2d_same(dist, _BOX3))
    dist = torch.round(_ops.conv2d_same(equalize_hist(dist), _EMBOSS)).clamp(0, 255)  # CV_8U output
    mask = liquid * _ops.conv2d_same(dist, _BOX3)
    mask = mask / mask.amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-12) * strength
    color = torch.tensor([175 / 255, 238 / 255, 238 / 255], device=x.device, dtype=x.dtype)
    return x + mask * color[None, :, None, None]


def spatter(x: torch.Tensor, severity: int, rng: SampleRNG, scale: float) -> torch.Tensor:
    """Water drops (severities 1-3) or mud splashes (4-5) on the lens."""
    mean, std, sigma, threshold, strength, mud = (
        (0.65, 0.3, 4, 0.69, 0.6, False),
        (0.65, 0.3, 3, 0.68, 0.6, False),
        (0.65, 0.3, 2, 0.68, 0.5, False),
        (0.65, 0.3, 1, 0.65, 1.5, True),
        (0.67, 0.4, 1, 0.65, 1.5, True),
    )[severity - 1]
    height, width = x.shape[-2:]
    # Blurring white noise with a sigma s times larger divides its spread by s: scaling the noise by s
    # keeps the blobs' statistics, hence how many cross the threshold, at every size.
    liquid = _ops.gaussian(rng.normal((1, height, width), mean, std * scale), sigma * scale)
    liquid = torch.where(liquid < threshold, torch.zeros_like(liquid), liquid)
    if not mud:
        return _water(x, liquid, strength, scale)
    mask = _ops.gaussian((liquid > threshold).to(x.dtype), strength * scale)
    mask = torch.where(mask < 0.8, torch.zeros_like(mask), mask)
    color = torch.tensor([63 / 255, 42 / 255, 20 / 255], device=x.device, dtype=x.dtype)
    return x * (1 - mask) + mask * color[None, :, None, None]
