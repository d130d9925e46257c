"""``cbtool families``: the support matrix — which model classes cbtool rewrites, and what CB and density mean."""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Annotated

import typer


def families_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON instead of text.")] = False,
    markdown: Annotated[bool, typer.Option("--markdown", help="Print a Markdown table (the README's).")] = False,
) -> None:
    """List the supported model families: library, classes, CB semantics, density semantics."""
    from cbtool.families import support_matrix

    rows = support_matrix()
    if as_json:
        typer.echo(json.dumps([asdict(row) for row in rows], indent=2))
        return
    if markdown:
        typer.echo("| family | library | classes | Context Broadcasting | attention density |")
        typer.echo("|:---|:---|:---|:---|:---|")
        for row in rows:
            typer.echo(f"| {row.family} | {row.library} | {', '.join(row.classes)} | {row.cb} | {row.density} |")
        return
    for row in rows:
        typer.echo(f"{row.family} ({row.library})")
        typer.echo(f"  classes: {', '.join(row.classes)}")
        typer.echo(f"  CB:      {row.cb}")
        typer.echo(f"  density: {row.density}")
    typer.echo("Any other model class is refused. Positions: mlp (default), attn, block; see README.")
