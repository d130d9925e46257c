"""The ``robustness`` record of one model in the results document, from per-cell accuracy (pure Python, no torch).

Layout: docs/results-schema.md. Errors are percentages like the rest of the document; CE and mCE are in
percent of AlexNet's error, as the paper quotes them (an mCE of 100 is AlexNet's).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from cbtool.robustness.mce import summarize
from cbtool.robustness.registry import SEVERITIES


def robustness_record(cells: Mapping[str, Mapping[int, Mapping[str, Any]]], clean_top1: float,
                      corruptions: Sequence[str], severities: Sequence[int], seed: int = 0) -> dict[str, Any]:
    """``cells[corruption][severity]`` are accuracy metrics (``top1`` in percent, ``correct``) of one model.

    CE, relative CE and mCE need all five severities (AlexNet's figures average them); with fewer they are
    empty and null.
    """
    error = {c: {str(s): 100.0 - cells[c][s]["top1"] for s in severities} for c in corruptions}
    record: dict[str, Any] = {
        "corruptions": list(corruptions),
        "severities": list(severities),
        "seed": seed,
        "clean_error": 100.0 - clean_top1,
        "error": error,
        "correct": {c: {str(s): cells[c][s]["correct"] for s in severities} for c in corruptions},
        "mean_error": {c: sum(error[c].values()) / len(severities) for c in corruptions},
        "ce": {}, "relative_ce": {}, "mce": None, "relative_mce": None, "complete": False,
        "relative_to_first": None,
    }
    if set(SEVERITIES) <= set(severities):
        summary = summarize({c: {s: error[c][str(s)] / 100 for s in SEVERITIES} for c in corruptions},
                            clean_error=(100.0 - clean_top1) / 100)
        record.update(
            ce={c: 100 * v for c, v in summary.ce.items()},
            relative_ce={c: 100 * v for c, v in summary.relative_ce.items()},
            mce=None if summary.mce is None else 100 * summary.mce,
            relative_mce=None if summary.relative_mce is None else 100 * summary.relative_mce,
            complete=summary.complete,
        )
    return record


def add_relative_to_first(records: Sequence[dict[str, Any]], labels: Sequence[str]) -> None:
    """Set each record's ``relative_to_first``: its summed error over the severities per corruption, in percent of
    the first model's (the CE with the first model as the baseline), and the mean over corruptions."""
    first = records[0]
    for record in records:
        ce = {}
        for c in record["corruptions"]:
            reference = sum(first["error"][c].values())
            ce[c] = 100 * sum(record["error"][c].values()) / reference if reference > 0 else None
        known = [v for v in ce.values() if v is not None]
        record["relative_to_first"] = {"reference": labels[0], "ce": ce,
                                       "mce": sum(known) / len(known) if known else None}
