"""The training loop: ``finetune`` sets a run up, then takes optimizer steps, validates and saves as it goes.

One optimizer step is ``grad_accum`` micro-batches of ``batch_size`` images per process. Under torchrun
the data is sharded by rank, DDP averages the gradients, and only rank 0 prints and writes.
"""

from __future__ import annotations

import math
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from cbtool import distributed
from cbtool.models.checkpoint import save, unwrap
from cbtool.errors import TrainingError
from cbtool.memory import is_out_of_memory
from cbtool.optim import ramp_factor
from cbtool.surgery import set_ramp
from cbtool.train.config import FinetuneConfig, FinetuneResult, Interrupted, State
from cbtool.train.consistency import refuse_finished
from cbtool.train.console import Progress, eval_line, progress, start_note, unreached_note
from cbtool.train.prepare import Plan, optimizer_for, output_paths, place, plan_run, wrap
from cbtool.train.record import metrics_only, training_record
from cbtool.train.resume import find_checkpoint
from cbtool.train.run import Run, deferred_sigint


class _Stop(Exception):
    """Ctrl-C was pressed; raised at a step boundary, on every rank together."""


def finetune(model: nn.Module, train, val=None, config: FinetuneConfig | None = None) -> FinetuneResult:
    """Fine-tune ``model`` on ``train`` and validate on ``val`` after each epoch, as ``config`` says.

    ``train``/``val`` are ``ResolvedDataset``s (transforms built here from the model's data config) or the
    torch datasets their ``with_transform`` returns. Under torchrun this joins the process group. Writes
    ``config.output`` (and ``config.save_best``) as cbtool files on rank 0; resumes from ``config.resume``.
    """
    config = config or FinetuneConfig()
    info, device = distributed.setup(config.device)
    checkpoint = find_checkpoint(config.resume) if config.resume else None
    output, best_path = output_paths(model, config, info, resuming=checkpoint is not None)
    plan = plan_run(model, train, val, config, info, device)
    run = Run(config, info, checkpoint)
    if run.shares_cb_lr():
        plan.cb_lr = None
    place(model, config, device)
    run.load_weights(model)
    plan.leave_out_unreached(model, run.unreached())
    optimizer, scaler, amp_dtype = optimizer_for(model, config, device, plan)
    state = run.restore(optimizer, scaler)
    if run.saved is not None:
        refuse_finished(run.dir, state.step, plan.schedule.total, output)
    t = _Training(model, wrap(model, config, info, device), optimizer, scaler, amp_dtype, config, device,
                  info, run, plan, state, best_path, plan.settings(config, info, device), plan.data())  # fmt: skip
    t.loader, t.val_loader = plan.loaders(config, info, state)
    run.seed()
    t.apply_ramp()
    run.log.write("resume" if run.saved else "start", step=state.step, config=config.to_dict(), **t.settings, data=t.data)
    if info.is_main and not config.quiet:
        print(start_note(state, plan.schedule.total, plan.steps_per_epoch, plan.schedule.peak, plan.trainable,
                         info, device, run.dir, config, t.data, plan.cb_lr), file=sys.stderr)  # fmt: skip
        if plan.unreached:
            print(unreached_note(plan.unreached, [name for name, _ in model.named_parameters()]), file=sys.stderr)
    try:
        last = _loop(t)
    finally:
        set_ramp(model, None)  # the model handed back (or left by an error) has the full CB weight
    if last is None and t.val_loader is not None:  # a finished run killed before its model was saved
        last = {"step": state.step, **_validate(model, t.val_loader, device, config)}  # measured, not logged as an eval
    summary = training_record(config, t.settings, t.data, state, last)
    if output is not None and info.is_main:
        save(model, output, force=config.force, training=summary)
    run.log.write("end", step=state.step, final=metrics_only(last), best_top1=state.best_top1,
                  best_step=state.best_step, output=str(output) if output else None)  # fmt: skip
    distributed.barrier()
    best = {"top1": state.best_top1, "step": state.best_step} if state.best_top1 is not None else None
    return FinetuneResult(unwrap(model).eval(), state.step, state.step / plan.steps_per_epoch, metrics_only(last),
                          best, run.dir, summary, t.history, output if info.is_main else None)  # fmt: skip


