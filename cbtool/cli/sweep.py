"""``cbtool sweep``: every run of a grid (variants x positions x layer sets x seeds) fine-tuned and evaluated the
same way, then a summary against ``plain``. Takes every ``cbtool finetune`` option: its signature is finetune's,
less the options the sweep sets per run, plus the sweep's own."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cbtool.cli import _options as opt
from cbtool.cli._slurm import SLURM_OPTIONS
from cbtool.cli._say import wrote
from cbtool.cli.finetune import finetune_command

_SWEEP_OPTIONS = {
    "variants": (str, "plain,cb", typer.Option("--variants", help="Comma list of plain (no CB), cb, cbs.")),
    "positions": (str, "mlp", typer.Option("--positions", help="Comma list of CB positions: mlp, attn, block.")),
    "layers": (Optional[list[str]], None, typer.Option("--layers", help="Comma list of layer sets (default all), e.g. all,0-5,6-11; '+' joins the terms of one set (0+2+5-7); repeatable.")),
    "seeds": (str, "0", typer.Option("--seeds", help="Comma list of seeds; each seed fixes the new head, the data order and the held-out split for every variant.")),
    "output": (Optional[Path], None, typer.Option("--output", "-o", help="The sweep's folder: sweep.json, summary.json and runs/<run>/ (start the same command again to continue).", file_okay=False)),
    "eval_dataset": (Optional[str], None, typer.Option("--eval-dataset", help="Evaluate on this dataset (default: --dataset).")),
    "eval_split": (Optional[str], None, typer.Option("--eval-split", help="Split to evaluate (default: validation, else test; never the split the runs train on).")),
    "eval_limit": (Optional[int], None, typer.Option("--eval-limit", min=1, help="Evaluate on a class-balanced subset of N images.")),
    "corruptions": (Optional[str], None, typer.Option("--corruptions", help="Also evaluate under ImageNet-C corruptions (as cbtool eval): all, a group or names; adds the mean corruption error (and mCE on ImageNet-1k validation).")),
    "severities": (Optional[str], None, typer.Option("--severities", help="Corruption severities: 1-5, 3, or 1,3,5 (default 1-5; needs --corruptions).")),
    "density": (bool, True, typer.Option("--density/--no-density", help="Measure attention entropy (at validation and evaluation).")),
    "no_finetune": (bool, False, typer.Option("--no-finetune", help="Do not train: evaluate each model as built, with CB as its cell says.")),
    "devices": (Optional[str], None, typer.Option("--devices", help="Run the runs as subprocesses, one per device at a time: CUDA indices like 0,1,2,3, or cpu,cpu.")),
    "torchrun": (Optional[int], None, typer.Option("--torchrun", min=1, help="Launch each run under torchrun with N processes (with --devices: N devices per run).")),
    "plot": (Optional[Path], None, opt.Plot.__metadata__[0]),
    "json_out": (bool, False, typer.Option("--json", help="Print the summary as JSON on stdout instead of the table.")),
    "summarize": (Optional[Path], None, typer.Option("--summarize", help="Rebuild summary.json and the table from this sweep folder, without training.", file_okay=False)),
    "status": (Optional[Path], None, typer.Option("--status", help="Show each run's state in this sweep folder (finished, pending, running, failed with its log's last lines, not submitted).", file_okay=False)),
    "only": (Optional[str], None, typer.Option("--only", hidden=True, help="Run this one run of the sweep in -o (what --devices starts).")),
    **SLURM_OPTIONS,
}  # fmt: skip
# Options that still mean something with --summarize, --only or --no-finetune.
_SUMMARY_OPTIONS = {"summarize", "plot", "json_out", "quiet"}
_STATUS_OPTIONS = {"status", "json_out"}
_CHILD_OPTIONS = {"only", "output", "quiet"}


def sweep_command(ctx: typer.Context, **options: Any) -> None:
    """Fine-tune and evaluate MODEL once per variant, position, layer set and seed, then summarize against plain:
    mean ± std over seeds of top-1, loss, entropy (and mCE), a paired t-test over seeds and McNemar on the pooled
    predictions. Each run is a resumable finetune run folder; kill the sweep and start it again to continue."""
    from cbtool.errors import CbtoolError

    typed = {name for name in options if _typed(ctx, name)}
    if options["status"] is not None:
        _refuse_others(ctx, typed, _STATUS_OPTIONS, "--status")
        return _show_status(options["status"], options["json_out"])
    if options["only"] is not None:
        _refuse_others(ctx, typed, _CHILD_OPTIONS, "--only")
        from cbtool.sweep.start import run_child

        return run_child(options["output"], options["only"], quiet=options["quiet"])
    if options["summarize"] is not None:
        _refuse_others(ctx, typed, _SUMMARY_OPTIONS, "--summarize")
        from cbtool.sweep.start import write_summary

        _check_plot(options["plot"])
        return _show(write_summary(options["summarize"]), options, options["summarize"])

    from cbtool.sweep.start import make_plan, run_sweep, training_only

    if options["no_finetune"]:
        needs_training = [name for name in training_only() if name in typed]
        if needs_training:
            raise CbtoolError(f"{_flag(ctx, needs_training[0])} needs training, and --no-finetune runs none; drop one of them")
    if options["output"] is None:
        raise CbtoolError("give the sweep's folder with -o/--output (e.g. -o sweeps/tiny)")
    if options["model"] is None or options["dataset"] is None:
        raise CbtoolError("give a MODEL and --dataset (or --summarize a sweep folder)")
    if options["device"] is not None and options["devices"] is not None:
        raise CbtoolError("give --device (one device for every run) or --devices (runs spread over devices), not both")
    from cbtool.outputs import check_outputs

    check_outputs({"--output": options["output"], "--plot": options["plot"]}, [options["model"], options["checkpoint"]],
                  dataset=[options["dataset"], options["eval_dataset"]])  # fmt: skip
    _check_plot(options["plot"], options["output"])
    slurm = _slurm(ctx, options, typed)
    sweep_names = set(_SWEEP_OPTIONS) - {"density"}
    finetune_options = {k: v for k, v in options.items() if k not in sweep_names}
    plan = make_plan(
        finetune_options.pop("model"), finetune_options.pop("dataset"), variants=options["variants"],
        positions=options["positions"], layers=options["layers"], seeds=options["seeds"],
        eval_dataset=options["eval_dataset"], eval_split=options["eval_split"], eval_limit=options["eval_limit"],
        corruptions=options["corruptions"], severities=options["severities"], finetune=not options["no_finetune"],
        processes=slurm.tasks if slurm else options["torchrun"] or 1, **finetune_options,
    )  # fmt: skip
    if slurm is not None:
        return _submit(plan, options, slurm)
    devices = [d.strip() for d in options["devices"].split(",")] if options["devices"] else None
    if devices is not None and not all(devices):
        raise CbtoolError(f"--devices {options['devices']!r} has an empty item; give e.g. 0,1,2,3 or cpu,cpu")
    _show(run_sweep(plan, options["output"], devices=devices, torchrun=options["torchrun"]), options,
          options["output"])


def _slurm(ctx: typer.Context, options: dict, typed: set[str]):
    """The SLURM request with --slurm (None without); --devices and --torchrun belong to a local sweep."""
    from cbtool.cli._slurm import pop_slurm_options
    from cbtool.errors import CbtoolError

    slurm = pop_slurm_options(options, typed, lambda name: _flag(ctx, name))
    if slurm is not None:
        for name in ("devices", "torchrun"):
            if options[name] is not None:
                raise CbtoolError(f"{_flag(ctx, name)} spreads runs over this machine; with --slurm each run is a job "
                                  "(use --slurm-nodes, --slurm-gpus-per-node or --slurm-tasks-per-node)")  # fmt: skip
        if options["plot"] is not None:
            raise CbtoolError("--plot is drawn from the summary, which the last job writes; use --summarize DIR --plot")
    return slurm


def _submit(plan, options: dict, slurm) -> None:
    """Submit the unfinished runs; say what was submitted and how to follow the sweep."""
    import sys

    from cbtool.sweep.slurm import submit_sweep

    note = (lambda text: None) if options["quiet"] else (lambda text: print(text, file=sys.stderr))
    submitted = submit_sweep(plan, options["output"], slurm, note=note)
    folder = options["output"]
    if submitted:
        typer.echo(f"submitted {len(submitted)} job(s) to SLURM; follow them with: cbtool sweep --status {folder} "
                   f"(the last job writes {folder}/summary.json)")  # fmt: skip
    else:
        typer.echo(f"nothing to submit: every run of {folder} is finished, queued or running (cbtool sweep --status {folder})")


def _show_status(folder: Path, json_out: bool) -> None:
    import json

    from cbtool.sweep.slurm import status_text, sweep_status

    rows = sweep_status(folder)
    typer.echo(json.dumps(rows, indent=2) if json_out else status_text(rows))


def _show(summary: dict, options: dict, folder: Path) -> None:
    import json

    from cbtool.sweep.plan import SUMMARY_FILE
    from cbtool.sweep.render import plot_summary, summary_text

    typer.echo(json.dumps(summary, indent=2, sort_keys=True) if options["json_out"] else summary_text(summary))
    wrote(Path(folder) / SUMMARY_FILE, quiet=options["quiet"])
    if options["plot"] is not None:
        plot_summary(summary, options["plot"])
        wrote(options["plot"], quiet=options["quiet"])


def _check_plot(plot: Path | None, folder: Path | None = None) -> None:
    """The plot's folder must exist, unless it is the sweep's own (created by the sweep)."""
    from cbtool.outputs import check_png_name

    check_png_name("--plot", plot)
    if plot is not None and not (folder is not None and plot.parent.resolve() == folder.resolve()):
        from cbtool.files import check_output_folder

        check_output_folder(plot)


def _typed(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")


def _flag(ctx: typer.Context, name: str) -> str:
    """How the user typed option ``name`` (its first flag; MODEL for the argument)."""
    for parameter in ctx.command.params:
        if parameter.name == name:
            return parameter.opts[0] if parameter.opts[0].startswith("-") else name.upper()
    return name


def _refuse_others(ctx: typer.Context, typed: set[str], allowed: set[str], mode: str) -> None:
    from cbtool.errors import CbtoolError

    others = sorted(typed - allowed)
    if others:
        what = {"--summarize": "rebuilds the summary from the folders", "--status": "reads the sweep folder"}.get(
            mode, "runs one run as recorded in -o")
        raise CbtoolError(f"{_flag(ctx, others[0])} does nothing with {mode}, which {what}; drop it")


def _signature() -> inspect.Signature:
    """finetune's parameters less the ones a sweep sets per run, with the sweep's own after MODEL."""
    from cbtool.sweep.start import OWNED

    finetune = inspect.signature(finetune_command, eval_str=True).parameters
    ctx, model = finetune["ctx"], finetune["model"]
    model = model.replace(annotation=Annotated[Optional[str], typer.Argument(help="timm name, hf-hub:ORG/NAME, Hugging Face id or folder, or a cbtool file (not needed with --summarize).")])
    own = [inspect.Parameter(name, inspect.Parameter.POSITIONAL_OR_KEYWORD, default=default,
                             annotation=Annotated[kind, info]) for name, (kind, default, info) in _SWEEP_OPTIONS.items()]  # fmt: skip
    shared = [p for name, p in finetune.items() if name not in (*OWNED, "model", "density")]
    return inspect.Signature([ctx, model, *own[:5], *shared, *own[5:]])


sweep_command.__signature__ = _signature()  # type: ignore[attr-defined]
sweep_command.__annotations__ = {name: p.annotation for name, p in sweep_command.__signature__.parameters.items()}
