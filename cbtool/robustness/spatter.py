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


# cv2.distanceTransform(DIST_L2, 5): chamfer steps of 1 (edge neighbours), 1.4 (corners) and
# 2.1969 (knight's moves) within a 5 x 5 mask.
_CHAMFER_5 = [(dy, dx, 1.0) for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0))]
_CHAMFER_5 += [(dy, dx, 1.4) for dy in (1, -1) for dx in (1, -1)]
_CHAMFER_5 += [(dy, dx, 2.1969) for dy, dx in ((1, 2), (2, 1), (1, -2), (2, -1), (-1, 2), (-2, 1), (-1, -2), (-2, -1))]


def distance_to(edges: torch.Tensor, limit: float) -> torch.Tensor:
    """Distance of every pixel to the nearest edge pixel in OpenCV's 5 x 5 chamfer metric, truncated at
    ``limit`` (cv2.distanceTransform(..., DIST_L2, 5), then cv2.threshold(..., THRESH_TRUNC)). Every step
    costs at least 1, so ``ceil(limit)`` rounds of relaxation settle all distances up to the limit."""
    height, width = edges.shape[-2:]
    far = float(limit) + 3.0  # anything beyond the limit is truncated anyway
    distance = (~edges).float() * far
    for _ in range(math.ceil(limit)):
        padded = F.pad(distance, (2, 2, 2, 2), value=far)
        relaxed = distance
        for dy, dx, step in _CHAMFER_5:
            relaxed = torch.minimum(relaxed, padded[..., 2 + dy : 2 + dy + height, 2 + dx : 2 + dx + width] + step)
        if torch.equal(relaxed, distance):
            break
        distance = relaxed
    return distance.clamp(max=limit)


def equalize_hist(image: torch.Tensor) -> torch.Tensor:
    """cv2.equalizeHist for each (1, H, W) image of 8-bit values in a batch."""
    batch = image.shape[0]
    levels = image.reshape(batch, -1).long()
    offsets = 256 * torch.arange(batch, device=image.device)[:, None]
    counts = torch.bincount((levels + offsets).reshape(-1), minlength=256 * batch).reshape(batch, 256).float()
    cumulative = counts.cumsum(dim=1)  # exact in float32 below 2**24 pixels
    first = (counts > 0).float().argmax(dim=1, keepdim=True)  # the darkest level present maps to 0
    below = cumulative.gather(1, first)
    spread = levels.shape[1] - below  # pixels above the darkest level
    lut = torch.round((cumulative - below) * 255 / spread.clamp(min=1)).clamp(0, 255)
    lut = torch.where(spread > 0, lut, first.float())  # a flat image keeps its level
    return lut.gather(1, levels).reshape(image.shape).to(image.dtype)


def _water(x: torch.Tensor, liquid: torch.Tensor, strength: float, scale: float) -> torch.Tensor:
    """Pale turquoise drops whose rims are lit by an emboss of the distance to their edges."""
    liquid = torch.floor(liquid * 255).clamp(0, 255)  # (liquid * 255).astype(np.uint8)
    dist = distance_to(canny(liquid, 50, 150), 20 * scale)
    dist = torch.floor(_ops.conv2d_same(dist, _BOX3))
    dist = torch.round(_ops.conv2d_same(equalize_hist(dist), _EMBOSS)).clamp(0, 255)  # CV_8U output
    mask = liquid * torch.round(_ops.conv2d_same(dist, _BOX3))  # cv2.blur of an 8-bit image rounds
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