@dataclass
class _Training:
    """One run in progress: what the steps use and what they change."""

    model: nn.Module
    runner: nn.Module
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler | None
    amp_dtype: torch.dtype | None
    config: FinetuneConfig
    device: torch.device
    info: distributed.DistInfo
    run: Run
    plan: Plan
    state: State
    best_path: Path | None
    settings: dict
    data: dict
    loader: object = None
    val_loader: object = None
    history: list[dict] = field(default_factory=list)
    progress: Progress = field(default_factory=lambda: Progress(None))
    loss_sum: float = 0.0
    loss_count: int = 0

    def apply_ramp(self) -> None:
        """``--cb-ramp``: set the CB weight for the next step; the factor is kept in the state, so in checkpoints."""
        if self.config.cb_ramp:
            self.state.cb_ramp = ramp_factor(self.state.step, self.config.cb_ramp)
            set_ramp(self.model, self.state.cb_ramp)

    def ramp_record(self) -> dict:
        """``{"cb_ramp": factor}`` for the log while a --cb-ramp run uses one (1.0 once it is complete), else empty."""
        if not self.config.cb_ramp:
            return {}
        return {"cb_ramp": 1.0 if self.state.cb_ramp is None else self.state.cb_ramp}

    def save_checkpoint(self) -> Path | None:
        return self.run.save(self.model, self.optimizer, self.scaler, self.state, self.plan.schedule.total,
                             unreached=self.plan.unreached)

    def evaluate(self) -> dict:
        """Validate, log, keep the best model (``--save-best``), print a line; resets the training-loss mean."""
        state, config = self.state, self.config
        metrics = _validate(self.model, self.val_loader, self.device, config)
        self.model.train()
        record = {"step": state.step, "epoch": round(state.step / self.plan.steps_per_epoch, 4),
                  "train_loss": self.loss_sum / max(self.loss_count, 1), **metrics, **self.ramp_record()}  # fmt: skip
        self.history.append(record)
        self.run.log.write("eval", **record)
        full_weight = state.cb_ramp is None  # a saved model has the full CB weight: mid-ramp ones are not candidates
        if full_weight and (state.best_top1 is None or metrics["top1"] > state.best_top1):
            state.best_top1, state.best_step = metrics["top1"], state.step
            if self.best_path is not None and self.info.is_main:
                save(self.model, self.best_path, force=True,
                     training=training_record(config, self.settings, self.data, state, record))  # fmt: skip
        if self.info.is_main and not config.quiet:
            self.progress.write(eval_line(state.step, self.plan.schedule.total, record))
        self.loss_sum, self.loss_count = 0.0, 0
        return record


def _loop(t: _Training) -> dict | None:
    """Steps until the planned total; returns the last validation. Ctrl-C saves at a step boundary and raises."""
    state, config, run, total = t.state, t.config, t.run, t.plan.schedule.total
    images_per_step = config.batch_size * config.grad_accum * t.info.world_size
    t.progress = progress(total, state.step, enabled=t.info.is_main and not config.quiet)
    window, last, just_saved = (time.perf_counter(), state.step), None, False
    params = [p for p in t.model.parameters() if p.requires_grad]
    t.model.train()
    try:
        with deferred_sigint() as stop:
            while state.step < total:
                t.loader.set_epoch(state.epoch)
                batches = iter(t.loader)
                while True:
                    just_saved = False
                    lr = t.plan.schedule(state.step)
                    ramp = t.ramp_record()
                    loss, stopping = _train_step(t.runner, t.plan.family, batches, t.optimizer, t.scaler, params, config,
                                                 t.device, t.amp_dtype, lr, stop, t.info.world_size)  # fmt: skip
                    if stopping:  # Ctrl-C: this step was not taken
                        raise _Stop
                    if not math.isfinite(loss):
                        raise TrainingError(run.nonfinite_message(loss, state.step + 1, lr))
                    state.step, state.pos = state.step + 1, state.pos + 1
                    t.apply_ramp()
                    t.loss_sum, t.loss_count = t.loss_sum + loss, t.loss_count + 1
                    epoch_end = state.pos == t.plan.steps_per_epoch
                    if epoch_end:
                        state.epoch, state.pos = state.epoch + 1, 0
                    t.progress.update(1)
                    if state.step % 5 == 0 or state.step == total:
                        now = time.perf_counter()
                        rate = (state.step - window[1]) * images_per_step / max(now - window[0], 1e-9)
                        window = (now, state.step) if now - window[0] > 10 else window
                        t.progress.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.0f}", refresh=False)
                    if state.step % config.log_every == 0:
                        epoch = round(state.step / t.plan.steps_per_epoch, 4)
                        run.log.write("train", step=state.step, epoch=epoch, loss=loss, lr=lr, **ramp)
                    due_eval = epoch_end or state.step == total or (config.eval_every and state.step % config.eval_every == 0)
                    if t.val_loader is not None and due_eval:
                        last = t.evaluate()
                    if state.step == total or (config.save_every and state.step % config.save_every == 0):
                        t.save_checkpoint()
                        just_saved = True
                    if epoch_end or state.step >= total:
                        break
    except _Stop:
        t.progress.close()
        try:
            path = run.checkpoint if just_saved else t.save_checkpoint()
        except KeyboardInterrupt:  # a second Ctrl-C while saving: atomic writes keep the previous checkpoint whole
            raise Interrupted(state.step, run.dir, None, again=True) from None
        run.log.write("interrupted", step=state.step)
        raise Interrupted(state.step, run.dir, path if t.info.is_main else None) from None
    except KeyboardInterrupt:  # a second Ctrl-C before the first was handled at a step boundary
        raise Interrupted(state.step, run.dir, None, again=True) from None
    except (RuntimeError, MemoryError) as error:  # torch.OutOfMemoryError, or the CPU allocator's RuntimeError
        if not is_out_of_memory(error):
            raise
        raise TrainingError(
            f"out of memory on {t.device} at --batch-size {config.batch_size}: use a smaller --batch-size, and "
            f"--grad-accum to keep the effective batch (e.g. --batch-size {max(config.batch_size // 2, 1)} "
            f"--grad-accum {config.grad_accum * 2}), or --amp"
        ) from None
    except TrainingError as error:
        run.log.write("error", step=state.step, message=str(error))
        raise
    finally:
        t.progress.close()
    return last


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
                logits = family.logits(family.run(unwrap(runner), images, runner))
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
        group["lr"] = lr * group.get("lr_scale", 1.0)
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
