"""``attention_maps``: each attention layer's softmax probabilities, the model's own, as whole tensors."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from cbtool.errors import VizError
from cbtool.families import TokenLayout, detect
from cbtool.families.base import NOT_APPLICABLE

LayerChoice = Sequence[int] | str | None


def choose_layers(layers: LayerChoice, count: int) -> list[int]:
    """Layer indices from ``None`` (all), a sequence, or ``--layers`` text (``0,5,11``, ``-1``, ``2-4``)."""
    from cbtool.errors import SpecError
    from cbtool.spec import CBSpec

    if layers is None:
        return list(range(count))
    try:
        chosen = CBSpec(layers=layers).resolve_layers(count)  # the same syntax and checks as inject --layers
    except SpecError as error:
        raise VizError(str(error).replace("blocks", "attention layers")) from None
    if isinstance(layers, str):
        return list(chosen)
    return [index % count for index in layers]  # the caller's order, checked above


def model_device(model: nn.Module) -> torch.device:
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


@torch.no_grad()
def attention_maps(model: nn.Module, images: torch.Tensor, layers: LayerChoice = None) -> list[torch.Tensor]:
    """The attention probabilities of ``model`` on ``images`` (B, 3, H, W), one tensor per chosen layer.

    Each tensor is (batch, heads, queries, keys), float32, the model's own softmax output read on its explicit
    path: fused attention (timm ``fused_attn``, transformers ``sdpa``) is switched off for the call and restored,
    and so is train mode. Windowed layers (Swin) give (batch * windows, heads, window tokens, window tokens);
    CaiT's class-attention layers have one query. ``layers`` picks layers (default: all), in the order of
    ``cbtool.families`` layouts.
    """
    family = detect(model)
    layouts = family.attention_layouts(model, tuple(images.shape[-2:]))
    chosen = choose_layers(layers, len(layouts))
    unmeasured = [index for index in chosen if layouts[index].kind == NOT_APPLICABLE]
    if unmeasured:  # never hand out a layer's component maps as if they were its attention
        raise VizError(f"{type(model).__name__} attention layer {unmeasured[0]} has no attention map to show: "
                       f"{layouts[unmeasured[0]].reason}")
    wanted = set(chosen)
    found: dict[int, torch.Tensor] = {}

    def keep(index: int, probs: torch.Tensor, allowed: torch.Tensor | None = None, **_: object) -> None:
        if index in wanted:
            found[index] = probs.detach().float().clone()

    training = model.training
    model.eval()
    try:
        pixels = images.to(model_device(model))
        with family.capture_attention(model, keep):
            family.run(model, pixels)
    finally:
        model.train(training)
    missing = [index for index in chosen if index not in found]
    if missing:
        raise VizError(f"{type(model).__name__} reported no attention for layers {missing}")
    return [found[index] for index in chosen]


def layouts_of(model: nn.Module, image_size: tuple[int, int], layers: LayerChoice = None) -> list[TokenLayout]:
    """The token layouts of the layers ``attention_maps`` returns for the same ``layers``."""
    all_layouts = detect(model).attention_layouts(model, image_size)
    return [all_layouts[index] for index in choose_layers(layers, len(all_layouts))]
