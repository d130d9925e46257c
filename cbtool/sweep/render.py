"""How a sweep's summary reads: the table of cells (mean ± std over seeds), the verdicts against ``plain``, and
the plot of top-1 and entropy per cell with each seed's value. No torch; matplotlib only for the plot."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

from cbtool.sweep.summary import METRICS


def _mean_std(entry: Mapping[str, Any], kind: str) -> str:
    from cbtool.report.tables import format_value

    if entry["mean"] is None:
        return "-"
    mean = format_value(entry["mean"], kind)
    return mean if entry["std"] is None else f"{mean} ± {format_value(entry['std'], kind)}"


def summary_rows(summary: Mapping[str, Any]) -> tuple[list[str], list[list[str]]]:
    labels = {key: label for key, label, *_ in METRICS}
    kinds = {key: kind for key, _, kind, _ in METRICS}
    headers = ["cell", "seeds", *(labels[key] for key in summary["metrics"])]
    rows = [[cell["name"], str(len(cell["seeds"])),
             *(_mean_std(cell["metrics"][key], kinds[key]) for key in summary["metrics"])]
            for cell in summary["cells"]]  # fmt: skip
    return headers, rows


def summary_text(summary: Mapping[str, Any], *, markdown: bool = False) -> str:
    """The table, then one sentence per comparison with ``plain`` (or why there is none), then what is missing."""
    from cbtool.report.tables import format_table, markdown_table

    headers, rows = summary_rows(summary)
    lines = [(markdown_table if markdown else format_table)(headers, rows), ""]
    lines.append("mean ± sample standard deviation over seeds; tests at p < 0.05")
    lines += [comparison["statement"] for comparison in summary["comparisons"]]
    lines += summary["notes"]
    if summary["missing"]:
        lines.append(f"unfinished runs ({len(summary['missing'])}, left out above): {', '.join(summary['missing'])}")
    return "\n".join(lines)


def plot_summary(summary: Mapping[str, Any], path: str | os.PathLike[str]) -> Path:
    """A PNG with one panel per metric among top-1 and entropy, and with corruptions the mCE (or, where there is
    no mCE, the mean corruption error): each seed's value as a dot, the mean with a ±1 standard deviation bar, one
    column per cell."""
    from cbtool.files import atomic_path
    from cbtool.report.plotting import pyplot

    plt = pyplot()
    figure = summary_figure(summary)
    path = Path(path)
    try:
        with atomic_path(path) as temporary:
            figure.savefig(temporary, format="png", dpi=110)
    finally:
        plt.close(figure)
    return path


def summary_figure(summary: Mapping[str, Any]):
    """The figure of :func:`plot_summary` (the caller closes it). Each cell's mean is drawn in its colour from
    ``plotting.model_colours`` over the cells in order, as ``compare --plot`` colours models (plain first: blue)."""
    from cbtool.report.plotting import model_colours, pyplot

    plt = pyplot()
    wanted = [(key, label) for key, label, *_ in METRICS
              if key in summary["metrics"] and key in ("top1", "entropy_mean", "mce")]
    if "mce" not in summary["metrics"] and "corruption_error" in summary["metrics"]:
        wanted.append(("corruption_error", corruption_error_title(summary)))
    figure, axes = plt.subplots(1, len(wanted), figsize=(4.2 * len(wanted), 3.6), squeeze=False)
    names = [cell["name"] for cell in summary["cells"]]
    colours = model_colours(names)
    for axis, (key, label) in zip(axes[0], wanted):
        for x, cell in enumerate(summary["cells"]):
            entry = cell["metrics"][key]
            values = [v for v in entry["values"] if v is not None]
            axis.scatter([x] * len(values), values, s=18, color="0.55", zorder=2)
            if entry["mean"] is not None:
                axis.errorbar([x + 0.15], [entry["mean"]], yerr=[entry["std"] or 0.0], fmt="o",
                              color=colours[cell["name"]], capsize=4, zorder=3)
        axis.set_xticks(range(len(names)), names, rotation=20, ha="right")
        for tick, name in zip(axis.get_xticklabels(), names):
            tick.set_color(colours[name])
        axis.set_title("mCE\n(% of AlexNet's errors)" if key == "mce" else label)
        # Absolute scales, so that differences of no weight do not fill the axis: entropy on its 0-1 range,
        # accuracy and errors from 0 (the range shows, in the ticks, how much of it the cells span).
        if key == "entropy_mean":
            axis.set_ylim(0.0, 1.0)
        else:
            # errors: 5% headroom above the highest bar, so that no bar seems cut off by the frame
            axis.set_ylim(bottom=0.0, top=100.0 if key == "top1" else 1.05 * axis.dataLim.y1)
        axis.ticklabel_format(axis="y", useOffset=False, style="plain")
        axis.grid(axis="y", alpha=0.3)
    figure.suptitle("per seed (grey) and mean ± std")
    figure.tight_layout()
    return figure


def corruption_error_title(summary: Mapping[str, Any]) -> str:
    """The robustness panel's title without an mCE (AlexNet's errors apply only to ImageNet-1k validation): the
    mean corruption error in points, and the corruptions and severities it averages, from the sweep's record."""
    from cbtool.robustness.registry import describe_corruptions, format_severities

    evaluation = (summary.get("sweep") or {}).get("evaluation") or {}
    names, severities = evaluation.get("corruptions") or [], evaluation.get("severities") or []
    lines = ["mean corruption error (points; not mCE)",
             f"top-1 error over {describe_corruptions(names, most=2) if names else 'the corruptions evaluated'}"]
    if severities:
        lines.append(f"severit{'ies' if len(severities) > 1 else 'y'} {format_severities(severities)}")
    return "\n".join(lines)
