"""What every timm family shares: heads, prefix tokens, and capturing attention from the explicit path."""

from __future__ import annotations

import math
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.overrides import TorchFunctionMode

from cbtool.errors import UnsupportedModelError
from cbtool.families.base import AttentionCallback, Branch, Family, allowed_from_mask, class_name, map_pieces

# Where a timm block's branches end: pre-norm blocks end at the attention / MLP module (layer scale and
# drop path follow, and both commute with a token mean); post-norm blocks end after norm1 / norm2, so
# CB goes on the drop path modules that receive the normalised branch output.
PRE_NORM, POST_NORM = "pre-norm", "post-norm"

# Embeddings that timm keeps free of weight decay (``no_weight_decay()``), wherever they sit in the model.
_NO_DECAY_LEAVES = {"pos_embed", "cls_token", "dist_token", "reg_token", "mask_token"}


def timm_branch(block: nn.Module, position: str, kind: str, attn_token_dims: tuple[int, ...] = (1,),
                mlp_token_dims: tuple[int, ...] = (1,), block_token_dims: tuple[int, ...] = (1,)) -> Branch:
    """The branch end of a timm block with ``attn``/``mlp`` (pre-norm) or ``drop_path1``/``drop_path2`` (post-norm)."""
    if position == "block":
        return Branch(block, block_token_dims)
    if kind == PRE_NORM:
        # timm's Block: the attention output enters ls1 alone (CB commutes with the layer scale); hooking ls1
        # rather than attn, which is called with keyword arguments, keeps the model scriptable.
        attention_end = block.ls1 if isinstance(getattr(block, "ls1", None), nn.Module) else block.attn
        module = attention_end if position == "attn" else block.mlp
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
    reads_qk: bool = False
    """The layer is timm's plain ``Attention``, whose ``F.scaled_dot_product_attention`` call can be answered in
    pieces of images and query rows, each piece of the maps reduced as it is made."""


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

    def no_weight_decay_names(self, model: nn.Module) -> set[str]:
        # timm's own list names top-level parameters; nested ones (a hybrid's stem) are found by their leaf.
        names = super().no_weight_decay_names(model)
        return names | {name for name, _ in model.named_parameters() if name.rsplit(".", 1)[-1] in _NO_DECAY_LEAVES}

    def input_geometry(self, model: nn.Module) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
        embed = getattr(model, "patch_embed", None) or getattr(model, "embeds", None)
        if embed is None or getattr(embed, "patch_size", None) is None:
            return None, None
        patch = _pair(embed.patch_size)
        flexible = getattr(model, "dynamic_img_size", False) or not getattr(embed, "strict_img_size", True)
        size = getattr(embed, "img_size", None)
        padded = getattr(embed, "dynamic_img_pad", False)  # pads any size up to a multiple of the patch
        return (None if flexible or size is None else _pair(size)), (None if padded else patch)

    def head_prefixes(self, model: nn.Module) -> list[str]:
        head = getattr(model, "pretrained_cfg", {}).get("classifier", "head")
        return list(head) if isinstance(head, (list, tuple)) else [head]

    def block_dim(self, block: nn.Module) -> int:
        norm = getattr(block, "norm1", None)
        shape = getattr(norm, "normalized_shape", None)
        if shape:
            return int(shape[-1])
        fc2 = getattr(getattr(block, "mlp", None), "fc2", None)
        if isinstance(fc2, nn.Linear):
            return fc2.out_features
        raise UnsupportedModelError(f"cannot tell the channel width of block {type(block).__name__}")

    def probes(self, model: nn.Module) -> list[AttentionProbe | None]:
        """One probe per attention layer, in the order of ``attention_layouts``; None for a layer whose layout is
        ``n/a`` (never measured)."""
        raise NotImplementedError

    @contextmanager
    def capture_attention(self, model: nn.Module, callback: AttentionCallback,
                          query_chunks: bool = False) -> Iterator[None]:
        with ExitStack() as stack:
            for index, probe in enumerate(self.probes(model)):
                if probe is None:
                    continue
                if query_chunks and probe.reads_qk:
                    stack.enter_context(_chunked_attention(probe, index, callback))
                else:
                    stack.enter_context(_explicit_attention(probe, index, callback))
            yield


def _pair(value) -> tuple[int, int]:
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


def attn_drop_probe(attention: nn.Module, where: str) -> AttentionProbe:
    """The usual timm attention: softmax -> ``attn_drop`` -> ``@ v``."""
    if not isinstance(getattr(attention, "attn_drop", None), nn.Module):
        raise UnsupportedModelError(
            f"attention module {where} ({type(attention).__name__}) has no attn_drop, so its probabilities "
            "cannot be captured"
        )
    plain = class_name(attention) == "timm.layers.attention.Attention" and getattr(attention, "gate", None) is None
    return AttentionProbe(attention, attention.attn_drop, reads_qk=plain)


def _mask_argument(args: tuple, kwargs: dict, name: str) -> Optional[torch.Tensor]:
    """The attention mask an attention module was called with: keyword ``name``, or its second positional argument."""
    return kwargs.get(name, args[1] if len(args) > 1 and torch.is_tensor(args[1]) else None)


_CPU_CHUNK_ELEMENTS = 1 << 20  # pieces of 4 MB of float32 maps: they stay in the caches
_DEVICE_CHUNK_ELEMENTS = 1 << 26  # on an accelerator, pieces of 256 MB of float32 maps: few launches
_SDPA_ARGUMENTS = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")


