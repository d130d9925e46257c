"""The robustness record's averages mean what their names say: CE and mCE (in % of AlexNet's) only on ImageNet-1k
validation in the 1,000-class space, the mean corruption error in points everywhere, every average naming the
corruptions it covers, and older files read back the same way. Pure Python, no torch."""

from __future__ import annotations

import random

import pytest

from cbtool.robustness import COMMON, CORRUPTIONS, summarize
from cbtool.robustness.baseline import alexnet_comparability
from cbtool.robustness.record import add_relative_to_first, robustness_record, upgrade_record
from cbtool.robustness.render import robustness_table, robustness_title

VAL = {"name": "imagenet-1k", "kind": "hub", "split": "validation", "num_samples": 50_000, "limit": None,
       "num_classes": 1000, "class_subset": None, "bad_images": 0}


@pytest.mark.parametrize(
    "change, reason",
    [
        ({}, None),
        ({"name": "ILSVRC/imagenet-1k"}, None),
        ({"limit": 1000, "num_samples": 1000}, None),  # part of the validation images, all 1,000 classes
        ({"kind": "folder", "name": "/data/imagenet/val"}, None),  # 50,000 images in the 1,000-class space
        ({"kind": "folder", "name": "/data/imagenet/val", "num_samples": 49_990, "bad_images": 10}, None),
        ({"split": "train"}, "split 'train' of ImageNet-1k, not its validation images"),
        ({"name": "sample", "kind": "sample", "split": "test", "num_classes": 10}, "'sample' has 10 classes"),
        ({"name": "imagenet-r", "num_classes": 200, "class_subset": list(range(0, 1000, 5))},
         "200-class subset of ImageNet-1k"),
        ({"kind": "folder", "name": "v2", "num_samples": 10_000}, "cannot tell it is ImageNet-1k validation"),
        ({"kind": "folder", "name": "val", "limit": 500, "num_samples": 500}, "this run: --limit 500"),
        ({"kind": "folder", "name": "val", "limit": 500, "num_samples": 500, "source_images": 50_000}, None),
        ({"kind": "folder", "name": "v2", "limit": 500, "num_samples": 500, "source_images": 10_000}, "--limit 500"),
    ],
)
def test_alexnet_applies_only_to_imagenet_validation(change, reason):
    found = alexnet_comparability({**VAL, **change})
    assert found is None if reason is None else reason in found


def cells(seed: int, clean: float = 80.0) -> dict:
    rng = random.Random(seed)
    return {c: {s: {"top1": clean - 8 * s - rng.uniform(0, 5), "correct": None} for s in range(1, 6)}
            for c in CORRUPTIONS}


def test_all_19_on_imagenet_validation():
    """mCE averages the 15 with an AlexNet figure, the mean corruption error all 19: each says so, in the record and
    the table, and the mCE is summarize's to the last digit (the arithmetic did not change)."""
    record = robustness_record(cells(0), 80.0, CORRUPTIONS, [1, 2, 3, 4, 5], dataset=VAL)
    error = {c: {s: (100 - cells(0)[c][s]["top1"]) / 100 for s in range(1, 6)} for c in CORRUPTIONS}
    summary = summarize(error, clean_error=0.2)
    assert record["mce"] == pytest.approx(100 * summary.mce, rel=1e-13)
    assert record["relative_mce"] == pytest.approx(100 * summary.relative_mce, rel=1e-13)
    assert record["mce_over"] == list(COMMON) and record["mean_corruption_error_over"] == list(CORRUPTIONS)
    assert record["mean_corruption_error"] == pytest.approx(sum(record["mean_error"].values()) / 19)
    assert record["complete"] is True and record["incomplete_reason"] is None and record["jpeg_quality"] == 85
    models = [{"label": "m", "robustness": record}]
    table = robustness_table(models)
    assert robustness_title(models) == "Top-1 error (%) under corruptions; CE and mCE in % of AlexNet's"
    assert "mCE over 15 corruptions" in table and "mean of 19 corruptions" in table and "complete: false" not in table
    assert f"{record['mce']:.2f}" in table.split("mCE over 15 corruptions")[1].splitlines()[0]


