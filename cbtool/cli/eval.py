"""``cbtool eval``: accuracy, loss, attention density and throughput of one or more models on a dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cbtool.cli import _options as opt
from cbtool.cli._say import wrote


def eval_command(
    models: Annotated[list[str], typer.Argument(help="One or more models (cbtool files, timm names, HF ids or folders).")],
    dataset: Annotated[str, typer.Option("--dataset", "-d", help="sample, imagenet-1k, a Hub dataset id, an image folder, or a save_to_disk folder.")],
    split: Annotated[Optional[str], typer.Option("--split", help="Split to evaluate (default: validation, else test).")] = None,
    limit: Annotated[Optional[int], typer.Option("--limit", min=1, help="Evaluate a deterministic, class-balanced subset of N images.")] = None,
    density: Annotated[bool, typer.Option("--density", help="Measure attention entropy and distance per layer and head.")] = False,
    streaming: Annotated[bool, typer.Option("--streaming", help="Stream a Hub dataset instead of downloading it.")] = False,
    image_column: Annotated[Optional[str], typer.Option("--image-column", help="Image column of a Hub/saved dataset (detected when omitted).")] = None,
    label_column: Annotated[Optional[str], typer.Option("--label-column", help="Label column of a Hub/saved dataset (detected when omitted).")] = None,
    skip_bad_images: Annotated[bool, typer.Option("--skip-bad-images", help="Count and skip images that cannot be decoded instead of failing.")] = False,
    batch_size: opt.BatchSize = 64,
    workers: Annotated[int, typer.Option("--workers", "-j", min=0, help="DataLoader worker processes.")] = 2,
    img_size: opt.ImgSize = None,
    crop_pct: Annotated[Optional[float], typer.Option("--crop-pct", help="Override the center-crop fraction.")] = None,
    interpolation: Annotated[Optional[str], typer.Option("--interpolation", help="Override the resize interpolation (bilinear, bicubic, ...).")] = None,
    no_pretrained: opt.NoPretrained = False,
    checkpoint: opt.Checkpoint = None,
    num_classes: opt.NumClasses = None,
    model_kwargs: opt.ModelKwargs = None,
    seed: opt.Seed = 0,
    device: opt.Device = None,
    amp: opt.Amp = False,
    channels_last: opt.ChannelsLast = False,
    compile: opt.Compile = False,
    corruptions: Annotated[Optional[str], typer.Option("--corruptions", help="Also evaluate on corrupted images (ImageNet-C): all, common, a group (noise, blur, weather, digital, extra) or names, comma-separated.")] = None,
    severities: Annotated[Optional[str], typer.Option("--severities", help="Corruption severities: 1-5, 3, or 1,3,5 (default 1-5; needs --corruptions).")] = None,
    no_jpeg: Annotated[bool, typer.Option("--no-jpeg", help="Do not save corrupted images as JPEG quality 85 and read them back, as ImageNet-C's files were (then errors are not comparable with ImageNet-C's).")] = False,
    save_examples: Annotated[Optional[Path], typer.Option("--save-examples", help="Write one labelled picture per corruption (clean, then each severity across; the first images down) to this folder (created).")] = None,
    json_out: opt.JsonOut = None,
    plot: opt.Plot = None,
    quiet: opt.Quiet = False,
) -> None:
    """Evaluate MODELS on the same batches: top-1/top-5, loss, throughput, (with --density) attention density and
    (with --corruptions) top-1 error, CE and mCE under common corruptions."""
    from cbtool.files import check_writable_folder
    from cbtool.outputs import check_outputs, check_png_name
    from cbtool.pipeline import check_corruption_options
    from cbtool.report import check_output_folder
    from cbtool.robustness.registry import JPEG_QUALITY

    jpeg_quality = None if no_jpeg else JPEG_QUALITY
    check_corruption_options(corruptions, severities, density=density, jpeg_quality=jpeg_quality,
                             save_examples=str(save_examples) if save_examples is not None else None)
    if save_examples is not None:
        check_writable_folder(save_examples, "--save-examples folder", "pass a folder you can write to")

    check_outputs({"--json": json_out, "--plot": plot, "--save-examples": save_examples}, [*models, checkpoint],
                  dataset=dataset)  # pictures inside an image folder would become samples of it
    check_png_name("--plot", plot)
    for path in (json_out, plot):
        if path is not None:
            check_output_folder(path)
    if plot is not None and not density and not corruptions:
        _check_scales_to_plot(models)

    from cbtool import distributed, report
    from cbtool.pipeline import evaluate_dataset

    document = evaluate_dataset(
        models, dataset, split=split, limit=limit, density=density, streaming=streaming, image_column=image_column,
        label_column=label_column, skip_bad_images=skip_bad_images, batch_size=batch_size, workers=workers,
        img_size=img_size, crop_pct=crop_pct, interpolation=interpolation, pretrained=not no_pretrained,
        checkpoint=checkpoint, num_classes=num_classes, model_kwargs=model_kwargs, device=device, amp=amp,
        channels_last=channels_last, compile=compile, progress=not quiet, corruptions=corruptions,
        severities=severities, seed=seed, save_examples=str(save_examples) if save_examples is not None else None,
        jpeg_quality=jpeg_quality,
    )
    if not distributed.is_main_process():
        return
    _print_summary(document, report, quiet)
    if json_out is not None:
        report.write_json_atomic(json_out, document)
        wrote(json_out, quiet=quiet)
    if plot is not None:  # error against severity with --corruptions, else per-layer density
        if corruptions:
            from cbtool.robustness.render import plot_robustness

            plot_robustness(document["models"], plot)
        else:
            report.plot_density(document["models"], plot)
        wrote(plot, quiet=quiet)


def _print_summary(document: dict, report, quiet: bool) -> None:
    dataset = document["dataset"]
    split = f" ({dataset['split']})" if dataset["split"] else ""  # a plain class folder has no split
    typer.echo(f"dataset: {dataset['name']}{split}, {document['models'][0]['metrics']['num_samples']} images, "
               f"{dataset['num_classes']} classes")
    if dataset.get("bad_images"):
        typer.echo(f"skipped {dataset['bad_images']} images that could not be decoded")
    typer.echo(report.metrics_table(document["models"]))
    if any(model["density"] for model in document["models"]):
        typer.echo("")
        typer.echo(report.density_table(document["models"]))
    if any(model.get("robustness") for model in document["models"]):
        from cbtool.robustness.render import robustness_table, robustness_title

        typer.echo("")
        typer.echo(robustness_title(document["models"]))
        typer.echo(robustness_table(document["models"]))


def _check_scales_to_plot(models: list[str]) -> None:
    """Without --density or --corruptions, --plot draws learned cbs scales: refuse it before any work when no
    model can have them (only a cbtool file of a cbs model does)."""
    from pathlib import Path

    from cbtool.models.checkpoint import has_cb_scales
    from cbtool.errors import CbtoolError

    def scaled(name: str) -> bool:
        path = Path(name).expanduser()
        if path.suffix != ".safetensors" or not path.is_file():
            return False
        try:
            return has_cb_scales(path)
        except CbtoolError:
            return True  # unreadable: loading the model says why, in its own words
    if not any(scaled(name) for name in models):
        raise CbtoolError("--plot draws per-layer density (add --density), error against severity (add "
                          "--corruptions) or learned cbs scales, and no model here has cbs scales")
