"""``cbtool report``'s page: results files as one self-contained HTML page (no scripts, no network).

Metrics and differences (with ``cbtool check``'s p-value and verdict on top-1), per-layer entropy and distance
(inline SVG charts and tables), robustness tables when a ``robustness`` record is present, attention pictures
embedded as data URIs at their natural size, and each model's provenance. Files over other samples are refused
as ``check`` refuses them (or shown under a warning with ``allow_mismatch``); per-sample vectors are left out.
Every number cell carries its JSON value in ``data-value``; the text is ``cbtool.report.format_value``'s. No torch.
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Mapping, Sequence
from html import escape
from pathlib import Path
from typing import Any

from cbtool._version import __version__
from cbtool.check.comparison import compare_results
from cbtool.errors import CbtoolError
from cbtool.files import json_text, write_text_atomic
from cbtool.report.plotting import model_colours
from cbtool.report import METRIC_HEADERS, difference_rows, format_p, format_value, label_models, metrics_row
from cbtool.report.svg import line_chart

_METRIC_KEYS = [("metrics", "top1"), ("metrics", "top5"), ("metrics", "loss"), ("metrics", "num_samples"),
                ("throughput", "model_images_per_s"), ("throughput", "end_to_end_images_per_s"),
                ("density", "entropy_mean"), ("density", "distance_mean")]
_DIFFERENCE_KEYS = [("top1", "accuracy"), ("top5", "accuracy"), ("loss", "loss"), ("entropy_mean", "entropy"),
                    ("distance_mean", "distance")]
_STYLE = """
body{font:14px/1.45 system-ui,-apple-system,"Segoe UI",sans-serif;margin:2em auto;max-width:1200px;color:#222;padding:0 1em}
h1{font-size:1.6em;margin-bottom:.2em}h2{border-bottom:1px solid #ddd;padding-bottom:.2em;margin-top:1.8em}
table{border-collapse:collapse;margin:.6em 0;display:block;max-width:100%;overflow-x:auto}
th,td{border:1px solid #ddd;padding:.25em .6em}
th{background:#f5f5f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.meta{color:#666}.charts{display:flex;flex-wrap:wrap;gap:1em}.chart text{font-size:11px;fill:#333}
.chart .chart-title{font-size:13px;font-weight:600}.chart{max-width:100%;height:auto}
figure{margin:1em 0}.picture{overflow-x:auto;max-width:100%;border:1px solid #ddd}
.picture img{display:block;max-width:none}figcaption{font-size:13px;color:#444;margin-top:.3em}
.warning{background:#fff4e5;border:1px solid #f0a040;border-left:6px solid #e07000;padding:.5em .8em;margin:.6em 0}
pre{background:#f8f8f8;padding:.6em;overflow:auto;font-size:12px}details{margin:.4em 0}
"""


def _number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _cell(value: Any, text: str | None = None, key: str = "") -> str:
    """A ``<td>``: numbers right-aligned with their JSON value in ``data-value``."""
    shown = escape(text if text is not None else ("-" if value is None else str(value)))
    attrs = f' data-key="{escape(key)}"' if key else ""
    if _number(value):
        return f'<td class="num"{attrs} data-value="{json.dumps(value)}">{shown}</td>'
    return f"<td{attrs}>{shown}</td>"


def _table(headers: Sequence[str], rows: Sequence[str], table_id: str = "") -> str:
    head = "".join(f"<th>{escape(str(h))}</th>" for h in headers)
    ident = f' id="{table_id}"' if table_id else ""
    return f"<table{ident}><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _metric_value(model: Mapping[str, Any], group: str, key: str) -> Any:
    if group == "throughput":
        return ((model.get("metrics") or {}).get("throughput") or {}).get(key)
    return (model.get(group) or {}).get(key)


def metrics_section(models: Sequence[Mapping[str, Any]], comparison: Any = None, checks: Sequence[Any] = ()) -> str:
    """The metrics table; with a ``check.Comparison``, the differences from the first model with ``cbtool check``'s
    top-1 p-value and verdict (``checks``, one per later model), under a warning when the data differ."""
    rows = []
    for model in models:
        texts = metrics_row(model)
        cells = [_cell(model.get("label"), texts[0], "label")]
        cells += [_cell(_metric_value(model, g, k), text, k) for (g, k), text in zip(_METRIC_KEYS, texts[1:])]
        rows.append(f'<tr data-label="{escape(str(model.get("label")))}">{"".join(cells)}</tr>')
    body = _table(METRIC_HEADERS, rows, "metrics")
    if comparison is not None:
        body += differences_section(models, comparison, checks)
    return "<h2>Metrics</h2>" + body


def differences_section(models: Sequence[Mapping[str, Any]], comparison: Any, checks: Sequence[Any]) -> str:
    """Each later model minus the first: the deltas, and beside top-1 what ``cbtool check`` says of the pair."""
    diff_rows = []
    for diff, check in zip(difference_rows(models), checks):
        cells = [_cell(diff["label"], key="label"), _cell(diff["top1"], format_value(diff["top1"], signed=True), "top1")]
        p_value = check.p_value if check is not None else None
        cells += [_cell(p_value, format_p(p_value), "top1_p_value"),
                  _cell(check.test if check is not None and check.test else None, key="top1_test"),
                  _cell(check.verdict if check is not None else None, key="top1_verdict")]
        cells += [_cell(diff[k], format_value(diff[k], kind, signed=True), k) for k, kind in _DIFFERENCE_KEYS[1:]]
        diff_rows.append(f"<tr>{''.join(cells)}</tr>")
    headers = ["model", "Δtop1", "p (top1)", "test", "verdict (top1)", "Δtop5", "Δloss", "Δentropy", "Δdistance"]
    reference = escape(str(models[0].get("label")))
    rule = next((c.allowed_text for c in checks if c is not None), "drop 0.50")
    note = (f'<p class="meta">p and verdict: <code>cbtool check</code> of each model against {reference} on top-1 '
            f"(allowed: {escape(rule)}; a larger drop is a regression only when p &lt; 0.05).</p>")
    return (f"<h3>Differences from {reference}</h3>" + mismatch_warning(comparison)
            + _table(headers, diff_rows, "differences") + note)


def mismatch_warning(comparison: Any) -> str:
    """A warning box naming every model evaluated on other data than the first (empty when all share the data)."""
    if comparison is None or not comparison.notes:
        return ""
    items = "".join(f"<li>{escape(note)}</li>" for note in comparison.notes)
    return (f'<div class="warning" role="alert"><strong>Warning: these models were not evaluated on the same '
            f"samples</strong> (allowed by --allow-mismatch), so their differences mix the models with the data:"
            f"<ul>{items}</ul></div>")


def without_per_sample(model: Mapping[str, Any]) -> dict[str, Any]:
    """A model entry without its per-sample ``correct`` vectors (top-1's and each corruption cell's), which a page
    has no use for: they stay in the results files."""
    return {**model, "metrics": _without_correct(model.get("metrics")), "robustness": _without_correct(model.get("robustness"))}


def _without_correct(record: Any) -> Any:
    return {k: v for k, v in record.items() if k != "correct"} if isinstance(record, Mapping) else record


def density_section(models: Sequence[Mapping[str, Any]]) -> str:
    measured = [m for m in models if (m.get("density") or {}).get("entropy_per_layer") is not None]
    if not measured:
        return ""
    series = {key: [(str(m["label"]), list(m["density"].get(key) or [])) for m in measured]
              for key in ("entropy_per_layer", "distance_per_layer")}
    colours = model_colours(m.get("label") for m in models)  # a model's colour is the same in every chart and plot
    # From 0, as the CLI's plot: entropy on its absolute 0-1 scale, distance from no distance at all
    farthest = max((v for _, values in series["distance_per_layer"] for v in values if v is not None), default=1.0)
    charts = (line_chart("Attention entropy per layer", series["entropy_per_layer"], y_label="entropy (1 = uniform)",
                         colours=colours, y_range=(0.0, 1.0))
              + line_chart("Mean attention distance per layer", series["distance_per_layer"], y_label="pixels",
                           colours=colours, y_range=(0.0, farthest)))
    depth = max(len(values) for entries in series.values() for _, values in entries)
    headers = ["layer"] + [f"entropy {m['label']}" for m in measured] + [f"distance {m['label']}" for m in measured]
    kinds = {"entropy_per_layer": "entropy", "distance_per_layer": "distance"}
    rows = []
    for layer in range(depth):
        cells = [_cell(layer, key="layer")]
        for key, entries in series.items():
            for label, values in entries:
                value = values[layer] if layer < len(values) else None
                cells.append(_cell(value, format_value(value, kinds[key]), f"{key}:{label}"))
        rows.append(f"<tr>{''.join(cells)}</tr>")
    return f'<h2>Attention density</h2><div class="charts">{charts}</div>' + _table(headers, rows, "density")


def _scalar(value: Any) -> bool:
    return value is None or isinstance(value, (str, int, float, bool))


def _value_text(value: Any) -> str:
    return format_value(value, "loss") if isinstance(value, float) else ("-" if value is None else str(value))


def generic_tables(record: Any, title: str = "") -> str:
    """Any JSON record as tables: scalars as key/value rows, mappings of mappings as a matrix, the rest nested."""
    heading = f"<h4>{escape(title)}</h4>" if title else ""
    if _scalar(record):
        return heading + f"<p>{escape(_value_text(record))}</p>"
    if isinstance(record, list):
        record = {str(i): item for i, item in enumerate(record)}
    scalars = {k: v for k, v in record.items() if _scalar(v)}
    nested = {k: v for k, v in record.items() if not _scalar(v)}
    out = heading
    if scalars:
        out += _table(["key", "value"], [f"<tr>{_cell(k)}{_cell(v, _value_text(v), k)}</tr>" for k, v in scalars.items()])
    matrix = {k: v for k, v in nested.items() if isinstance(v, Mapping) and all(_scalar(x) for x in v.values())}
    if len(matrix) > 1 or (matrix and len(next(iter(matrix.values()))) > 1):
        columns = list(dict.fromkeys(c for v in matrix.values() for c in v))
        if len(columns) > len(matrix):  # e.g. {"ce": {corruption: x}, "mean_error": {corruption: y}}: corruptions as rows
            rows = [f"<tr>{_cell(c)}{''.join(_cell(matrix[k].get(c), _value_text(matrix[k].get(c)), f'{k}:{c}') for k in matrix)}</tr>"
                    for c in columns]
            out += _table(["", *matrix], rows)
        else:
            rows = [f"<tr>{_cell(k)}{''.join(_cell(v.get(c), _value_text(v.get(c)), f'{k}:{c}') for c in columns)}</tr>"
                    for k, v in matrix.items()]
            out += _table(["", *columns], rows)
        nested = {k: v for k, v in nested.items() if k not in matrix}
    return out + "".join(generic_tables(v, str(k)) for k, v in nested.items())


def robustness_section(documents: Sequence[tuple[str, Mapping[str, Any]]], models: Sequence[Mapping[str, Any]]) -> str:
    """The models' robustness records as the CLI shows them (``report.robustness_page``); ``documents`` is unused."""
    from cbtool.report.robustness_page import robustness_html

    return robustness_html(models, _cell, _table)


def pictures_section(pictures: Sequence[str | os.PathLike[str]]) -> str:
    """One figure per row, each picture at its natural size (its titles as legible as in the PNG) in a box that
    scrolls sideways when the picture is wider than the page."""
    figures = []
    for path in pictures:
        path = Path(path)
        try:
            data = path.read_bytes()
        except OSError as error:
            raise CbtoolError(f"cannot read picture {path}: {error.strerror or error}") from None
        kind = {".png": "png", ".jpg": "jpeg", ".jpeg": "jpeg", ".svg": "svg+xml", ".webp": "webp"}.get(path.suffix.lower())
        if kind is None:
            raise CbtoolError(f"picture {path} is not a .png, .jpg, .svg or .webp file")
        uri = f"data:image/{kind};base64,{base64.b64encode(data).decode('ascii')}"
        figures.append(f'<figure><div class="picture"><img src="{uri}" alt="{escape(path.name)}"></div>'
                       f"<figcaption>{escape(path.name)} (natural size; scroll sideways for the rest)</figcaption></figure>")
    return "<h2>Attention pictures</h2>" + "".join(figures) if figures else ""


def provenance_section(models: Sequence[Mapping[str, Any]], documents: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    by_file = dict(documents)
    parts = []
    for model in models:
        document = by_file.get(model.get("file"), {})
        record = {"file": model.get("file"), "source": model.get("source"), "cb_spec": model.get("cb_spec"),
                  "dataset": document.get("dataset"), "preprocessing": document.get("preprocessing"),
                  "environment": document.get("environment"), "created": document.get("created"),
                  "cbtool_version": document.get("cbtool_version")}
        text = json_text(record, default=str)  # strict, as every JSON cbtool writes
        parts.append(f"<details><summary>{escape(str(model.get('label')))}</summary><pre>{escape(text)}</pre></details>")
    return '<h2>Provenance</h2><div id="provenance">' + "".join(parts) + "</div>"


def report_page(documents: Sequence[tuple[str, Mapping[str, Any]]], *, pictures: Sequence[str | os.PathLike[str]] = (),
                title: str = "cbtool report", allow_mismatch: bool = False) -> str:
    """The HTML page for ``(file name, results)`` pairs (``cbtool eval --json`` documents) and picture files.

    Files over different samples are refused as ``cbtool check`` refuses them, unless ``allow_mismatch``; then a
    warning stands above every comparison. Per-sample ``correct`` vectors are left out of the page."""
    if not documents:
        raise CbtoolError("the report needs at least one results file")
    comparison, checks = None, []
    if sum(len(document.get("models") or []) for _, document in documents) > 1:
        comparison = compare_results([document for _, document in documents], [name for name, _ in documents])
        checks = comparison.top1_checks(allow_mismatch=allow_mismatch)  # refuses other data unless allowed
    models = [without_per_sample(model) for model in label_models(documents)]
    shown = [(name, {**document, "robustness": _without_correct(document.get("robustness"))}) for name, document in documents]
    files = ", ".join(escape(Path(name).name) for name, _ in documents)
    warning = mismatch_warning(comparison)
    robustness = robustness_section(shown, models)
    body = "".join([
        f"<h1>{escape(title)}</h1><p class=\"meta\">{files} · cbtool {escape(__version__)}</p>", warning,
        metrics_section(models, comparison, checks), density_section(models),
        (warning + robustness) if robustness else "",
        pictures_section(pictures), provenance_section(models, shown),
    ])
    return (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8"><title>{escape(title)}</title>'
            f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{_STYLE}</style></head>'
            f"<body>{body}</body></html>\n")


def write_report_page(path: str | os.PathLike[str], documents: Sequence[tuple[str, Mapping[str, Any]]], *,
                      pictures: Sequence[str | os.PathLike[str]] = (), title: str = "cbtool report",
                      allow_mismatch: bool = False) -> Path:
    """Write :func:`report_page` to ``path`` atomically."""
    return write_text_atomic(path, report_page(documents, pictures=pictures, title=title, allow_mismatch=allow_mismatch))
