"""Tables and plots of robustness results (``cbtool eval --corruptions``): the ``robustness`` record of each model."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cbtool.errors import CbtoolError
from cbtool.files import atomic_path, check_parent_folder
from cbtool.report.plotting import model_colours, pyplot
from cbtool.robustness.record import versus
from cbtool.results import is_number
from cbtool.robustness.registry import corruption_order
from cbtool.report.tables import delta, format_table, format_value, markdown_table


Cell = tuple[Any, str]  # (the JSON value, its text)


def table_rows(models: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[Cell]], list[str]]:
    """Headers, rows of ``(value, text)`` cells and notes of :func:`robustness_table` (the report page draws the same).

    One row per model and corruption, in ImageNet-C order: top-1 error per severity and its mean; CE and relative
    CE only when a model has AlexNet-relative figures; with several models "vs first" (summed error in % of the
    first model's). Then per model: clean error, the mean corruption error (and mean "vs first") over the
    corruptions it names, and the mCE over the ones it names. The notes say what each average covers and why
    figures are missing."""
    robust = [m for m in models if m.get("robustness")]
    if not robust:
        return [], [], []
    severities = robust[0]["robustness"]["severities"]
    several = len(robust) > 1
    alexnet = any(m["robustness"].get("mce") is not None for m in robust)
    headers = ["model", "corruption", *[f"s{s}" for s in severities], "mean"]
    headers += ["CE", "rel CE"] if alexnet else []
    headers += ["vs first"] if several else []
    blank = [(None, "")] * len(severities)
    rows: list[list[Cell]] = []
    for model in robust:
        record, label = model["robustness"], str(model.get("label", "?"))
        versus = record.get("relative_to_first") or {}
        for name in record["corruptions"]:
            row = [(label, label), (name, name), *[_cell(record["error"][name].get(str(s))) for s in severities],
                   _cell(record["mean_error"][name])]
            row += [_cell(record["ce"].get(name)), _cell(record["relative_ce"].get(name))] if alexnet else []
            rows.append(row + ([_cell((versus.get("ce") or {}).get(name))] if several else []))
        over = record.get("mean_corruption_error_over") or record["corruptions"]
        summaries = [("clean error", _cell(record["clean_error"]), None, None),
                     (f"mean of {len(over)} corruptions", _cell(record.get("mean_corruption_error")), None,
                      _cell(versus.get("mean", versus.get("mce"))))]
        if record.get("mce") is not None:
            summaries.append((f"mCE over {len(record.get('mce_over') or record['ce'])} corruptions", None,
                              (_cell(record["mce"]), _cell(record["relative_mce"])), None))
        for title, mean, alexnet_cells, first in summaries:
            row = [(label, label), (None, title), *blank, mean or (None, "")]
            row += list(alexnet_cells or [(None, "")] * 2) if alexnet else []
            rows.append(row + ([first or (None, "")] if several else []))
    return headers, rows, _notes(robust, several)


def _cell(value: Any) -> Cell:
    return value, format_value(value)


def _notes(robust: Sequence[Mapping[str, Any]], several: bool) -> list[str]:
    """What the averages cover, why CE/mCE are missing or partial, and whether images were re-encoded as JPEG."""
    notes = []
    first = robust[0]["robustness"]
    over = first.get("mean_corruption_error_over") or first["corruptions"]
    notes.append(f"mean: top-1 error in points, averaged over the severities; the \"mean of {len(over)}\" row "
                 f"averages all {len(over)} corruptions evaluated")
    if any(m["robustness"].get("mce") is not None for m in robust):
        notes.append("CE, rel CE and mCE: in % of AlexNet's ImageNet-1k validation error (100 = AlexNet); "
                     f"mCE averages the corruptions with an AlexNet figure ({', '.join(first.get('mce_over') or [])})")
    if several:
        notes.append(f"vs first: summed error in % of {robust[0].get('label')}'s, per corruption; its mean is over the "
                     "same corruptions as the mean row")
        for model in robust:
            record = model["robustness"]
            versus_over = (record.get("relative_to_first") or {}).get("mean_over")
            left_out = [c for c in record["corruptions"] if versus_over is not None and c not in versus_over]
            if left_out:
                notes.append(f"vs first of {model.get('label')}: its mean leaves out {', '.join(left_out)} "
                             "(the first model made no error there, so there is no ratio)")
    for reason in dict.fromkeys(m["robustness"].get("incomplete_reason") for m in robust):
        if reason:
            notes.append(f"complete: false: {reason}")
    for quality in dict.fromkeys(m["robustness"].get("jpeg_quality", "unknown") for m in robust):
        if quality is None:
            notes.append("corrupted images not re-encoded as JPEG (--no-jpeg, or written before cbtool did it): "
                         "errors are not comparable with ImageNet-C's files")
        elif quality != "unknown":
            notes.append(f"corrupted images re-encoded as JPEG quality {quality}, as ImageNet-C's files were")
    return notes


def robustness_title(models: Sequence[Mapping[str, Any]]) -> str:
    """The heading of the robustness table: it names AlexNet only when the table holds AlexNet-relative figures."""
    if any((m.get("robustness") or {}).get("mce") is not None for m in models):
        return "Top-1 error (%) under corruptions; CE and mCE in % of AlexNet's"
    return "Top-1 error (%) under corruptions (no CE or mCE: see the notes)"


def robustness_table(models: Sequence[Mapping[str, Any]], *, markdown: bool = False) -> str:
    """:func:`table_rows` as a text (or Markdown) table, then its notes; ``""`` without robustness records."""
    headers, rows, notes = table_rows(models)
    if not rows:
        return ""
    texts = [[text for _, text in row] for row in rows]
    table = markdown_table(headers, texts) if markdown else format_table(headers, texts)
    return table + "".join(f"\n{'- ' if markdown else ''}{note}" for note in notes)


def plot_robustness(models: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write a PNG of top-1 error against severity, one panel per corruption and one line per model
    (:func:`robustness_figure`)."""
    path = Path(path)
    check_parent_folder(path)
    figure = robustness_figure(models)
    try:
        with atomic_path(path) as temporary:
            figure.savefig(temporary, format="png", dpi=100)
    finally:
        pyplot().close(figure)
    return path


def robustness_figure(models: Sequence[Mapping[str, Any]]):
    """The figure of :func:`plot_robustness` (the caller closes it): one panel per corruption any model was
    evaluated on (ImageNet-C order), all on one y scale from 0; each model in its ``plotting.model_colours``
    colour (by its place among ``models``), drawn only where it has a figure: a corruption it lacks has no line
    (its panel's title and the figure's title say so), a severity it lacks breaks its line."""
    robust = [m for m in models if _robustness(m)]
    drawn = [m for m in robust if all(key in _robustness(m) for key in ("corruptions", "severities", "error"))]
    if not robust:
        raise CbtoolError("no model has robustness figures to plot; evaluate with --corruptions")
    if not drawn:
        raise CbtoolError("no model's robustness record has per-severity errors to plot (only averages); "
                          "evaluate with cbtool eval --corruptions")
    plt = pyplot()
    from matplotlib.lines import Line2D

    colours = model_colours(m.get("label", "?") for m in models)
    names = corruption_order(c for m in drawn for c in _robustness(m)["corruptions"])
    severities = sorted({int(s) for m in drawn for s in _robustness(m)["severities"]})
    columns = min(5, len(names))
    rows = math.ceil(len(names) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(3 * columns, 2.6 * rows + 0.8), squeeze=False,
                             sharey=True, layout="constrained")
    try:
        top = 0.0
        for ax, name in zip(axes.flat, names):
            absent = []
            for model in drawn:
                label, errors = str(model.get("label", "?")), _errors(_robustness(model), name)
                if errors is None:
                    absent.append(label)
                    continue
                # NaN where this model has no figure: the line breaks there rather than bridging the gap
                ys = [_number(errors.get(str(s), errors.get(s))) for s in severities]
                top = max([top, *(y for y in ys if not math.isnan(y))])
                ax.plot(severities, ys, marker="o", color=colours[label], label=label)
            title = name + (f"\n(not evaluated: {', '.join(absent)})" if absent else "")
            ax.set_title(title, fontsize="medium" if not absent else "small")
            ax.set(xlabel="severity", xticks=severities)
            ax.grid(alpha=0.3)
        # From 0 (no error) on every panel (sharey): a steeper line is a larger rise in error in every panel
        axes.flat[0].set_ylim(0, 1.05 * top if top > 0 else 1.0)
        for ax in axes[:, 0]:
            ax.set_ylabel("top-1 error (%)")
        for ax in list(axes.flat)[len(names):]:
            ax.set_visible(False)
        handles = [Line2D([], [], color=colours[str(m.get("label", "?"))], marker="o", label=str(m.get("label", "?")))
                   for m in drawn]
        fig.legend(handles=handles, loc="outside lower center", fontsize="small", ncols=min(len(handles), 6),
                   frameon=False)
        notes = _missing_notes(robust, drawn, names, severities)
        fig.suptitle("\n".join(["top-1 error under corruptions, one line per model", *notes]), fontsize="medium")
    except BaseException:
        plt.close(fig)
        raise
    return fig


def _errors(record: Mapping[str, Any], name: str) -> Mapping[Any, Any] | None:
    """The per-severity errors of corruption ``name`` in ``record``; None when it was not evaluated on it."""
    errors = record["error"].get(name)
    return errors if name in record["corruptions"] and isinstance(errors, Mapping) else None


def _number(value: Any) -> float:
    return float(value) if is_number(value) else math.nan


def _missing_notes(robust: Sequence[Mapping[str, Any]], drawn: Sequence[Mapping[str, Any]], names: Sequence[str],
                   severities: Sequence[int]) -> list[str]:
    """One line per model that is not drawn everywhere: the corruptions and severities it was not evaluated on,
    or that it is not drawn at all (a record without per-severity errors)."""
    notes, drawn_ids = [], {id(m) for m in drawn}
    for model in robust:
        label, record = str(model.get("label", "?")), _robustness(model)
        if id(model) not in drawn_ids:
            notes.append(f"{label}: not drawn (its record has no per-severity errors)")
            continue
        lacking = [c for c in names if _errors(record, c) is None]
        own = sorted({int(s) for s in record["severities"]})
        parts = [f"not evaluated on {', '.join(lacking)}"] if lacking else []
        parts += [f"severities {', '.join(map(str, own))} only"] if own != list(severities) else []
        if parts:
            notes.append(f"{label}: {'; '.join(parts)}")
    return notes


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
            # None unless both have AlexNet-relative figures over the same corruptions
            "mce": delta(record.get("mce"), ref.get("mce")) if record.get("mce_over") == ref.get("mce_over") else None,
            "mean_corruption_error": delta(record.get("mean_corruption_error"), ref.get("mean_corruption_error"))
            if record.get("mean_corruption_error_over") == ref.get("mean_corruption_error_over") else None,
            "mean_corruption_error_over": record.get("mean_corruption_error_over"),
            "relative_mce": delta(record.get("relative_mce"), ref.get("relative_mce"))
            if record.get("mce_over") == ref.get("mce_over") else None,
            "mean_error": {c: delta(record["mean_error"].get(c), ref["mean_error"][c]) for c in shared},
        })  # fmt: skip
    return rows


