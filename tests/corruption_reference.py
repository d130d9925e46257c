"""The reference for tests/test_corruptions.py: imagecorruptions 1.1.2 (PyPI), made to run on today's
stack, and real RGB photos from scikit-image's bundled data.

imagecorruptions 1.1.2 imports ``pkg_resources`` (gone from setuptools >= 81), calls
``skimage.filters.gaussian(..., multichannel=True)`` (removed in scikit-image 0.21) and uses
``np.float_`` (removed in NumPy 2). The shims below live only in this helper and only touch the
imagecorruptions module's own globals.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import os
import sys
import types
from collections.abc import Iterator
from typing import Any

import numpy as np


class _NumpyCompat(types.ModuleType):
    """numpy, plus the aliases NumPy 2 removed."""

    float_ = np.float64

    def __getattr__(self, name: str) -> Any:
        return getattr(np, name)


def _resource_filename(package: str, path: str) -> str:
    return os.path.join(os.path.dirname(sys.modules[package].__file__), path)


def load_imagecorruptions() -> types.ModuleType | None:
    """The imagecorruptions package with the shims applied, or None when it (or OpenCV) is missing."""
    if importlib.util.find_spec("imagecorruptions") is None or importlib.util.find_spec("cv2") is None:
        return None
    shimmed = importlib.util.find_spec("pkg_resources") is None and "pkg_resources" not in sys.modules
    if shimmed:
        sys.modules["pkg_resources"] = types.SimpleNamespace(resource_filename=_resource_filename)
    try:
        module = importlib.import_module("imagecorruptions")
    finally:
        if shimmed:
            del sys.modules["pkg_resources"]
    from skimage.filters import gaussian

    def gaussian_compat(image: np.ndarray, *args: Any, multichannel: bool | None = None, **kwargs: Any) -> np.ndarray:
        if multichannel:
            kwargs["channel_axis"] = -1
        return gaussian(image, *args, **kwargs)

    module.corruptions.gaussian = gaussian_compat
    module.corruptions.np = _NumpyCompat("numpy")
    return module


def elastic_transform_imagenet_c(image: np.ndarray, severity: int) -> np.ndarray:
    """make_imagenet_c.py's elastic_transform (hendrycks/robustness, Apache-2.0), which made ImageNet-C;
    imagecorruptions replaced it with a different one. uint8 (H, W, 3) in, float 0-255 out."""
    import cv2
    from scipy.ndimage import map_coordinates
    from skimage.filters import gaussian

    c = [(244 * 2, 244 * 0.7, 244 * 0.1), (244 * 2, 244 * 0.08, 244 * 0.2), (244 * 0.05, 244 * 0.01, 244 * 0.02),
         (244 * 0.07, 244 * 0.01, 244 * 0.02), (244 * 0.12, 244 * 0.01, 244 * 0.02)][severity - 1]  # fmt: skip
    image = np.array(image, dtype=np.float32) / 255.0
    shape = image.shape
    shape_size = shape[:2]
    center_square = np.float32(shape_size) // 2
    square_size = min(shape_size) // 3
    pts1 = np.float32([center_square + square_size,
                       [center_square[0] + square_size, center_square[1] - square_size],
                       center_square - square_size])  # fmt: skip
    pts2 = pts1 + np.random.uniform(-c[2], c[2], size=pts1.shape).astype(np.float32)
    matrix = cv2.getAffineTransform(pts1, pts2)
    image = cv2.warpAffine(image, matrix, shape_size[::-1], borderMode=cv2.BORDER_REFLECT_101)
    dx = (gaussian(np.random.uniform(-1, 1, size=shape[:2]), c[1], mode="reflect", truncate=3) * c[0]).astype(np.float32)
    dy = (gaussian(np.random.uniform(-1, 1, size=shape[:2]), c[1], mode="reflect", truncate=3) * c[0]).astype(np.float32)
    dx, dy = dx[..., np.newaxis], dy[..., np.newaxis]
    x, y, z = np.meshgrid(np.arange(shape[1]), np.arange(shape[0]), np.arange(shape[2]))
    indices = np.reshape(y + dy, (-1, 1)), np.reshape(x + dx, (-1, 1)), np.reshape(z, (-1, 1))
    return np.clip(map_coordinates(image, indices, order=1, mode="reflect").reshape(shape), 0, 1) * 255


def reference_corrupt(module: types.ModuleType, image: np.ndarray, name: str, severity: int) -> np.ndarray:
    """One uint8 (H, W, 3) image corrupted by the reference implementation."""
    if name == "elastic_transform":
        return np.uint8(elastic_transform_imagenet_c(image, severity))
    return module.corrupt(image, corruption_name=name, severity=severity)


def photos(size: int = 224, count: int = 4) -> np.ndarray:
    """Real RGB photos from scikit-image's bundled data, resized (shorter side 256/224 * size) and
    centre-cropped like an eval transform: uint8 (count, size, size, 3)."""
    from PIL import Image
    from skimage import data

    out = []
    for load in (data.astronaut, data.coffee, data.chelsea, data.rocket, data.immunohistochemistry)[:count]:
        image = Image.fromarray(load()).convert("RGB")
        short = round(size * 256 / 224)
        ratio = short / min(image.size)
        image = image.resize((round(image.width * ratio), round(image.height * ratio)), Image.BICUBIC)
        left, top = (image.width - size) // 2, (image.height - size) // 2
        out.append(np.asarray(image.crop((left, top, left + size, top + size))))
    return np.stack(out)


class RecordingRNG:
    """Wraps a one-sample ``SampleRNG`` and keeps its draws in standard form (uniforms in [0, 1),
    normals with mean 0 and std 1, integers as offsets from ``low``), so the reference can replay them
    under its own parameters: a wrong parameter on either side still shows. Draws shaped like the
    image (3, H, W) are kept channels-last, the layout of the reference's arrays."""

    def __init__(self, rng: Any, image_shape: tuple[int, int, int]) -> None:
        self.rng, self.device, self.image_shape = rng, rng.device, tuple(image_shape)
        self.draws: dict[str, list[float]] = {"normal": [], "uniform": [], "randint": [], "poisson": []}

    def __len__(self) -> int:
        return len(self.rng)

    def _keep(self, kind: str, standard: Any) -> None:
        draw = standard[0]
        if tuple(draw.shape) == self.image_shape:
            draw = draw.permute(1, 2, 0)
        self.draws[kind].extend(draw.reshape(-1).tolist())

    def normal(self, shape: Any, mean: float = 0.0, std: float = 1.0) -> Any:
        out = self.rng.normal(shape, mean, std)
        self._keep("normal", (out - mean) / std)
        return out

    def uniform(self, shape: Any, low: float = 0.0, high: float = 1.0) -> Any:
        out = self.rng.uniform(shape, low, high)
        self._keep("uniform", (out - low) / (high - low))
        return out

    def randint(self, shape: Any, low: int, high: int) -> Any:
        out = self.rng.randint(shape, low, high)
        self._keep("randint", out - low)
        return out

    def poisson(self, rates: Any) -> Any:
        out = self.rng.poisson(rates)
        self._keep("poisson", out)
        return out


