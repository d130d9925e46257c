"""The training data: the train split and a validation split that never is the test set unless asked."""

from __future__ import annotations

from typing import Any

from cbtool.errors import CbtoolError


def resolve_training_data(
    name: str,
    *,
    split: str | None = None,
    val_split: str | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
    limit: int | None = None,
    val_limit: int | None = None,
    num_model_classes: int | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    skip_bad_images: bool = False,
) -> tuple[Any, Any, str | None]:
    """(train, validation, note): the train split and its validation split, else ``val_fraction`` (default 0.1)
    of train held out; the test split only when ``val_split`` names it, so that choosing the best
    checkpoint never looks at the test set. The note says which, when it was not asked for."""
    from cbtool.data import resolve_dataset, split_validation
    from cbtool.data.dataset import apply_limit
    from cbtool.data.splits import canonical_split
    from cbtool.errors import DatasetError

    common = dict(image_column=image_column, label_column=label_column, num_model_classes=num_model_classes,
                  skip_bad_images=skip_bad_images)  # fmt: skip
    train = resolve_dataset(name, split, purpose="train", **common)
    if train.streaming:
        raise DatasetError("training needs a dataset with a length; drop --streaming")
    note = None
    others = [s for s in train.available_splits if s != train.split and canonical_split(s) == "validation"]
    if val_split is not None and val_fraction is not None:
        raise CbtoolError("give --val-split or --val-fraction, not both")
    if val_fraction is None and (val_split is not None or others):
        val = resolve_dataset(name, val_split, purpose="eval", **common)
        if val.split == train.split:
            raise CbtoolError(f"--val-split {val.split} is the training split; validate on another split or use --val-fraction")
    else:
        if val_fraction is None:
            val_fraction = 0.1
            note = (f"'{name}' has no validation split: holding out 10% of {train.split or 'it'} for validation "
                    "(--val-fraction; --val-split test would select checkpoints on the test set)")  # fmt: skip
        train, val = split_validation(train, val_fraction, seed)
    if train.class_subset is not None or val.class_subset is not None:
        raise DatasetError(f"'{name}' is a subset of ImageNet's classes; give the model its own head with --num-classes")
    if val.num_classes != train.num_classes:
        raise DatasetError(f"the validation split has {val.num_classes} classes but the training split {train.num_classes}")
    return apply_limit(train, limit), apply_limit(val, val_limit), note


def describe(data) -> dict | None:
    """What the run trained or validated on, for the log and the training record."""
    if data is None:
        return None
    resolved = getattr(data, "resolved", None)
    if resolved is None:
        return {"num_samples": len(data)}
    full = resolved.describe()
    return {key: full.get(key) for key in ("name", "split", "num_samples", "num_classes", "samples_sha256", "holdout") if key in full}
