"""``cbtool compare``: results files side by side, with per-layer density and differences from the first."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cbtool.cli._options import JsonOut, MarkdownOut, Plot, Quiet
from cbtool.cli._say import wrote


def compare_command(
    files: Annotated[
        list[Path], typer.Argument(help="Results files from cbtool eval --json; the first is the reference.")
    ],
    plot: Plot = None,
    json_out: JsonOut = None,
    markdown: MarkdownOut = None,
    quiet: Quiet = False,
) -> None:
    """Show results side by side: metrics, per-layer entropy and distance, and differences from the first.

    --plot draws per-layer entropy and distance, and the learned cbs scales per layer where a model has them.
    """

    from cbtool.check import compare_results
    from cbtool.errors import CbtoolError
    from cbtool.files import check_output_folder, check_text_file, write_json_atomic, write_text_atomic
    from cbtool.outputs import check_outputs, check_png_name
    from cbtool.report import comparison_markdown, comparison_text, plot_density
    from cbtool.results import load_results

    check_outputs({"--json": json_out, "--plot": plot, "--markdown": markdown}, files)
    check_png_name("--plot", plot)
    for path in (json_out, plot, markdown):
        if path is not None:
            check_output_folder(path)
    if markdown is not None:
        check_text_file(markdown)  # appended to: a binary file there is refused before the comparison
    comparison = compare_results([load_results(path) for path in files], [str(path) for path in files])
    plottable = [m for m in comparison.models if (m.get("density") or {}).get("entropy_per_layer") or m.get("cb_scales")]
    if plot is not None and not plottable:
        raise CbtoolError("--plot needs per-layer density or cbs scales, and no model has them: evaluate with --density")

    typer.echo(comparison_text(comparison))
    if plot is not None:  # first: the likeliest to fail (no matplotlib), before other files are written
        plot_density(comparison.models, plot)
        wrote(plot, quiet=quiet)
    if markdown is not None:
        write_text_atomic(markdown, comparison_markdown(comparison), append=True)
        wrote(markdown, quiet=quiet, detail="appended the comparison")
    if json_out is not None:
        write_json_atomic(json_out, comparison.to_dict())
        wrote(json_out, quiet=quiet)
