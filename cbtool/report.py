"""Tables, markdown, plots and atomic file writes shared by ``eval``, ``compare`` and ``check``.

Everything here works on the ``models`` entries of the results schema (docs/results-schema.md) and
imports nothing heavy: matplotlib is imported only inside :func:`plot_density` and :func:`plot_robustness`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cbtool.checkpoint import atomic_path
from cbtool.errors import CbtoolError, OutputError

__all__ = [
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
    "write_json_atomic",
    "write_text_atomic",
]

# Decimals per kind of number: accuracies in percent, entropies normalised to [0, 1], distances in pixels.
_DECIMALS = {"accuracy": 2, "loss": 4, "entropy": 4, "distance": 2, "throughput": 1, "count": 0}


def format_value(value: Any, kind: str = "accuracy", *, signed: bool = False) -> str:
    """``value`` with the decimals its kind deserves; ``None`` (and NaN) as ``-``."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isnan(value):
        return "nan" if signed else "-"
    decimals = _DECIMALS.get(kind, 4)
    sign = "+" if signed else ""
    if kind == "count":
        return f"{int(value):{sign},d}"
    return f"{value:{sign}.{decimals}f}"


def format_p(p: float | None) -> str:
    """A p-value with three decimals, or in scientific notation when below 0.001."""
    if p is None:
        return "-"
    return f"{p:.1e}" if p < 0.001 else f"{p:.3f}"


def _looks_numeric(cell: str) -> bool:
    # "-" (missing), "81.20", "1,000", "+0.0500 (+1.2%)", "[-5.74, -2.25]", "1.3e-05", "0.98x"
    if cell.strip() in {"", "-"}:
        return True
    first = cell.strip().strip("[(").split()[0].rstrip(",").replace(",", "").rstrip("%x")
    try:
        float(first)
    except ValueError:
        return False
    return True


def _cells(rows: Sequence[Sequence[Any]]) -> list[list[str]]:
    return [["-" if cell is None else str(cell) for cell in row] for row in rows]


def _default_align(headers: Sequence[str], rows: list[list[str]]) -> list[str]:
    # The first column names the row; the others are right-aligned when every cell is a number.
    align = ["<"]
    for column in range(1, len(headers)):
        numeric = all(_looks_numeric(row[column]) for row in rows if column < len(row))
        align.append(">" if numeric and rows else "<")
    return align


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    """A plain-text table with a header rule; ``align`` holds ``<`` or ``>`` per column (default: numbers right)."""
    cells = _cells(rows)
    for row in cells:
        if len(row) != len(headers):
            raise ValueError(f"row has {len(row)} cells for {len(headers)} headers: {row}")
    align = list(align) if align is not None else _default_align(headers, cells)
    widths = [max([len(str(h))] + [len(row[i]) for row in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(f"{v:{a}{w}}" for v, a, w in zip(values, align, widths)).rstrip()

    out = [line([str(h) for h in headers]), "  ".join("-" * w for w in widths)]
    out.extend(line(row) for row in cells)
    return "\n".join(out)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]], align: Sequence[str] | None = None) -> str:
    """A GitHub-flavoured markdown table; ``|`` inside cells is escaped."""
    cells = _cells(rows)
    align = list(align) if align is not None else _default_align(headers, cells)

    def escape(text: str) -> str:
        return text.replace("|", "\\|").replace("\n", " ")

    out = ["| " + " | ".join(escape(str(h)) for h in headers) + " |"]
    out.append("|" + "|".join("---:" if a == ">" else ":---" for a in align) + "|")
    out.extend("| " + " | ".join(escape(c) for c in row) + " |" for row in cells)
    return "\n".join(out)


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]], markdown: bool) -> str:
    return markdown_table(headers, rows) if markdown else format_table(headers, rows)


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
    return _table(headers, rows, markdown)


DIFFERENCE_HEADERS = ["model", "Δtop1", "Δtop5", "Δloss", "Δentropy", "Δdistance", "img/s model", "img/s e2e"]


