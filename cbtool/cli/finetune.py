"""``cbtool finetune``: train a model (after optional CB surgery) on a dataset and save a cbtool file.

Works the same under ``torchrun --nproc_per_node=N -m cbtool finetune ...`` (only rank 0 prints and writes).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Optional

import typer

from cbtool.cli import _options as opt
from cbtool.cli._say import wrote

_FLAGS = {"model": "MODEL", "inject_cb": "--inject", "compile_model": "--compile"}


def finetune_command(
    ctx: typer.Context,
    model: Annotated[Optional[str], typer.Argument(help="timm name, hf-hub:ORG/NAME, Hugging Face id or folder, or a cbtool file (not needed with --resume).")] = None,
    output: Annotated[Optional[Path], typer.Option("--output", "-o", help="Where to write the fine-tuned .safetensors file.", dir_okay=False)] = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", help="sample, imagenet-1k, a local folder, or a Hub dataset id.")] = None,
    split: Annotated[Optional[str], typer.Option("--split", help="Training split (default: train).")] = None,
    val_split: Annotated[Optional[str], typer.Option("--val-split", help="Validation split (default: validation, else --val-fraction of the training split).")] = None,
    val_fraction: Annotated[Optional[float], typer.Option("--val-fraction", help="Hold out this fraction of the training split for validation (default 0.1 when there is no validation split; the test split is used only with --val-split test).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Train on at most this many images (class-balanced, deterministic).")] = None,
    val_limit: Annotated[Optional[int], typer.Option("--val-limit", min=1, help="Validate on at most this many images.")] = None,
    image_column: Annotated[Optional[str], typer.Option("--image-column", help="Image column of a Hub or save_to_disk dataset.")] = None,
    label_column: Annotated[Optional[str], typer.Option("--label-column", help="Label column of a Hub or save_to_disk dataset.")] = None,
    skip_bad_images: Annotated[bool, typer.Option("--skip-bad-images", help="Leave out images that cannot be decoded.")] = False,
    inject_cb: Annotated[bool, typer.Option("--inject", help="Insert Context Broadcasting first (--variant/--position/--layers).")] = False,
    variant: opt.Variant = "cb",
    position: opt.Position = "mlp",
    layers: opt.Layers = "all",
    scale_init: opt.ScaleInit = None,
    no_pretrained: opt.NoPretrained = False,
    checkpoint: opt.Checkpoint = None,
    num_classes: opt.NumClasses = None,
    img_size: opt.ImgSize = None,
    model_kwargs: opt.ModelKwargs = None,
    epochs: Annotated[Optional[int], typer.Option("--epochs", min=1, help="Passes over the training split (default 1).")] = None,
    steps: Annotated[Optional[int], typer.Option("--steps", min=1, help="Optimizer steps, instead of --epochs.")] = None,
    batch_size: opt.BatchSize = 64,
    grad_accum: Annotated[int, typer.Option("--grad-accum", min=1, help="Batches per optimizer step (effective batch = batch size x this x processes).")] = 1,
    lr: Annotated[Optional[float], typer.Option("--lr", help="Peak learning rate (default: 1e-5 for pretrained weights, 1e-3 for random ones).")] = None,
    cb_lr: Annotated[Optional[float], typer.Option("--cb-lr", help="Peak learning rate of the cbs scales, on the same schedule (default: the larger of 1e-2 and --lr).")] = None,
    cb_ramp: Annotated[Optional[int], typer.Option("--cb-ramp", min=1, help="Raise the CB weight linearly from 0 (the plain model) to full over these first steps; the saved model has the full weight.")] = None,
    min_lr: Annotated[float, typer.Option("--min-lr", help="Learning rate at the end of the cosine decay.")] = 0.0,
    weight_decay: Annotated[float, typer.Option("--weight-decay", help="AdamW weight decay (never on norms, biases, CB scales, embeddings).")] = 0.05,
    warmup_steps: Annotated[Optional[int], typer.Option("--warmup-steps", min=0, help="Linear warmup steps (default: --warmup-frac of all steps).")] = None,
    warmup_frac: Annotated[float, typer.Option("--warmup-frac", help="Warmup as a fraction of all steps.")] = 0.05,
    label_smoothing: Annotated[float, typer.Option("--label-smoothing", help="Label smoothing of the cross-entropy.")] = 0.1,
    clip_grad: Annotated[float, typer.Option("--clip-grad", help="Clip the gradient norm to this (0: no clipping).")] = 1.0,
    train: Annotated[str, typer.Option("--train", help="What to train: all, or a comma list of cb (CB_S scales), head, norm.")] = "all",
    seed: Annotated[int, typer.Option("--seed", help="Seed for the data order, augmentation and new heads.")] = 0,
    workers: Annotated[Optional[int], typer.Option("--workers", min=0, help="Data-loading processes (default: 0 on CPU, up to 8 on CUDA).")] = None,
    scale: Annotated[Optional[float], typer.Option("--scale", help="Smallest random-resized-crop area with --augment (default 0.08, or 0.35 for inputs under 64 px).")] = None,
    hflip: Annotated[float, typer.Option("--hflip", help="Horizontal flip probability.")] = 0.5,
    color_jitter: Annotated[float, typer.Option("--color-jitter", help="Color jitter strength (0: none).")] = 0.4,
    auto_augment: Annotated[Optional[str], typer.Option("--auto-augment", help="timm auto-augment policy, e.g. rand-m9-mstd0.5.")] = None,
    augment: Annotated[Optional[bool], typer.Option("--augment/--no-augment", help="Random crops, flips and color jitter (default: on for inputs of 64 px and more; off below, training on the eval transform).")] = None,
    device: opt.Device = None,
    amp: opt.Amp = False,
    channels_last: opt.ChannelsLast = False,
    compile_model: opt.Compile = False,
    run_dir: Annotated[Optional[Path], typer.Option("--run-dir", help="Folder for checkpoints and the log (default: runs/<timestamp>, with runs/last).", file_okay=False)] = None,
    save_every: Annotated[Optional[int], typer.Option("--save-every", min=1, help="Also save a checkpoint every N steps (always at the end).")] = None,
    eval_every: Annotated[Optional[int], typer.Option("--eval-every", min=1, help="Also validate every N steps (always after each epoch).")] = None,
    log: Annotated[Optional[Path], typer.Option("--log", help="JSON-lines log (default: <run-dir>/log.jsonl).", dir_okay=False)] = None,
    save_best: Annotated[Optional[Path], typer.Option("--save-best", help="Also write the model with the best validation top-1 here.", dir_okay=False)] = None,
    density: Annotated[bool, typer.Option("--density", help="Measure attention entropy at each validation.")] = False,
    resume: Annotated[Optional[Path], typer.Option("--resume", help="Continue the run in this folder (e.g. runs/last) with its settings.")] = None,
    force: opt.Force = False,
    quiet: opt.Quiet = False,
) -> None:
    """Fine-tune MODEL on a dataset (AdamW, warmup + cosine, label smoothing) and save it as a cbtool file.

    Validates after each epoch, logs to JSON lines, checkpoints for --resume; Ctrl-C saves and stops.
    """
    options = {name: value for name, value in locals().items() if name != "ctx"}
    from cbtool import distributed

    options = _complete(ctx, options)
    try:
        _run(options)
    finally:
        distributed.teardown()


def _complete(ctx: typer.Context, options: dict[str, Any]) -> dict[str, Any]:
    """The options with a resumed run's settings merged in; an output, a model and data are required."""
    from cbtool.errors import CbtoolError

    if options["resume"] is not None:
        options = _resume_options(ctx, options)
    if options["output"] is None:
        raise CbtoolError("give the output file with -o/--output (e.g. -o tuned.safetensors)")
    if options["model"] is None or options["dataset"] is None:
        raise CbtoolError("give a MODEL and --dataset (or --resume a run folder)")
    return options


