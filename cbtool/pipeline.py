"""The eval pipeline: model names and a dataset in, the results document out (what ``cbtool eval --json`` writes).

``evaluate_dataset`` builds the models, checks that they fit the data and each other, preprocesses exactly
as the models expect, runs ``evaluation.evaluate`` on shared batches (sharded under torchrun) and assembles
the document of ``results.py`` (layout: docs/results-schema.md).
"""

from __future__ import annotations

import sys

from typing import Any, Sequence

from cbtool.models import provenance
from cbtool.errors import CbtoolError, DatasetError


def evaluate_dataset(
    models: Sequence[str],
    dataset: str,
    *,
    split: str | None = None,
    limit: int | None = None,
    density: bool = False,
    streaming: bool = False,
    image_column: str | None = None,
    label_column: str | None = None,
    skip_bad_images: bool = False,
    batch_size: int = 64,
    workers: int = 2,
    img_size: int | None = None,
    crop_pct: float | None = None,
    interpolation: str | None = None,
    pretrained: bool = True,
    checkpoint: str | None = None,
    num_classes: int | None = None,
    model_kwargs: dict[str, Any] | list[str] | None = None,
    device: str | None = None,
    amp: bool = False,
    channels_last: bool = False,
    compile: bool = False,
    progress: bool = True,
    corruptions: Sequence[str] | str | None = None,
    severities: Sequence[int] | str | None = None,
    save_examples: str | None = None,
    jpeg_quality: int | None = 85,
    seed: int | None = None,
) -> dict[str, Any]:
    """Evaluate ``models`` (cbtool files, timm names, HF ids or folders) on ``dataset``, all on the same batches.

    Returns the results document on every rank (metrics are reduced over ranks under torchrun). Options mean
    what the ``cbtool eval`` options of the same names mean. With ``corruptions`` (names, or a string such as
    ``"all"`` or ``"fog,noise"``) each model also gets a ``robustness`` record (cbtool.robustness.record) at
    ``severities`` (default 1-5), the corrupted images re-encoded as JPEG at ``jpeg_quality`` (ImageNet-C's 85;
    ``None``: not), and ``save_examples`` names a folder (created) for one picture per corruption (main rank only).
    ``seed`` draws random weights (``pretrained=False``, a new head) alike on every run: each model is built from it.
    """
    from cbtool import data, distributed, results
    from cbtool.models import resolve as sources
    from cbtool.evaluation import evaluate
    from cbtool.families import detect, require_head
    from cbtool.models.fit import check_input_size

    models = list(models)
    corruptions, severities = check_corruption_options(corruptions, severities, density=density,
                                                       save_examples=save_examples, jpeg_quality=jpeg_quality)
    dist_info, torch_device = distributed.setup(device)
    try:
        loaded = [sources.resolve(name, pretrained=pretrained, checkpoint=checkpoint, num_classes=num_classes,
                                  img_size=img_size, model_kwargs=model_kwargs, seed=seed) for name in models]
        _refuse_fresh_heads(models, loaded, num_classes)
        data_config = shared_data_config(models, loaded)
        heads = [require_head(model, name) for name, model in zip(models, loaded)]
        preprocessing = data.resolve_preprocessing(data_config, crop_pct=crop_pct, interpolation=interpolation)
        for name, model in zip(models, loaded):  # before the dataset is opened (a download, perhaps)
            check_input_size(model, preprocessing["input_size"], name, option="the input size")
            note = detect(model).input_note(model, preprocessing["input_size"])
            if note and progress and dist_info.is_main:
                print(f"note: {name}: {note}", file=sys.stderr)
        if corruptions:
            check_corruptible_size(preprocessing["input_size"])
        ds = data.resolve_dataset(
            dataset, split, purpose="eval", image_column=image_column, label_column=label_column,
            streaming=streaming, limit=limit, num_model_classes=heads[0], skip_bad_images=skip_bad_images,
        )
        for model_classes in heads:
            data.check_num_classes(ds, model_classes)
        if corruptions:
            if save_examples is not None and dist_info.is_main:
                from cbtool.robustness.examples import save_examples as write_examples

                first = next(iter(data.build_loader(ds.with_transform(data.build_transform(preprocessing)),
                                                    batch_size=4, workers=0, rank=0, world_size=1)))
                write_examples(save_examples, first[0], first[2].tolist(), corruptions, preprocessing["mean"],
                               preprocessing["std"], severities=severities, jpeg_quality=jpeg_quality)
        loader = data.build_loader(
            ds.with_transform(data.build_transform(preprocessing)), batch_size=batch_size, workers=workers,
            rank=dist_info.rank, world_size=dist_info.world_size, pin_memory=torch_device.type == "cuda",
        )
        total = None if ds.streaming else data.loader.num_batches(
            len(ds), batch_size, rank=dist_info.rank, world_size=dist_info.world_size)
        found = evaluate(
            loaded, loader, device=torch_device, num_classes=len(ds.class_subset) if ds.class_subset else ds.num_classes,
            labels=models, amp=amp, channels_last=channels_last, compile=compile, density=density,
            class_subset=ds.class_subset, progress=progress and dist_info.is_main, total_batches=total,
            corruptions=corruptions, severities=severities, mean=preprocessing["mean"], std=preprocessing["std"],
            corruption_jpeg_quality=jpeg_quality,
        )
        dataset_record = ds.describe()
        # describe() counts this rank's bad images only; under torchrun both counts need every rank's.
        dataset_record["bad_images"] = distributed.sum_over_ranks(ds.bad_images)
        dataset_record["num_samples"] = found[0].metrics["num_samples"]
        if not dataset_record["num_samples"]:
            raise DatasetError(f"no image of '{dataset}' could be evaluated: all {dataset_record['bad_images']} "
                               "could not be decoded; check the files (e.g. open one with PIL)")  # fmt: skip
        records = [results.model_record(name, model, result) for name, model, result in zip(models, loaded, found)]
        if corruptions:
            from cbtool.robustness.record import add_relative_to_first, robustness_record

            # The source's size tells ImageNet-1k validation (50,000 images) from other sets under --limit.
            identity = {**dataset_record, "source_images": ds.source_size() if ds.holdout is None else None}
            for record, result in zip(records, found):
                record["robustness"] = robustness_record(result.extra["corruptions"], result.metrics["top1"],
                                                         corruptions, severities, dataset=identity,
                                                         jpeg_quality=jpeg_quality)
            add_relative_to_first([record["robustness"] for record in records], models)
        return results.results_document(
            dataset=dataset_record,
            preprocessing={k: list(v) if isinstance(v, tuple) else v for k, v in preprocessing.items()},
            environment=results.environment_record(
                str(torch_device), world_size=dist_info.world_size, batch_size=batch_size, amp=amp,
                channels_last=channels_last, compile=compile,
            ),
            models=records,
            class_names=ds.class_names,
        )
    finally:
        distributed.teardown()


