"""The corruption library: names and parsers, shapes and ranges, per-sample determinism, bad input,
CE/mCE, and agreement with imagecorruptions on real photos (skipped when it is not installed)."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from cbtool.errors import CbtoolError
from cbtool.robustness import (
    ALEXNET_CLEAN_ERROR,
    ALEXNET_ERRORS,
    COMMON,
    CORRUPTIONS,
    CorruptionError,
    corrupt,
    corrupt_normalized,
    parse_corruptions,
    parse_severities,
    summarize,
)
from cbtool.robustness.mce import corruption_error, relative_corruption_error

from corruption_reference import RecordingRNG, load_imagecorruptions, photos, reference_corrupt, replaying

REPO_ROOT = Path(__file__).resolve().parents[1]

DETERMINISTIC = {"defocus_blur", "zoom_blur", "brightness", "contrast", "pixelate", "jpeg_compression",
                 "gaussian_blur", "saturate"}  # fmt: skip


@pytest.fixture(scope="module")
def fashion() -> torch.Tensor:
    """(4, 3, 224, 224) real images: three Fashion-MNIST garments as the R, G, B planes, upsampled."""
    import importlib.resources

    with importlib.resources.files("cbtool.data").joinpath("sample", "fashion_mnist_sample.npz").open("rb") as f:
        planes = np.load(f)["test_images"][:12]
    images = torch.from_numpy(planes).float().reshape(4, 3, 28, 28) / 255
    return torch.nn.functional.interpolate(images, size=(224, 224), mode="bilinear", align_corners=False)


# --- names and parsers ------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "text, expected",
    [
        ("all", CORRUPTIONS),
        ("common", COMMON),
        ("noise", ("gaussian_noise", "shot_noise", "impulse_noise")),
        ("fog,noise", ("gaussian_noise", "shot_noise", "impulse_noise", "fog")),
        (" Saturate , fog,fog", ("fog", "saturate")),
        ("extra", ("speckle_noise", "gaussian_blur", "spatter", "saturate")),
    ],
)
def test_parse_corruptions(text, expected):
    assert parse_corruptions(text) == expected


@pytest.mark.parametrize("text, fragment", [("gausian_noise", "valid: gaussian_noise, shot_noise"),
                                            ("", "no corruption"), ("fog,,snow", "empty name")])  # fmt: skip
def test_parse_corruptions_rejects(text, fragment):
    with pytest.raises(CorruptionError, match=fragment) as error:
        parse_corruptions(text)
    assert isinstance(error.value, CbtoolError) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "text, expected", [("1-5", (1, 2, 3, 4, 5)), ("3", (3,)), ("1,3,5", (1, 3, 5)), ("5,1-2", (1, 2, 5))]
)
def test_parse_severities(text, expected):
    assert parse_severities(text) == expected


@pytest.mark.parametrize("text", ["0", "6", "1-6", "5-1", "a", "", "2.5"])
def test_parse_severities_rejects(text):
    with pytest.raises(CorruptionError) as error:
        parse_severities(text)
    assert "\n" not in str(error.value)


def test_every_name_has_its_function():
    from cbtool.robustness.corruptions import FUNCTIONS

    assert tuple(FUNCTIONS) == CORRUPTIONS and all(FUNCTIONS[name].__name__ == name for name in CORRUPTIONS)


def test_names_and_metrics_import_without_torch():
    code = "import sys, cbtool.robustness as r; r.summarize; assert 'torch' not in sys.modules, 'torch imported'"
    subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, check=True)


# --- corrupt(): shapes, ranges, determinism, bad input -------------------------------------------------


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_shapes_range_and_dtype(name, fashion):
    for severity in (1, 3, 5):
        out = corrupt(fashion[:2], name, severity, [0, 1])
        assert out.shape == (2, 3, 224, 224) and out.dtype == torch.float32
        assert 0 <= out.min() and out.max() <= 1 and not torch.equal(out, fashion[:2])
    # Other sizes scale the pixel-sized parameters; other float dtypes come back as they went in.
    small = corrupt(fashion[:2, :, :64, :96].double(), name, 5, [0, 1])
    assert small.shape == (2, 3, 64, 96) and small.dtype == torch.float64 and 0 <= small.min() <= small.max() <= 1


@pytest.mark.parametrize("name", CORRUPTIONS)
def test_same_key_same_pixels_at_any_batch_size(name, fashion):
    keys = [11, 12, 13, 14]
    batch = corrupt(fashion, name, 3, keys)
    singles = torch.cat([corrupt(fashion[i : i + 1], name, 3, [key]) for i, key in enumerate(keys)])
    reordered = corrupt(fashion[[2, 0]], name, 3, torch.tensor([13, 11]))
    assert torch.equal(batch, singles) and torch.equal(reordered, batch[[2, 0]])
    assert torch.equal(corrupt(fashion, name, 3, keys), batch)  # run to run
    if name not in DETERMINISTIC:
        assert not torch.equal(corrupt(fashion, name, 3, [21, 22, 23, 24]), batch)
        assert not torch.equal(corrupt(fashion, name, 3, keys, seed=1), batch)


def test_normalized_batches_and_numpy_keys(fashion):
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    m, s = torch.tensor(mean)[None, :, None, None], torch.tensor(std)[None, :, None, None]
    out = corrupt_normalized((fashion - m) / s, "snow", 2, np.arange(4), mean, std, jpeg_quality=None)
    torch.testing.assert_close(out * s + m, corrupt(fashion, "snow", 2, [0, 1, 2, 3], jpeg_quality=None), rtol=0, atol=1e-5)


def test_glass_blur_scrambles_like_the_reference_loop():
    """The batched pointer jumping gives what the reference's sequential numpy loop gives, view
    semantics included (its "swap" of two views copies one pixel over the other)."""
    from cbtool.robustness.blur import _glass_sources

    size, delta, iterations = 12, 2, 3
    visits = (size - 2 * delta) ** 2
    offsets = torch.randint(-delta, delta, (2, iterations, visits, 2), generator=torch.Generator().manual_seed(0))
    for sample in range(2):
        x = np.arange(size * size).reshape(size, size, 1)
        steps = iter(offsets[sample].reshape(-1, 2).tolist())
        for _ in range(iterations):  # make_imagenet_c.py's glass_blur loop
            for h in range(size - delta, delta, -1):
                for w in range(size - delta, delta, -1):
                    dx, dy = next(steps)
                    h_prime, w_prime = h + dy, w + dx
                    x[h, w], x[h_prime, w_prime] = x[h_prime, w_prime], x[h, w]
        assert _glass_sources(size, size, delta, offsets)[sample].tolist() == x.reshape(-1).tolist()


@pytest.mark.skipif(importlib.util.find_spec("cv2") is None, reason="OpenCV (pip install .[test]) missing")
def test_spatter_rims_follow_opencv():
    """Spatter's water drops: Canny, the chamfer distance transform and histogram equalisation give what
    OpenCV gives on a spatter-like liquid layer."""
    import cv2

    from cbtool.robustness import _ops, spatter

    rng = _ops.SampleRNG(range(3), "test", torch.device("cpu"))
    liquid = _ops.gaussian(rng.normal((1, 96, 96), 0.65, 0.3), 2)
    layer = torch.floor(torch.where(liquid < 0.68, 0, liquid) * 255)
    edges = spatter.canny(layer, 50, 150)
    distance = spatter.distance_to(edges, 20)
    equalized = spatter.equalize_hist(torch.floor(distance))
    for i, image in enumerate(layer[:, 0].numpy().astype(np.uint8)):
        reference_edges = cv2.Canny(image, 50, 150)
        assert np.array_equal(edges[i, 0].numpy(), reference_edges > 0)
        reference_distance = np.minimum(cv2.distanceTransform(255 - reference_edges, cv2.DIST_L2, 5), 20)
        np.testing.assert_allclose(distance[i, 0].numpy(), reference_distance, atol=1e-5)
        reference_equalized = cv2.equalizeHist(np.floor(distance[i, 0].numpy()).astype(np.uint8))
        assert np.array_equal(equalized[i, 0].numpy().astype(np.uint8), reference_equalized)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (("fgsm", 3), "unknown corruption 'fgsm'; valid: gaussian_noise, shot_noise"),
        (("fog", 0), "severity must be an integer from 1 to 5, got 0"),
        (("fog", 6), "got 6"),
        (("fog", "3"), "got '3'"),
        (("fog", True), "got True"),
    ],
)
def test_corrupt_rejects_names_and_severities(args, fragment, fashion):
    with pytest.raises(CorruptionError, match=fragment) as error:
        corrupt(fashion[:1], *args, keys=[0])
    assert isinstance(error.value, CbtoolError) and "\n" not in str(error.value)


@pytest.mark.parametrize(
    "images, keys, fragment",
    [
        (torch.rand(3, 32, 32), [0], r"\(B, 3, H, W\)"),
        (torch.rand(1, 1, 32, 32), [0], r"\(B, 3, H, W\)"),
        (torch.zeros(1, 3, 32, 32, dtype=torch.uint8), [0], "float images"),
        (torch.rand(1, 3, 16, 64), [0], "at least 32"),
        (torch.rand(2, 3, 32, 32), [0], "one key per image"),
        (torch.rand(1, 3, 32, 32), [0.5], "integers"),
    ],
)
def test_corrupt_rejects_bad_batches(images, keys, fragment):
    with pytest.raises(CorruptionError, match=fragment):
        corrupt(images, "fog", 1, keys)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_stays_on_the_gpu(fashion):
    for name in CORRUPTIONS:
        out = corrupt(fashion[:2].cuda(), name, 3, [0, 1])
        assert out.is_cuda and torch.equal(out, corrupt(fashion[:2].cuda(), name, 3, [0, 1]))


# --- CE, mCE, relative mCE -----------------------------------------------------------------------------


def _table(errors: dict[str, float]) -> dict[str, dict[int, float]]:
    return {name: {s: value for s in range(1, 6)} for name, value in errors.items()}


def test_alexnet_scores_one():
    summary = summarize(_table(ALEXNET_ERRORS), clean_error=ALEXNET_CLEAN_ERROR)
    assert summary.complete and summary.mce == pytest.approx(1) and summary.relative_mce == pytest.approx(1)
    assert len(ALEXNET_ERRORS) == 15 and set(ALEXNET_ERRORS) == set(COMMON)


def test_ce_and_relative_ce_by_hand():
    errors = {1: 0.2, 2: 0.3, 3: 0.4, 4: 0.5, 5: 0.6}
    assert corruption_error(errors, 0.8) == pytest.approx(0.4 / 0.8)
    assert relative_corruption_error(errors, 0.1, 0.8, 0.4) == pytest.approx((0.4 - 0.1) / (0.8 - 0.4))
    summary = summarize({"fog": errors, "spatter": errors}, clean_error=0.1)
    assert summary.ce == {"fog": pytest.approx(0.4 / ALEXNET_ERRORS["fog"])}  # no AlexNet figure for spatter
    assert summary.mean_error == {"fog": pytest.approx(0.4), "spatter": pytest.approx(0.4)}
    assert summary.mce == summary.ce["fog"] and not summary.complete
    assert summarize({"fog": {str(s): e for s, e in errors.items()}}).ce == summary.ce  # JSON keys


@pytest.mark.parametrize(
    "table, fragment",
    [
        ({"fog": {1: 0.5, 2: 0.5}}, "needs severities 1-5 of fog; missing 3, 4, 5"),
        ({"fog": {s: 1.5 for s in range(1, 6)}}, "fraction from 0 to 1"),
        ({"fog": {s: 0.5 for s in range(0, 6)}}, "got 0"),
        ({"smog": {s: 0.5 for s in range(1, 6)}}, "unknown corruption 'smog'"),
    ],
)
def test_summarize_rejects(table, fragment):
    with pytest.raises(CorruptionError, match=fragment):
        summarize(table)


# --- agreement with imagecorruptions on real photos ----------------------------------------------------

imagecorruptions = load_imagecorruptions()
needs_reference = pytest.mark.skipif(imagecorruptions is None, reason="imagecorruptions (pip install .[test]) missing")


@pytest.fixture(scope="module")
def reference_photos() -> np.ndarray:
    return photos(224, count=4)


@needs_reference
@pytest.mark.parametrize("name", [name for name in CORRUPTIONS if name != "impulse_noise"])
def test_same_pixels_as_imagecorruptions(name, reference_photos):
    """Fed our random draws (replayed under its own parameters), the reference gives our pixels: after the
    reference's uint8 truncation, all but a few differ by at most one grey level. Frost allows for its
    textures, which cbtool ships re-encoded as JPEG."""
    from cbtool.robustness._ops import SampleRNG
    from cbtool.robustness.corruptions import FUNCTIONS

    photos_used, severities = (reference_photos[:1], (2, 3)) if name == "glass_blur" else (reference_photos[:2], range(1, 6))
    for severity in severities:  # glass: the reference takes ~0.5 s per image; 2 and 3 cover 1 and 3 passes
        for key, image in enumerate(photos_used):
            rng = RecordingRNG(SampleRNG([key], name, torch.device("cpu")), (3, 224, 224))
            x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255
            ours = FUNCTIONS[name](x, severity, rng, 1.0).clamp(0, 1)[0].permute(1, 2, 0).double().numpy()
            with replaying(rng.draws):
                reference = np.asarray(reference_corrupt(imagecorruptions, image, name, severity)) / 255.0
            difference = np.abs(np.floor(ours * 255 + 1e-3) - 255 * reference).mean()  # in grey levels
            assert difference < (3.5 if name == "frost" else 0.15), (severity, key, difference)


@needs_reference
def test_impulse_noise_as_strong_as_imagecorruptions(reference_photos):
    """scikit-image draws impulse noise from its own generator, which cannot be replayed: compare strength."""
    np.random.seed(0)
    clean = reference_photos / 255.0
    x = torch.from_numpy(reference_photos).permute(0, 3, 1, 2).float() / 255
    for severity in range(1, 6):
        reference = np.stack([reference_corrupt(imagecorruptions, image, "impulse_noise", severity)
                              for image in reference_photos]) / 255.0  # fmt: skip
        ours = corrupt(x, "impulse_noise", severity, range(4), jpeg_quality=None).permute(0, 2, 3, 1).double().numpy()
        assert np.abs(ours - clean).mean() == pytest.approx(np.abs(reference - clean).mean(), rel=0.05)


# --- sizes other than 224 px --------------------------------------------------------------------------


def mean_displacement(size: int, severity: int) -> float:
    """Mean displacement of ``elastic_transform`` as a fraction of the side, read from the pixels: the image is its
    own coordinates (red = column, green = row, both 0-1), which bilinear sampling reproduces exactly, so each output
    pixel says where it came from. The outer eighth is left out (the reflecting borders fold coordinates back)."""
    from cbtool.robustness._ops import SampleRNG, size_scale
    from cbtool.robustness.corruptions import FUNCTIONS

    cols = torch.linspace(0, 1, size).view(1, size).expand(size, size)
    rows = torch.linspace(0, 1, size).view(size, 1).expand(size, size)
    x = torch.stack([cols, rows, torch.full_like(cols, 0.5)])[None].repeat(4, 1, 1, 1)
    rng = SampleRNG(range(4), f"elastic_transform/{severity}", torch.device("cpu"))
    out = FUNCTIONS["elastic_transform"](x, severity, rng, size_scale(size, size))
    margin = size // 8
    moved = (out[:, :2] - x[:, :2]).square().sum(1).sqrt()[:, margin:-margin, margin:-margin]
    return moved.mean().item()


@pytest.mark.parametrize("severity", [1, 3, 5])
def test_elastic_displacement_is_a_fraction_of_the_image(severity):
    """docs/robustness.md: pixel-sized parameters are a fixed fraction of the image. Before, severity 5 moved pixels
    9.5% of the side at 32 px and 1.75% at 224 px (a fixed number of pixels)."""
    reference = mean_displacement(224, severity)
    assert reference > 0.01  # the warp does move pixels
    for size in (32, 64, 448):
        assert mean_displacement(size, severity) == pytest.approx(reference, rel=0.06), size


# --- ImageNet-C's JPEG quality-85 files ------------------------------------------------------------------


@pytest.mark.parametrize("name", ["gaussian_noise", "fog", "jpeg_compression"])
def test_corrupted_images_are_saved_as_jpeg_85_by_default(name, fashion):
    """As make_imagenet_c.py saved its files: ``Image.fromarray(np.uint8(255 * x)).save(f, quality=85,
    optimize=True)``, read back. ``jpeg_quality=None`` leaves the corruption's own pixels."""
    import io

    from PIL import Image

    raw = corrupt(fashion[:2], name, 3, [5, 6], jpeg_quality=None)
    expected = []
    for image in raw.permute(0, 2, 3, 1).double().numpy():
        buffer = io.BytesIO()
        Image.fromarray(np.uint8(image * 255 + 1e-4)).save(buffer, "JPEG", quality=85, optimize=True)
        expected.append(np.asarray(Image.open(buffer).convert("RGB")) / 255.0)
    default = corrupt(fashion[:2], name, 3, [5, 6])
    assert torch.equal(default, corrupt(fashion[:2], name, 3, [5, 6], jpeg_quality=85))
    np.testing.assert_allclose(default.permute(0, 2, 3, 1).double().numpy(), np.stack(expected), atol=1e-6)
    assert (default - raw).abs().mean() > 1 / 255  # re-encoding changes the pixels


@pytest.mark.parametrize("quality", [0, 96, 85.0, True, "85"])
def test_bad_jpeg_quality_is_refused(quality, fashion):
    with pytest.raises(CorruptionError, match="jpeg_quality"):
        corrupt(fashion[:1], "fog", 1, [0], jpeg_quality=quality)
