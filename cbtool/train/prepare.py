"""Getting a model and its data ready to train: a new model's seeded head, the parameters that train
(``--train``), the learning rate, augmentation, loaders, the optimizer, AMP, ``torch.compile`` and DDP."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from cbtool import distributed
from cbtool.models.checkpoint import check_output_path, unwrap
from cbtool.errors import CbtoolError, OutputError
from cbtool.optim import (WarmupCosine, freeze, param_groups, parse_train_parts, select_trainable,
                          unreached_parameters)
from cbtool.train.config import CB_LR, PRETRAINED_LR, SCRATCH_LR, SMALL_INPUT, FinetuneConfig, State
from cbtool.train.data import describe


def new_model(name: str, *, seed: int, spec=None, **source_options: Any) -> nn.Module:
    """``sources.resolve(name, **source_options)``, with CB injected as ``spec`` says.

    A new head is drawn from ``seed``: the same head on every rank and every run.
    """
    from cbtool.models.resolve import resolve

    model = resolve(name, seed=seed, **source_options)
    if spec is not None:
        from cbtool.surgery import inject

        inject(model, spec)
    return model


def default_lr(model: nn.Module) -> float:
    """1e-5 for pretrained weights (healing), 1e-3 for randomly initialised ones (training from scratch)."""
    from cbtool.models import provenance
    from cbtool.models.fit import has_trained_weights

    record = provenance.source_of(unwrap(model))
    return PRETRAINED_LR if (has_trained_weights(unwrap(model)) or not record) else SCRATCH_LR


def fit_head(model: nn.Module, num_classes: int) -> int | None:
    """Give ``model`` a fresh ``num_classes`` head when its head differs; returns the old class count (or None)."""
    from cbtool.families import detect
    from cbtool.models.resolve import set_num_classes

    current = detect(model).num_classes(model)
    if current == num_classes:
        return None
    set_num_classes(model, num_classes)
    return current


def check_new_head(train: str) -> None:
    """A head ``fit_head`` just replaced must train: ``train`` (the ``--train`` parts) has to include it."""
    if "all" not in train and "head" not in train:
        raise CbtoolError(f"the model has a new, untrained head; add it to --train (e.g. --train {train},head)")


@dataclass
class Plan:
    """What a run works out before it starts: the datasets with their transforms, its length and its schedule."""

    family: Any
    train_ds: Any
    val_ds: Any
    augmentation: dict | None
    trainable: int
    workers: int
    steps_per_epoch: int
    schedule: WarmupCosine
    cb_lr: float | None = None  # the cbs scales' peak learning rate, when they train in a group of their own
    input_size: tuple[int, ...] = ()
    unreached: tuple[str, ...] = ()  # parameters the logits do not depend on: not trained (leave_out_unreached)

    def leave_out_unreached(self, model: nn.Module, names: list[str] | None = None) -> None:
        """Freeze the parameters the logits do not reach (``names``, or found by ``optim.unreached_parameters``)."""
        if names is None:
            names = unreached_parameters(unwrap(model), self.family, self.input_size)
        self.trainable -= freeze(unwrap(model), names)
        self.unreached = tuple(names)

    def settings(self, config: FinetuneConfig, info, device: torch.device) -> dict:
        """The worked-out settings, for the log and the training record."""
        augmentation = self.augmentation and {**self.augmentation, "scale": list(self.augmentation["scale"])}
        return dict(lr=self.schedule.peak, cb_lr=self.cb_lr, cb_ramp=config.cb_ramp, warmup_steps=self.schedule.warmup, total_steps=self.schedule.total,
                    steps_per_epoch=self.steps_per_epoch, world_size=info.world_size,
                    global_batch_size=config.batch_size * config.grad_accum * info.world_size,
                    trainable_parameters=self.trainable, unreached_parameters=list(self.unreached),
                    workers=self.workers, device=str(device),
                    augmentation=augmentation)  # fmt: skip

    def loaders(self, config: FinetuneConfig, info, state: State):
        """The training loader, positioned at ``state``, and the validation loader (or None)."""
        from cbtool.data import build_loader

        loader = build_loader(self.train_ds, batch_size=config.batch_size, workers=self.workers, shuffle=True,
                              seed=config.seed, rank=info.rank, world_size=info.world_size, drop_last=True,
                              start_epoch=state.epoch, start_batch=state.pos * config.grad_accum)  # fmt: skip
        val_loader = None
        if self.val_ds is not None:
            val_loader = build_loader(self.val_ds, batch_size=config.batch_size, workers=self.workers, rank=info.rank,
                                      world_size=info.world_size)  # fmt: skip
        return loader, val_loader

    def data(self) -> dict:
        return {"train": describe(self.train_ds), "val": describe(self.val_ds)}


def plan_run(model: nn.Module, train, val, config: FinetuneConfig, info, device: torch.device) -> Plan:
    """Choose the trainable parameters and work out the data, length and schedule; refuse a run too small for one step."""
    from cbtool.families import detect

    trainable = select_trainable(model, parse_train_parts(config.train))
    family = detect(unwrap(model))
    data_config, augmentation = _augmentation(model, config)
    train_ds, val_ds = _transformed(train, data_config, augmentation), _transformed(val, data_config)
    workers = _default_workers(device, info.world_size) if config.workers is None else config.workers
    steps_per_epoch = ((len(train_ds) // info.world_size) // config.batch_size) // config.grad_accum
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
    cb_lr = _cb_lr(model, config, lr)
    _check_ramp(model, config, total)
    return Plan(family, train_ds, val_ds, augmentation, trainable, workers, steps_per_epoch, schedule, cb_lr,
                input_size=tuple(data_config["input_size"]))


def _cb_lr(model: nn.Module, config: FinetuneConfig, lr: float) -> float | None:
    """The cbs scales' learning rate: ``--cb-lr``, else the larger of ``CB_LR`` and ``lr``; None when none train."""
    from cbtool.surgery import broadcast_parameters

    if not any(p.requires_grad for p in broadcast_parameters(unwrap(model))):
        if config.cb_lr is not None:
            raise CbtoolError("--cb-lr sets the learning rate of the cbs scales, and no cbs scale trains here "
                              "(inject with --variant cbs, and include cb in --train)")  # fmt: skip
        return None
    return config.cb_lr if config.cb_lr is not None else max(CB_LR, lr)