@contextlib.contextmanager
def replaying(draws: dict[str, list[float]]) -> Iterator[None]:
    """Make np.random's normal, uniform, poisson and randint hand out the recorded ``draws`` in order,
    under the caller's parameters (a numpy call takes as many values as its size asks for). randint
    falls back on uniform draws u, as ``low + int(u * (high - low))``, the way frost draws its integers."""
    queues = {kind: iter(values) for kind, values in draws.items()}

    def take(kind: str, size: Any) -> Any:
        if size is None:
            return next(queues[kind])
        return np.array([next(queues[kind]) for _ in range(int(np.prod(size)))]).reshape(size)

    def normal(loc: float = 0.0, scale: float = 1.0, size: Any = None) -> Any:
        return loc + scale * take("normal", size)

    def uniform(low: float = 0.0, high: float = 1.0, size: Any = None) -> Any:
        return low + (high - low) * take("uniform", size)

    def poisson(lam: Any = 1.0, size: Any = None) -> Any:
        return take("poisson", np.shape(lam))

    def randint(low: int, high: int | None = None, size: Any = None) -> Any:
        low, high = (0, low) if high is None else (low, high)
        if not draws["randint"]:
            return low + int(next(queues["uniform"]) * (high - low))
        offsets = np.asarray(take("randint", size), dtype=np.int64)
        if np.any(offsets >= high - low):
            raise AssertionError(f"recorded integers exceed the reference's range [{low}, {high})")
        return low + offsets

    saved = {name: getattr(np.random, name) for name in ("normal", "uniform", "poisson", "randint")}
    for name, function in (("normal", normal), ("uniform", uniform), ("poisson", poisson), ("randint", randint)):
        setattr(np.random, name, function)
    try:
        yield
    finally:
        for name, function in saved.items():
            setattr(np.random, name, function)
