"""What every timm family shares: heads, prefix tokens, and capturing attention from the explicit path."""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from cbtool.errors import UnsupportedModelError
from cbtool.families.base import AttentionCallback, Branch, Family, allowed_from_mask

# Where a timm block's branches end: pre-norm blocks end at the attention / MLP module (layer scale and
# drop path follow, and both commute with a token mean); post-norm blocks end after norm1 / norm2, so
# CB goes on the drop path modules that receive the normalised branch output.
PRE_NORM, POST_NORM = "pre-norm", "post-norm"


def timm_branch(block: nn.Module, position: str, kind: str, attn_token_dims: tuple[int, ...] = (1,),
                mlp_token_dims: tuple[int, ...] = (1,), block_token_dims: tuple[int, ...] = (1,)) -> Branch:
    """The branch end of a timm block with ``attn``/``mlp`` (pre-norm) or ``drop_path1``/``drop_path2`` (post-norm)."""
    if position == "block":
        return Branch(block, block_token_dims)
    if kind == PRE_NORM:
        module = block.attn if position == "attn" else block.mlp
    else:
        module = block.drop_path1 if position == "attn" else block.drop_path2
    return Branch(module, attn_token_dims if position == "attn" else mlp_token_dims)


@dataclass(frozen=True)
class AttentionProbe:
    """Where one timm attention layer's probabilities can be read on its explicit (unfused) path.

    attention: the module with the ``fused_attn`` switch, whose ``mask_arg`` keyword holds the attention mask.
    probs_at: the module whose input is the softmax output (``attn_drop``; ``proj_w`` for talking heads).
    to_probs: turns that input into (batch, heads, queries, keys).
    to_allowed: turns the mask into a bool tensor broadcastable to the probabilities (None: no mask).
    """

    attention: nn.Module
    probs_at: nn.Module
    to_probs: Callable[[torch.Tensor], torch.Tensor] = lambda x: x
    mask_arg: str = "attn_mask"
    to_allowed: Callable[[torch.Tensor, torch.Tensor], Optional[torch.Tensor]] = (
        lambda mask, probs: allowed_from_mask(mask)
    )


class TimmFamily(Family):
    """Shared by the timm adapters; subclasses say where the blocks and attention layers are."""

    library = "timm"

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return int(getattr(model, "num_prefix_tokens", 1 if getattr(model, "cls_token", None) is not None else 0))

    def num_classes(self, model: nn.Module) -> int | None:
        n = getattr(model, "num_classes", None)
        return int(n) if n else None

    def reset_classifier(self, model: nn.Module, num_classes: int) -> None:
        model.reset_classifier(num_classes)

    def head_modules(self, model: nn.Module) -> list[nn.Module]:
        head = model.get_classifier()
        heads = list(head) if isinstance(head, (tuple, list)) else [head]  # distilled models have two
        return [h for h in heads if isinstance(h, nn.Module)]

    def block_dim(self, block: nn.Module) -> int:
        norm = getattr(block, "norm1", None)
        shape = getattr(norm, "normalized_shape", None)
        if shape:
            return int(shape[-1])
        fc2 = getattr(getattr(block, "mlp", None), "fc2", None)
        if isinstance(fc2, nn.Linear):
            return fc2.out_features
        raise UnsupportedModelError(f"cannot tell the channel width of block {type(block).__name__}")

    def probes(self, model: nn.Module) -> list[AttentionProbe]:
        """One probe per attention layer, in the order of ``attention_layouts``."""
        raise NotImplementedError

    @contextmanager
    def capture_attention(self, model: nn.Module, callback: AttentionCallback) -> Iterator[None]:
        with ExitStack() as stack:
            for index, probe in enumerate(self.probes(model)):
                stack.enter_context(_explicit_attention(probe, index, callback))
            yield


def attn_drop_probe(attention: nn.Module, where: str) -> AttentionProbe:
    """The usual timm attention: softmax -> ``attn_drop`` -> ``@ v``."""
    if not isinstance(getattr(attention, "attn_drop", None), nn.Module):
        raise UnsupportedModelError(
            f"attention module {where} ({type(attention).__name__}) has no attn_drop, so its probabilities "
            "cannot be captured"
        )
    return AttentionProbe(attention, attention.attn_drop)


@contextmanager
def _explicit_attention(probe: AttentionProbe, index: int, callback: AttentionCallback) -> Iterator[None]:
    """Route ``probe.attention`` through its explicit softmax path and report its probabilities."""
    attention = probe.attention
    had_flag = "fused_attn" in attention.__dict__
    previous = attention.__dict__.get("fused_attn")
    mask: list[Optional[torch.Tensor]] = [None]

    def remember_mask(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask[0] = kwargs.get(probe.mask_arg, args[1] if len(args) > 1 and torch.is_tensor(args[1]) else None)

    def report(_module: nn.Module, args: tuple) -> None:
        probs = probe.to_probs(args[0])
        allowed = None if mask[0] is None else probe.to_allowed(mask[0], probs)
        callback(index, probs, allowed)

    if hasattr(attention, "fused_attn"):
        attention.fused_attn = False
    handles = [
        attention.register_forward_pre_hook(remember_mask, with_kwargs=True),
        probe.probs_at.register_forward_pre_hook(report),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        if had_flag:
            attention.fused_attn = previous
        elif "fused_attn" in attention.__dict__:
            del attention.fused_attn
