"""``cbtool compare``: results files side by side, with per-layer density and differences from the first."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from cbtool.cli._options import JsonOut, MarkdownOut, Plot, Quiet


def _summary(model: dict[str, Any]) -> dict[str, Any]:
    metrics, density = model["metrics"], model.get("density") or {}
    return {
        "label": model["label"],
        "file": model["file"],
        "num_samples": metrics.get("num_samples"),
        "top1": metrics.get("top1"),
        "top5": metrics.get("top5"),
        "loss": metrics.get("loss"),
        "throughput": metrics.get("throughput"),
        "entropy_mean": density.get("entropy_mean"),
        "distance_mean": density.get("distance_mean"),
        "entropy_per_layer": density.get("entropy_per_layer"),
        "distance_per_layer": density.get("distance_per_layer"),
    }


def compare_command(
    files: Annotated[
        list[Path], typer.Argument(help="Results files from cbtool eval --json; the first is the reference.")
    ],
    plot: Plot = None,
    json_out: JsonOut = None,
    markdown: MarkdownOut = None,
    quiet: Quiet = False,
) -> None:
    """Show results side by side: metrics, per-layer entropy and distance, and differences from the first."""
    import sys

    from cbtool.check import dataset_mismatches, load_results, paired_top1_test
    from cbtool.errors import CbtoolError
    from cbtool.report import (
        check_output_folder,
        label_models,
        density_table,
        difference_rows,
        difference_table,
        metrics_table,
        plot_density,
        write_json_atomic,
        write_text_atomic,
    )

    from cbtool.files import check_outputs

    check_outputs({"--json": json_out, "--plot": plot, "--markdown": markdown}, files)
    for path in (json_out, plot, markdown):
        if path is not None:
            check_output_folder(path)
    loaded = [(str(path), load_results(path)) for path in files]
    models = label_models(loaded)
    if len(models) < 2:
        raise CbtoolError("compare needs at least two models: give two results files, or one that holds several")

    if plot is not None and not any((m.get("density") or {}).get("entropy_per_layer") for m in models):
        raise CbtoolError("--plot needs per-layer density, and no model has it: evaluate with --density")

    reference = models[0]
    notes = []
    for model in models[1:]:
        reasons = dataset_mismatches(reference["dataset"], model["dataset"])
        if reasons:
            where = f"{model['label']} was evaluated on other data than {reference['label']}"
            notes.append(f"{where}: {'; '.join(reasons)}")
    sha = reference["dataset"].get("samples_sha256")
    same_samples = bool(sha) and all(m["dataset"].get("samples_sha256") == sha for m in models)
    p_values = None
    if same_samples:
        tests = [paired_top1_test(reference, model) for model in models[1:]]
        if any(test is not None for test in tests):
            p_values = [test.p_value if test is not None else None for test in tests]

    sections = [
        ("Metrics", metrics_table, {}),
        ("Attention density per layer", density_table, {}),
        (f"Differences from {reference['label']}", difference_table, {"p_values": p_values}),
    ]
    text_parts, markdown_parts = [], []
    for title, table, kwargs in sections:
        body = table(models, **kwargs)
        if body:
            text_parts.append(f"{title}\n{body}")
            markdown_parts.append(f"#### {title}\n\n{table(models, markdown=True, **kwargs)}")
    typer.echo("\n\n".join(text_parts))
    for note in notes:
        typer.echo(f"note: {note}")

    if plot is not None:  # first: the likeliest to fail (no matplotlib), before other files are written
        plot_density(models, plot)
    if markdown is not None:
        body = "\n\n".join(["### cbtool compare", *markdown_parts, *(f"- {note}" for note in notes)])
        write_text_atomic(markdown, body + "\n\n", append=True)
    if json_out is not None:
        differences = difference_rows(models)
        for index, row in enumerate(differences):
            row["top1_p_value"] = p_values[index] if p_values is not None else None
        record = {
            "kind": "cbtool-compare",
            "schema_version": 1,
            "files": [name for name, _ in loaded],
            "same_samples": same_samples,
            "notes": notes,
            "models": [_summary(m) for m in models],
            "differences": differences,
        }
        write_json_atomic(json_out, record)
    if not quiet:
        for path in (json_out, plot):
            if path is not None:
                print(f"wrote {path}", file=sys.stderr)
