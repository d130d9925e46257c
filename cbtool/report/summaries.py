"""Tables, markdown and plots shared by ``eval``, ``compare``, ``check`` and ``report``: how results read.

Everything here works on the ``models`` entries of the results schema (docs/results-schema.md), or on
what ``cbtool.check`` makes of them, and imports nothing heavy: matplotlib only inside :func:`pyplot`.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cbtool.errors import CbtoolError
from cbtool.report.plotting import model_colours, pyplot
from cbtool.robustness.render import robustness_section
from cbtool.report.tables import _table, delta, format_p, format_table, format_value, markdown_table  # noqa: F401  (names kept here)
# The atomic writers live in files.py; they stay importable from here, where eval, compare and check found them.
from cbtool.files import atomic_path, check_output_folder, check_parent_folder, write_json_atomic, write_text_atomic  # noqa: F401

__all__ = [
    "check_markdown",
    "check_summary",
    "check_text",
    "comparison_markdown",
    "comparison_text",
    "density_table",
    "difference_rows",
    "difference_table",
    "format_p",
    "format_table",
    "format_value",
    "label_models",
    "markdown_table",
    "metrics_table",
    "plot_density",
    "check_output_folder",
    "write_json_atomic",
    "write_text_atomic",
]

def _metrics(model: Mapping[str, Any]) -> Mapping[str, Any]:
    return model.get("metrics") or {}


def _density(model: Mapping[str, Any]) -> Mapping[str, Any]:
    return model.get("density") or {}


def _throughput(model: Mapping[str, Any], key: str) -> Any:
    return (_metrics(model).get("throughput") or {}).get(key)


def label_models(loaded: Sequence[tuple[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Every model of every ``(file name, results)``, relabelled ``file:label`` when labels would be ambiguous."""
    entries = [(name, results, model) for name, results in loaded for model in results["models"]]
    labels = [str(model["label"]) for _, _, model in entries]
    if len(set(labels)) < len(labels):
        short = [f"{Path(name).name}:{model['label']}" for name, _, model in entries]
        labels = short if len(set(short)) == len(short) else [f"{name}:{model['label']}" for name, _, model in entries]
    return [
        {**model, "label": label, "file": name, "dataset": results["dataset"]}
        for (name, results, model), label in zip(entries, labels)
    ]


METRIC_HEADERS = ["model", "top1", "top5", "loss", "samples", "img/s model", "img/s e2e", "entropy", "distance"]


def metrics_row(model: Mapping[str, Any]) -> list[str]:
    """One row of :func:`metrics_table` for one ``models`` entry."""
    metrics, density = _metrics(model), _density(model)
    return [
        str(model.get("label", "?")),
        format_value(metrics.get("top1")),
        format_value(metrics.get("top5")),
        format_value(metrics.get("loss"), "loss"),
        format_value(metrics.get("num_samples"), "count"),
        format_value(_throughput(model, "model_images_per_s"), "throughput"),
        format_value(_throughput(model, "end_to_end_images_per_s"), "throughput"),
        format_value(density.get("entropy_mean"), "entropy"),
        format_value(density.get("distance_mean"), "distance"),
    ]


def metrics_table(models: Sequence[Mapping[str, Any]], *, markdown: bool = False) -> str:
    """Accuracy, loss, throughput and attention density of each model, one row per model."""
    return _table(METRIC_HEADERS, [metrics_row(m) for m in models], markdown)


