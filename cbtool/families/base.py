"""The small interface every model family implements; nothing outside ``families/`` knows module names."""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import nn

AttentionCallback = Callable[[int, torch.Tensor], None]
"""Called as ``callback(layer_index, probs)`` with probs of shape (batch, heads, queries, keys)."""


@dataclass(frozen=True)
class TokenLayout:
    """How the keys of one attention layer sit in the image, for attention distances.

    prefix: tokens before the patch tokens (class, distillation, register tokens).
    grid: (rows, cols) of patch tokens, or None when it must be inferred from the key count.
    pixels_per_token: the stride of one patch token in input pixels.
    heads: attention heads of the layer.
    """

    prefix: int
    grid: tuple[int, int] | None
    pixels_per_token: float
    heads: int


class Family:
    """One model family: where the blocks are, where each branch ends, how to read attention."""

    name: str = "base"
    description: str = ""

    def matches(self, model: nn.Module) -> bool:
        raise NotImplementedError

    def blocks(self, model: nn.Module) -> list[tuple[str, nn.Module]]:
        """The transformer blocks in forward order, with their qualified names."""
        raise NotImplementedError

    def branch_module(self, block: nn.Module, position: str) -> nn.Module:
        """The module whose output is the end of the branch at ``position`` (``mlp``, ``attn`` or ``block``)."""
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

    def logits(self, output: object) -> torch.Tensor:
        """The classification logits from whatever the model's forward returned."""
        return output  # type: ignore[return-value]

    def attention_layouts(self, model: nn.Module, image_size: tuple[int, int]) -> list[TokenLayout]:
        """One layout per attention layer, in the order ``capture_attention`` reports them."""
        raise NotImplementedError

    @contextmanager
    def capture_attention(self, model: nn.Module, callback: AttentionCallback) -> Iterator[None]:
        """While active, every forward calls ``callback`` with each layer's attention probabilities.

        Fused attention is switched to the explicit path for the measurement and restored afterwards.
        """
        raise NotImplementedError
        yield


def children_named(module: nn.Module, *names: str) -> bool:
    return all(isinstance(getattr(module, name, None), nn.Module) for name in names)


def find_blocks(model: nn.Module, *child_names: str) -> list[tuple[str, nn.Module]]:
    """Outermost modules that have all of ``child_names`` as children, in registration (forward) order."""
    found: list[tuple[str, nn.Module]] = []
    for name, module in model.named_modules():
        if any(name.startswith(parent + ".") for parent, _ in found):
            continue
        if module is not model and children_named(module, *child_names):
            found.append((name, module))
    return found
