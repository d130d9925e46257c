"""Tables and plots of robustness results (``cbtool eval --corruptions``): the ``robustness`` record of each model."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cbtool.errors import CbtoolError
from cbtool.files import atomic_path, check_parent_folder
from cbtool.plotting import pyplot
from cbtool.tables import delta, format_table, format_value, markdown_table


def robustness_table(models: Sequence[Mapping[str, Any]], *, markdown: bool = False) -> str:
    """Top-1 error per corruption (rows) and severity (columns) for each model, with its mean, CE, relative CE and
    (with several models) the CE relative to the first; then clean error, mCE and relative mCE lines."""
    robust = [m for m in models if m.get("robustness")]
    if not robust:
        return ""
    severities = robust[0]["robustness"]["severities"]
    several = len(robust) > 1
    headers = ["model", "corruption", *[f"s{s}" for s in severities], "mean", "CE", "rel CE"]
    headers += ["CE vs first"] if several else []
    rows: list[list[Any]] = []
    for model in robust:
        record, label = model["robustness"], str(model.get("label", "?"))
        versus = (record.get("relative_to_first") or {}).get("ce") or {}
        for name in record["corruptions"]:
            row = [label, name, *[format_value(record["error"][name][str(s)]) for s in severities],
                   format_value(record["mean_error"][name]), format_value(record["ce"].get(name)),
                   format_value(record["relative_ce"].get(name))]
            rows.append(row + ([format_value(versus.get(name))] if several else []))
        summary_cells = [format_value(record["clean_error"]), format_value(record["mce"]),
                         format_value(record["relative_mce"])]
        extra = [format_value((record.get("relative_to_first") or {}).get("mce"))] if several else []
        rows.append([label, "clean err, mCE, rel mCE", *[""] * len(severities), *summary_cells, *extra])
    table = markdown_table(headers, rows) if markdown else format_table(headers, rows)
    notes = []
    if robust[0]["robustness"]["mce"] is None:
        notes.append("CE and mCE need severities 1-5 (AlexNet's errors average all five)")
    elif not robust[0]["robustness"]["complete"]:
        notes.append("mCE over the corruptions given, not all 15 of ImageNet-C: not the published mCE")
    return table + "".join(f"\n{note}" for note in notes)


def plot_robustness(models: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write a PNG of top-1 error against severity, one panel per corruption and one line per model."""
    robust = [m for m in models if m.get("robustness")]
    if not robust:
        raise CbtoolError("no model has robustness figures to plot; evaluate with --corruptions")
    plt = pyplot()

    path = Path(path)
    check_parent_folder(path)
    names = robust[0]["robustness"]["corruptions"]
    columns = min(5, len(names))
    rows = math.ceil(len(names) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 2.6 * rows), squeeze=False,
                             sharey=True, constrained_layout=True)
    try:
        for ax, name in zip(axes.flat, names):
            for model in robust:
                record = model["robustness"]
                severities = record["severities"]
                ax.plot(severities, [record["error"][name][str(s)] for s in severities], marker="o",
                        label=str(model.get("label", "?")))
            ax.set(title=name, xlabel="severity", xticks=robust[0]["robustness"]["severities"])
            ax.grid(alpha=0.3)
        for ax in axes[:, 0]:
            ax.set_ylabel("top-1 error (%)")
        for ax in list(axes.flat)[len(names):]:
            ax.set_visible(False)
        axes.flat[0].legend(fontsize="small")
        with atomic_path(path) as temporary:
            fig.savefig(temporary, format="png", dpi=100)
    finally:
        plt.close(fig)
    return path


def _robustness(model: Mapping[str, Any]) -> Mapping[str, Any]:
    return model.get("robustness") or {}


def robustness_differences(models: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """mCE, relative mCE and mean error per corruption of each later model with a robustness record, minus the
    first such model's (``[]`` when fewer than two models have one)."""
    robust = [m for m in models if _robustness(m)]
    if len(robust) < 2:
        return []
    ref = _robustness(robust[0])
    rows = []
    for model in robust[1:]:
        record = _robustness(model)
        shared = [c for c in record.get("corruptions", []) if c in (ref.get("mean_error") or {})]
        rows.append({
            "label": model.get("label"),
            "reference": robust[0].get("label"),
            "mce": delta(record.get("mce"), ref.get("mce")),
            "relative_mce": delta(record.get("relative_mce"), ref.get("relative_mce")),
            "mean_error": {c: delta(record["mean_error"].get(c), ref["mean_error"][c]) for c in shared},
        })  # fmt: skip
    return rows


def _versus(model: Mapping[str, Any], reference: Mapping[str, Any]) -> dict[str, Any]:
    """``relative_to_first`` of ``model`` with ``reference`` as the first: summed error per corruption in percent of
    the reference's, over the same severities (``None`` where the reference lacks them)."""
    errors, ref_errors = _robustness(model).get("error") or {}, _robustness(reference).get("error") or {}
    ce: dict[str, float | None] = {}
    for corruption, cells in errors.items():
        ref = ref_errors.get(corruption) or {}
        total = sum(ref[s] for s in cells if s in ref)
        ce[corruption] = 100 * sum(cells.values()) / total if set(cells) <= set(ref) and total > 0 else None
    known = [v for v in ce.values() if v is not None]
    return {"reference": reference.get("label"), "ce": ce, "mce": sum(known) / len(known) if known else None}


def robustness_section(models: Sequence[Mapping[str, Any]], *, markdown: bool = False) -> str:
    """Every robustness cell of every model (``robustness.render.robustness_table``, one table per set of
    severities), then one line per later model with its mCE difference from the first; ``""`` without records."""
    robust = [m for m in models if _robustness(m)]
    if len(robust) > 1:  # "CE vs first": against the first model compared here, not the first of its own eval run
        robust = [{**m, "robustness": {**_robustness(m), "relative_to_first": _versus(m, robust[0])}} for m in robust]
    groups: dict[tuple[int, ...], list[Mapping[str, Any]]] = {}
    for model in robust:
        groups.setdefault(tuple(_robustness(model).get("severities") or ()), []).append(model)
    parts = [robustness_table(group, markdown=markdown) for group in groups.values()]
    for diff in robustness_differences(models):
        line = f"mCE {diff['label']} vs {diff['reference']}: {format_value(diff['mce'], 'error', signed=True)}"
        line += f" (relative mCE {format_value(diff['relative_mce'], 'error', signed=True)})"
        if diff["mce"] is None:
            line += " (mCE needs severities 1-5 in both)"
        parts.append(f"- {line}" if markdown else line)
    return "\n".join(part for part in parts if part)
