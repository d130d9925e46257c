"""``corrupt``: apply one of the 19 ImageNet-C corruptions to a batch, reproducibly per sample.

Apply it to the image at the model's input size, after resize and crop and before normalisation.
Random draws come from a stream seeded by (seed, corruption, severity, the sample's key), so an image
with the same key gets the same pixels on every run, rank and batch size (on a given device type:
CPU and CUDA generators give different streams).

By default the corrupted image is then saved and read back as JPEG at quality 85, as ImageNet-C's files were
(make_imagenet_c.py: ``Image.fromarray(np.uint8(x)).save(path, quality=85, optimize=True)``), so that errors are
comparable with numbers published on those files; ``jpeg_quality=None`` skips it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Sequence

import torch

from cbtool.robustness import blur, digital, noise, spatter, weather
from cbtool.robustness._ops import SampleRNG, jpeg_round_trip, size_scale
from cbtool.robustness.registry import (
    JPEG_QUALITY,
    CorruptionError,
    check_corruption,
    check_jpeg_quality,
    check_severity,
)

Corruption = Callable[[torch.Tensor, int, SampleRNG, float], torch.Tensor]

FUNCTIONS: dict[str, Corruption] = {
    "gaussian_noise": noise.gaussian_noise,
    "shot_noise": noise.shot_noise,
    "impulse_noise": noise.impulse_noise,
    "defocus_blur": blur.defocus_blur,
    "glass_blur": blur.glass_blur,
    "motion_blur": blur.motion_blur,
    "zoom_blur": blur.zoom_blur,
    "snow": weather.snow,
    "frost": weather.frost,
    "fog": weather.fog,
    "brightness": digital.brightness,
    "contrast": digital.contrast,
    "elastic_transform": digital.elastic_transform,
    "pixelate": digital.pixelate,
    "jpeg_compression": digital.jpeg_compression,
    "speckle_noise": noise.speckle_noise,
    "gaussian_blur": blur.gaussian_blur,
    "spatter": spatter.spatter,
    "saturate": digital.saturate,
}

MIN_SIDE = 32  # imagecorruptions' limit too: smaller images leave some corruptions nothing to work with


def _keys(keys: Sequence[int] | torch.Tensor, batch: int) -> list[int]:
    """One Python int per image (numpy and tensor integers accepted), or CorruptionError."""
    values = keys.detach().reshape(-1).tolist() if isinstance(keys, torch.Tensor) else list(keys)
    if len(values) != batch:
        raise CorruptionError(f"need one key per image: got {len(values)} keys for {batch} images")
    try:
        if any(isinstance(value, bool) for value in values):
            raise TypeError
        return [operator.index(value) for value in values]
    except TypeError:
        raise CorruptionError("sample keys must be integers (e.g. dataset indices)") from None


def _check_images(images: torch.Tensor) -> None:
    """Raise CorruptionError unless ``images`` is a float (B, 3, H, W) batch of at least 32 x 32."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise CorruptionError(f"corrupt() takes RGB batches shaped (B, 3, H, W), got {shape}")
    if not images.is_floating_point():
        raise CorruptionError(f"corrupt() takes float images in [0, 1], got {images.dtype}")
    if min(images.shape[-2:]) < MIN_SIDE:
        raise CorruptionError(f"images must be at least {MIN_SIDE} x {MIN_SIDE} pixels, got {tuple(images.shape[-2:])}")


def save_as_jpeg(images: torch.Tensor, quality: int) -> torch.Tensor:
    """ImageNet-C's last step: truncate to 8 bits as ``np.uint8`` does, save as JPEG at ``quality``, read back.
    (The 1e-4 keeps float32 rounding just below an integer from dropping a grey level.)"""
    pixels = torch.floor(images.clamp(0, 1) * 255 + 1e-4).clamp_(0, 255).to(torch.uint8)
    return jpeg_round_trip(pixels, quality, optimize=True)


def corrupt(
    images: torch.Tensor,
    name: str,
    severity: int,
    keys: Sequence[int] | torch.Tensor,
    seed: int = 0,
    jpeg_quality: int | None = JPEG_QUALITY,
) -> torch.Tensor:
    """Return ``images`` (B, 3, H, W), floats in [0, 1], with corruption ``name`` at ``severity``
    (1-5), on the same device and dtype. ``keys`` holds one integer per image that identifies the
    sample (a dataset index), ``seed`` varies all draws at once. Pixel-sized parameters are those of
    ImageNet-C at 224 x 224 and are the same fraction of the image at other sizes. The result is saved
    and read back as JPEG at ``jpeg_quality`` (85, as ImageNet-C's files; ``None``: not re-encoded)."""
    check_corruption(name)
    check_severity(severity)
    check_jpeg_quality(jpeg_quality)
    _check_images(images)
    sample_keys = _keys(keys, images.shape[0])
    if not sample_keys:
        return images.clone()
    rng = SampleRNG(sample_keys, f"{name}/{severity}", images.device, seed)
    scale = size_scale(*images.shape[-2:])
    with torch.no_grad():
        out = FUNCTIONS[name](images.detach().float().clamp(0, 1), severity, rng, scale).clamp_(0, 1)
        if jpeg_quality is not None:
            out = save_as_jpeg(out, jpeg_quality)
    return out.to(images.dtype)


def corrupt_normalized(
    images: torch.Tensor,
    name: str,
    severity: int,
    keys: Sequence[int] | torch.Tensor,
    mean: Sequence[float],
    std: Sequence[float],
    seed: int = 0,
    jpeg_quality: int | None = JPEG_QUALITY,
) -> torch.Tensor:
    """``corrupt`` for batches already normalised with ``mean`` and ``std`` (per channel), as data
    loaders with timm transforms produce them: undo the normalisation, corrupt, normalise again."""
    _check_images(images)
    shape = (1, -1, 1, 1)
    mean_t = torch.as_tensor(mean, device=images.device, dtype=torch.float32).reshape(shape)
    std_t = torch.as_tensor(std, device=images.device, dtype=torch.float32).reshape(shape)
    pixels = images.detach().float() * std_t + mean_t
    corrupted = corrupt(pixels, name, severity, keys, seed, jpeg_quality=jpeg_quality)
    return ((corrupted - mean_t) / std_t).to(images.dtype)
