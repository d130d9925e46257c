"""Hugging Face transformers Swin: layers hold (B, H * W, C) sequences and attend within shifted windows."""

from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from cbtool.families.base import WINDOW, Branch, TokenLayout, window_allowed
from cbtool.families.hf_vit import HfViT, _MODELS, _vision_config


class HfSwin(HfViT):
    name = "hf-swin"
    classes = (f"{_MODELS}.swin.modeling_swin.SwinModel", f"{_MODELS}.swin.modeling_swin.SwinForImageClassification",
               f"{_MODELS}.swin.modeling_swin.SwinBackbone")
    cb_semantics = "mean over the whole H x W map of the stage (never per window)"
    density_semantics = (
        "window attention: entropy over each query's valid keys (shifted-window masks excluded), distances on "
        "the window grid in pixels of that stage"
    )
    layer_classes = {f"{_MODELS}.swin.modeling_swin.SwinLayer": ("attention", "mlp")}

    def branch(self, block: nn.Module, position: str) -> Branch:
        # The attention module sees one window; drop_path receives the reassembled (B, H * W, C) branch output.
        if position == "block":
            return Branch(block, (1,), tuple_output=True)
        if position == "attn":
            return Branch(block.drop_path, (1,))
        return Branch(block.mlp, (1,))

    def block_dim(self, block: nn.Module) -> int:
        return int(block.layernorm_before.normalized_shape[-1])

    def num_prefix_tokens(self, model: nn.Module) -> int:
        return 0

    def attention_layouts(self, model: nn.Module, image_size: tuple[int, int]) -> list[TokenLayout]:
        config = _vision_config(model)
        patch = int(config.patch_size)
        rows = image_size[0] // patch
        layouts = []
        for name, block in self.blocks(model):
            stage = int(name.split("layers.")[1].split(".")[0])
            window = min(int(config.window_size), max(rows >> stage, 1))
            heads = self.heads(block)
            layouts.append(TokenLayout(0, (window, window), float(patch * 2**stage), heads, kind=WINDOW))
        return layouts

    def heads(self, block: nn.Module) -> int:
        return int(block.attention.num_attention_heads)

    def mask_to_allowed(self, mask: Optional[torch.Tensor], probs: torch.Tensor) -> Optional[torch.Tensor]:
        return None if mask is None else window_allowed(mask, probs)
