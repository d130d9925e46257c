"""Reading the metrics of a results file's ``robustness`` record for ``cbtool check`` (missing ones are bad input)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from cbtool.check.rules import robustness_cell
from cbtool.errors import CbtoolError


def robustness_value(model: Mapping[str, Any], metric: str, name: str) -> float:
    """``mce``, ``relative_mce``, ``mean_corruption_error``, ``error:<c>`` or ``error:<c>:<s>`` of one model;
    missing is bad input (mCE is missing wherever AlexNet's errors do not apply: the record says why)."""
    record, label = model.get("robustness"), model["label"]
    if not isinstance(record, dict):
        raise CbtoolError(f"{name}: model {label!r} has no robustness record for {metric}; evaluate with --corruptions")
    cell = robustness_cell(metric)
    if cell is None:  # mce, relative_mce, mean_corruption_error
        value = record.get(metric)
        if value is None:
            why = record.get("incomplete_reason") or (f"CE needs severities 1-5 of corruptions with an AlexNet error; "
                                                      f"it has severities {record.get('severities')}")
            raise CbtoolError(f"{name}: model {label!r} has no {metric} ({why}); "
                              "bound mean_corruption_error or error:<corruption> instead")  # fmt: skip
        return value
    corruption, severity = cell
    if corruption not in (record.get("mean_error") or {}):
        evaluated = ", ".join(record.get("corruptions") or []) or "none"
        raise CbtoolError(f"{name}: model {label!r} has no {corruption} errors for {metric} (evaluated: {evaluated})")
    if severity is None:
        return record["mean_error"][corruption]
    cells = (record.get("error") or {}).get(corruption) or {}
    if str(severity) not in cells:
        raise CbtoolError(f"{name}: model {label!r} has no {corruption} severity {severity} for {metric} "
                          f"(severities: {record.get('severities')})")  # fmt: skip
    return cells[str(severity)]


def cell_correct(model: Mapping[str, Any], corruption: str, severity: int) -> str | None:
    record = model.get("robustness") or {}
    correct = ((record.get("correct") or {}).get(corruption) or {}).get(str(severity))
    if correct is not None and (not isinstance(correct, str) or correct.strip("01")):
        raise CbtoolError(f"model {model['label']!r}: robustness.correct.{corruption}.{severity} "
                          "must be a string of 0s and 1s")  # fmt: skip
    return correct


# The average metrics and the field naming the corruptions each one averages.
AVERAGED_OVER = {"mce": "mce_over", "relative_mce": "mce_over", "mean_corruption_error": "mean_corruption_error_over"}


def same_average(current: Mapping[str, Any], base: Mapping[str, Any], metric: str, names: tuple[str, str]) -> None:
    """Refuse to compare an average over one set of corruptions with an average over another (bad input)."""
    key = AVERAGED_OVER.get(metric)
    if key is None:
        return
    new, old = ((model.get("robustness") or {}).get(key) for model in (current, base))
    if new is not None and old is not None and list(new) != list(old):
        raise CbtoolError(f"{metric} of {current['label']!r} averages {len(new)} corruptions in {names[0]} but "
                          f"{len(old)} in {names[1]} ({', '.join(sorted(set(new) ^ set(old)))} differ); "
                          "evaluate the same --corruptions, or bound error:<corruption>")
