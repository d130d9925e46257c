"""``cbtool bench``: forward latency and throughput of a model with and without Context Broadcasting."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from cbtool.cli import _options as opt
from cbtool.cli._say import wrote

Repeats = Annotated[int, typer.Option("--repeats", min=1, help="Timed repeats per model, alternating plain and CB.")]
Warmup = Annotated[int, typer.Option("--warmup", min=0, help="Untimed forwards per model before timing.")]
Number = Annotated[
    Optional[int],
    typer.Option("--number", min=1, help="Forwards per timed repeat (default: enough for about 50 ms)."),
]

MaxTime = Annotated[
    Optional[float],
    typer.Option("--max-time", min=0.001, help="Stop repeating after this many timed seconds (at least 3 repeats run)."),
]

Clock = Annotated[
    str,
    typer.Option("--clock", help="wall, or cpu: the process's CPU time (CPU only; steadier on a shared machine)."),
]
Threads = Annotated[Optional[int], typer.Option("--threads", min=1, help="CPU threads for torch (default: torch's).")]


def bench_command(
    model: Annotated[str, typer.Argument(help="timm name, hf-hub:ORG/NAME, Hugging Face id or folder, or a plain cbtool file.")],
    variant: opt.Variant = "cb",
    position: opt.Position = "mlp",
    layers: opt.Layers = "all",
    batch_size: opt.BatchSize = 32,
    device: opt.Device = None,
    amp: opt.Amp = False,
    compile: opt.Compile = False,
    channels_last: opt.ChannelsLast = False,
    repeats: Repeats = 20,
    warmup: Warmup = 3,
    number: Number = None,
    max_time: MaxTime = None,
    clock: Clock = "wall",
    threads: Threads = None,
    no_pretrained: opt.NoPretrained = False,
    checkpoint: opt.Checkpoint = None,
    num_classes: opt.NumClasses = None,
    img_size: opt.ImgSize = None,
    model_kwargs: opt.ModelKwargs = None,
    seed: opt.Seed = 0,
    json_out: opt.JsonOut = None,
    quiet: opt.Quiet = False,
) -> None:
    """Time the plain model against the same weights with CB, in alternating repeats; print medians and the ratio."""
    from cbtool.report import check_output_folder
    from cbtool.spec import CBSpec

    from cbtool.outputs import check_outputs

    from cbtool.ranges import check_seed

    spec = CBSpec(variant=variant, position=position, layers=layers)
    check_seed("--seed", seed)
    check_outputs({"--json": json_out}, [model, checkpoint])
    if json_out is not None:
        json_out = check_output_folder(json_out)  # fail before building the model

    from cbtool.models import resolve as sources
    from cbtool.benchmark import measure_overhead
    from cbtool.distributed import pick_device

    device_obj = pick_device(device)  # an unusable --device fails before a download
    model_obj = sources.resolve(
        model,
        pretrained=not no_pretrained,
        checkpoint=checkpoint,
        num_classes=num_classes,
        img_size=img_size,
        model_kwargs=model_kwargs,
        seed=seed,
    )
    def progress(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    result = measure_overhead(
        model_obj,
        spec,
        batch_size=batch_size,
        device=device_obj,
        amp=amp,
        compile=compile,
        channels_last=channels_last,
        repeats=repeats,
        warmup=warmup,
        number=number,
        max_seconds=max_time,
        clock=clock,
        threads=threads,
        label=model,
        progress=None if quiet else progress,
    )
    typer.echo(result.describe())
    typer.echo(result.table())
    if json_out is not None:
        from cbtool.report import write_json_atomic

        write_json_atomic(json_out, result.to_dict())
        wrote(json_out, quiet=quiet)
