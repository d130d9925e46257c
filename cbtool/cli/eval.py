"""``cbtool eval``: accuracy, loss, attention density and throughput of one or more models on a dataset."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from cbtool.cli import _options as opt


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
    device: opt.Device = None,
    amp: opt.Amp = False,
    channels_last: opt.ChannelsLast = False,
    compile: opt.Compile = False,
    json_out: opt.JsonOut = None,
    plot: opt.Plot = None,
    quiet: opt.Quiet = False,
) -> None:
    """Evaluate MODELS on the same batches: top-1/top-5, loss, throughput and (with --density) attention density."""
    from cbtool.files import check_outputs
    from cbtool.report import check_output_folder

    check_outputs({"--json": json_out, "--plot": plot}, [*models, checkpoint], dataset=dataset)
    for path in (json_out, plot):
        if path is not None:
            check_output_folder(path)

    from cbtool import data, distributed, report, results, sources
    from cbtool.evaluation import evaluate
    from cbtool.families import detect
    from cbtool.fit import check_input_size

    dist_info, torch_device = distributed.setup(device)
    try:
        loaded = [
            sources.resolve(
                name, pretrained=not no_pretrained, checkpoint=checkpoint, num_classes=num_classes,
                img_size=img_size, model_kwargs=model_kwargs,
            )
            for name in models
        ]
        _refuse_fresh_heads(models, loaded, num_classes)
        data_config = _shared_data_config(models, loaded)
        head = detect(loaded[0]).num_classes(loaded[0])
        ds = data.resolve_dataset(
            dataset, split, purpose="eval", image_column=image_column, label_column=label_column,
            streaming=streaming, limit=limit, num_model_classes=head, skip_bad_images=skip_bad_images,
        )
        for name, model in zip(models, loaded):
            model_classes = detect(model).num_classes(model)
            if model_classes is None:
                from cbtool.errors import UnsupportedModelError

                raise UnsupportedModelError(f"{name} has no classification head; give it one with --num-classes at inject, then finetune")
            data.check_num_classes(ds, model_classes)
        preprocessing = data.resolve_preprocessing(data_config, crop_pct=crop_pct, interpolation=interpolation)
        for name, model in zip(models, loaded):  # before the first forward
            check_input_size(model, preprocessing["input_size"], name, option="the input size")
        transform = data.build_transform(preprocessing)
        loader = data.build_loader(
            ds.with_transform(transform), batch_size=batch_size, workers=workers,
            rank=dist_info.rank, world_size=dist_info.world_size, pin_memory=torch_device.type == "cuda",
        )
        total = None if ds.streaming else data.loader.num_batches(len(ds), batch_size, rank=dist_info.rank, world_size=dist_info.world_size)
        found = evaluate(
            loaded, loader, device=torch_device, num_classes=len(ds.class_subset) if ds.class_subset else ds.num_classes,
            labels=models, amp=amp, channels_last=channels_last, compile=compile, density=density,
            class_subset=ds.class_subset, progress=not quiet and dist_info.is_main, total_batches=total,
        )
        dataset_record = ds.describe()
        # describe() counts this rank's bad images only; under torchrun both counts need every rank's.
        dataset_record["bad_images"] = distributed.sum_over_ranks(ds.bad_images)
        dataset_record["num_samples"] = found[0].metrics["num_samples"]
        if not dataset_record["num_samples"]:
            from cbtool.errors import DatasetError

            raise DatasetError(f"no image of '{dataset}' could be evaluated: all {dataset_record['bad_images']} "
                               "could not be decoded; check the files (e.g. open one with PIL)")  # fmt: skip
        if not dist_info.is_main:
            return
        document = results.results_document(
            dataset=dataset_record,
            preprocessing={k: list(v) if isinstance(v, tuple) else v for k, v in preprocessing.items()},
            environment=results.environment_record(
                str(torch_device), world_size=dist_info.world_size, batch_size=batch_size, amp=amp,
                channels_last=channels_last, compile=compile,
            ),
            models=[results.model_record(name, model, result) for name, model, result in zip(models, loaded, found)],
            class_names=ds.class_names,
        )
        _print_summary(document, report, quiet)
        if json_out is not None:
            report.write_json_atomic(json_out, document)
        if plot is not None:
            report.plot_density(document["models"], plot)
    finally:
        distributed.teardown()


def _refuse_fresh_heads(names: list[str], models: list, num_classes: int | None) -> None:
    """--num-classes must not put an untrained head on trained weights: that measures chance, not the model."""
    from cbtool.errors import CbtoolError

    for name, model in zip(names, models):
        if getattr(model, "cbtool_fresh_head", False):
            raise CbtoolError(
                f"--num-classes {num_classes} would put a new, untrained head on the trained weights of {name} and "
                f"report chance accuracy; give it a {num_classes}-class head with cbtool finetune (or evaluate it "
                "with the head it was trained with)"
            )


def _shared_data_config(names: list[str], models: list) -> dict:
    """One preprocessing for all models, since they are evaluated on the same batches."""
    from cbtool.errors import CbtoolError
    from cbtool.sources import DATA_CONFIG_ATTRIBUTE

    configs = [getattr(model, DATA_CONFIG_ATTRIBUTE, None) for model in models]
    if configs[0] is None:
        raise CbtoolError(f"{names[0]} has no data config; pass a timm name, HF model or cbtool file")
    for name, config in zip(names[1:], configs[1:]):
        if config != configs[0]:
            raise CbtoolError(
                f"{names[0]} and {name} preprocess images differently (input size, crop, mean or std); "
                "evaluate them in separate runs"
            )
    return configs[0]


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
