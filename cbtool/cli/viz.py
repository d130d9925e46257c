"""``cbtool viz``: attention pictures of one or more models (plain beside CB) on the same images."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cbtool.cli import _options as opt
from cbtool.cli._say import wrote


def parse_query(text: str | None) -> tuple[int, int] | None:
    """``"3,5"`` -> (3, 5); anything else is one line."""
    if text is None:
        return None
    from cbtool.errors import VizError

    parts = text.replace(" ", "").split(",")
    if len(parts) != 2 or not all(p.isdigit() for p in parts):
        raise VizError(f"--query takes ROW,COL of a patch (e.g. 3,5), not {text!r}")
    return int(parts[0]), int(parts[1])


def model_labels(names: list[str]) -> list[str]:
    """Short labels for the command-line model names (cbtool files by their stem), made unique by position."""
    short = [Path(name).stem if Path(name).suffix == ".safetensors" else name for name in names]
    return short if len(set(short)) == len(short) else [f"{i}:{name}" for i, name in enumerate(short)]


def viz_command(
    models: Annotated[list[str], typer.Argument(help="One or more models (cbtool files, timm names, HF ids or folders); two: plain beside CB.")],
    output: Annotated[Path, typer.Option("--output", "-o", help="PNG file to write (replaced atomically).", dir_okay=False)],
    images: Annotated[Optional[list[Path]], typer.Option("--images", help="Image files (several may follow one --images).")] = None,
    dataset: Annotated[Optional[str], typer.Option("--dataset", "-d", help="Take images from a dataset instead (sample, a folder, a Hub id).")] = None,
    split: Annotated[Optional[str], typer.Option("--split", help="Split of --dataset (default: validation, else test).")] = None,
    limit: Annotated[int, typer.Option("--limit", min=1, help="Images taken from --dataset (class-balanced).")] = 8,
    layers: Annotated[str, typer.Option("--layers", help="Attention layers to draw: indices and ranges like 0,5,11 (negative counts from the end).")] = "-1",
    heads: Annotated[str, typer.Option("--heads", help="mean, max or min over heads, all (one picture per head), or a head index.")] = "mean",
    query: Annotated[Optional[str], typer.Option("--query", help="Also draw the attention of the patch at ROW,COL (outlined in cyan).")] = None,
    entropy: Annotated[bool, typer.Option("--entropy", help="Also draw each query's attention entropy (bright: dense, dark: sharp).")] = False,
    rollout: Annotated[bool, typer.Option("--rollout", help="Also draw attention rollout (residual ViTs only).")] = False,
    head_fusion: Annotated[Optional[str], typer.Option("--head-fusion", help="How rollout fuses heads: mean (default), max or min.")] = None,
    discard_ratio: Annotated[Optional[float], typer.Option("--discard-ratio", help="Rollout only: zero this fraction of each layer's weakest attention (vit-explain's variant; default 0: Abnar & Zuidema, nothing discarded).")] = None,
    scale: Annotated[str, typer.Option("--scale", help="shared: one colour scale per view for all panels, with a colour bar (entropy 0-1; attention from 0, the uniform 1/N marked); per-panel: each panel stretched to its own min-max.")] = "shared",
    panel: Annotated[int, typer.Option("--panel", min=32, help="Pixels per picture.")] = 160,
    cmap: Annotated[str, typer.Option("--cmap", help="matplotlib colormap of the heatmaps.")] = "inferno",
    img_size: opt.ImgSize = None,
    no_pretrained: opt.NoPretrained = False,
    checkpoint: opt.Checkpoint = None,
    num_classes: opt.NumClasses = None,
    model_kwargs: opt.ModelKwargs = None,
    seed: opt.Seed = 0,
    device: opt.Device = None,
    quiet: opt.Quiet = False,
) -> None:
    """Draw attention maps: class-token (or mean-query) attention per layer, a query patch, entropy, rollout.
    The model options mean what eval's do; with --img-size the images are drawn at that size."""

    from cbtool.errors import VizError
    from cbtool.files import check_output_folder
    from cbtool.outputs import check_outputs, check_png_name
    from cbtool.ranges import check_seed

    check_seed("--seed", seed)
    check_outputs({"--output": output}, [*models, checkpoint, *(images or [])], dataset=dataset)
    check_png_name("--output", output)
    check_output_folder(output)
    if bool(images) == bool(dataset):
        raise VizError("give images with --images FILE ... or --dataset NAME (one of the two)")
    location = parse_query(query)

    from cbtool import distributed
    from cbtool.models import resolve as sources
    from cbtool.viz.figure import VizOptions, attention_figure, check_options, load_images

    options = VizOptions(layers=layers, heads=heads, query=location, entropy=entropy, rollout=rollout,
                         head_fusion=head_fusion, discard_ratio=discard_ratio, scale=scale)  # before any model or image
    if images:
        pictures, names = load_images(images), [path.name for path in images]
    torch_device = distributed.pick_device(device)
    loaded = [sources.resolve(name, pretrained=not no_pretrained, checkpoint=checkpoint, num_classes=num_classes,
                              img_size=img_size, model_kwargs=model_kwargs, seed=seed).to(torch_device)
              for name in models]
    check_options(loaded, model_labels(models), options)  # before the dataset is opened
    if not images:
        from cbtool.data import resolve_dataset

        ds = resolve_dataset(dataset, split, purpose="eval", limit=limit)
        pictures = [ds[i][0] for i in range(min(limit, len(ds)))]
        labels = ds.labels[: len(pictures)]
        known = ds.class_names or []
        names = [str(known[label]) if 0 <= label < len(known) else f"image {i}" for i, label in enumerate(labels)]
    attention_figure(loaded, pictures, output, labels=model_labels(models), names=names, options=options,
                     panel=panel, cmap=cmap)
    wrote(output, quiet=quiet)
