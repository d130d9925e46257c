"""Whether AlexNet's ImageNet-C errors can normalise a run's errors (CE, mCE): decided from the results' ``dataset``
record, as ``cbtool eval`` writes it (docs/results-schema.md). Pure Python, no torch.

AlexNet's figures are top-1 errors over ImageNet-1k validation images in the 1,000-class label space. A CE is a
ratio of two error rates, so it means "% of AlexNet's" only when both were measured on the same kind of images
with the same label space: a 10-class set, a 200-class subset (ImageNet-A/R), ImageNet-V2 or training images are
not comparable, and a ratio against AlexNet there is a number whose name says something it is not.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

IMAGENET_CLASSES = 1000
IMAGENET_VAL_IMAGES = 50_000
# What --dataset names the Hub's ImageNet-1k as (the alias and the repository it stands for).
IMAGENET_NAMES = ("imagenet-1k", "ILSVRC/imagenet-1k")
VALIDATION_SPLITS = ("validation", "val")


def alexnet_comparability(dataset: Mapping[str, Any] | None) -> str | None:
    """``None`` when the evaluated images are ImageNet-1k validation in the 1,000-class label space (AlexNet's CE
    denominators apply), else the reason why not, one sentence."""
    if not isinstance(dataset, Mapping):
        return "the results do not say which dataset was evaluated, so AlexNet's ImageNet-1k errors cannot apply"
    name, classes = dataset.get("name"), dataset.get("num_classes")
    subset = dataset.get("class_subset")
    if subset:
        return (f"'{name}' is scored in a {len(subset)}-class subset of ImageNet-1k; AlexNet's errors are over all "
                f"{IMAGENET_CLASSES:,} classes")
    if classes != IMAGENET_CLASSES:
        return f"'{name}' has {classes} classes, not ImageNet-1k's {IMAGENET_CLASSES:,}; AlexNet's errors do not apply"
    split = dataset.get("split")
    if name in IMAGENET_NAMES:
        if split not in VALIDATION_SPLITS:
            return f"split {split!r} of ImageNet-1k, not its validation images (AlexNet's errors are on validation)"
        return None
    # A folder or saved set in the 1,000-class space: ImageNet-1k validation has 50,000 images (V2 has 10,000,
    # the training set 1.28 M). Under --limit only the source's size (``source_images``, passed by the eval
    # pipeline, not stored) tells; without it cbtool cannot tell which images these are.
    total = (dataset.get("num_samples") or 0) + (dataset.get("bad_images") or 0)
    if dataset.get("limit") is None and total == IMAGENET_VAL_IMAGES:
        return None
    if dataset.get("limit") is not None and dataset.get("source_images") == IMAGENET_VAL_IMAGES:
        return None
    what = f"{total:,} images" if dataset.get("limit") is None else f"--limit {dataset.get('limit')}"
    return (f"'{name}' is in ImageNet-1k's label space but cbtool cannot tell it is ImageNet-1k validation "
            f"({IMAGENET_VAL_IMAGES:,} images; this run: {what}); AlexNet's errors may not apply")


def sample_note(dataset: Mapping[str, Any]) -> str | None:
    """For comparable runs on part of ImageNet-1k validation (``--limit``): how many images, else ``None``."""
    limit, evaluated = dataset.get("limit"), dataset.get("num_samples")
    if limit is None or evaluated is None or evaluated >= IMAGENET_VAL_IMAGES:
        return None
    return (f"on {evaluated:,} of ImageNet-1k's {IMAGENET_VAL_IMAGES:,} validation images (--limit {limit}): "
            "an estimate of the published figure")