def test_limit_on_validation_keeps_the_mce_but_not_complete():
    dataset = {**VAL, "limit": 1000, "num_samples": 1000}
    record = robustness_record(cells(0), 80.0, CORRUPTIONS, [1, 2, 3, 4, 5], dataset=dataset)
    assert record["mce"] is not None and record["complete"] is False
    assert record["incomplete_reason"].startswith("on 1,000 of ImageNet-1k's 50,000 validation images")


def test_other_datasets_get_points_and_the_first_model_not_alexnet():
    dataset = {**VAL, "name": "sample", "kind": "sample", "split": "test", "num_classes": 10}
    records = [robustness_record(cells(seed), 80.0, CORRUPTIONS, [1, 2, 3, 4, 5], dataset=dataset,
                                 jpeg_quality=None) for seed in (0, 1)]
    add_relative_to_first(records, ["plain", "cb"])
    for record in records:
        assert record["mce"] is None and record["ce"] == {} and record["relative_mce"] is None
        assert record["complete"] is False and "'sample' has 10 classes" in record["incomplete_reason"]
    second = records[1]["relative_to_first"]
    assert second["mean_over"] == list(CORRUPTIONS)
    assert second["mean"] == pytest.approx(sum(second["ce"].values()) / 19)
    models = [{"label": "plain", "robustness": records[0]}, {"label": "cb", "robustness": records[1]}]
    table = robustness_table(models)
    header = table.splitlines()[0].split()
    assert "CE" not in header and "rel" not in header and header[-2:] == ["vs", "first"]
    assert "AlexNet" not in robustness_title(models) and "not re-encoded as JPEG" in table
    assert "mean of 19 corruptions" in table and f"{second['mean']:.2f}" in table


def test_upgrading_an_imagenet_record_keeps_its_numbers():
    new = robustness_record(cells(0), 80.0, CORRUPTIONS, [1, 2, 3, 4, 5], dataset=VAL)
    add_relative_to_first([new], ["m"])
    old = {k: v for k, v in new.items() if k not in ("mce_over", "mean_corruption_error", "jpeg_quality",
                                                      "mean_corruption_error_over", "incomplete_reason")}
    old["relative_to_first"] = {"reference": "m", "ce": new["relative_to_first"]["ce"], "mce": 100.0}
    upgraded = upgrade_record(old, VAL)
    assert upgraded["mce"] == new["mce"] and upgraded["ce"] == new["ce"] and upgraded["jpeg_quality"] is None
    assert upgraded["relative_to_first"]["mean"] == 100.0 and upgraded["relative_to_first"]["mean_over"] == list(CORRUPTIONS)
    assert upgrade_record(upgraded, {"num_classes": 10}) == upgraded  # today's layout is left alone


def test_vs_first_says_which_corruptions_its_mean_leaves_out():
    dataset = {**VAL, "name": "sample", "num_classes": 10}
    perfect = cells(0)
    perfect["fog"] = {s: {"top1": 100.0, "correct": None} for s in range(1, 6)}  # the first model: no fog error
    records = [robustness_record(c, 80.0, CORRUPTIONS, [1, 2, 3, 4, 5], dataset=dataset) for c in (perfect, cells(1))]
    add_relative_to_first(records, ["plain", "cb"])
    second = records[1]["relative_to_first"]
    assert second["ce"]["fog"] is None and "fog" not in second["mean_over"] and len(second["mean_over"]) == 18
    table = robustness_table([{"label": "plain", "robustness": records[0]}, {"label": "cb", "robustness": records[1]}])
    assert "vs first of cb: its mean leaves out fog" in table


def test_without_the_jpeg_step_the_mce_is_not_the_published_one():
    record = robustness_record(cells(0), 80.0, CORRUPTIONS, [1, 2, 3, 4, 5], dataset=VAL, jpeg_quality=None)
    assert record["mce"] is not None and record["complete"] is False
    assert "not saved as JPEG quality 85" in record["incomplete_reason"]