class _AnswerAttention(TorchFunctionMode):
    """Answers one call to ``F.scaled_dot_product_attention`` with ``_attend``; every other call passes through."""

    def __init__(self, index: int, callback: AttentionCallback) -> None:
        super().__init__()
        self.index, self.callback, self.answered = index, callback, False

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is not F.scaled_dot_product_attention or self.answered:
            return func(*args, **kwargs)
        self.answered = True  # a layer attends once; anything it calls later runs as it is
        call = {**dict(zip(_SDPA_ARGUMENTS, args)), **kwargs}
        if call.get("dropout_p") or call.get("enable_gqa"):
            raise UnsupportedModelError("attention density is measured in eval mode, without dropout or grouped keys")
        return _attend(call["query"], call["key"], call["value"], call.get("attn_mask"), call.get("is_causal", False),
                       call.get("scale"), self.index, self.callback)


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor], is_causal: bool,
            scale: Optional[float], index: int, callback: AttentionCallback) -> torch.Tensor:
    """``softmax(q kᵀ * scale + mask) @ v`` as timm's explicit path computes it, in pieces of images and query
    rows, each piece of the maps reported as soon as it is made."""
    batch, heads, queries, keys = q.shape[0], q.shape[1], q.shape[2], k.shape[-2]
    dtype = torch.promote_types(q.dtype, v.dtype)  # what the fused kernel would return (autocast: half precision)
    if is_causal:
        mask = torch.ones(queries, keys, dtype=torch.bool, device=q.device).tril()
    with torch.autocast(q.device.type, enabled=False):  # the maps in float32, whatever the model runs in
        q = q.float() * (q.shape[-1] ** -0.5 if scale is None else scale)
        k = k.float().contiguous().transpose(-2, -1)  # q, k and v are strided views of qkv: copied once, not per piece
        v = v.float().contiguous()
        out = q.new_empty(batch, heads, queries, v.shape[-1])
        budget = _CPU_CHUNK_ELEMENTS if q.device.type == "cpu" else _DEVICE_CHUNK_ELEMENTS
        pieces = map_pieces(batch, heads, queries, keys, budget)
        first_images, first_rows = pieces[0] if pieces else (slice(0), slice(0))  # the first piece is the largest
        largest = len(range(batch)[first_images]) * heads * len(range(queries)[first_rows]) * keys
        buffers = q.new_empty(2, largest)  # scores and probabilities, reused: no page faults per piece
        for images, rows in pieces:
            part = q[images, :, rows]
            shape = part.shape[:-1] + (keys,)
            scores = torch.matmul(part, k[images], out=buffers[0, : math.prod(shape)].view(shape))
            allowed = None
            if mask is not None:
                bias = mask[images] if mask.dim() == 4 and mask.shape[0] > 1 else mask
                bias = bias[..., rows, :] if bias.shape[-2] > 1 else bias
                if bias.dtype == torch.bool:
                    scores.masked_fill_(~bias, float("-inf"))
                else:
                    scores.add_(bias)
                allowed = allowed_from_mask(bias)
            probs = torch.softmax(scores, dim=-1, out=buffers[1, : scores.numel()].view(shape))
            out[images, :, rows] = torch.matmul(probs, v[images])
            if allowed is None and hasattr(callback, "add_softmax"):
                callback.add_softmax(index, scores, probs, query_offset=rows.start)  # overwrites the scores
            else:
                callback(index, probs, allowed, query_offset=rows.start)
    return out.to(dtype)


@contextmanager
def _chunked_attention(probe: AttentionProbe, index: int, callback: AttentionCallback) -> Iterator[None]:
    """Compute timm's plain ``Attention`` a few images or query rows at a time, reducing each piece of its maps.

    The layer's call to ``F.scaled_dot_product_attention`` is answered by the explicit computation (timm's own
    unfused path) in cache-sized pieces, so the maps never exist whole (at 512 px a ViT-S layer's maps are
    400 MB per batch of 16) and q·kᵀ is computed once for both the output and the measurement.
    """
    attention = probe.attention
    had_flag, previous = "fused_attn" in attention.__dict__, attention.__dict__.get("fused_attn")
    modes: list[_AnswerAttention] = []

    def arm(_module: nn.Module, _args: tuple) -> None:
        modes.append(_AnswerAttention(index, callback))
        modes[-1].__enter__()

    def disarm(_module: nn.Module, _args: tuple, _output) -> None:
        if modes:
            modes.pop().__exit__(None, None, None)

    attention.fused_attn = True  # a user's explicit path is answered too: the same computation, in pieces
    handles = [
        attention.register_forward_pre_hook(arm),
        attention.register_forward_hook(disarm, always_call=True),
    ]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        while modes:  # a Ctrl-C inside the layer skips always_call hooks: never leave the mode armed
            modes.pop().__exit__(None, None, None)
        if had_flag:
            attention.fused_attn = previous
        else:
            del attention.fused_attn


@contextmanager
def _explicit_attention(probe: AttentionProbe, index: int, callback: AttentionCallback) -> Iterator[None]:
    """Route ``probe.attention`` through its explicit softmax path and report its probabilities."""
    attention = probe.attention
    had_flag = "fused_attn" in attention.__dict__
    previous = attention.__dict__.get("fused_attn")
    mask: list[Optional[torch.Tensor]] = [None]

    def remember_mask(_module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask[0] = _mask_argument(args, kwargs, probe.mask_arg)

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