def density_table(models: Sequence[Mapping[str, Any]], *, markdown: bool = False) -> str:
    """Per-layer entropy and attention distance, one row per layer and one column per model and quantity.

    Models evaluated without ``--density`` are left out; the result is ``""`` when none has it.
    """
    with_density = [m for m in models if _density(m).get("entropy_per_layer") is not None]
    if not with_density:
        return ""
    labels = [str(m.get("label", "?")) for m in with_density]
    entropies = [list(_density(m).get("entropy_per_layer") or []) for m in with_density]
    distances = [list(_density(m).get("distance_per_layer") or []) for m in with_density]
    depth = max(len(values) for values in entropies + distances)

    def at(values: list[Any], index: int) -> Any:
        return values[index] if index < len(values) else None

    single = len(with_density) == 1
    headers = ["layer"]
    headers += ["entropy" if single else f"entropy {label}" for label in labels]
    headers += ["distance" if single else f"distance {label}" for label in labels]
    rows = []
    for layer in range(depth):
        row = [str(layer)]
        row += [format_value(at(values, layer), "entropy") for values in entropies]
        row += [format_value(at(values, layer), "distance") for values in distances]
        rows.append(row)
    notes = _not_applicable_notes(with_density, labels, single)
    table = _table(headers, rows, markdown)
    return table if not notes else table + ("\n\n" if markdown else "\n") + "\n".join(notes)


def _not_applicable_notes(models: Sequence[Mapping[str, Any]], labels: list[str], single: bool) -> list[str]:
    """One line per model and reason for the layers density is not defined for (``-`` in the table)."""
    notes = []
    for model, label in zip(models, labels):
        by_reason: dict[str, list[str]] = {}
        for layer, reason in (_density(model).get("not_applicable") or {}).items():
            by_reason.setdefault(str(reason), []).append(str(layer))
        for reason, layers in by_reason.items():
            owner = "" if single else f" of {label}"
            notes.append(f"layers {', '.join(layers)}{owner} not measured: {reason}")
    return notes


DIFFERENCE_HEADERS = ["model", "Δtop1", "Δtop5", "Δloss", "Δentropy", "Δdistance", "img/s model", "img/s e2e"]


