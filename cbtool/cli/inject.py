"""``cbtool inject``: load a model, insert Context Broadcasting, save a cbtool safetensors file."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from cbtool.cli import _options as opt
from cbtool.cli._say import wrote


def inject_command(
    model: Annotated[str, typer.Argument(help="timm name, hf-hub:ORG/NAME, Hugging Face id or folder, or a cbtool file.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to write the .safetensors file.", dir_okay=False)],
    variant: opt.Variant = "cb",
    position: opt.Position = "mlp",
    layers: opt.Layers = "all",
    scale_init: opt.ScaleInit = None,
    no_pretrained: opt.NoPretrained = False,
    checkpoint: opt.Checkpoint = None,
    num_classes: opt.NumClasses = None,
    img_size: opt.ImgSize = None,
    model_kwargs: opt.ModelKwargs = None,
    seed: opt.Seed = 0,
    force: opt.Force = False,
    quiet: opt.Quiet = False,
) -> None:
    """Insert Context Broadcasting into every (or the chosen) block and save the model."""
    from cbtool.models.checkpoint import check_output_path, save
    from cbtool.spec import CBSpec

    from cbtool.outputs import check_outputs

    from cbtool.ranges import check_seed

    spec = CBSpec.from_options(variant, position, layers, scale_init)
    check_seed("--seed", seed)
    check_outputs({"--output": output}, [model, checkpoint])
    output = check_output_path(output, force=force)  # fail before a long download

    from cbtool.models import resolve as sources
    from cbtool.families import detect
    from cbtool.surgery import find_broadcasts, inject

    model_obj = sources.resolve(
        model,
        pretrained=not no_pretrained,
        checkpoint=checkpoint,
        num_classes=num_classes,
        img_size=img_size,
        model_kwargs=model_kwargs,
        seed=seed,
    )
    inject(model_obj, spec)
    save(model_obj, output, force=force)
    family = detect(model_obj)
    rewritten = len(find_broadcasts(model_obj))
    wrote(output, quiet=quiet, detail=f"{family.name}, {spec.variant} at {spec.position} in {rewritten} of "
                                      f"{len(family.blocks(model_obj))} blocks")
