"""The evaluation loop: several models on exactly the same batches, metrics reduced across ranks."""

from __future__ import annotations

import time
from contextlib import ExitStack, nullcontext
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import torch
from torch import nn

from cbtool.distributed import all_reduce_sum, amp_dtype, synchronize
from cbtool.families import detect, require_head
from cbtool.metrics import AccuracyAccumulator, DensityAccumulator
from cbtool.memory import memory_guard


@dataclass
class ModelResult:
    """What ``evaluate`` found for one model (layout of ``metrics``/``density``: docs/results-schema.md)."""

    label: str
    metrics: dict
    density: dict | None = None
    extra: dict = field(default_factory=dict)


def autocast_context(device: torch.device, amp: bool):
    """Autocast to ``distributed.amp_dtype(device)`` when ``amp``; otherwise nothing."""
    return torch.autocast(device.type, dtype=amp_dtype(device)) if amp else nullcontext()


def prepare_model(model: nn.Module, device: torch.device, *, channels_last: bool = False, compile: bool = False):
    """Move to ``device`` in eval mode, optionally channels-last and compiled; returns the module to call."""
    model = model.to(device).eval()
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    return torch.compile(model) if compile else model


@torch.inference_mode()
def evaluate(
    models: Sequence[nn.Module],
    loader: Iterable,
    *,
    device: torch.device | str = "cpu",
    num_classes: int | None = None,
    labels: Sequence[str] | None = None,
    amp: bool = False,
    channels_last: bool = False,
    compile: bool = False,
    density: bool = False,
    class_subset: Sequence[int] | None = None,
    progress: bool = True,
    total_batches: int | None = None,
    corruptions: Sequence[str] = (),
    severities: Sequence[int] = (),
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    corruption_seed: int = 0,
    corruption_jpeg_quality: int | None = 85,
) -> list[ModelResult]:
    """Evaluate ``models`` on the batches of ``loader`` (``(images, labels[, indices])``), all on the same batches.

    ``class_subset`` restricts the logits to those classes (ImageNet-A/R style 200-class sets), and labels index
    into the subset. With ``density`` each model's attention probabilities are measured on the fly.

    With ``corruptions`` every batch is also corrupted at each of ``severities`` (``corrupt_normalized`` with the
    loader's ``mean`` and ``std``, keyed by the batch's dataset indices, so the pixels do not depend on the batch
    size or rank) and each model's accuracy per cell lands in ``extra["corruptions"][name][severity]``. The corrupted
    images are re-encoded as JPEG at ``corruption_jpeg_quality`` (ImageNet-C's 85; ``None``: not re-encoded).
    """
    device = torch.device(device)
    families = [detect(model) for model in models]
    labels = list(labels) if labels is not None else [f"model{i}" for i in range(len(models))]
    if num_classes is None:
        num_classes = len(class_subset) if class_subset is not None else require_head(models[0], labels[0])
    runners = [prepare_model(m, device, channels_last=channels_last, compile=compile) for m in models]
    accuracy = [AccuracyAccumulator(num_classes) for _ in models]
    densities: list[DensityAccumulator | None] = [None] * len(models)
    subset = torch.as_tensor(list(class_subset), device=device) if class_subset is not None else None
    model_seconds = [0.0] * len(models)
    cells = [(name, severity) for name in corruptions for severity in severities]
    cell_accuracy = [{cell: AccuracyAccumulator(num_classes) for cell in cells} for _ in models]
    if cells:
        from cbtool.robustness import corrupt_normalized

        if mean is None or std is None:
            raise ValueError("corruptions need the loader's normalisation mean and std")
        if density:
            raise ValueError("density is measured on clean images; evaluate corruptions in a separate run")

    progress_bar = None
    if progress:
        from cbtool.progress import progress_bar as make_bar

        progress_bar = make_bar(total_batches, desc="eval", unit="batch", leave=False)
    with ExitStack() as captures:
        if progress_bar is not None:  # cleared on errors and Ctrl-C too, so messages start on a clean line
            captures.callback(progress_bar.close)
        # An allocator's refusal in a batch (its collation in a worker, a forward) names the option to lower.
        captures.enter_context(memory_guard("--batch-size", getattr(loader, "batch_size", None)))
        started = time.perf_counter()
        for batch in loader:
            images, targets = batch[0], batch[1]
            indices = batch[2] if len(batch) > 2 else None
            images = images.to(device, non_blocking=True)
            targets = targets.to(device, non_blocking=True)
            clean = images
            if channels_last:
                images = images.contiguous(memory_format=torch.channels_last)
            if density and densities[0] is None:
                size = (int(images.shape[-2]), int(images.shape[-1]))
                for i, (model, family) in enumerate(zip(models, families)):
                    densities[i] = DensityAccumulator(family.attention_layouts(model, size))
                    captures.enter_context(family.capture_attention(model, densities[i], query_chunks=True))
            for i, (model, runner, family) in enumerate(zip(models, runners, families)):
                synchronize(device)
                tick = time.perf_counter()
                with autocast_context(device, amp):
                    logits = family.logits(family.run(model, images, runner))
                synchronize(device)
                model_seconds[i] += time.perf_counter() - tick
                if subset is not None:
                    logits = logits.index_select(1, subset)
                accuracy[i].update(logits, targets, indices)
            if cells:
                if indices is None:
                    raise ValueError("corruptions need batches of (images, labels, dataset indices)")
                keys = indices.tolist()  # the dataset index: the same pixels on every rank and batch size
                for cell in cells:
                    corrupted = corrupt_normalized(clean, cell[0], cell[1], keys, mean, std, seed=corruption_seed,
                                                   jpeg_quality=corruption_jpeg_quality)
                    if channels_last:
                        corrupted = corrupted.contiguous(memory_format=torch.channels_last)
                    for i, (model, runner, family) in enumerate(zip(models, runners, families)):
                        with autocast_context(device, amp):
                            logits = family.logits(family.run(model, corrupted, runner))
                        if subset is not None:
                            logits = logits.index_select(1, subset)
                        cell_accuracy[i][cell].update(logits, targets, indices)
            if progress_bar is not None:
                progress_bar.update(1)
        elapsed = time.perf_counter() - started
    if progress_bar is not None:
        progress_bar.close()

    results = []
    for i, label in enumerate(labels):
        metrics = accuracy[i].result()
        # Throughput over all ranks: total images over the mean time per rank (ranks run in parallel).
        seconds = all_reduce_sum(torch.tensor([model_seconds[i], elapsed], dtype=torch.float64))
        world = _world_size()
        mean_model, mean_elapsed = (seconds / world).tolist()
        count = metrics["num_samples"]
        metrics["throughput"] = {
            "model_images_per_s": count / mean_model if mean_model > 0 else None,
            "end_to_end_images_per_s": count / mean_elapsed if mean_elapsed > 0 else None,
        }
        extra = {}
        if cells:
            by_cell = {cell: acc.result() for cell, acc in cell_accuracy[i].items()}
            extra["corruptions"] = {name: {s: by_cell[(name, s)] for s in severities} for name in corruptions}
        results.append(ModelResult(label, metrics, densities[i].result() if densities[i] is not None else None, extra))
    return results


def _world_size() -> int:
    import torch.distributed as dist

    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