def _check_ramp(model: nn.Module, config: FinetuneConfig, total: int) -> None:
    from cbtool.surgery import find_broadcasts

    if config.cb_ramp is None:
        return
    if not find_broadcasts(unwrap(model)):
        raise CbtoolError("--cb-ramp raises the Context Broadcasting weight, and this model has none; add --inject")
    if config.cb_ramp >= total:
        raise CbtoolError(f"--cb-ramp {config.cb_ramp} leaves no step of the run ({total} steps) at the full CB weight, "
                          "which the saved model has; use a shorter ramp or a longer run")  # fmt: skip


def place(model: nn.Module, config: FinetuneConfig, device: torch.device) -> None:
    model.to(device)
    if config.channels_last:
        model.to(memory_format=torch.channels_last)


def optimizer_for(model: nn.Module, config: FinetuneConfig, device: torch.device, plan: Plan):
    """(AdamW over the trainable parameters, a GradScaler for float16 AMP or None, the AMP dtype or None)."""
    lr = plan.schedule.peak
    cb_lr_scale = plan.cb_lr / lr if plan.cb_lr is not None else None
    optimizer = torch.optim.AdamW(param_groups(model, config.weight_decay, cb_lr_scale=cb_lr_scale), lr=lr,
                                  betas=config.betas, fused=device.type == "cuda")  # fmt: skip
    amp_dtype = distributed.amp_dtype(device) if config.amp else None  # the policy eval and bench use too
    scaler = torch.amp.GradScaler(device.type) if amp_dtype == torch.float16 else None
    return optimizer, scaler, amp_dtype


def wrap(model: nn.Module, config: FinetuneConfig, info, device: torch.device) -> nn.Module:
    """What the steps call: the model, compiled with ``config.compile``, inside DDP under torchrun."""
    runner = torch.compile(model) if config.compile else model
    if info.enabled:
        from torch.nn.parallel import DistributedDataParallel

        runner = DistributedDataParallel(runner, device_ids=[device.index] if device.type == "cuda" else None)
    return runner


def output_paths(model: nn.Module, config: FinetuneConfig, info, *, resuming: bool) -> tuple[Path | None, Path | None]:
    """``config.output`` and ``config.save_best`` as paths, checked on rank 0 before any work."""
    output = Path(config.output).expanduser() if config.output else None
    best = Path(config.save_best).expanduser() if config.save_best else None
    if info.is_main:
        _check_outputs(model, output, best, config.force, resuming=resuming)
    return output, best


