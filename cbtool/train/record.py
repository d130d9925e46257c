"""The ``training`` record of a fine-tuned model, saved in its file as ``cbtool_training``."""

from __future__ import annotations

from cbtool.train.config import FinetuneConfig, State


def training_record(config: FinetuneConfig, settings: dict, data: dict, state: State, last: dict | None) -> dict:
    """The ``cbtool_training`` metadata of the saved model: data, recipe, length and accuracy (JSON values).

    ``settings`` holds what the run worked out (lr, warmup, batch, ...), ``data`` the train/val descriptions,
    ``last`` the latest validation.
    """
    return {
        "dataset": data["train"],
        "val_dataset": data["val"],
        "steps": state.step,
        "epochs": round(state.step / settings["steps_per_epoch"], 4),
        "lr": settings["lr"],
        "cb_lr": settings["cb_lr"],
        "cb_ramp": config.cb_ramp,
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


def metrics_only(record: dict | None) -> dict | None:
    if record is None:
        return None
    return {key: record.get(key) for key in ("top1", "top5", "loss", "num_samples", "entropy_mean") if record.get(key) is not None}
