"""``cbtool check``: fail CI when a results file regresses from a baseline beyond the allowed changes."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cbtool.cli._options import JsonOut, MarkdownOut, Quiet
from cbtool.cli._say import wrote

MaxDrop = Annotated[
    Optional[list[str]],
    typer.Option(
        "--max-drop",
        metavar="METRIC=VALUE",
        help="Fail when METRIC falls by more than VALUE (its units; points for top1/top5; '5%' relative). "
        "A bare METRIC uses its default bound; METRIC=off drops a default rule. Repeatable.",
    ),
]
MaxRise = Annotated[
    Optional[list[str]],
    typer.Option(
        "--max-rise",
        metavar="METRIC=VALUE",
        help="Fail when METRIC grows by more than VALUE (for loss, entropy and the robustness errors mce, "
        "relative_mce, error:fog, error:fog:3, where higher is worse). Repeatable.",
    ),
]


def check_command(
    results: Annotated[Path, typer.Argument(help="Results to check, from cbtool eval --json.", dir_okay=False)],
    baseline: Annotated[Path, typer.Option("--baseline", help="Baseline results to compare with.", dir_okay=False)],
    max_drop: MaxDrop = None,
    max_rise: MaxRise = None,
    alpha: Annotated[float, typer.Option("--alpha", help="Significance level of the accuracy tests.")] = 0.05,
    strict: Annotated[
        bool, typer.Option("--strict", help="Fail on any change beyond its bound, significant or not.")
    ] = False,
    allow_mismatch: Annotated[
        bool, typer.Option("--allow-mismatch", help="Compare files that describe different datasets.")
    ] = False,
    model: Annotated[Optional[str], typer.Option("--model", help="Label of the model to check in RESULTS.")] = None,
    baseline_model: Annotated[
        Optional[str], typer.Option("--baseline-model", help="Label of the model in the baseline (default: --model).")
    ] = None,
    markdown: MarkdownOut = None,
    json_out: JsonOut = None,
    quiet: Quiet = False,
) -> None:
    """Compare RESULTS with a baseline: exit 0 within bounds, 1 on a regression, 2 on bad input.

    Default bounds (top1 is always checked, the others only when named):
    top1, top5: 0.5 points; loss, entropy_mean: 0.02; entropy_layer: 0.05;
    distance_mean: 1.0 px; distance_layer: 2.0 px (the _layer bounds per layer);
    model_images_per_s, end_to_end_images_per_s: 5%; robustness (--max-rise):
    mce, relative_mce, error:CORRUPTION, error:CORRUPTION:SEVERITY: 1.0.

    A top1/top5 change beyond its bound counts only when significant at --alpha
    (McNemar's test on the same samples, else a two-proportion test);
    --strict counts it regardless. Verdicts: ok, improved, regression, and
    noise (beyond the bound but not significant).
    """

    from cbtool.check import check_results, parse_rules
    from cbtool.files import check_output_folder, check_text_file, write_json_atomic, write_text_atomic
    from cbtool.outputs import check_outputs
    from cbtool.results import load_results

    rules = parse_rules(max_drop or [], max_rise or [])
    check_outputs({"--json": json_out, "--markdown": markdown}, [results, baseline])
    for path in (json_out, markdown):
        if path is not None:
            check_output_folder(path)
    if markdown is not None:
        check_text_file(markdown)  # appended to: a binary file there is refused before the comparison
    report = check_results(
        load_results(results),
        load_results(baseline),
        rules,
        alpha=alpha,
        strict=strict,
        allow_mismatch=allow_mismatch,
        model=model,
        baseline_model=baseline_model,
        results_name=str(results),
        baseline_name=str(baseline),
    )
    typer.echo(report.to_text())
    if markdown is not None:
        write_text_atomic(markdown, report.to_markdown(), append=True)  # GitHub's step summary expects appends
        wrote(markdown, quiet=quiet, detail="appended the summary")
    if json_out is not None:
        write_json_atomic(json_out, report.to_dict())
        wrote(json_out, quiet=quiet)
    report.raise_for_regression()
