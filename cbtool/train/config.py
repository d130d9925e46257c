"""How to fine-tune: ``FinetuneConfig`` (settings and their validation), what a run returns, and its file names."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

from torch import nn

from cbtool.errors import CbtoolError
from cbtool.optim import parse_train_parts
from cbtool.ranges import check_range, check_seed

CHECKPOINT_NAME = "checkpoint.pt"
CHECKPOINT_INFO_NAME = "checkpoint.json"
LOG_NAME = "log.jsonl"
CHECKPOINT_FORMAT = "cbtool-run-1"
# Healing a pretrained model wants a small step; a randomly initialised one needs a large one.
PRETRAINED_LR = 1e-5
SCRATCH_LR = 1e-3
# The cbs scales' own learning rate (--cb-lr), at least the model's: a few hundred values that must move by
# tenths, where the backbone's weights move by thousandths (measured in README "Healing after surgery").
CB_LR = 1e-2
SMALL_INPUT = 64  # pixels: smaller inputs train without augmentation by default (see FinetuneConfig)


@dataclass
class FinetuneConfig:
    """How to fine-tune. ``None`` means "work it out" (documented per field).

    Length: ``epochs`` or ``steps`` (optimizer steps), not both; neither means 1 epoch.
    ``lr=None``: 1e-3 for randomly initialised weights, 1e-5 for pretrained ones (``default_lr``).
    ``warmup_steps=None``: ``warmup_frac`` of all steps. ``train``: ``all`` or a comma list of
    ``cb``, ``head``, ``norm``. ``cb_lr``: peak learning rate of the ``cbs`` scales, on the same schedule
    (``None``: the larger of ``CB_LR`` and ``lr``). ``cb_ramp``: the CB mixing weight rises linearly from 0
    (the plain model) to its full value over this many first steps.
    Augmentation is timm's ``create_transform(is_training=True)`` (RandomResizedCrop from ``scale``..1 of the
    area, flip, color jitter); ``augment=None`` turns it on for inputs of 64 px and more and off below, where
    a random crop of a few-pixel image changes what it shows (off means training on the deterministic eval
    transform). ``scale=None``: timm's 0.08, or 0.35 for
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
    cb_lr: float | None = None
    cb_ramp: int | None = None

    def __post_init__(self) -> None:
        if self.epochs is not None and self.steps is not None:
            raise CbtoolError("give --epochs or --steps, not both")
        positive = {"epochs": self.epochs, "steps": self.steps, "batch_size": self.batch_size,
                    "grad_accum": self.grad_accum, "cb_ramp": self.cb_ramp, "save_every": self.save_every,
                    "eval_every": self.eval_every, "log_every": self.log_every}  # fmt: skip
        for name, value in positive.items():
            if value is not None and value < 1:
                raise CbtoolError(f"--{name.replace('_', '-')} must be at least 1, not {value}")
        # (value, low, high, low_open, high_open): every float option has its range, and none may be nan or inf.
        ranges = {"lr": (self.lr, 0, None, True, False), "cb_lr": (self.cb_lr, 0, None, True, False),
                  "min_lr": (self.min_lr, 0, self.lr, False, False),
                  "weight_decay": (self.weight_decay, 0, None, False, False),
                  "warmup_frac": (self.warmup_frac, 0, 1, False, True), "warmup_steps": (self.warmup_steps, 0, None, False, False),
                  "label_smoothing": (self.label_smoothing, 0, 1, False, True), "clip_grad": (self.clip_grad, 0, None, False, False),
                  "scale": (self.scale, 0, 1, True, False), "hflip": (self.hflip, 0, 1, False, False),
                  "color_jitter": (self.color_jitter, 0, None, False, False), "workers": (self.workers, 0, None, False, False)}  # fmt: skip
        for name, (value, low, high, low_open, high_open) in ranges.items():
            check_range(f"--{name.replace('_', '-')}", value, low, high, low_open=low_open, high_open=high_open)
        check_seed("--seed", self.seed)
        if self.auto_augment is not None:
            from cbtool.data.transforms import check_auto_augment

            check_auto_augment(self.auto_augment)
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


class Interrupted(KeyboardInterrupt):
    """Ctrl-C stopped the run at a step boundary after saving a checkpoint (``checkpoint`` may be None).

    ``again``: a second Ctrl-C stopped it before that checkpoint was saved (an earlier one stays whole).
    ``is_main``: raised on the process that reports it (rank 0; set by ``train.train_from_options``).
    """

    is_main = True

    def __init__(self, step: int, run_dir: Path, checkpoint: Path | None, *, again: bool = False):
        super().__init__(f"interrupted at step {step}")
        self.step, self.run_dir, self.checkpoint, self.again = step, run_dir, checkpoint, again


@dataclass
class State:
    """Everything that changes during training besides the weights and the optimizer."""

    step: int = 0
    epoch: int = 0
    pos: int = 0  # optimizer steps done in ``epoch``
    best_top1: float | None = None
    best_step: int | None = None
    cb_ramp: float | None = None  # the CB mixing weight's factor at ``step`` while --cb-ramp rises (None: full)
