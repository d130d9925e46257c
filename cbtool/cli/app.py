"""Wires the command modules into one Typer app and turns user errors into one line on stderr."""

from __future__ import annotations

import os
import sys

import typer

from cbtool import __version__
from cbtool.cli import bench, check, compare, eval as eval_cmd, families, finetune, info, inject, report_page, viz

app = typer.Typer(
    name="cbtool",
    help="Context Broadcasting for Vision Transformers: inject, evaluate, fine-tune, and guard in CI.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
app.command("inject")(inject.inject_command)
app.command("info")(info.info_command)
app.command("eval")(eval_cmd.eval_command)
app.command("finetune")(finetune.finetune_command)
app.command("check")(check.check_command)
app.command("compare")(compare.compare_command)
app.command("bench")(bench.bench_command)
app.command("families")(families.families_command)
app.command("viz")(viz.viz_command)
app.command("report")(report_page.report_command)


def _version_callback(value: bool) -> None:
    if value:
        typer.echo(f"cbtool {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: bool = typer.Option(False, "--version", callback=_version_callback, is_eager=True, help="Show the version and exit."),
) -> None:
    """Context Broadcasting for Vision Transformers."""


# Options that, as in timm's scripts, take several space-separated values after one flag: key=value pairs,
# or (PATH_OPTIONS) every following argument up to the next option.
MULTI_VALUE_OPTIONS = ("--model-kwargs", "--images", "--pictures")
PATH_OPTIONS = ("--images", "--pictures")


def expand_multi_value_options(argv: list[str]) -> list[str]:
    """``--model-kwargs a=1 b=2`` -> ``--model-kwargs a=1 --model-kwargs b=2`` (Typer takes one value per flag)."""
    expanded: list[str] = []
    current: str | None = None
    for arg in argv:
        if arg in MULTI_VALUE_OPTIONS:
            current = arg
            continue
        if current is not None and ("=" in arg or current in PATH_OPTIONS) and not arg.startswith("-"):
            expanded += [current, arg]
            continue
        if current is not None and not expanded[-2:-1] == [current]:
            expanded.append(current)  # let Typer report the missing value
        current = None
        expanded.append(arg)
    if current is not None and expanded[-2:-1] != [current]:
        expanded.append(current)
    return expanded


def main(argv: list[str] | None = None) -> None:
    """Console entry point: known errors become one line on stderr (``CBTOOL_DEBUG=1`` shows the traceback)."""
    from cbtool.errors import CbtoolError

    args = expand_multi_value_options(list(sys.argv[1:] if argv is None else argv))
    try:
        app(args=args, prog_name="cbtool")  # standalone: Typer reports usage errors itself (exit 2)
    except CbtoolError as error:
        if os.environ.get("CBTOOL_DEBUG"):
            raise
        print(f"cbtool: error: {error}", file=sys.stderr)
        sys.exit(error.exit_code)
    except KeyboardInterrupt:
        print("cbtool: interrupted", file=sys.stderr)
        sys.exit(130)