def finetune_or_submit(ctx: typer.Context, **options: Any) -> None:
    """``cbtool finetune``: finetune_command's options, plus --slurm to submit the fine-tune as one SLURM job
    (multi-node, multi-GPU DDP through submitit) instead of running it here."""
    from cbtool.cli._slurm import pop_slurm_options

    slurm = pop_slurm_options(options, {name for name in options if _typed(ctx, name)}, _flag)
    if slurm is None:
        return finetune_command(ctx, **options)
    from cbtool.train.slurm import submit_finetune

    job, run_dir, log = submit_finetune(_complete(ctx, options), slurm)
    typer.echo(f"submitted job {job} to SLURM: it trains into {run_dir} and writes {options['output']}; its log is "
               f"{log} (a preempted or timed-out job saves a checkpoint and requeues itself)")  # fmt: skip


def _run(o: dict[str, Any]) -> None:
    from cbtool import train

    try:
        result = train.train_from_options(o)
    except train.Interrupted as stop:
        if stop.is_main:
            from cbtool.errors import Interrupted

            raise Interrupted(_interrupted_message(stop)) from None
        raise typer.Exit(130) from None
    if result is not None:
        final = f"val top-1 {result.final['top1']:.2f}%" if result.final else "no validation"
        best = f", best {result.best['top1']:.2f}% at step {result.best['step']}" if result.best else ""
        wrote(result.output, quiet=o["quiet"], detail=f"{result.step} steps, {final}{best}; run folder {result.run_dir}")
        if o["save_best"] is not None and result.best:
            wrote(o["save_best"], quiet=o["quiet"], detail=f"the best validation, step {result.best['step']}")
        if o["log"] is not None:
            wrote(o["log"], quiet=o["quiet"], detail="the run's log")