def comparable_groups(models: Sequence[Mapping[str, Any]]) -> list[list[Mapping[str, Any]]]:
    """The models with a robustness record, grouped by their severities (one table each), each record's
    ``relative_to_first`` recomputed against the first model given here, not the first of its own eval run."""
    robust = [m for m in models if _robustness(m)]
    if len(robust) > 1:
        robust = [{**m, "robustness": {**_robustness(m), "relative_to_first": versus(
            _robustness(m), _robustness(robust[0]), robust[0].get("label"))}} for m in robust]
    groups: dict[tuple[int, ...], list[Mapping[str, Any]]] = {}
    for model in robust:
        groups.setdefault(tuple(_robustness(model).get("severities") or ()), []).append(model)
    return list(groups.values())


def robustness_section(models: Sequence[Mapping[str, Any]], *, markdown: bool = False) -> str:
    """Every robustness cell of every model (``robustness.render.robustness_table``, one table per set of
    severities), then one line per later model with its mCE (or mean corruption error) difference from the first;
    ``""`` without records."""
    parts = [robustness_table(group, markdown=markdown) for group in comparable_groups(models)]
    for diff in robustness_differences(models):
        parts.append(f"- {difference_line(diff)}" if markdown else difference_line(diff))
    return "\n".join(part for part in parts if part)


def difference_line(diff: Mapping[str, Any]) -> str:
    """One later model against the first: mCE when both have one, else the mean corruption error in points."""
    label, reference = diff["label"], diff["reference"]
    if diff["mce"] is not None:
        return (f"mCE {label} vs {reference}: {format_value(diff['mce'], 'error', signed=True)}"
                f" (relative mCE {format_value(diff['relative_mce'], 'error', signed=True)})")
    if diff.get("mean_corruption_error") is None:
        return f"mean corruption error {label} vs {reference}: - (not over the same corruptions)"
    over = diff.get("mean_corruption_error_over") or []
    return (f"mean corruption error {label} vs {reference}: "
            f"{format_value(diff['mean_corruption_error'], 'error', signed=True)} points over {len(over)} corruptions "
            "(no mCE: see the notes)")