def difference_rows(models: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Differences of ``models[1:]`` from ``models[0]`` (current minus reference; throughput as a ratio)."""
    if not models:
        return []
    ref = models[0]
    rows = []
    for model in models[1:]:
        m, r = _metrics(model), _metrics(ref)
        d, rd = _density(model), _density(ref)
        row: dict[str, Any] = {
            "label": model.get("label"),
            "reference": ref.get("label"),
            "top1": delta(m.get("top1"), r.get("top1")),
            "top5": delta(m.get("top5"), r.get("top5")),
            "loss": delta(m.get("loss"), r.get("loss")),
            "entropy_mean": delta(d.get("entropy_mean"), rd.get("entropy_mean")),
            "distance_mean": delta(d.get("distance_mean"), rd.get("distance_mean")),
        }
        for key in ("model_images_per_s", "end_to_end_images_per_s"):
            current, reference = _throughput(model, key), _throughput(ref, key)
            row[f"{key}_ratio"] = current / reference if current is not None and reference else None
        rows.append(row)
    return rows


def difference_table(
    models: Sequence[Mapping[str, Any]], *, p_values: Sequence[float | None] | None = None, markdown: bool = False
) -> str:
    """Differences of each model from the first; ``p_values`` (one per later model) adds a McNemar column."""
    headers = list(DIFFERENCE_HEADERS) + (["p (top1)"] if p_values is not None else [])
    rows = []
    for index, diff in enumerate(difference_rows(models)):
        row = [
            str(diff["label"]),
            format_value(diff["top1"], signed=True),
            format_value(diff["top5"], signed=True),
            format_value(diff["loss"], "loss", signed=True),
            format_value(diff["entropy_mean"], "entropy", signed=True),
            format_value(diff["distance_mean"], "distance", signed=True),
            "-" if diff["model_images_per_s_ratio"] is None else f"{diff['model_images_per_s_ratio']:.2f}x",
            "-" if diff["end_to_end_images_per_s_ratio"] is None else f"{diff['end_to_end_images_per_s_ratio']:.2f}x",
        ]
        if p_values is not None:
            row.append(format_p(p_values[index]))
        rows.append(row)
    return _table(headers, rows, markdown)


def _check_rows(report: Any) -> tuple[list[str], list[list[str]]]:
    several = len({(c.model, c.baseline_model) for c in report.checks}) > 1
    headers = ["metric", "baseline", "current", "diff", report.confidence_label, "p", "allowed", "verdict"]
    rows = []
    for c in report.checks:
        diff = format_value(c.difference, c.kind, signed=True)
        if c.allowed_text.endswith("%") and c.difference is not None and c.baseline:
            diff += f" ({100 * c.difference / abs(c.baseline):+.1f}%)"
        interval = "-"
        if c.interval is not None:
            low, high = (format_value(v, c.kind, signed=True) for v in c.interval)
            interval = f"[{low}, {high}]"
        current, baseline = format_value(c.current, c.kind), format_value(c.baseline, c.kind)
        row = [c.metric, baseline, current, diff, interval, format_p(c.p_value), c.allowed_text, c.verdict]
        rows.append([c.model, *row] if several else row)
    return (["model", *headers] if several else headers), rows


def check_summary(report: Any) -> str:
    """One line for a ``check.CheckReport``: passed or failed, and the count of each verdict."""
    counts = ", ".join(f"{count} {verdict}" for verdict, count in report.counts.items())
    state = "passed" if report.passed else "FAILED"
    return f"check {state}: {len(report.checks)} checks ({counts})"


def check_text(report: Any) -> str:
    """A ``check.CheckReport`` as plain text: which files, the table, notes and the summary line."""
    pairs = sorted({(c.model, c.baseline_model) for c in report.checks})
    lines = [f"{report.results_name} vs baseline {report.baseline_name}"]
    if len(pairs) == 1:
        model, base = pairs[0]
        lines[0] += f" (model {model!r}" + (f" vs {base!r})" if base != model else ")")
    headers, rows = _check_rows(report)
    lines += ["", format_table(headers, rows), ""]
    lines += [f"note: {note}" for note in report.notes]
    lines.append(check_summary(report))
    return "\n".join(lines)


def check_markdown(report: Any) -> str:
    """A ``check.CheckReport`` as a section for a CI job page (e.g. ``$GITHUB_STEP_SUMMARY``)."""
    headers, rows = _check_rows(report)
    rows = [[f"**{cell}**" if cell == "regression" else cell for cell in row] for row in rows]
    state = "passed" if report.passed else "failed: regression"
    lines = [
        f"### cbtool check {state}",
        "",
        f"`{report.results_name}` vs baseline `{report.baseline_name}`, "
        f"alpha {report.alpha:g}{', strict' if report.strict else ''}.",
        "",
        markdown_table(headers, rows),
        "",
    ]
    lines += [f"- {note}" for note in report.notes]
    if report.notes:
        lines.append("")
    return "\n".join(lines) + "\n"  # a blank line before whatever the next step appends


def _comparison_sections(comparison: Any, markdown: bool) -> list[str]:
    reference = comparison.models[0]
    sections = [
        ("Metrics", metrics_table, {}),
        ("Attention density per layer", density_table, {}),
        (f"Differences from {reference['label']}", difference_table, {"p_values": comparison.p_values}),
        ("Robustness (top-1 error %; CE and mCE only where AlexNet's figures apply: see the notes)", robustness_section, {}),
    ]
    parts = []
    for title, table, kwargs in sections:
        body = table(comparison.models, markdown=markdown, **kwargs)
        if body:
            parts.append(f"#### {title}\n\n{body}" if markdown else f"{title}\n{body}")
    return parts


def comparison_text(comparison: Any) -> str:
    """A ``check.Comparison`` as plain text: metrics, per-layer density, differences from the first, notes."""
    return "\n".join(["\n\n".join(_comparison_sections(comparison, False)), *(f"note: {n}" for n in comparison.notes)])


def comparison_markdown(comparison: Any) -> str:
    """A ``check.Comparison`` as a markdown section to append to a CI job page."""
    body = "\n\n".join(["### cbtool compare", *_comparison_sections(comparison, True),
                         *(f"- {note}" for note in comparison.notes)])  # fmt: skip
    return body + "\n\n"


def plot_density(models: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write a PNG with per-layer entropy and attention distance, one line per model, and, where a model has
    ``cbs`` scales, their mean per CB layer with the min-max band; returns the path."""
    path = Path(path)
    figure = density_figure(models)
    plt = pyplot()
    try:
        check_parent_folder(path)
        with atomic_path(path) as temporary:
            figure.savefig(temporary, format="png", dpi=120)
    finally:
        plt.close(figure)
    return path


def density_figure(models: Sequence[Mapping[str, Any]]):
    """The matplotlib figure of :func:`plot_density` (the caller closes it). Each model keeps one colour in every
    panel (``plotting.model_colours``, by its place among ``models``); one legend, below the panels, covers no data."""
    # Only models with a measured layer: a model whose every layer is n/a (differential attention) has no line.
    with_density = [m for m in models if any(v is not None for v in _density(m).get("entropy_per_layer") or [])]
    with_scales = [m for m in models if m.get("cb_scales")]
    if not with_density and not with_scales:
        reasons = sorted({str(r) for m in models for r in (_density(m).get("not_applicable") or {}).values()})
        if reasons:
            raise CbtoolError(f"no layer has attention density to plot: {'; '.join(reasons)}")
        raise CbtoolError("no model has per-layer density or cbs scales to plot; evaluate with --density "
                          "(or a cbs model)")
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    colours = model_colours(m.get("label", "?") for m in models)
    panels = 2 * bool(with_density) + bool(with_scales)
    fig, axes = plt.subplots(1, panels, figsize=(5 * panels, 4), layout="constrained", squeeze=False)
    axes = list(axes[0])
    try:
        if with_density:
            ax_entropy, ax_distance = axes[:2]
            for model in with_density:
                label = str(model.get("label", "?"))
                entropy = _density(model).get("entropy_per_layer") or []
                distance = _density(model).get("distance_per_layer") or []
                ax_entropy.plot(range(len(entropy)), entropy, marker="o", label=label, color=colours[label])
                ax_distance.plot(range(len(distance)), distance, marker="o", label=label, color=colours[label])
            # From 0: entropy on its absolute scale (1 = uniform), distance from no distance at all, so that a
            # difference of a hundredth is not stretched over the whole axis
            ax_entropy.set(title="Attention entropy", xlabel="layer", ylabel="normalised entropy (1 = uniform)",
                           ylim=(0, 1.02))
            ax_distance.set(title="Mean attention distance", xlabel="layer", ylabel="pixels")
            ax_distance.set_ylim(0, 1.08 * ax_distance.get_ylim()[1])  # room above the farthest layer's point
        if with_scales:
            _plot_scales(axes[-1], with_scales, colours)
        for ax in axes:
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        legend: dict[str, Any] = {}  # label -> handle, each model once across the panels
        for ax in axes:
            for handle, label in zip(*ax.get_legend_handles_labels()):
                legend.setdefault(label, handle)
        fig.legend(list(legend.values()), list(legend), loc="outside lower center", fontsize="small",
                   ncols=min(len(legend), 6), frameon=False)
    except BaseException:
        plt.close(fig)
        raise
    return fig


def _plot_scales(ax, models: Sequence[Mapping[str, Any]], colours: Mapping[str, str] | None = None) -> None:
    """The learned cbs scales per block (the row's ``layer``; files from before it: the CB operations in
    order): the mean, and the band from min to max, in each model's colour from ``colours``."""
    colours = colours or model_colours(m.get("label", "?") for m in models)
    for model in models:
        rows = model["cb_scales"]
        label = str(model.get("label", "?"))
        layers = [row["layer"] if row.get("layer") is not None else i for i, row in enumerate(rows)]
        ax.plot(layers, [r["mean"] for r in rows], marker="o", label=label, color=colours[label])
        ax.fill_between(layers, [r["min"] for r in rows], [r["max"] for r in rows], color=colours[label], alpha=0.15)
    ax.axhline(0.5, color="grey", linestyle=":", linewidth=1, label="cb (0.5)")
    ax.set(title="Learned CB_S scales", xlabel="layer", ylabel="scale (mean, min-max band)")
