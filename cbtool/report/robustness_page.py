"""The robustness part of ``cbtool report``'s page: the CLI's table (corruption x severity in ImageNet-C order, CE and
mCE where AlexNet's figures apply, else the mean corruption error, with the notes that say what each average
covers), the differences from the first model, and one small chart of error against severity per corruption.
Never the raw record: no per-sample vectors. No torch."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from html import escape
from typing import Any

from cbtool.robustness.render import (
    comparable_groups,
    difference_line,
    robustness_differences,
    robustness_title,
    table_rows,
)
from cbtool.report.tables import format_value
from cbtool.report.plotting import model_colours
from cbtool.report.svg import line_chart

_NEEDED = ("corruptions", "severities", "error", "mean_error", "clean_error")


def robustness_html(models: Sequence[Mapping[str, Any]], cell, table) -> str:
    """The section's HTML (``""`` when no model has a robustness record); ``cell`` and ``table`` are the page's
    ``<td>`` and ``<table>`` builders, so numbers carry their JSON value in ``data-value`` as elsewhere."""
    whole = [m for m in models if m.get("robustness") and all(key in m["robustness"] for key in _NEEDED)]
    partial = [m for m in models if m.get("robustness") and m not in whole]
    groups = comparable_groups(whole)
    if not groups and not partial:
        return ""
    parts = ["<h2>Robustness</h2>"]
    if groups:
        parts.append(f"<p>{escape(robustness_title([m for g in groups for m in g]))}</p>")
    for index, group in enumerate(groups):
        headers, rows, notes = table_rows(group)
        body = []
        for row in rows:
            label, name = str(row[0][0]), row[1][1]
            cells = [cell(label), cell(name)]
            cells += [cell(value, text, f"{label}:{name}:{header}") for (value, text), header in zip(row[2:], headers[2:])]
            body.append(f"<tr>{''.join(cells)}</tr>")
        parts.append(table(headers, body, f"robustness-{index}" if index else "robustness-table"))
        parts.append('<ul class="notes">' + "".join(f"<li>{escape(note)}</li>" for note in notes) + "</ul>")
    if partial:
        parts.append(_averages(partial, cell, table))
    lines = [difference_line(diff) for diff in robustness_differences(whole)]
    if lines:
        parts.append("<ul>" + "".join(f"<li>{escape(line)}</li>" for line in lines) + "</ul>")
    if groups:
        colours = model_colours(str(m.get("label", "?")) for m in models)  # the page's colours, every model counted
        parts.append(f'<div class="charts">{_charts([m for g in groups for m in g], colours)}</div>')
    return f'<div id="robustness">{"".join(parts)}</div>'


def _averages(models: Sequence[Mapping[str, Any]], cell, table) -> str:
    """Records without cbtool's cells (hand-made, or cut down): the averages they hold, per corruption and overall,
    said to be partial; never their per-sample strings."""
    keys = [k for k in ("mean_error", "ce", "relative_ce") if any(isinstance(m["robustness"].get(k), Mapping)
                                                                   for m in models)]
    body = []
    for model in models:
        record, label = model["robustness"], str(model.get("label", "?"))
        names = list(dict.fromkeys(c for k in keys for c in (record.get(k) or {})))
        for name in names:
            body.append(f"<tr>{cell(label)}{cell(name)}"
                        + "".join(cell(v, format_value(v), f"{label}:{name}:{k}")
                                  for k in keys for v in [(record.get(k) or {}).get(name)]) + "</tr>")
        for key in ("clean_error", "mean_corruption_error", "mce", "relative_mce"):
            if isinstance(record.get(key), (int, float)):
                body.append(f"<tr>{cell(label)}{cell(key)}{cell(record[key], format_value(record[key]), key)}"
                            + cell(None, "") * (max(len(keys), 1) - 1) + "</tr>")
    note = ("<p>These records lack the per-severity errors that cbtool eval --corruptions writes: only the averages "
            "they hold are shown, without the notes that say what each covers.</p>")
    return note + table(["model", "corruption or average", *(keys or ["value"])], body, "robustness-averages")


def _charts(models: Sequence[Mapping[str, Any]], colours: Mapping[str, str]) -> str:
    """One chart per corruption: top-1 error at severity 0 (clean) to 5, one line per model (the CLI's --plot),
    all on one y scale from 0 (no error), as the CLI's, so that a steeper line is a larger rise in error and a gap
    of a few points is not stretched over the chart."""
    names = list(dict.fromkeys(c for m in models for c in m["robustness"]["corruptions"]))
    every = {}
    for name in names:
        series = []
        for model in models:
            record = model["robustness"]
            errors = record["error"].get(name) or {}
            series.append((str(model.get("label", "?")),
                           [record.get("clean_error"), *[errors.get(str(s)) for s in range(1, 6)]]))
        every[name] = series
    values = [v for series in every.values() for _, ys in series for v in ys if isinstance(v, (int, float))]
    shared = (0.0, max(values)) if values else None
    return "".join(line_chart(name, series, x_label="severity (0 = clean)", y_label="top-1 error (%)", width=280,
                              height=220, y_range=shared, colours=colours) for name, series in every.items())