def _interrupted_message(stop) -> str:
    """What a Ctrl-C left: the checkpoint just saved, else the last complete one, else nothing to resume."""
    from cbtool.train import CHECKPOINT_NAME

    resume = f"resume with: cbtool finetune --resume {stop.run_dir}"
    if stop.checkpoint:
        return f"interrupted at step {stop.step}; saved {stop.checkpoint}; {resume}"
    checkpoint = stop.run_dir / CHECKPOINT_NAME
    if checkpoint.exists():  # written atomically: whole, whenever the second Ctrl-C came
        return f"interrupted at step {stop.step} before saving; the last complete checkpoint is {checkpoint}; {resume}"
    return f"interrupted at step {stop.step} before any checkpoint was saved; nothing was saved ({stop.run_dir} holds only its log)"


def _resume_options(ctx: typer.Context, given: dict[str, Any]) -> dict[str, Any]:
    """The options the run started with; options typed now must agree with them, except the runtime ones."""
    from cbtool.train import resume_options

    return resume_options(given, lambda name: _typed(ctx, name), _flag)


def _typed(ctx: typer.Context, name: str) -> bool:
    source = ctx.get_parameter_source(name)
    return source is not None and source.name in ("COMMANDLINE", "ENVIRONMENT")


def _flag(name: str) -> str:
    """How the user types option ``name``."""
    return _FLAGS.get(name, "--" + name.replace("_", "-"))


def _entry_signature():
    import inspect

    from cbtool.cli._slurm import SLURM_OPTIONS

    own = inspect.signature(finetune_command, eval_str=True)
    slurm = [inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default, annotation=Annotated[kind, info])
             for name, (kind, default, info) in SLURM_OPTIONS.items()]  # fmt: skip
    return own.replace(parameters=[*own.parameters.values(), *slurm])


finetune_or_submit.__signature__ = _entry_signature()  # type: ignore[attr-defined]
finetune_or_submit.__annotations__ = {name: p.annotation for name, p in finetune_or_submit.__signature__.parameters.items()}
finetune_or_submit.__doc__ = finetune_command.__doc__  # the command's help
