"""What to train and how: parameter selection (``--train``), AdamW groups, and the warmup-cosine schedule."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from cbtool.errors import CbtoolError

TRAIN_PARTS = ("all", "cb", "head", "norm")


def parse_train_parts(text: str) -> tuple[str, ...]:
    """``"cb,head"`` -> ``("cb", "head")``; unknown parts are an error that lists the choices."""
    parts = tuple(dict.fromkeys(p.strip().lower() for p in str(text).split(",") if p.strip()))
    unknown = [p for p in parts if p not in TRAIN_PARTS]
    if not parts or unknown:
        bad = f"unknown part {unknown[0]!r}" if unknown else "nothing chosen"
        raise CbtoolError(f"--train: {bad}; use one or more of {', '.join(TRAIN_PARTS)}, comma-separated (e.g. cb,head)")
    if "all" in parts and len(parts) > 1:
        raise CbtoolError("--train all already trains everything; leave out the other parts")
    return parts


def head_modules(model: nn.Module) -> list[nn.Module]:
    """The classifier module(s), as the model's family adapter names them."""
    from cbtool.families import detect

    return detect(model).head_modules(model)


def is_norm(module: nn.Module) -> bool:
    """LayerNorm, GroupNorm, BatchNorm, RMSNorm and the norm classes timm and transformers derive from them."""
    norms = (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase, getattr(nn, "RMSNorm", nn.LayerNorm))
    return isinstance(module, norms) or type(module).__name__.endswith(("Norm", "Norm2d", "RMSNorm"))


def select_trainable(model: nn.Module, parts: tuple[str, ...] | str) -> int:
    """Set ``requires_grad`` so that only ``parts`` train; returns the number of trainable values.

    Raises ``CbtoolError`` when the selection holds no parameters (``--train cb`` on a ``cb`` model).
    """
    from cbtool.surgery import broadcast_parameters, spec_of

    if isinstance(parts, str):
        parts = parse_train_parts(parts)
    chosen: dict[int, nn.Parameter] = {}
    for part in parts:
        if part == "all":
            found = list(model.parameters())
        elif part == "cb":
            found = broadcast_parameters(model)
            if not found:
                spec = spec_of(model)
                why = ("its CB variant 'cb' has no parameters" if spec is not None
                       else "it has no Context Broadcasting")  # fmt: skip
                raise CbtoolError(
                    f"--train cb selects no parameters: {why}; inject the learned variant with --inject --variant cbs, "
                    "or train other parts (--train all, head, norm)"
                )
        elif part == "head":
            found = [p for head in head_modules(model) for p in head.parameters()]
            if not found:
                raise CbtoolError("--train head selects no parameters: this model has no classifier head")
        else:
            found = [p for module in model.modules() if is_norm(module) for p in module.parameters(recurse=False)]
            if not found:
                raise CbtoolError("--train norm selects no parameters: this model has no norm layers")
        for param in found:
            chosen[id(param)] = param
    for param in model.parameters():
        param.requires_grad_(id(param) in chosen)
    return sum(p.numel() for p in chosen.values())


def unreached_parameters(model: nn.Module, family, input_size) -> list[str]:
    """The names of the trainable parameters the logits do not depend on.

    A classifier may hold modules its logits never use: SigLIP's and SigLIP2's attention-pooling head beside the
    classifier's mean pooling, CLIP's post-norm of the class token, Dinov2's mask token. They get no gradient, so
    AdamW leaves them as they are; under DDP they would stop the second step ("Expected to have finished
    reduction"). One forward and backward of a blank image in eval mode (no normalisation statistics move), on the
    model's device, finds them: they are left without a gradient; every ``.grad`` is put back as it was. A backward
    rather than a walk of the forward graph (or ``autograd.grad``, which reentrant checkpointing refuses), so that
    blocks under activation checkpointing, whose parameters enter the graph only when the backward recomputes them,
    are seen.
    """
    trainable = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    if not trainable:
        return []
    reference = trainable[0][1]
    images = torch.zeros(1, *input_size, device=reference.device, dtype=reference.dtype)
    training = model.training
    kept = [p.grad for _, p in trainable]
    model.eval()
    try:
        for _, param in trainable:
            param.grad = None
        with torch.enable_grad():
            family.logits(family.run(model, images)).float().sum().backward()
        return [name for name, param in trainable if param.grad is None]
    finally:
        model.train(training)
        for (_, param), grad in zip(trainable, kept):
            param.grad = grad


def freeze(model: nn.Module, names) -> int:
    """Stop training the parameters ``names``; returns how many values they hold."""
    chosen = set(names)
    frozen = 0
    for name, param in model.named_parameters():
        if name in chosen:
            param.requires_grad_(False)
            frozen += param.numel()
    return frozen


def param_groups(model: nn.Module, weight_decay: float, *, cb_lr_scale: float | None = None) -> list[dict]:
    """AdamW groups over the trainable parameters, as timm's ``param_groups_weight_decay`` builds them.

    No decay for 1-d parameters (norms, biases, CB scales) and the embeddings the model's family names.
    ``cb_lr_scale``: the trainable CB scales get a group of their own whose ``lr_scale`` multiplies the
    scheduled learning rate (``--cb-lr``); a group without ``lr_scale`` follows the schedule as it is.
    """
    from cbtool.families import detect
    from cbtool.surgery import broadcast_parameters

    skip = detect(model).no_weight_decay_names(model)
    own = {id(p) for p in broadcast_parameters(model) if p.requires_grad} if cb_lr_scale is not None else set()
    decay, no_decay, broadcast = [], [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if id(param) in own:
            broadcast.append(param)
        elif param.ndim <= 1 or name.endswith(".bias") or name in skip:
            no_decay.append(param)
        else:
            decay.append(param)
    groups = []
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    if decay:
        groups.append({"params": decay, "weight_decay": weight_decay})
    if broadcast:
        groups.append({"params": broadcast, "weight_decay": 0.0, "lr_scale": cb_lr_scale})
    return groups


def ramp_factor(step: int, ramp_steps: int | None) -> float | None:
    """``--cb-ramp``: the factor of the CB mixing weight at optimizer step ``step`` (0-based): ``step / ramp_steps``,
    from 0 (the plain model) up; None (the full weight) from step ``ramp_steps`` on, or without a ramp."""
    if not ramp_steps or step >= ramp_steps:
        return None
    return step / ramp_steps


@dataclass(frozen=True)
class WarmupCosine:
    """Linear warmup from 0 to ``peak`` over ``warmup`` steps, then cosine decay to ``floor`` at ``total``.

    A pure function of the step, so resuming needs only the step count.
    """

    peak: float
    total: int
    warmup: int = 0
    floor: float = 0.0

    def __call__(self, step: int) -> float:
        """The learning rate for optimizer step ``step`` (0-based)."""
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        span = max(self.total - self.warmup, 1)
        progress = min((step - self.warmup) / span, 1.0)
        return self.floor + 0.5 * (self.peak - self.floor) * (1.0 + math.cos(math.pi * progress))
