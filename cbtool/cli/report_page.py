"""``cbtool report``: results files (and attention pictures) as one self-contained HTML page."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cbtool.cli._options import Quiet
from cbtool.cli._say import wrote


def report_command(
    files: Annotated[list[Path], typer.Argument(help="Results files from cbtool eval --json (robustness records included).")],
    output: Annotated[Path, typer.Option("--output", "-o", help="HTML file to write (replaced atomically).", dir_okay=False)],
    pictures: Annotated[Optional[list[Path]], typer.Option("--pictures", help="PNG files to embed, e.g. from cbtool viz (repeatable).")] = None,
    title: Annotated[str, typer.Option("--title", help="Title of the page.")] = "cbtool report",
    allow_mismatch: Annotated[bool, typer.Option("--allow-mismatch", help="Report files over different samples, under a warning (as cbtool check compares them).")] = False,
    quiet: Quiet = False,
) -> None:
    """Write one self-contained HTML page: metrics, per-layer density, robustness, pictures and provenance."""

    from cbtool.files import check_output_folder
    from cbtool.outputs import check_outputs
    from cbtool.results import load_results
    from cbtool.report.page import write_report_page

    check_outputs({"--output": output}, [*files, *(pictures or [])])
    check_output_folder(output)
    documents = [(str(path), load_results(path)) for path in files]
    write_report_page(output, documents, pictures=pictures or [], title=title, allow_mismatch=allow_mismatch)
    wrote(output, quiet=quiet)
