"""Per-pixel noise: gaussian, shot, impulse and speckle noise (Hendrycks & Dietterich's parameters).

Noise is drawn independently per pixel, so it has no size-dependent parameter to rescale.
"""

from __future__ import annotations

import torch

from cbtool.robustness._ops import SampleRNG


def gaussian_noise(x: torch.Tensor, severity: int, rng: SampleRNG, scale: float) -> torch.Tensor:
    """Additive Gaussian noise."""
    std = (0.08, 0.12, 0.18, 0.26, 0.38)[severity - 1]
    return x + rng.normal(x.shape[1:], std=std)


def shot_noise(x: torch.Tensor, severity: int, rng: SampleRNG, scale: float) -> torch.Tensor:
    """Poisson (photon) noise: ``poisson(x * c) / c``."""
    photons = (60, 25, 12, 5, 3)[severity - 1]
    return rng.poisson(x * photons) / photons


def impulse_noise(x: torch.Tensor, severity: int, rng: SampleRNG, scale: float) -> torch.Tensor:
    """Salt-and-pepper noise on each channel value (skimage.util.random_noise, mode 's&p')."""
    amount = (0.03, 0.06, 0.09, 0.17, 0.27)[severity - 1]
    flipped = rng.uniform(x.shape[1:]) < amount
    salt = (rng.uniform(x.shape[1:]) < 0.5).to(x.dtype)
    return torch.where(flipped, salt, x)


def speckle_noise(x: torch.Tensor, severity: int, rng: SampleRNG, scale: float) -> torch.Tensor:
    """Multiplicative Gaussian noise."""
    std = (0.15, 0.2, 0.35, 0.45, 0.6)[severity - 1]
    return x + x * rng.normal(x.shape[1:], std=std)
