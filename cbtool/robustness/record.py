"""The ``robustness`` record of one model in the results document, from per-cell accuracy (pure Python, no torch).

Layout: docs/results-schema.md. Errors are percentages like the rest of the document. CE and mCE (percent of
AlexNet's error, as the paper quotes them: an mCE of 100 is AlexNet's) exist only where AlexNet's figures apply
(``baseline.alexnet_comparability``); every run gets the mean corruption error in points and, with several models,
each model relative to the first. Every average names the corruptions it averages (``*_over``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cbtool.robustness.baseline import alexnet_comparability, sample_note
from cbtool.robustness.mce import summarize
from cbtool.robustness.registry import COMMON, JPEG_QUALITY, SEVERITIES

_ALEXNET_KEYS = ("ce", "relative_ce", "mce", "relative_mce", "mce_over")


def robustness_record(cells: Mapping[str, Mapping[int, Mapping[str, Any]]], clean_top1: float,
                      corruptions: Sequence[str], severities: Sequence[int], seed: int = 0, *,
                      dataset: Mapping[str, Any] | None = None, jpeg_quality: int | None = JPEG_QUALITY) -> dict[str, Any]:
    """``cells[corruption][severity]`` are accuracy metrics (``top1`` in percent, ``correct``) of one model;
    ``dataset`` is the results' ``dataset`` record (it decides whether AlexNet's errors apply).

    CE, relative CE and mCE need ImageNet-1k validation and all five severities (AlexNet's figures average them);
    otherwise they are empty and null and ``incomplete_reason`` says why.
    """
    error = {c: {str(s): 100.0 - cells[c][s]["top1"] for s in severities} for c in corruptions}
    record: dict[str, Any] = {
        "corruptions": list(corruptions),
        "severities": list(severities),
        "seed": seed,
        "jpeg_quality": jpeg_quality,
        "clean_error": 100.0 - clean_top1,
        "error": error,
        "correct": {c: {str(s): cells[c][s]["correct"] for s in severities} for c in corruptions},
        "relative_to_first": None,
    }
    return _with_averages(record, dataset)


def _with_averages(record: dict[str, Any], dataset: Mapping[str, Any] | None) -> dict[str, Any]:
    """``record`` with its mean errors, the AlexNet-relative figures where they apply, ``complete`` and the reason."""
    corruptions, severities, error = record["corruptions"], record["severities"], record["error"]
    means = {c: sum(error[c].values()) / len(error[c]) for c in corruptions}
    record.update(
        mean_error=means,
        mean_corruption_error=sum(means.values()) / len(means) if means else None,
        mean_corruption_error_over=list(corruptions),
        ce={}, relative_ce={}, mce=None, relative_mce=None, mce_over=[], complete=False,
    )
    reason = alexnet_comparability(dataset)
    if reason is None and not set(SEVERITIES) <= set(severities):
        reason = "CE and mCE need severities 1-5 (AlexNet's errors average all five)"
    if reason is None:
        summary = summarize({c: {s: error[c][str(s)] / 100 for s in SEVERITIES} for c in corruptions},
                            clean_error=record["clean_error"] / 100)
        record.update(
            ce={c: 100 * v for c, v in summary.ce.items()},
            relative_ce={c: 100 * v for c, v in summary.relative_ce.items()},
            mce=None if summary.mce is None else 100 * summary.mce,
            relative_mce=None if summary.relative_mce is None else 100 * summary.relative_mce,
            mce_over=list(summary.ce),
        )
        missing = [c for c in COMMON if c not in summary.ce]
        if missing:
            reason = (f"mCE over {len(summary.ce)} of the 15 ImageNet-C corruptions (missing: {', '.join(missing)}): "
                      "not the published mCE")
        elif record.get("jpeg_quality") != JPEG_QUALITY:
            reason = (f"corrupted images not saved as JPEG quality {JPEG_QUALITY} as ImageNet-C's were "
                      f"(jpeg_quality {record.get('jpeg_quality')}): close to, but not, the published mCE")
        else:
            reason = sample_note(dataset or {})
        record["complete"] = reason is None
    record["incomplete_reason"] = reason
    return record


def versus(record: Mapping[str, Any], reference: Mapping[str, Any], label: Any) -> dict[str, Any]:
    """``relative_to_first`` of ``record`` against ``reference`` (named ``label``): per corruption, its error summed
    over the severities in percent of the reference's (the CE with the reference as the baseline; ``None`` where
    the reference lacks those severities or has no error), and ``mean``, their mean over ``mean_over``."""
    errors, ref_errors = record.get("error") or {}, reference.get("error") or {}
    ce: dict[str, float | None] = {}
    for corruption, cells in errors.items():
        ref = ref_errors.get(corruption) or {}
        total = sum(ref[s] for s in cells if s in ref)
        ce[corruption] = 100 * sum(cells.values()) / total if set(cells) <= set(ref) and total > 0 else None
    over = [c for c, v in ce.items() if v is not None]
    return {"reference": label, "ce": ce, "mean": sum(ce[c] for c in over) / len(over) if over else None,
            "mean_over": over}


def add_relative_to_first(records: Sequence[dict[str, Any]], labels: Sequence[str]) -> None:
    """Set each record's ``relative_to_first`` (:func:`versus` with the first record as the reference)."""
    for record in records:
        record["relative_to_first"] = versus(record, records[0], labels[0])


def upgrade_record(record: Mapping[str, Any], dataset: Mapping[str, Any] | None) -> dict[str, Any]:
    """A robustness record of an older results file (schema 2) in today's layout: its figures recomputed from its
    errors, CE and mCE dropped where AlexNet's errors do not apply (those files wrote them for any dataset), and
    ``jpeg_quality`` null (cbtool did not re-encode before schema 3)."""
    needed = ("corruptions", "severities", "error", "clean_error")
    if "mean_corruption_error" in record or not all(key in record for key in needed) or any(
            c not in record["error"] for c in record["corruptions"]):
        return dict(record)  # today's layout, or not a record cbtool wrote: nothing to recompute from
    upgraded = {k: v for k, v in record.items() if k not in _ALEXNET_KEYS}
    upgraded.setdefault("jpeg_quality", None)
    first = record.get("relative_to_first")
    upgraded = _with_averages(upgraded, dataset)
    if isinstance(first, Mapping) and "mean" not in first:
        over = [c for c, v in (first.get("ce") or {}).items() if v is not None]
        upgraded["relative_to_first"] = {"reference": first.get("reference"), "ce": first.get("ce") or {},
                                         "mean": first.get("mce"), "mean_over": over}
    return upgraded
