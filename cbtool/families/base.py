"""The small interface every model family implements; nothing outside ``families/`` knows module names.

A family adapter declares the exact model classes it supports (``classes``) and what Context
Broadcasting and attention density mean for them (``cb_semantics``, ``density_semantics``). Models are
never accepted by look-alike structure: ``families.detect`` looks the class up in the registry.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator, Optional

import torch
from torch import nn

from cbtool.errors import UnsupportedModelError

AttentionCallback = Callable[..., None]
"""Called as ``callback(layer_index, probs, valid=None)``.

probs: (batch, heads, queries, keys) softmax probabilities, the model's own.
valid: None, or a bool tensor broadcastable to ``probs`` marking the keys each query may attend to
    (shifted-window masks, padding); entropy is then normalised by the count of valid keys.
"""

# What an attention layer's maps are, for density: only token-to-token maps are measured.
GLOBAL, WINDOW, CLASS, NOT_APPLICABLE = "global", "window", "class", "n/a"


@dataclass(frozen=True)
class TokenLayout:
    """How the keys of one attention layer sit in the image, for attention distances.

    prefix: tokens before the patch tokens (class, distillation, register tokens).
    grid: (rows, cols) of patch keys (the window for windowed attention), or None to infer a square.
    pixels_per_token: the stride of one patch token in input pixels.
    heads: attention heads of the layer.
    kind: ``global`` (every token attends to every token of the image), ``window`` (within local
        windows, folded into the batch), ``class`` (class-attention: only the class token queries) or
        ``n/a`` (not token attention; never measured).
    reason: why a layer is ``n/a``.
    """

    prefix: int
    grid: tuple[int, int] | None
    pixels_per_token: float
    heads: int
    kind: str = GLOBAL
    reason: str = ""


@dataclass(frozen=True)
class Branch:
    """Where one branch of a block ends, for the CB hook.

    module: the module whose output is the end of the branch (before layer scale, drop path and the
        residual add; after a post-norm).
    token_dims: the dims of one image's tokens in that output (``(1,)`` for (B, N, C), ``(1, 2)`` for maps).
    tuple_output: the module returns a tuple whose first item is the branch output.
    """

    module: nn.Module
    token_dims: tuple[int, ...] = (1,)
    tuple_output: bool = False
    norm_end: bool = False
    """``module`` is a post-norm ``torch.nn.LayerNorm`` that carries the hook itself (transformers post-norm
    layers, where no other module receives the normalised branch alone; torch.fx does not trace these models)."""


@dataclass(frozen=True)
class Support:
    """One row of the support matrix (``cbtool families``)."""

    family: str
    library: str
    classes: tuple[str, ...]
    cb: str
    density: str


class Family:
    """One model family: where the blocks are, where each branch ends, how to read attention."""

    name: str = "base"
    library: str = ""
    classes: tuple[str, ...] = ()
    """Fully qualified names (``module.Class``) of the model classes this adapter supports."""
    cb_semantics: str = ""
    density_semantics: str = ""

    def support(self) -> Support:
        short = tuple(name.rsplit(".", 1)[-1] for name in self.classes)
        return Support(self.name, self.library, short, self.cb_semantics, self.density_semantics)

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The blocks that CB may rewrite, in forward order, with their qualified names."""
        raise NotImplementedError

    def branch(self, block: nn.Module, position: str) -> Branch:
        """Where the branch at ``position`` (``mlp``, ``attn`` or ``block``) of ``block`` ends."""
        raise NotImplementedError

    def block_dim(self, block: nn.Module) -> int:
        """Channel width of the block's output."""
        raise NotImplementedError

    def num_prefix_tokens(self, model: nn.Module) -> int:
        raise NotImplementedError

    def num_classes(self, model: nn.Module) -> int | None:
        """Classes of the head, or None for a headless backbone."""
        raise NotImplementedError

    def reset_classifier(self, model: nn.Module, num_classes: int) -> None:
        raise NotImplementedError

    def head_modules(self, model: nn.Module) -> list[nn.Module]:
        """The classifier module(s) (``--train head``)."""
        raise NotImplementedError

    def no_weight_decay_names(self, model: nn.Module) -> set[str]:
        """Names of the parameters kept free of weight decay besides 1-d ones (position/class/register embeddings)."""
        return set(model.no_weight_decay()) if callable(getattr(model, "no_weight_decay", None)) else set()

    def input_geometry(self, model: nn.Module) -> tuple[tuple[int, int] | None, tuple[int, int] | None]:
        """``(fixed input size or None, patch size or None)``: None for the size means any multiple of the patch."""
        return None, None

    def head_prefixes(self, model: nn.Module) -> list[str]:
        """State-dict prefixes of the classifier (a checkpoint's head of another class count is left fresh)."""
        return ["head"]

    def logits(self, output: object) -> torch.Tensor:
        """The classification logits from whatever the model's forward returned."""
        return output  # type: ignore[return-value]

    masked_tokens: bool = False
    """Blocks receive an ``attn_mask`` keyword marking padding tokens; CB then averages the valid tokens only."""

    def token_weights(self, attn_mask: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        """(B, N, 1) weights of the valid tokens for a block's ``attn_mask`` (``masked_tokens`` families): 1 for the
        tokens some query may attend to, 0 for padding; None (no mask) means every token counts."""
        valid = valid_tokens(attn_mask)
        return None if valid is None else valid.unsqueeze(-1)

    def block_mask(self, args: tuple, kwargs: dict) -> Optional[torch.Tensor]:
        """The attention mask a block is called with (``masked_tokens`` families), from its call's arguments."""
        mask = kwargs.get("attn_mask")
        return mask if torch.is_tensor(mask) else None

    def model_inputs(self, model: nn.Module, images: torch.Tensor) -> tuple[tuple, dict]:
        """The positional and keyword arguments that feed a batch of (B, C, H, W) ``images`` to ``model``."""
        return (images,), {}

    def input_note(self, model: nn.Module, input_size) -> str | None:
        """What a reader of figures measured at ``input_size`` (C, H, W) should know about how the images reached
        the model, where that differs from the model's own preprocessing; None when nothing."""
        return None

    def entry(self, model: nn.Module) -> nn.Module:
        """The module that takes ``model_inputs``: the model itself, or the vision tower of a vision-text model."""
        return model

    def run(self, model: nn.Module, images: torch.Tensor, runner: Optional[Callable] = None) -> object:
        """``model``'s output for (B, C, H, W) ``images``, called through ``runner`` where given (the compiled or DDP
        wrapper a classifier runs in: eval and finetune, where ``entry(model)`` is ``model``); every place cbtool runs
        a model goes through here (bench: ``entry`` and ``model_inputs``, so that the inputs are made once, outside
        the timed forwards)."""
        args, kwargs = self.model_inputs(model, images)
        return (self.entry(model) if runner is None else runner)(*args, **kwargs)

    def attention_layouts(self, model: nn.Module, image_size: tuple[int, int]) -> list[TokenLayout]:
        """One layout per attention layer, in the order ``capture_attention`` reports them."""
        raise NotImplementedError

    @contextmanager
    def capture_attention(self, model: nn.Module, callback: AttentionCallback,
                          query_chunks: bool = False) -> Iterator[None]:
        """While active, every forward calls ``callback`` with each layer's attention probabilities.

        Fused attention is switched to the explicit path for the measurement and restored afterwards. With
        ``query_chunks`` a family may instead compute the attention itself in pieces of images and query rows,
        calling ``callback(layer, probs, allowed, query_offset=first_row)`` per piece, or
        ``callback.add_softmax(layer, scores, probs, query_offset=first_row)`` for unmasked pieces where the
        callback has it (it may overwrite ``scores``).
        """
        raise NotImplementedError
        yield


def map_pieces(batch: int, heads: int, queries: int, keys: int, elements: int) -> list[tuple[slice, slice]]:
    """(images, queries) slices that cut (batch, heads, queries, keys) maps into pieces of about ``elements``.

    Whole images while one fits, several at a time; otherwise one image and as many query rows as fit. Rows
    of one image rather than a few rows of every image: a q·kᵀ of a few rows runs far below the speed of the
    matrix unit (ViT-S at 512 px: 10 rows of 16 images take 2.7x the time of 170 rows of one).
    """
    per_image = max(1, heads * queries * keys)
    if per_image <= elements:
        step = max(1, elements // per_image)
        return [(slice(b, b + step), slice(0, queries)) for b in range(0, batch, step)]
    rows = max(1, elements // max(1, heads * keys))
    return [(slice(b, b + 1), slice(q, q + rows)) for b in range(batch) for q in range(0, queries, rows)]


def class_name(model: nn.Module) -> str:
    """The fully qualified class name the registry is keyed by."""
    cls = type(model)
    return f"{cls.__module__}.{cls.__qualname__}"


def checked_blocks(
    owner: str, blocks: list[tuple[str, nn.Module]], allowed: dict[str, str]
) -> list[tuple[str, nn.Module]]:
    """``blocks`` if every block's class is in ``allowed`` (qualified name -> kind); refuse the model otherwise."""
    if not blocks:
        raise UnsupportedModelError(f"{owner} has no transformer blocks")
    for name, block in blocks:
        if class_name(block) not in allowed:
            short = ", ".join(sorted({n.rsplit(".", 1)[-1] for n in allowed}))
            raise UnsupportedModelError(
                f"{owner} block {name} is a {type(block).__name__}, whose branches cbtool cannot place CB in "
                f"(supported blocks: {short}); see `cbtool families`"
            )
    return blocks


def allowed_from_mask(mask: torch.Tensor | None) -> torch.Tensor | None:
    """Which (query, key) pairs an attention mask allows: True where a boolean mask is True or an additive one is 0."""
    if mask is None:
        return None
    return mask if mask.dtype == torch.bool else mask == 0


def allowed_pairs(mask: torch.Tensor | None) -> torch.Tensor | None:
    """``allowed_from_mask`` as (B, heads or 1, queries or 1, keys) booleans, from masks of (B, N) to 4 dims."""
    allowed = allowed_from_mask(mask)
    while allowed is not None and allowed.ndim < 4:
        allowed = allowed.unsqueeze(1)
    return allowed


def valid_tokens(mask: torch.Tensor | None) -> torch.Tensor | None:
    """(B, N) booleans for an attention mask (boolean or additive; (B, N) to (B, heads, N, N)): the tokens some
    query of the image may attend to, the rest being padding; None without a mask."""
    allowed = allowed_pairs(mask)
    return None if allowed is None else allowed.any(dim=-2).any(dim=1)


def window_allowed(mask: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
    """A (windows, N, N) shifted-window mask (0 allowed, -100 masked) as (batch * windows, 1, N, N) booleans."""
    windows = mask.shape[0]
    allowed = (mask == 0).unsqueeze(0).expand(probs.shape[0] // windows, -1, -1, -1)
    return allowed.reshape(-1, 1, *mask.shape[1:])