def _delta(current: Any, reference: Any) -> float | None:
    if current is None or reference is None:
        return None
    return current - reference


def _ratio(current: Any, reference: Any) -> str:
    if current is None or not reference:
        return "-"
    return f"{current / reference:.2f}x"


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
            "top1": _delta(m.get("top1"), r.get("top1")),
            "top5": _delta(m.get("top5"), r.get("top5")),
            "loss": _delta(m.get("loss"), r.get("loss")),
            "entropy_mean": _delta(d.get("entropy_mean"), rd.get("entropy_mean")),
            "distance_mean": _delta(d.get("distance_mean"), rd.get("distance_mean")),
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


def _pyplot():
    """matplotlib.pyplot on the Agg backend, or a one-line error naming the extra to install."""
    try:
        import matplotlib
    except ImportError as error:
        raise CbtoolError("plots need matplotlib: pip install 'cbtool[plot]'") from error
    matplotlib.use("Agg")  # no display on CI machines; must precede pyplot
    import matplotlib.pyplot as plt

    return plt


def plot_density(models: Sequence[Mapping[str, Any]], path: str | os.PathLike[str]) -> Path:
    """Write a PNG with per-layer entropy and attention distance, one line per model; returns the path."""
    with_density = [m for m in models if _density(m).get("entropy_per_layer") is not None]
    if not with_density:
        raise CbtoolError("no model has per-layer density to plot; evaluate with --density")
    plt = _pyplot()
    from matplotlib.ticker import MaxNLocator

    path = Path(path)
    _check_folder(path)
    fig, (ax_entropy, ax_distance) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    try:
        for model in with_density:
            label = str(model.get("label", "?"))
            entropy = _density(model).get("entropy_per_layer") or []
            distance = _density(model).get("distance_per_layer") or []
            ax_entropy.plot(range(len(entropy)), entropy, marker="o", label=label)
            ax_distance.plot(range(len(distance)), distance, marker="o", label=label)
        ax_entropy.set(title="Attention entropy", xlabel="layer", ylabel="normalised entropy (1 = uniform)")
        ax_distance.set(title="Mean attention distance", xlabel="layer", ylabel="pixels")
        for ax in (ax_entropy, ax_distance):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend(fontsize="small")
        with atomic_path(path) as temporary:
            fig.savefig(temporary, format="png", dpi=120)
    finally:
        plt.close(fig)
    return path


def _check_folder(path: Path) -> None:
    if not path.parent.is_dir():
        raise OutputError(f"output folder {path.parent} does not exist; create it first")


def write_text_atomic(path: str | os.PathLike[str], text: str, *, append: bool = False) -> Path:
    """Write ``text`` to ``path`` atomically; with ``append``, after the file's current content."""
    path = Path(path)
    _check_folder(path)
    if append and path.is_file():
        previous = path.read_text(encoding="utf-8")
        if previous and not previous.endswith("\n"):
            previous += "\n"
        text = previous + text
    with atomic_path(path) as temporary:
        temporary.write_text(text, encoding="utf-8")
    return path


def write_json_atomic(path: str | os.PathLike[str], obj: Any) -> Path:
    """Write ``obj`` as JSON (sorted keys, indent 2, trailing newline) atomically."""
    text = json.dumps(obj, sort_keys=True, indent=2, allow_nan=True) + "\n"
    return write_text_atomic(path, text)


def check_output_folder(path: str | os.PathLike[str]) -> Path:
    """Fail before any work when a report's folder is missing (reports are overwritten; models are not)."""
    path = Path(path).expanduser()
    if path.is_dir():
        raise OutputError(f"output {path} is a folder; give a file name")
    _check_folder(path)
    return path


# --------------------------------------------------------------------------------------------
# Robustness (cbtool eval --corruptions)
# --------------------------------------------------------------------------------------------


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
    table = _table(headers, rows, markdown)
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
    plt = _pyplot()

    path = Path(path)
    _check_folder(path)
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