def check_corruption_options(corruptions: Sequence[str] | str | None, severities: Sequence[int] | str | None = None, *,
                             density: bool = False, save_examples: str | None = None,
                             jpeg_quality: int | None = 85) -> tuple[list[str], list[int]]:
    """The corruption names and severities (``None``: 1-5) to evaluate (empty without ``corruptions``); one-line
    errors for the combinations that cannot work, and for corruption options given without corruptions, before
    any model or image is loaded."""
    from cbtool.robustness import SEVERITIES, check_corruption, check_severity, parse_corruptions, parse_severities
    from cbtool.robustness.registry import JPEG_QUALITY, check_jpeg_quality

    if not corruptions:
        given = [flag for flag, used in (("--severities", severities is not None),
                                         ("--save-examples", save_examples is not None),
                                         ("--no-jpeg", jpeg_quality != JPEG_QUALITY)) if used]
        if given:
            verb = "applies" if len(given) == 1 else "apply"
            raise CbtoolError(f"{' and '.join(given)} only {verb} to corrupted images; give --corruptions too "
                              "(e.g. --corruptions all), or leave them out")
        return [], []
    check_jpeg_quality(jpeg_quality)
    names = list(parse_corruptions(corruptions)) if isinstance(corruptions, str) else [
        check_corruption(name) for name in corruptions]
    if severities is None:
        severities = SEVERITIES
    levels = list(parse_severities(severities)) if isinstance(severities, str) else [
        check_severity(level) for level in severities]
    if density:
        raise CbtoolError("--density measures clean images; evaluate --corruptions in a separate run")
    return names, levels


def check_corruptible_size(input_size: Sequence[int]) -> None:
    if min(input_size[-2:]) < 32:
        raise CbtoolError(f"corruptions need inputs of at least 32 x 32 px; these models take "
                          f"{input_size[-2]} x {input_size[-1]} (pass --img-size 32 or more to a model that allows it)")


def shared_data_config(names: Sequence[str], models: Sequence[Any]) -> dict:
    """One preprocessing for all models, since they are evaluated on the same batches."""
    configs = [provenance.data_config_of(model) for model in models]
    if configs[0] is None:
        raise CbtoolError(f"{names[0]} has no data config; pass a timm name, HF model or cbtool file")
    for name, config in zip(names[1:], configs[1:]):
        if config != configs[0]:
            raise CbtoolError(
                f"{names[0]} and {name} preprocess images differently (input size, crop, mean or std); "
                "evaluate them in separate runs"
            )
    return configs[0]


def _refuse_fresh_heads(names: Sequence[str], models: Sequence[Any], num_classes: int | None) -> None:
    """--num-classes must not put an untrained head on trained weights: that measures chance, not the model."""
    for name, model in zip(names, models):
        if provenance.has_fresh_head(model):
            raise CbtoolError(
                f"--num-classes {num_classes} would put a new, untrained head on the trained weights of {name} and "
                f"report chance accuracy; give it a {num_classes}-class head with cbtool finetune (or evaluate it "
                "with the head it was trained with)"
            )