def check_run_outputs(output, *, save_best=None, log=None, run_dir=None, resume=None, inputs=(), dataset=None,
                      force: bool = False) -> None:
    """Before a long download or run: the output files may be written, name no input, and the run folder is writable."""
    from cbtool.files import check_writable_folder
    from cbtool.outputs import check_outputs
    from cbtool.train.resume import find_checkpoint

    check_outputs({"--output": output, "--save-best": save_best, "--log": log}, list(inputs), dataset=dataset)
    if resume is not None:  # before "already exists": a finished run's model is expected to exist
        from cbtool.train.consistency import refuse_finished
        from cbtool.train.resume import read_run_info

        summary = read_run_info(resume)
        refuse_finished(find_checkpoint(resume).parent, summary.get("step", 0), summary.get("total_steps"),
                        Path(output).expanduser() if output else None)  # fmt: skip
    check_output_path(output, force=force)
    if save_best is not None and resume is None:
        check_output_path(save_best, force=force)
    folder = run_dir or (find_checkpoint(resume).parent if resume else "runs")
    check_writable_folder(folder, "run folder", "pick another with --run-dir, or run from a writable folder")
    if log is not None:  # appended to at every step: a full or read-only folder must fail now, not mid-run
        check_writable_folder(Path(log).expanduser().parent, "--log folder", "pick another --log file")


def _check_outputs(model: nn.Module, output: Path | None, best: Path | None, force: bool, *, resuming: bool) -> None:
    from cbtool.models import provenance

    for path in (output, best):
        if path is not None:
            # A resumed run overwrites the best model its first part wrote.
            check_output_path(path, force=force or (resuming and path is best))
    if output is not None and best is not None and output.resolve() == best.resolve():
        raise OutputError("--save-best and --output name the same file; give the best model its own name")
    if (output or best) and provenance.source_of(unwrap(model)) is None:
        raise CbtoolError("this model has no cbtool source record, so it cannot be saved; "
                          "build it with cbtool.models.resolve.resolve() or cbtool.load()")


def _augmentation(model: nn.Module, config: FinetuneConfig) -> tuple[dict, dict | None]:
    """The model's data config, and timm's training-transform options (None: train on the eval transform)."""
    from cbtool.models import provenance
    from cbtool.models.resolve import timm_data_config

    data_config = provenance.data_config_of(unwrap(model)) or timm_data_config(unwrap(model))
    size = min(int(s) for s in data_config["input_size"][1:])
    if not (config.augment if config.augment is not None else size >= SMALL_INPUT):
        return data_config, None
    scale = config.scale if config.scale is not None else (0.08 if size >= SMALL_INPUT else 0.35)
    options = dict(scale=(scale, 1.0), hflip=config.hflip, color_jitter=config.color_jitter, auto_augment=config.auto_augment)
    return data_config, options


def check_augmentation(model: nn.Module, config: FinetuneConfig) -> None:
    """Augmentation options need augmentation: one line when it is off (``--no-augment``, or a small input)."""
    if _augmentation(model, config)[1] is not None:
        return
    given = [flag for flag, value, default in (("--scale", config.scale, None), ("--hflip", config.hflip, 0.5),
                                               ("--color-jitter", config.color_jitter, 0.4),
                                               ("--auto-augment", config.auto_augment, None)) if value != default]
    if given:
        why = "--no-augment" if config.augment is False else f"the default for inputs under {SMALL_INPUT} px"
        raise CbtoolError(f"{given[0]} sets the training augmentation, which is off ({why}); add --augment, "
                          f"or drop {given[0]}")


def _transformed(data, data_config: dict, train_options: dict | None = None):
    """A torch dataset of ``(tensor, label, index)``: ``data`` itself, or a ``ResolvedDataset`` with the model's transform."""
    if data is None or not hasattr(data, "with_transform"):
        return data
    from cbtool.data import build_transform

    if train_options is None:
        return data.with_transform(build_transform(data_config))
    return data.with_transform(build_transform(data_config, is_training=True, **train_options))


def _default_workers(device: torch.device, world_size: int) -> int:
    if device.type != "cuda":
        return 0  # on CPU the loader's processes compete with the model for the same cores
    return max(1, min(8, (os.cpu_count() or 1) // world_size))


