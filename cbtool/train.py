"""Fine-tuning: heal a model after CB surgery (or train a new head) with a small, resumable AdamW loop.

One optimizer step is ``grad_accum`` micro-batches of ``batch_size`` images per process. Under torchrun
the data is sharded by rank, DDP averages the gradients, and only rank 0 prints and writes.

A run folder (``run_dir``; the CLI's default is ``runs/<timestamp>`` with ``runs/last`` pointing at the
newest) holds ``checkpoint.pt`` (model, optimizer, scaler, step, data position, every rank's RNG states:
tensors and primitives only, read back with ``torch.load(weights_only=True)``), ``checkpoint.json`` (the
step and settings, readable without torch) and ``log.jsonl``.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import sys
import threading
import time
from contextlib import contextmanager, nullcontext
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from cbtool import distributed
from cbtool.checkpoint import atomic_path, check_output_path, save, unwrap
from cbtool.errors import CbtoolError, OutputError, TrainingError
from cbtool.optim import WarmupCosine, param_groups, parse_train_parts, select_trainable
from cbtool.ranges import check_range

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_INFO_NAME = "checkpoint.json"
LOG_NAME = "log.jsonl"
CHECKPOINT_FORMAT = "cbtool-run-1"
# Healing a pretrained model wants a small step; a randomly initialised one needs a large one.
PRETRAINED_LR = 1e-5
SCRATCH_LR = 1e-3
SMALL_INPUT = 64  # pixels: smaller inputs train without augmentation by default (see FinetuneConfig)


@dataclass
class FinetuneConfig:
    """How to fine-tune. ``None`` means "work it out" (documented per field).

    Length: ``epochs`` or ``steps`` (optimizer steps), not both; neither means 1 epoch.
    ``lr=None``: 1e-3 for randomly initialised weights, 1e-5 for pretrained ones (``default_lr``).
    ``warmup_steps=None``: ``warmup_frac`` of all steps. ``train``: ``all`` or a comma list of
    ``cb``, ``head``, ``norm``. Augmentation is timm's ``create_transform(is_training=True)``
    (RandomResizedCrop from ``scale``..1 of the area, flip, color jitter); ``augment=None`` turns it on for
    inputs of 64 px and more and off below, where a random crop of a few-pixel image changes what it shows
    (off means training on the deterministic eval transform). ``scale=None``: timm's 0.08, or 0.35 for
    inputs under 64 px. ``workers=None``: 0 on CPU, else up to 8 per process.
    """

    epochs: int | None = None
    steps: int | None = None
    batch_size: int = 64
    grad_accum: int = 1
    lr: float | None = None
    min_lr: float = 0.0
    weight_decay: float = 0.05
    warmup_steps: int | None = None
    warmup_frac: float = 0.05
    label_smoothing: float = 0.1
    clip_grad: float | None = 1.0
    betas: tuple[float, float] = (0.9, 0.999)
    train: str = "all"
    seed: int = 0
    workers: int | None = None
    augment: bool | None = None
    scale: float | None = None
    hflip: float = 0.5
    color_jitter: float = 0.4
    auto_augment: str | None = None
    device: str | None = None
    amp: bool = False
    channels_last: bool = False
    compile: bool = False
    run_dir: str | None = None
    save_every: int | None = None
    eval_every: int | None = None
    log: str | None = None
    log_every: int = 50
    output: str | None = None
    save_best: str | None = None
    force: bool = False
    density: bool = False
    quiet: bool = False
    resume: str | None = None
    run_info: dict | None = None  # stored with each checkpoint (the CLI keeps its options here)

    def __post_init__(self) -> None:
        if self.epochs is not None and self.steps is not None:
            raise CbtoolError("give --epochs or --steps, not both")
        positive = {"epochs": self.epochs, "steps": self.steps, "batch_size": self.batch_size,
                    "grad_accum": self.grad_accum, "save_every": self.save_every, "eval_every": self.eval_every,
                    "log_every": self.log_every}  # fmt: skip
        for name, value in positive.items():
            if value is not None and value < 1:
                raise CbtoolError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
        # (value, low, high, low_open, high_open): every float option has its range, and none may be nan or inf.
        ranges = {"lr": (self.lr, 0, None, True, False), "min_lr": (self.min_lr, 0, self.lr, False, False),
                  "weight_decay": (self.weight_decay, 0, None, False, False),
                  "warmup_frac": (self.warmup_frac, 0, 1, False, True), "warmup_steps": (self.warmup_steps, 0, None, False, False),
                  "label_smoothing": (self.label_smoothing, 0, 1, False, True), "clip_grad": (self.clip_grad, 0, None, False, False),
                  "scale": (self.scale, 0, 1, True, False), "hflip": (self.hflip, 0, 1, False, False),
                  "color_jitter": (self.color_jitter, 0, None, False, False), "workers": (self.workers, 0, None, False, False)}  # fmt: skip
        for name, (value, low, high, low_open, high_open) in ranges.items():
            check_range(f"--{name.replace('_', '-')}", value, low, high, low_open=low_open, high_open=high_open)
        for beta in self.betas:
            check_range("betas", beta, 0, 1, high_open=True)
        self.betas = tuple(float(b) for b in self.betas)  # type: ignore[assignment]
        self.train = ",".join(parse_train_parts(self.train))

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "betas": list(self.betas)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "FinetuneConfig":
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass
class FinetuneResult:
    """What ``finetune`` did. ``model`` is the trained, unwrapped model (eval mode, on the training device)."""

    model: nn.Module
    step: int
    epochs: float
    final: dict | None
    best: dict | None
    run_dir: Path
    summary: dict
    history: list[dict] = field(default_factory=list)
    output: Path | None = None


class _Stop(Exception):
    """Ctrl-C was pressed; raised at a step boundary, on every rank together."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run at a step boundary after saving a checkpoint (``checkpoint`` may be None).

    ``again``: a second Ctrl-C stopped it before that checkpoint was saved (an earlier one stays whole).
    """

    def __init__(self, step: int, run_dir: Path, checkpoint: Path | None, *, again: bool = False):
        super().__init__(f"interrupted at step {step}")
        self.step, self.run_dir, self.checkpoint, self.again = step, run_dir, checkpoint, again


# --- the loop -----------------------------------------------------------------------------------


@dataclass
class _State:
    """Everything that changes during training besides the weights and the optimizer."""

    step: int = 0
    epoch: int = 0
    pos: int = 0  # optimizer steps done in ``epoch``
    best_top1: float | None = None
    best_step: int | None = None


def finetune(model: nn.Module, train, val=None, config: FinetuneConfig | None = None) -> FinetuneResult:
    """Fine-tune ``model`` on ``train`` and validate on ``val`` after each epoch, as ``config`` says.

    ``train``/``val`` are ``ResolvedDataset``s (transforms built here from the model's data config) or the
    torch datasets their ``with_transform`` returns. Under torchrun this joins the process group. Writes
    ``config.output`` (and ``config.save_best``) as cbtool files on rank 0; resumes from ``config.resume``.
    """
    config = config or FinetuneConfig()
    info, device = distributed.setup(config.device)
    main = info.is_main
    output = Path(config.output).expanduser() if config.output else None
    best_path = Path(config.save_best).expanduser() if config.save_best else None
    checkpoint = find_checkpoint(config.resume) if config.resume else None
    if main:
        _check_outputs(model, output, best_path, config.force, resuming=checkpoint is not None)

    parts = parse_train_parts(config.train)
    trainable = select_trainable(model, parts)
    family = _family(model)
    data_config, augmentation = _augmentation(model, config)
    train_ds, val_ds = _transformed(train, data_config, augmentation), _transformed(val, data_config)
    workers = _default_workers(device, info.world_size) if config.workers is None else config.workers
    batches_per_epoch = (len(train_ds) // info.world_size) // config.batch_size
    steps_per_epoch = batches_per_epoch // config.grad_accum
    if steps_per_epoch == 0:
        need = config.batch_size * config.grad_accum * info.world_size
        raise CbtoolError(
            f"{len(train_ds)} training images do not fill one step of {need} images "
            f"(batch size x grad accum x processes); lower --batch-size or --grad-accum"
        )
    total = config.steps or (config.epochs or 1) * steps_per_epoch
    lr = config.lr if config.lr is not None else default_lr(model)
    warmup = config.warmup_steps if config.warmup_steps is not None else int(round(config.warmup_frac * total))
    schedule = WarmupCosine(lr, total, min(warmup, total), config.min_lr)

    saved = _load_checkpoint(checkpoint) if checkpoint is not None else None
    run_dir = _run_dir(config, info, checkpoint)
    log = _RunLog(Path(config.log) if config.log else run_dir / LOG_NAME, enabled=main)

    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)
    if saved is not None:
        _check_resumable(saved, config, info)
        unwrap(model).load_state_dict(saved["model"])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay), lr=lr, betas=config.betas,
                                  fused=device.type == "cuda")  # fmt: skip
    amp_dtype = _amp_dtype(device, config.amp, quiet=config.quiet or not main)
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    state = _State()
    if saved is not None:
        optimizer.load_state_dict(saved["optimizer"])
        if scaler is not None and saved["scaler"]:
            scaler.load_state_dict(saved["scaler"])
        state = _State(**saved["state"])

    runner = torch.compile(model) if config.compile else model
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(runner, device_ids=[device.index] if device.type == "cuda" else None)

    from cbtool.data import build_loader

    loader = build_loader(train_ds, batch_size=config.batch_size, workers=workers, shuffle=True, seed=config.seed,
                          rank=info.rank, world_size=info.world_size, drop_last=True, start_epoch=state.epoch,
                          start_batch=state.pos * config.grad_accum)  # fmt: skip
    val_loader = None
    if val_ds is not None:
        val_loader = build_loader(val_ds, batch_size=config.batch_size, workers=workers, rank=info.rank,
                                  world_size=info.world_size)  # fmt: skip

    # Augmentation and dropout differ per rank; the data order (the sampler's own seed) is shared.
    _seed_everything(config.seed + info.rank)
    if saved is not None:
        _set_rng_state(saved["rng"][info.rank])
    describe = {"train": _describe(train_ds), "val": _describe(val_ds)}
    settings = dict(lr=lr, warmup_steps=schedule.warmup, total_steps=total, steps_per_epoch=steps_per_epoch,
                    world_size=info.world_size, global_batch_size=config.batch_size * config.grad_accum * info.world_size,
                    trainable_parameters=trainable, workers=workers, device=str(device),
                    augmentation=augmentation and {**augmentation, "scale": list(augmentation["scale"])})  # fmt: skip
    log.write("resume" if saved else "start", step=state.step, config=config.to_dict(), **settings, data=describe)
    if main and not config.quiet:
        print(_start_note(state, total, steps_per_epoch, lr, trainable, info, device, run_dir, config, describe), file=sys.stderr)

    history: list[dict] = []
    last: dict | None = None
    images_per_step = config.batch_size * config.grad_accum * info.world_size
    progress = _progress(total, state.step, enabled=main and not config.quiet)
    window = (time.perf_counter(), state.step)
    loss_sum, loss_count = 0.0, 0

    def save_checkpoint() -> Path:
        return _save_checkpoint(run_dir, model, optimizer, scaler, state, config, info, schedule)

    def evaluate_now() -> dict:
        metrics = _validate(model, val_loader, device, config)
        model.train()
        record = {"step": state.step, "epoch": round(state.step / steps_per_epoch, 4),
                  "train_loss": loss_sum / max(loss_count, 1), **metrics}  # fmt: skip
        history.append(record)
        log.write("eval", **record)
        if state.best_top1 is None or metrics["top1"] > state.best_top1:
            state.best_top1, state.best_step = metrics["top1"], state.step
            if best_path is not None and main:
                save(model, best_path, force=True, training=_summary(config, settings, describe, state, record))
        if main and not config.quiet:
            density = f", entropy {metrics['entropy_mean']:.3f}" if metrics.get("entropy_mean") is not None else ""
            progress.write(f"step {state.step}/{total}: val top-1 {metrics['top1']:.2f}%, "
                           f"loss {metrics['loss']:.4f}{density}")  # fmt: skip
        return record

    model.train()
    just_saved = False
    try:
        with _deferred_sigint() as stop:
            while state.step < total:
                loader.set_epoch(state.epoch)
                batches = iter(loader)
                while True:
                    just_saved = False
                    step_lr = schedule(state.step)
                    loss, stopping = _train_step(runner, family, batches, optimizer, scaler, params, config,
                                                 device, amp_dtype, step_lr, stop, info.world_size)  # fmt: skip
                    if stopping:  # Ctrl-C: this step was not taken
                        raise _Stop
                    if not math.isfinite(loss):
                        raise TrainingError(_nonfinite_message(loss, state.step + 1, step_lr, run_dir))
                    state.step += 1
                    state.pos += 1
                    loss_sum, loss_count = loss_sum + loss, loss_count + 1
                    epoch_end = state.pos == steps_per_epoch
                    if epoch_end:
                        state.epoch, state.pos = state.epoch + 1, 0
                    progress.update(1)
                    if state.step % 5 == 0 or state.step == total:
                        now = time.perf_counter()
                        rate = (state.step - window[1]) * images_per_step / max(now - window[0], 1e-9)
                        window = (now, state.step) if now - window[0] > 10 else window
                        progress.set_postfix(loss=f"{loss:.4f}", lr=f"{step_lr:.2e}", img_s=f"{rate:.0f}", refresh=False)
                    if state.step % config.log_every == 0:
                        log.write("train", step=state.step, epoch=round(state.step / steps_per_epoch, 4),
                                  loss=loss, lr=step_lr)  # fmt: skip
                    due_eval = epoch_end or state.step == total or (config.eval_every and state.step % config.eval_every == 0)
                    if val_loader is not None and due_eval:
                        last = evaluate_now()
                        loss_sum, loss_count = 0.0, 0
                    if state.step == total or (config.save_every and state.step % config.save_every == 0):
                        save_checkpoint()
                        just_saved = True
                    if epoch_end or state.step >= total:
                        break
    except _Stop:
        progress.close()
        try:
            path = run_dir / CHECKPOINT_NAME if just_saved else save_checkpoint()
        except KeyboardInterrupt:  # a second Ctrl-C while saving: atomic writes keep the previous checkpoint whole
            raise Interrupted(state.step, run_dir, None, again=True) from None
        log.write("interrupted", step=state.step)
        raise Interrupted(state.step, run_dir, path if main else None) from None
    except KeyboardInterrupt:  # a second Ctrl-C before the first was handled at a step boundary
        raise Interrupted(state.step, run_dir, None, again=True) from None
    except torch.OutOfMemoryError:
        raise TrainingError(
            f"out of memory on {device} at --batch-size {config.batch_size}: use a smaller --batch-size, and "
            f"--grad-accum to keep the effective batch (e.g. --batch-size {max(config.batch_size // 2, 1)} "
            f"--grad-accum {config.grad_accum * 2}), or --amp"
        ) from None
    except TrainingError as error:
        log.write("error", step=state.step, message=str(error))
        raise
    finally:
        progress.close()

    if last is None and val_loader is not None:  # resumed a finished run: still report its accuracy
        last = evaluate_now()
    summary = _summary(config, settings, describe, state, last)
    if output is not None and main:
        save(model, output, force=config.force, training=summary)
    log.write("end", step=state.step, final=_metrics_only(last), best_top1=state.best_top1, best_step=state.best_step,
              output=str(output) if output else None)  # fmt: skip
    distributed.barrier()
    best = {"top1": state.best_top1, "step": state.best_step} if state.best_top1 is not None else None
    return FinetuneResult(unwrap(model).eval(), state.step, state.step / steps_per_epoch, _metrics_only(last), best,
                          run_dir, summary, history, output if main else None)  # fmt: skip


def _train_step(runner, family, batches, optimizer, scaler, params, config, device, amp_dtype, lr, stop, world):
    """One optimizer step over ``grad_accum`` micro-batches; returns (mean loss over all ranks, stop requested).

    The loss is checked before the update, so a non-finite loss never reaches the weights.
    """
    optimizer.zero_grad(set_to_none=True)
    total = torch.zeros((), device=device)
    for micro in range(config.grad_accum):
        try:
            images, labels, _ = next(batches)
        except (RuntimeError, StopIteration) as error:
            if stop.is_set():  # Ctrl-C also reaches loader workers; the step has not started updating
                return float("nan"), True
            if isinstance(error, StopIteration):  # only when whole batches were left out as undecodable
                from cbtool.errors import DatasetError

                raise DatasetError("the training images ran out mid-epoch: too many could not be decoded "
                                   "(--skip-bad-images); check the files") from None  # fmt: skip
            raise
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        if config.channels_last:
            images = images.contiguous(memory_format=torch.channels_last)
        syncing = micro == config.grad_accum - 1 or not hasattr(runner, "no_sync")
        with nullcontext() if syncing else runner.no_sync():
            with torch.autocast(device.type, dtype=amp_dtype) if amp_dtype is not None else nullcontext():
                logits = family.logits(runner(images))
            loss = F.cross_entropy(logits.float(), labels, label_smoothing=config.label_smoothing)
            scaled = loss / config.grad_accum
            (scaler.scale(scaled) if scaler is not None else scaled).backward()
        total += loss.detach()
    # One small all-reduce per step: the mean loss and whether any rank was asked to stop.
    flag = torch.tensor(float(stop.is_set()), device=device)
    loss_sum, stops = distributed.all_reduce_sum(torch.stack([total / config.grad_accum, flag])).tolist()
    loss_value, stopping = loss_sum / world, stops > 0
    if stopping or not math.isfinite(loss_value):
        optimizer.zero_grad(set_to_none=True)
        return loss_value, stopping
    if scaler is not None:
        scaler.unscale_(optimizer)
    if config.clip_grad:
        torch.nn.utils.clip_grad_norm_(params, config.clip_grad)
    for group in optimizer.param_groups:
        group["lr"] = lr
    if scaler is not None:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()
    return loss_value, False


def _validate(model, loader, device, config) -> dict:
    from cbtool.evaluation import evaluate

    result = evaluate([unwrap(model)], loader, device=device, amp=config.amp, channels_last=config.channels_last,
                      density=config.density, progress=False)[0]  # fmt: skip
    metrics = {key: result.metrics.get(key) for key in ("top1", "top5", "loss", "num_samples")}
    if result.density is not None:
        metrics["entropy_mean"] = result.density.get("entropy_mean")
        metrics["entropy_per_layer"] = result.density.get("entropy_per_layer")
    return metrics


# --- preparing a model and data (used by the CLI; handy in scripts) -----------------------------


def default_lr(model: nn.Module) -> float:
    """1e-5 for pretrained weights (healing), 1e-3 for randomly initialised ones (training from scratch)."""
    from cbtool.sources import SOURCE_ATTRIBUTE

    from cbtool.fit import has_trained_weights

    record = getattr(unwrap(model), SOURCE_ATTRIBUTE, None)
    return PRETRAINED_LR if (has_trained_weights(unwrap(model)) or not record) else SCRATCH_LR


def fit_head(model: nn.Module, num_classes: int) -> int | None:
    """Give ``model`` a fresh ``num_classes`` head when its head differs; returns the old class count (or None)."""
    from cbtool.families import detect
    from cbtool.sources import set_num_classes

    current = detect(model).num_classes(model)
    if current == num_classes:
        return None
    set_num_classes(model, num_classes)
    return current


def resolve_training_data(
    name: str,
    *,
    split: str | None = None,
    val_split: str | None = None,
    val_fraction: float | None = None,
    seed: int = 0,
    limit: int | None = None,
    val_limit: int | None = None,
    num_model_classes: int | None = None,
    image_column: str | None = None,
    label_column: str | None = None,
    skip_bad_images: bool = False,
) -> tuple[Any, Any, str | None]:
    """(train, validation, note): the train split and its validation split, else ``val_fraction`` (default 0.1)
    of train held out; the test split only when ``val_split`` names it, so that choosing the best
    checkpoint never looks at the test set. The note says which, when it was not asked for."""
    from cbtool.data import resolve_dataset, split_validation
    from cbtool.data.dataset import apply_limit
    from cbtool.data.splits import canonical_split
    from cbtool.errors import DatasetError

    common = dict(image_column=image_column, label_column=label_column, num_model_classes=num_model_classes,
                  skip_bad_images=skip_bad_images)  # fmt: skip
    train = resolve_dataset(name, split, purpose="train", **common)
    if train.streaming:
        raise DatasetError("training needs a dataset with a length; drop --streaming")
    note = None
    others = [s for s in train.available_splits if s != train.split and canonical_split(s) == "validation"]
    if val_split is not None and val_fraction is not None:
        raise CbtoolError("give --val-split or --val-fraction, not both")
    if val_fraction is None and (val_split is not None or others):
        val = resolve_dataset(name, val_split, purpose="eval", **common)
        if val.split == train.split:
            raise CbtoolError(f"--val-split {val.split} is the training split; validate on another split or use --val-fraction")
    else:
        if val_fraction is None:
            val_fraction = 0.1
            note = (f"'{name}' has no validation split: holding out 10% of {train.split or 'it'} for validation "
                    "(--val-fraction; --val-split test would select checkpoints on the test set)")  # fmt: skip
        train, val = split_validation(train, val_fraction, seed)
    if train.class_subset is not None or val.class_subset is not None:
        raise DatasetError(f"'{name}' is a subset of ImageNet's classes; give the model its own head with --num-classes")
    if val.num_classes != train.num_classes:
        raise DatasetError(f"the validation split has {val.num_classes} classes but the training split {train.num_classes}")
    return apply_limit(train, limit), apply_limit(val, val_limit), note


def load_run(path: str | Path) -> tuple[nn.Module, dict]:
    """Rebuild the model of a run folder (offline, random weights until ``finetune`` resumes it) and its info.

    The info is ``checkpoint.json``: ``step``, ``config``, ``run_info`` and the model ``record``.
    """
    from cbtool.sources import DATA_CONFIG_ATTRIBUTE, rebuild
    from cbtool.spec import CBSpec
    from cbtool.surgery import inject

    info = read_run_info(path)
    record = info.get("record") or {}
    if not record.get("source"):
        raise CbtoolError(f"the run in {path} does not say how to rebuild the model (it was trained from a model without a cbtool source)")
    model = rebuild(record["source"])
    if record.get("spec"):
        inject(model, CBSpec.from_dict(record["spec"]))
    if record.get("data_config"):
        setattr(model, DATA_CONFIG_ATTRIBUTE, record["data_config"])
    if record.get("training"):
        model.cbtool_training = record["training"]
    return model, info


def read_run_info(path: str | Path) -> dict:
    """``checkpoint.json`` of a run folder (or ``last`` link, or checkpoint file): step, config, run_info, record."""
    info_path = find_checkpoint(path).with_name(CHECKPOINT_INFO_NAME)
    try:
        return json.loads(info_path.read_text())
    except (OSError, json.JSONDecodeError):
        raise CbtoolError(f"cannot read {info_path}; the run folder is incomplete") from None


# --- checkpoints --------------------------------------------------------------------------------


def find_checkpoint(path: str | Path) -> Path:
    """``checkpoint.pt`` from a run folder, a ``last`` link or pointer file, or the file itself."""
    path = Path(path).expanduser()
    if path.is_file() and path.name == "last":  # a 'last' pointer where symlinks are unavailable
        path = path.parent / path.read_text(errors="replace").strip()
    elif path.is_file() and path.suffix != ".pt":
        raise CbtoolError(f"--resume takes a run folder (e.g. runs/last) or its {CHECKPOINT_NAME}, not {path}; "
                          "to train a saved model further, pass it as MODEL")  # fmt: skip
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise CbtoolError(f"no checkpoint at {path}; --resume takes a run folder holding {CHECKPOINT_NAME} (e.g. runs/last)")
    return path.resolve()


def _save_checkpoint(run_dir: Path, model, optimizer, scaler, state: _State, config: FinetuneConfig, info, schedule) -> Path | None:
    """Every rank hands in its RNG states; rank 0 writes ``checkpoint.pt`` then ``checkpoint.json``, atomically."""
    rng = distributed.all_gather_objects(_rng_state())
    path = run_dir / CHECKPOINT_NAME
    if not info.is_main:
        return None
    from cbtool.sources import DATA_CONFIG_ATTRIBUTE, SOURCE_ATTRIBUTE
    from cbtool.surgery import spec_of

    plain = unwrap(model)
    spec = spec_of(plain)
    record = {"source": getattr(plain, SOURCE_ATTRIBUTE, None), "spec": spec.to_dict() if spec else None,
              "data_config": getattr(plain, DATA_CONFIG_ATTRIBUTE, None),
              "training": getattr(plain, "cbtool_training", None)}  # fmt: skip
    payload = {
        "format": CHECKPOINT_FORMAT,
        "model": plain.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None else {},
        "state": asdict(state),
        "rng": rng,
        "world_size": info.world_size,
        "config": json.dumps(config.to_dict(), sort_keys=True),
        "total_steps": schedule.total,
    }
    with atomic_path(path) as temporary:
        torch.save(payload, temporary)
    summary = {"step": state.step, "epoch": state.epoch, "pos": state.pos, "time": time.time(),
               "world_size": info.world_size, "config": config.to_dict(), "run_info": config.run_info,
               "record": record}  # fmt: skip
    with atomic_path(run_dir / CHECKPOINT_INFO_NAME) as temporary:
        temporary.write_text(json.dumps(summary, indent=2, sort_keys=True, default=str))
    return path


def _load_checkpoint(path: Path) -> dict:
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a truncated or foreign file raises many types
        from cbtool.fit import unreadable_message

        raise CbtoolError(unreadable_message(path, error)) from None
    if not isinstance(saved, dict) or saved.get("format") != CHECKPOINT_FORMAT:
        raise CbtoolError(f"{path} is not a cbtool training checkpoint")
    return saved


def _check_resumable(saved: dict, config: FinetuneConfig, info) -> None:
    before = json.loads(saved["config"])
    changed = [f"--{key.replace('_', '-')} {before.get(key)} -> {getattr(config, key)}"
               for key in ("batch_size", "grad_accum", "seed", "train")
               if before.get(key) != getattr(config, key)]  # fmt: skip
    if saved["world_size"] != info.world_size:
        changed.append(f"processes {saved['world_size']} -> {info.world_size}")
    if changed:
        raise CbtoolError(f"cannot resume with other settings ({'; '.join(changed)}); resume with the ones the run started with")


def _rng_state() -> dict:
    version, values, gauss = random.getstate()
    name, keys, position, has_gauss, cached = np.random.get_state()
    state = {
        "python": {"version": version, "state": torch.tensor(values, dtype=torch.int64), "gauss": gauss},
        "numpy": {"name": name, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(position),
                  "has_gauss": int(has_gauss), "cached": float(cached)},  # fmt: skip
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()  # this rank's device
    return state


def _set_rng_state(state: dict) -> None:
    python = state["python"]
    random.setstate((python["version"], tuple(python["state"].tolist()), python["gauss"]))
    numpy = state["numpy"]
    np.random.set_state((numpy["name"], numpy["keys"].numpy().astype(np.uint32), numpy["pos"], numpy["has_gauss"], numpy["cached"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


# --- small helpers ------------------------------------------------------------------------------


def _check_outputs(model: nn.Module, output: Path | None, best: Path | None, force: bool, *, resuming: bool) -> None:
    from cbtool.sources import SOURCE_ATTRIBUTE

    for path in (output, best):
        if path is not None:
            # A resumed run overwrites the best model its first part wrote.
            check_output_path(path, force=force or (resuming and path is best))
    if output is not None and best is not None and output.resolve() == best.resolve():
        raise OutputError("--save-best and --output name the same file; give the best model its own name")
    if (output or best) and getattr(unwrap(model), SOURCE_ATTRIBUTE, None) is None:
        raise CbtoolError("this model has no cbtool source record, so it cannot be saved; build it with cbtool.sources.resolve() or cbtool.load()")


def _family(model: nn.Module):
    from cbtool.families import detect

    return detect(unwrap(model))


def _augmentation(model: nn.Module, config: FinetuneConfig) -> tuple[dict, dict | None]:
    """The model's data config, and timm's training-transform options (None: train on the eval transform)."""
    from cbtool.sources import DATA_CONFIG_ATTRIBUTE, timm_data_config

    data_config = getattr(unwrap(model), DATA_CONFIG_ATTRIBUTE, None) or timm_data_config(unwrap(model))
    size = min(int(s) for s in data_config["input_size"][1:])
    if not (config.augment if config.augment is not None else size >= SMALL_INPUT):
        return data_config, None
    scale = config.scale if config.scale is not None else (0.08 if size >= SMALL_INPUT else 0.35)
    options = dict(scale=(scale, 1.0), hflip=config.hflip, color_jitter=config.color_jitter, auto_augment=config.auto_augment)
    return data_config, options


def _transformed(data, data_config: dict, train_options: dict | None = None):
    """A torch dataset of ``(tensor, label, index)``: ``data`` itself, or a ``ResolvedDataset`` with the model's transform."""
    if data is None or not hasattr(data, "with_transform"):
        return data
    from cbtool.data import build_transform

    if train_options is None:
        return data.with_transform(build_transform(data_config))
    return data.with_transform(build_transform(data_config, is_training=True, **train_options))


def _describe(data) -> dict | None:
    if data is None:
        return None
    resolved = getattr(data, "resolved", None)
    if resolved is None:
        return {"num_samples": len(data)}
    full = resolved.describe()
    return {key: full.get(key) for key in ("name", "split", "num_samples", "num_classes", "samples_sha256", "holdout") if key in full}


def _default_workers(device: torch.device, world_size: int) -> int:
    if device.type != "cuda":
        return 0  # on CPU the loader's processes compete with the model for the same cores
    return max(1, min(8, (os.cpu_count() or 1) // world_size))


def _amp_dtype(device: torch.device, amp: bool, *, quiet: bool) -> torch.dtype | None:
    if not amp:
        return None
    if device.type in ("cuda", "cpu"):
        return distributed.amp_dtype(device)
    if not quiet:
        print(f"note: --amp is not supported on {device.type}; training in float32", file=sys.stderr)
    return None


def _run_dir(config: FinetuneConfig, info, checkpoint: Path | None) -> Path:
    """The run folder: the resumed run's, ``config.run_dir``, or ``runs/<timestamp>`` (with ``runs/last``)."""
    if checkpoint is not None:
        return checkpoint.parent
    chosen = None
    if info.is_main:
        if config.run_dir:
            chosen = Path(config.run_dir).expanduser()
            if (chosen / CHECKPOINT_NAME).exists() and not config.force:
                raise OutputError(f"{chosen} already holds a run; resume it with --resume {chosen}, or pick another --run-dir (or --force)")
        try:
            if chosen is not None:
                chosen.mkdir(parents=True, exist_ok=True)
            else:
                chosen = _new_run_dir(Path("runs"))
        except OSError as error:
            raise OutputError(f"cannot create the run folder {chosen or 'runs'} ({error.strerror}); pick another with --run-dir") from None
    return Path(distributed.all_gather_objects(str(chosen) if chosen else None)[0])


def _new_run_dir(root: Path) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path, n = root / stamp, 1
    while path.exists():
        n += 1
        path = root / f"{stamp}-{n}"
    path.mkdir()
    last = root / "last"
    try:
        if last.is_symlink() or not last.exists():
            temporary = root / f".last.{os.getpid()}"
            os.symlink(path.name, temporary, target_is_directory=True)
            os.replace(temporary, last)
    except OSError:  # no symlinks (Windows without developer mode): a pointer file instead
        if not last.is_dir():
            last.write_text(path.name)
    return path


class _RunLog:
    """``log.jsonl``: one JSON object per line, appended on rank 0 only."""

    def __init__(self, path: Path, *, enabled: bool):
        self.path, self.enabled = path, enabled
        if enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, event: str, **fields: Any) -> None:
        if not self.enabled:
            return
        with open(self.path, "a") as handle:
            handle.write(json.dumps({"event": event, "time": round(time.time(), 3), **fields}, default=str) + "\n")


class _Progress:
    def __init__(self, bar):
        self.bar = bar

    def update(self, n: int) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def set_postfix(self, **kwargs) -> None:
        if self.bar is not None:
            self.bar.set_postfix(**kwargs)

    def write(self, text: str) -> None:
        if self.bar is not None:
            self.bar.write(text, file=sys.stderr)
        else:
            print(text, file=sys.stderr)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _progress(total: int, initial: int, *, enabled: bool) -> _Progress:
    if not enabled:
        return _Progress(None)
    from tqdm import tqdm

    return _Progress(tqdm(total=total, initial=initial, desc="finetune", unit="step", file=sys.stderr, dynamic_ncols=True))


@contextmanager
def _deferred_sigint() -> Iterator[threading.Event]:
    """The first Ctrl-C only sets the event (the loop stops at the next step boundary); a second one raises."""
    stop = threading.Event()
    if threading.current_thread() is not threading.main_thread():
        yield stop
        return

    def handler(_signum, _frame):
        stop.set()
        signal.signal(signal.SIGINT, previous)  # a second Ctrl-C interrupts at once

    previous = signal.signal(signal.SIGINT, handler)
    try:
        yield stop
    finally:
        signal.signal(signal.SIGINT, previous)


def _nonfinite_message(loss: float, step: int, lr: float, run_dir: Path) -> str:
    checkpoint = run_dir / CHECKPOINT_NAME
    kept = f"the last good checkpoint is {checkpoint}" if checkpoint.exists() else "no checkpoint was saved yet"
    return (f"the training loss became {loss} at step {step} (lr {lr:.3g}); stopped before updating the weights, and "
            f"{kept}; lower --lr, raise --warmup-steps, or drop --amp")  # fmt: skip


def _metrics_only(record: dict | None) -> dict | None:
    if record is None:
        return None
    return {key: record.get(key) for key in ("top1", "top5", "loss", "num_samples", "entropy_mean") if record.get(key) is not None}


def _summary(config: FinetuneConfig, settings: dict, data: dict, state: _State, last: dict | None) -> dict:
    """The ``cbtool_training`` metadata of the saved model."""
    return {
        "dataset": data["train"],
        "val_dataset": data["val"],
        "steps": state.step,
        "epochs": round(state.step / settings["steps_per_epoch"], 4),
        "lr": settings["lr"],
        "min_lr": config.min_lr,
        "warmup_steps": settings["warmup_steps"],
        "weight_decay": config.weight_decay,
        "label_smoothing": config.label_smoothing,
        "clip_grad": config.clip_grad,
        "batch_size": settings["global_batch_size"],
        "grad_accum": config.grad_accum,
        "train": config.train,
        "trainable_parameters": settings["trainable_parameters"],
        "augmentation": settings["augmentation"],
        "seed": config.seed,
        "world_size": settings["world_size"],
        "amp": config.amp,
        "final_top1": last.get("top1") if last else None,
        "final_loss": last.get("loss") if last else None,
        "best_top1": state.best_top1,
        "best_step": state.best_step,
    }


def _validation_text(val: dict | None) -> str:
    if val is None:
        return "no validation"
    holdout = val.get("holdout")
    if holdout:
        return (f"validation on {val['num_samples']} images held out of {holdout.get('from_split') or 'the training data'} "
                f"(--val-fraction {holdout['fraction']:g})")  # fmt: skip
    split = f"split {val['split']}" if val.get("split") else "the validation data"
    return f"validation on {split} ({val['num_samples']} images)"


def _start_note(state, total, steps_per_epoch, lr, trainable, info, device, run_dir, config, data) -> str:
    verb = f"resuming at step {state.step} of" if state.step else "training for"
    processes = f" x {info.world_size} processes" if info.world_size > 1 else ""
    lr_note = "" if config.lr is not None else " (default for these weights; set --lr)"
    return (f"{verb} {total} steps ({total / steps_per_epoch:.3g} epochs of {steps_per_epoch}) on {device}{processes}: "
            f"{trainable:,} parameters ({config.train}), lr {lr:g}{lr_note}, "
            f"batch {config.batch_size}x{config.grad_accum}{processes}; {_validation_text(data['val'])}; "
            f"run folder {run_dir}")  # fmt: skip
